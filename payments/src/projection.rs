//! The payment read models as one [`Projection`]: per-payment status (`payment_projection`) and
//! per-tenant daily revenue by currency (`tenant_daily_revenue`). The rules are in
//! `project_payment_events` (`migrations/payments/V3__inbox_projection.sql`): one call per batch, the revenue added in key order;
//! the inbox decided already what is applied.

use pg_outbox::consumer::{Projection, ProjectionError, Projections};
use pg_outbox::envelope::EventEnvelope;
use pg_outbox::sink::DeliveryError;
use pg_outbox::tokio_postgres::types::Type;
use pg_outbox::BoxFuture;

use crate::domain::events::{PAYMENT_PAID, PAYMENT_REFUNDED};
use crate::interpret::{interpret, Interpreted, PaymentChange};

const PROJECT: &str = "SELECT project_payment_events($1, $2, $3, $4, $5, $6, $7)";

/// The payment projections.
#[derive(Debug, Clone, Copy, Default)]
pub struct PaymentProjections;

/// The inbox consumer the payment projections are applied as (the SQS sink's default
/// `SINK_CONSUMER`, and `outboxctl nats consume --inbox-consumer`'s).
pub const CONSUMER: &str = "payment-projections";

/// Every read model of the payment service: the one registry the SQS sink and
/// `outboxctl nats consume` both apply. A new projection of this service is added here.
pub fn projections() -> Projections {
    Projections::new().with(PaymentProjections)
}

fn change(event: &EventEnvelope) -> Result<PaymentChange, DeliveryError> {
    match interpret(event)? {
        Interpreted::Change(change) => Ok(change),
        Interpreted::UnknownType(t) => Err(DeliveryError::InvalidEnvelope(format!(
            "{t} is not a payment event"
        ))),
    }
}

impl Projection for PaymentProjections {
    fn name(&self) -> &str {
        "payment_projections"
    }

    fn aggregate_type(&self) -> &str {
        "payment"
    }

    fn handles(&self, event_type: &str) -> bool {
        event_type == PAYMENT_PAID || event_type == PAYMENT_REFUNDED
    }

    fn check(&self, event: &EventEnvelope) -> Result<(), DeliveryError> {
        change(event).map(|_| ())
    }

    /// A payment's projection starts with its `payment.paid`, whatever its version (a payment
    /// can have versions before it is paid that emitted no event).
    fn starts_aggregate(&self, event: &EventEnvelope) -> bool {
        event.event_type == PAYMENT_PAID
    }

    fn apply<'a>(
        &'a self,
        tx: &'a pg_outbox::tokio_postgres::Transaction<'_>,
        events: &'a [&'a EventEnvelope],
    ) -> BoxFuture<'a, Result<(), ProjectionError>> {
        Box::pin(async move {
            let changes = events
                .iter()
                .map(|e| change(e))
                .collect::<Result<Vec<_>, _>>()?;
            let tenants: Vec<&str> = changes.iter().map(|c| c.tenant_id.as_str()).collect();
            let types: Vec<&str> = changes.iter().map(|c| c.event_type).collect();
            let payments: Vec<&str> = changes.iter().map(|c| c.payment_id.as_str()).collect();
            let versions: Vec<i64> = changes.iter().map(|c| c.version).collect();
            let amounts: Vec<i64> = changes.iter().map(|c| c.amount_minor).collect();
            let currencies: Vec<&str> = changes.iter().map(|c| c.currency.as_str()).collect();
            let ats: Vec<chrono::DateTime<chrono::Utc>> = changes.iter().map(|c| c.at).collect();
            tx.execute_typed(
                PROJECT,
                &[
                    (&tenants, Type::TEXT_ARRAY),
                    (&types, Type::TEXT_ARRAY),
                    (&payments, Type::TEXT_ARRAY),
                    (&versions, Type::INT8_ARRAY),
                    (&amounts, Type::INT8_ARRAY),
                    (&currencies, Type::TEXT_ARRAY),
                    (&ats, Type::TIMESTAMPTZ_ARRAY),
                ],
            )
            .await?;
            Ok(())
        })
    }
}
