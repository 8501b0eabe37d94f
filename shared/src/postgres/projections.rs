//! SQL of the read side (`processed_events`, `payment_projection`, `tenant_daily_revenue`): the
//! rules live in `apply_payment_event` (migration V2), one call per event.

use futures_util::future::join_all;
use tokio_postgres::types::Type;

use super::Db;
use crate::ports::ProjectionStore;
use crate::sink::{ApplyOutcome, PaymentChange};

const APPLY: &str = "SELECT apply_payment_event($1, $2, $3, $4, $5, $6, $7, $8, $9)";

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
    async fn apply_changes(&self, consumer: &str, changes: &[PaymentChange]) -> Vec<ApplyOutcome> {
        let all_failed = |reason: String| vec![ApplyOutcome::Failed(reason); changes.len()];
        let mut client = match self.db.client().await {
            Ok(client) => client,
            Err(e) => return all_failed(format!("database unavailable: {e}")),
        };
        let tx = match client.transaction().await {
            Ok(tx) => tx,
            Err(e) => return all_failed(format!("cannot begin: {e}")),
        };
        // The calls are pipelined on the connection and run in order, so a batch costs about one
        // round trip plus one commit; each call is its own subtransaction inside the function.
        let calls = changes.iter().map(|c| {
            let tx = &tx;
            async move {
                tx.query_typed_one(
                    APPLY,
                    &[
                        (&consumer, Type::TEXT),
                        (&c.event_id, Type::UUID),
                        (&c.tenant_id, Type::TEXT),
                        (&c.event_type, Type::TEXT),
                        (&c.payment_id, Type::TEXT),
                        (&c.version, Type::INT8),
                        (&c.amount_minor, Type::INT8),
                        (&c.currency, Type::TEXT),
                        (&c.at, Type::TIMESTAMPTZ),
                    ],
                )
                .await
                .and_then(|row| row.try_get::<_, String>(0))
            }
        });
        let results = join_all(calls).await;
        let outcomes: Vec<ApplyOutcome> = results
            .into_iter()
            .map(|r| match r {
                Ok(text) => outcome(&text),
                Err(e) => ApplyOutcome::Failed(format!("apply failed: {e}")),
            })
            .collect();
        if outcomes
            .iter()
            .any(|o| matches!(o, ApplyOutcome::Failed(f) if f.starts_with("apply failed")))
        {
            // A statement error aborts the transaction: nothing of this batch is kept.
            let _ = tx.rollback().await;
            return all_failed("batch rolled back after a statement error".into());
        }
        match tx.commit().await {
            Ok(()) => outcomes,
            Err(e) => all_failed(format!("commit failed: {e}")),
        }
    }
}
