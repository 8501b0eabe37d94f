//! The orders service: how a team adopts the outbox toolkit from its own crate, with nothing but
//! the toolkit's public API (`pg_outbox`). Two events of an `order` aggregate, appended in the
//! service's own transactions; one read model (`order_book`) applied by the toolkit's SQS sink;
//! the service's migrations in a history table of their own, after the toolkit's.
//!
//! # Layout
//! - the events: [`OrderPlaced`], [`OrderShipped`] (each an [`OutboxEvent`]);
//! - the command side: [`place_order`], [`ship_order`] (state and event in one transaction);
//! - the read model: [`OrderBook`] and [`projections`], what the sink binary (`src/bin/orders-sink.rs`)
//!   applies;
//! - the schema: [`migrate`], the toolkit's migrations then `migrations/`.

use pg_outbox::prelude::*;
use pg_outbox::sink::DeliveryError;
use serde::{Deserialize, Serialize};

/// The inbox consumer the sink applies the orders' read model as.
pub const CONSUMER: &str = "orders";
/// The service's name in its events' metadata (`source`).
pub const SOURCE: &str = "orders";

// ---- the events ---------------------------------------------------------------------------

/// `order.placed`, schema 1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderPlaced {
    /// The tenant (not part of the payload: the envelope carries it).
    #[serde(skip)]
    pub tenant: String,
    /// The order.
    pub order_id: String,
    /// What it costs, in minor units.
    pub total_minor: i64,
}

impl OutboxEvent for OrderPlaced {
    const EVENT_TYPE: &'static str = "order.placed";
    const SCHEMA_VERSION: i32 = 1;
    const AGGREGATE_TYPE: &'static str = "order";
    fn tenant_id(&self) -> &str {
        &self.tenant
    }
    fn aggregate_id(&self) -> &str {
        &self.order_id
    }
    /// An order is placed once: a second append of the same order is refused.
    fn idempotency_key(&self) -> Option<&str> {
        Some(&self.order_id)
    }
}

/// `order.shipped`, schema 1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderShipped {
    /// The tenant.
    #[serde(skip)]
    pub tenant: String,
    /// The order.
    pub order_id: String,
    /// Who carries it.
    pub carrier: String,
}

impl OutboxEvent for OrderShipped {
    const EVENT_TYPE: &'static str = "order.shipped";
    const SCHEMA_VERSION: i32 = 1;
    const AGGREGATE_TYPE: &'static str = "order";
    fn tenant_id(&self) -> &str {
        &self.tenant
    }
    fn aggregate_id(&self) -> &str {
        &self.order_id
    }
}

// ---- the command side ---------------------------------------------------------------------

/// Places an order in the caller's transaction: the service's own writes and the event commit
/// together, or neither does.
pub async fn place_order(
    tx: &tokio_postgres::Transaction<'_>,
    order: &OrderPlaced,
    request_id: &str,
) -> Result<Appended, AppendError> {
    append(tx, order, &EventMetadata::new(SOURCE, request_id)).await
}

/// Ships an order, in the caller's transaction.
pub async fn ship_order(
    tx: &tokio_postgres::Transaction<'_>,
    shipped: &OrderShipped,
    request_id: &str,
) -> Result<Appended, AppendError> {
    append(tx, shipped, &EventMetadata::new(SOURCE, request_id)).await
}

// ---- the read model -----------------------------------------------------------------------

/// One row per order in `order_book`.
#[derive(Debug, Clone, Copy, Default)]
pub struct OrderBook;

/// The service's read models: what its sink applies. A new projection is one more `.with(...)`.
pub fn projections() -> Projections {
    Projections::new().with(OrderBook)
}

impl Projection for OrderBook {
    fn name(&self) -> &str {
        "order_book"
    }

    fn aggregate_type(&self) -> &str {
        OrderPlaced::AGGREGATE_TYPE
    }

    fn handles(&self, event_type: &str) -> bool {
        event_type == OrderPlaced::EVENT_TYPE || event_type == OrderShipped::EVENT_TYPE
    }

    fn starts_aggregate(&self, event: &EventEnvelope) -> bool {
        event.event_type == OrderPlaced::EVENT_TYPE
    }

    fn check(&self, event: &EventEnvelope) -> Result<(), DeliveryError> {
        if event.event_type == OrderPlaced::EVENT_TYPE {
            event.decode::<OrderPlaced>().map(drop)
        } else {
            event.decode::<OrderShipped>().map(drop)
        }
    }

    fn apply<'a>(
        &'a self,
        tx: &'a tokio_postgres::Transaction<'_>,
        events: &'a [&'a EventEnvelope],
    ) -> BoxFuture<'a, Result<(), ProjectionError>> {
        Box::pin(async move {
            for event in events {
                if event.event_type == OrderPlaced::EVENT_TYPE {
                    let placed: OrderPlaced = event.decode()?;
                    tx.execute(
                        "INSERT INTO order_book (tenant_id, order_id, total_minor, status, version)
                         VALUES ($1, $2, $3, 'placed', $4)",
                        &[
                            &event.tenantid,
                            &placed.order_id,
                            &placed.total_minor,
                            &event.aggregateversion,
                        ],
                    )
                    .await?;
                } else {
                    let shipped: OrderShipped = event.decode()?;
                    tx.execute(
                        "UPDATE order_book SET status = 'shipped', carrier = $3, version = $4, updated_at = now()
                         WHERE tenant_id = $1 AND order_id = $2",
                        &[&event.tenantid, &shipped.order_id, &shipped.carrier, &event.aggregateversion],
                    )
                    .await?;
                }
            }
            Ok(())
        })
    }
}

// ---- the schema ---------------------------------------------------------------------------

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// The orders service's migrations, recorded in `orders_schema_history`.
pub const MIGRATIONS: pg_outbox::postgres::migrate::MigrationSet =
    pg_outbox::postgres::migrate::MigrationSet {
        folder: "orders",
        history_table: "orders_schema_history",
        runner: embedded::migrations::runner,
        before_split: &[],
    };

/// The toolkit's migrations, then the service's; returns the names applied.
pub async fn migrate(
    client: &mut tokio_postgres::Client,
) -> Result<Vec<String>, pg_outbox::postgres::migrate::refinery::Error> {
    let mut applied = pg_outbox::postgres::migrate::run_outbox_migrations(client).await?;
    applied.extend(pg_outbox::postgres::migrate::run_set(client, &MIGRATIONS).await?);
    Ok(applied)
}
