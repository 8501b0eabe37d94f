//! SQL of the read side (`processed_events`, `payment_projection`, `tenant_daily_revenue`): the
//! rules live in `apply_payment_event` (migration V2), one call per event.

use tokio_postgres::types::Type;

use super::Db;
use crate::ports::{ProjectionStore, StoreError};
use crate::sink::{ApplyOutcome, PaymentChange};

const APPLY: &str = "SELECT apply_payment_events($1, $2, $3, $4, $5, $6, $7, $8, $9)";

/// Adds a batch's revenue, one row per (tenant, day, currency), in key order.
const ADD_REVENUE: &str = "
    INSERT INTO tenant_daily_revenue AS r (tenant_id, day, currency, paid_minor, refunded_minor)
    SELECT * FROM unnest($1::text[], $2::date[], $3::text[], $4::bigint[], $5::bigint[])
    ORDER BY 1, 2, 3
    ON CONFLICT (tenant_id, day, currency) DO UPDATE
    SET paid_minor = r.paid_minor + EXCLUDED.paid_minor,
        refunded_minor = r.refunded_minor + EXCLUDED.refunded_minor";

/// Revenue deltas of the changes applied in a batch, keyed and ordered by (tenant, day, currency).
fn revenue_deltas(
    changes: &[PaymentChange],
    outcomes: &[ApplyOutcome],
) -> std::collections::BTreeMap<(String, chrono::NaiveDate, String), (i64, i64)> {
    let mut deltas = std::collections::BTreeMap::new();
    for (change, outcome) in changes.iter().zip(outcomes) {
        if *outcome != ApplyOutcome::Applied {
            continue;
        }
        let key = (
            change.tenant_id.clone(),
            change.at.date_naive(),
            change.currency.clone(),
        );
        let entry: &mut (i64, i64) = deltas.entry(key).or_default();
        if change.event_type == crate::domain::events::PAYMENT_PAID {
            entry.0 += change.amount_minor;
        } else {
            entry.1 += change.amount_minor;
        }
    }
    deltas
}

/// The [`ProjectionStore`] on PostgreSQL.
pub struct PgProjectionStore {
    db: Db,
}

impl PgProjectionStore {
    /// A store on the instance's connection.
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    /// The connection, for start-up warm-up.
    pub fn db(&self) -> &Db {
        &self.db
    }
}

fn outcome(text: &str) -> ApplyOutcome {
    match text {
        "applied" => ApplyOutcome::Applied,
        "duplicate" => ApplyOutcome::Duplicate,
        "stale" => ApplyOutcome::Stale,
        "gap" => ApplyOutcome::Gap,
        other => ApplyOutcome::Failed(other.to_owned()),
    }
}

impl ProjectionStore for PgProjectionStore {
    #[tracing::instrument(skip_all, fields(changes = changes.len()))]
    async fn apply_changes(
        &self,
        consumer: &str,
        changes: &[PaymentChange],
    ) -> Result<Vec<ApplyOutcome>, StoreError> {
        if changes.is_empty() {
            return Ok(Vec::new());
        }
        self.db
            .run(|mut client| async move { apply_in(&mut client, consumer, changes).await })
            .await
    }
}

/// Applies a batch in one transaction on `client`. Safe to run again after a connection broke
/// during the commit: the inbox turns what did commit into duplicates, and revenue is only added
/// for changes applied now.
async fn apply_in(
    client: &mut tokio_postgres::Client,
    consumer: &str,
    changes: &[PaymentChange],
) -> Result<Vec<ApplyOutcome>, StoreError> {
    let tx = client.transaction().await?;
    // One call for the whole batch: the function applies the changes in order, each in its own
    // subtransaction, so one that fails leaves the others applied.
    let ids: Vec<uuid::Uuid> = changes.iter().map(|c| c.event_id).collect();
    let tenants: Vec<&str> = changes.iter().map(|c| c.tenant_id.as_str()).collect();
    let types: Vec<&str> = changes.iter().map(|c| c.event_type).collect();
    let payments: Vec<&str> = changes.iter().map(|c| c.payment_id.as_str()).collect();
    let versions: Vec<i64> = changes.iter().map(|c| c.version).collect();
    let amounts: Vec<i64> = changes.iter().map(|c| c.amount_minor).collect();
    let currencies: Vec<&str> = changes.iter().map(|c| c.currency.as_str()).collect();
    let ats: Vec<chrono::DateTime<chrono::Utc>> = changes.iter().map(|c| c.at).collect();
    let texts: Vec<String> = tx
        .query_typed_one(
            APPLY,
            &[
                (&consumer, Type::TEXT),
                (&ids, Type::UUID_ARRAY),
                (&tenants, Type::TEXT_ARRAY),
                (&types, Type::TEXT_ARRAY),
                (&payments, Type::TEXT_ARRAY),
                (&versions, Type::INT8_ARRAY),
                (&amounts, Type::INT8_ARRAY),
                (&currencies, Type::TEXT_ARRAY),
                (&ats, Type::TIMESTAMPTZ_ARRAY),
            ],
        )
        .await?
        .try_get(0)?;
    if texts.len() != changes.len() {
        // Dropping the transaction rolls it back.
        return Err(StoreError::Corrupt(format!(
            "{} outcomes for {} changes",
            texts.len(),
            changes.len()
        )));
    }
    let outcomes: Vec<ApplyOutcome> = texts.iter().map(|t| outcome(t)).collect();
    let deltas = revenue_deltas(changes, &outcomes);
    if !deltas.is_empty() {
        let mut columns = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for ((tenant, day, currency), (paid, refunded)) in deltas {
            columns.0.push(tenant);
            columns.1.push(day);
            columns.2.push(currency);
            columns.3.push(paid);
            columns.4.push(refunded);
        }
        tx.execute_typed(
            ADD_REVENUE,
            &[
                (&columns.0, Type::TEXT_ARRAY),
                (&columns.1, Type::DATE_ARRAY),
                (&columns.2, Type::TEXT_ARRAY),
                (&columns.3, Type::INT8_ARRAY),
                (&columns.4, Type::INT8_ARRAY),
            ],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(outcomes)
}
