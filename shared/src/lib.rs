//! `pg-outbox`: a transactional outbox on PostgreSQL for AWS Lambda. A service appends its events
//! in the transaction that changes its state; a scheduled dispatcher publishes them to SNS,
//! EventBridge or NATS JetStream in per-aggregate order, with retries, backoff and dead letters;
//! a sink applies them to read models through an inbox, once in effect. It knows no domain: its
//! first user, beside it in this repository, uses only what is public here.
//!
//! ```no_run
//! use pg_outbox::prelude::*;
//! # async fn demo(client: &mut tokio_postgres::Client) -> Result<(), Box<dyn std::error::Error>> {
//! # #[derive(serde::Serialize)] struct OrderPlaced { tenant: String, order_id: String }
//! # impl OutboxEvent for OrderPlaced {
//! #     const EVENT_TYPE: &'static str = "order.placed";
//! #     const SCHEMA_VERSION: i32 = 1;
//! #     const AGGREGATE_TYPE: &'static str = "order";
//! #     fn tenant_id(&self) -> &str { &self.tenant }
//! #     fn aggregate_id(&self) -> &str { &self.order_id }
//! # }
//! let tx = client.transaction().await?;
//! // ... the service's own writes in `tx` ...
//! let placed = OrderPlaced { tenant: "acme".into(), order_id: "o-1".into() };
//! append(&tx, &placed, &EventMetadata::new("orders", "request-1")).await?;
//! tx.commit().await?;
//! # Ok(()) }
//! ```
//!
//! # Layout
//! - [`producer`]: [`OutboxEvent`](producer::OutboxEvent) and [`append`](producer::append), a
//!   service's typed events in its own transaction.
//! - [`outbox`]: the event as stored and claimed, its metadata, the backlog.
//! - [`dispatcher`]: the claim → publish → record loop, in named parts.
//! - [`consumer`]: [`Projection`](consumer::Projection) and [`Projections`](consumer::Projections),
//!   the read models a sink applies through the inbox.
//! - [`sink`]: reading delivered messages back into envelopes; [`sqs`]: the SQS sink a service's
//!   Lambda runs.
//! - [`feed`]: the events feed clients pull, with per-consumer acknowledgments.
//! - [`envelope`]: the message format every bus carries (CloudEvents 1.0).
//! - [`ports`]: the narrow traits the dispatcher, the sink and the feed ask for.
//! - [`postgres`]: connection handling, migrations, and the SQL behind the ports: claim and
//!   record, the inbox, the feed, capture, and the operator's jobs (`postgres::admin`).
//! - [`aws`], [`nats`]: the SNS / EventBridge and JetStream publishers, the secret.
//! - [`memory`]: the outbox store and the bus in memory, for unit tests.
//! - [`ids`]: validated identifiers (tenants, idempotency keys, and [`slug_id!`] for your own).
//! - [`metrics`], [`failure`], [`config`], [`telemetry`]: CloudWatch metrics (EMF), the classes
//!   of function failures, settings read at cold start, logs.

pub mod aws;
pub mod claim_check;
pub mod config;
pub mod consumer;
pub mod contract;
pub mod dispatcher;
pub mod envelope;
pub mod failure;
pub mod feed;
pub mod ids;
pub mod memory;
pub mod metrics;
pub mod nats;
pub mod outbox;
pub mod ports;
pub mod postgres;
pub mod producer;
pub mod sink;
pub mod sqs;
pub mod telemetry;

/// The boxed future a [`Projection`](consumer::Projection) returns, so a projection needs no
/// `futures` dependency of its own.
pub use futures_util::future::BoxFuture;
/// The driver in the public signatures ([`producer::append`], [`consumer::Projection::apply`]):
/// use this one, so the versions always match.
pub use tokio_postgres;

/// What a service's crate imports to append events and keep projections.
pub mod prelude {
    pub use crate::consumer::{Projection, ProjectionError, Projections};
    pub use crate::envelope::EventEnvelope;
    pub use crate::outbox::EventMetadata;
    pub use crate::producer::{append, AppendError, Appended, OutboxEvent};
    pub use crate::tokio_postgres;
    pub use crate::BoxFuture;
}
