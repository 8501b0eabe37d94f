//! The payment read models as one [`Projection`]: per-payment status (`payment_projection`) and
//! per-tenant daily revenue by currency (`tenant_daily_revenue`). The rules are in
//! `project_payment_events` (migration V5); the inbox decided already what is applied.

use futures_util::future::BoxFuture;
use tokio_postgres::types::Type;

use crate::consumer::{Projection, ProjectionError};
use crate::domain::events::{PAYMENT_PAID, PAYMENT_REFUNDED};
use crate::envelope::EventEnvelope;
use crate::sink::{interpret, DeliveryError, Interpreted, PaymentChange};

const PROJECT: &str = "SELECT project_payment_events($1, $2, $3, $4, $5, $6, $7)";

/// Adds a batch's revenue, one row per (tenant, day, currency), in key order: concurrent sinks
/// take those shared rows' locks in the same order and cannot deadlock on them.
const ADD_REVENUE: &str = "
    INSERT INTO tenant_daily_revenue AS r (tenant_id, day, currency, paid_minor, refunded_minor)
    SELECT * FROM unnest($1::text[], $2::date[], $3::text[], $4::bigint[], $5::bigint[])
    ORDER BY 1, 2, 3
    ON CONFLICT (tenant_id, day, currency) DO UPDATE
    SET paid_minor = r.paid_minor + EXCLUDED.paid_minor,
        refunded_minor = r.refunded_minor + EXCLUDED.refunded_minor";

/// The payment projections, registered in the projection sink's `main.rs`.
#[derive(Debug, Clone, Copy, Default)]
pub struct PaymentProjections;

fn change(event: &EventEnvelope) -> Result<PaymentChange, DeliveryError> {
    match interpret(event)? {
        Interpreted::Change(change) => Ok(change),
        Interpreted::UnknownType(t) => Err(DeliveryError::InvalidEnvelope(format!(
            "{t} is not a payment event"
        ))),
    }
}

/// Revenue deltas of `changes`, keyed and ordered by (tenant, day, currency).
fn revenue_deltas(
    changes: &[PaymentChange],
) -> std::collections::BTreeMap<(String, chrono::NaiveDate, String), (i64, i64)> {
    let mut deltas = std::collections::BTreeMap::new();
    for change in changes {
        let key = (
            change.tenant_id.clone(),
            change.at.date_naive(),
            change.currency.clone(),
        );
        let entry: &mut (i64, i64) = deltas.entry(key).or_default();
        if change.event_type == PAYMENT_PAID {
            entry.0 += change.amount_minor;
        } else {
            entry.1 += change.amount_minor;
        }
    }
    deltas
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
        tx: &'a tokio_postgres::Transaction<'_>,
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
            let project = [
                (
                    &tenants as &(dyn tokio_postgres::types::ToSql + Sync),
                    Type::TEXT_ARRAY,
                ),
                (&types, Type::TEXT_ARRAY),
                (&payments, Type::TEXT_ARRAY),
                (&versions, Type::INT8_ARRAY),
                (&amounts, Type::INT8_ARRAY),
                (&currencies, Type::TEXT_ARRAY),
                (&ats, Type::TIMESTAMPTZ_ARRAY),
            ];
            let mut columns = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for ((tenant, day, currency), (paid, refunded)) in revenue_deltas(&changes) {
                columns.0.push(tenant);
                columns.1.push(day);
                columns.2.push(currency);
                columns.3.push(paid);
                columns.4.push(refunded);
            }
            let revenue = [
                (
                    &columns.0 as &(dyn tokio_postgres::types::ToSql + Sync),
                    Type::TEXT_ARRAY,
                ),
                (&columns.1, Type::DATE_ARRAY),
                (&columns.2, Type::TEXT_ARRAY),
                (&columns.3, Type::INT8_ARRAY),
                (&columns.4, Type::INT8_ARRAY),
            ];
            // Independent statements: sent together (pipelined), awaited together.
            tokio::try_join!(
                tx.execute_typed(PROJECT, &project),
                tx.execute_typed(ADD_REVENUE, &revenue)
            )?;
            Ok(())
        })
    }
}
