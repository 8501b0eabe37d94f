//! The inbox on PostgreSQL (`processed_events`, `inbox_positions`, function `inbox_accept` of
//! migration V5) and the registered projections applied in its transaction.

use tokio_postgres::types::Type;

use super::Db;
use crate::consumer::{ProjectionError, Projections};
use crate::envelope::EventEnvelope;
use crate::ports::{ProjectionStore, StoreError};
use crate::sink::ApplyOutcome;

const ACCEPT: &str = "SELECT inbox_accept($1, $2, $3, $4, $5, $6, $7, $8)";

/// The inbox's verdict on one event (see `inbox_accept`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// New and next in its aggregate: apply it now.
    Apply,
    /// This consumer applied it before.
    Duplicate,
    /// At or below its aggregate's position: applied before.
    Stale,
    /// A predecessor is missing: redeliver later.
    Gap,
}

/// Records the inbox rows and positions of `events` (delivery order) for `consumer` in `tx`, and
/// says what to do with each. `starts[i]` says whether `events[i]` may start its aggregate.
pub async fn accept(
    tx: &tokio_postgres::Transaction<'_>,
    consumer: &str,
    events: &[&EventEnvelope],
    starts: &[bool],
) -> Result<Vec<Verdict>, StoreError> {
    let ids: Vec<uuid::Uuid> = events.iter().map(|e| e.id).collect();
    let tenants: Vec<&str> = events.iter().map(|e| e.tenantid.as_str()).collect();
    let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
    let aggregate_types: Vec<&str> = events.iter().map(|e| e.aggregatetype.as_str()).collect();
    let aggregate_ids: Vec<&str> = events.iter().map(|e| e.aggregateid.as_str()).collect();
    let versions: Vec<i64> = events.iter().map(|e| e.aggregateversion).collect();
    let texts: Vec<String> = tx
        .query_typed_one(
            ACCEPT,
            &[
                (&consumer, Type::TEXT),
                (&ids, Type::UUID_ARRAY),
                (&tenants, Type::TEXT_ARRAY),
                (&types, Type::TEXT_ARRAY),
                (&aggregate_types, Type::TEXT_ARRAY),
                (&aggregate_ids, Type::TEXT_ARRAY),
                (&versions, Type::INT8_ARRAY),
                (&starts, Type::BOOL_ARRAY),
            ],
        )
        .await?
        .try_get(0)?;
    if texts.len() != events.len() {
        return Err(StoreError::Corrupt(format!(
            "{} inbox verdicts for {} events",
            texts.len(),
            events.len()
        )));
    }
    texts
        .iter()
        .map(|t| match t.as_str() {
            "apply" => Ok(Verdict::Apply),
            "duplicate" => Ok(Verdict::Duplicate),
            "stale" => Ok(Verdict::Stale),
            "gap" => Ok(Verdict::Gap),
            other => Err(StoreError::Corrupt(format!("inbox verdict {other:?}"))),
        })
        .collect()
}

/// Runs every registered projection over the events it handles, in order, in `tx`.
pub async fn project(
    tx: &tokio_postgres::Transaction<'_>,
    projections: &Projections,
    events: &[&EventEnvelope],
) -> Result<(), ProjectionError> {
    for projection in projections.iter() {
        let mine: Vec<&EventEnvelope> = events
            .iter()
            .copied()
            .filter(|e| {
                e.aggregatetype == projection.aggregate_type() && projection.handles(&e.event_type)
            })
            .collect();
        if mine.is_empty() {
            continue;
        }
        projection
            .apply(tx, &mine)
            .await
            .map_err(|e| -> ProjectionError {
                format!(
                    "{}: {}",
                    projection.name(),
                    crate::telemetry::error_chain(e.as_ref())
                )
                .into()
            })?;
    }
    Ok(())
}

/// The inbox and the projections on PostgreSQL: the sink's [`ProjectionStore`].
pub struct PgProjectionStore {
    db: Db,
    projections: Projections,
}

impl PgProjectionStore {
    /// A store on the instance's connection, applying `projections`.
    pub fn new(db: Db, projections: Projections) -> Self {
        Self { db, projections }
    }

    /// The connection, for start-up warm-up.
    pub fn db(&self) -> &Db {
        &self.db
    }
}

impl ProjectionStore for PgProjectionStore {
    fn projections(&self) -> &Projections {
        &self.projections
    }

    #[tracing::instrument(skip_all, fields(events = events.len()))]
    async fn apply_events(
        &self,
        consumer: &str,
        events: &[EventEnvelope],
    ) -> Result<Vec<ApplyOutcome>, StoreError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let projections = &self.projections;
        self.db
            .run(|mut client| async move {
                let all: Vec<&EventEnvelope> = events.iter().collect();
                match apply_in(&mut client, projections, consumer, &all).await? {
                    Ok(outcomes) => Ok(outcomes),
                    Err(error) if all.len() == 1 => Ok(vec![ApplyOutcome::Failed(error)]),
                    Err(error) => {
                        // One event's projection failed and took the batch with it: apply them
                        // one per transaction, so only that one is redelivered.
                        tracing::warn!(%error, "a projection failed; applying the batch event by event");
                        let mut outcomes = Vec::with_capacity(all.len());
                        for event in all {
                            outcomes.push(
                                match apply_in(&mut client, projections, consumer, &[event]).await? {
                                    Ok(mut one) => one.remove(0),
                                    Err(error) => ApplyOutcome::Failed(error),
                                },
                            );
                        }
                        Ok(outcomes)
                    }
                }
            })
            .await
    }

    async fn delete_expired(
        &self,
        retention: std::time::Duration,
        max_rows: i32,
    ) -> Result<u64, StoreError> {
        self.db
            .run(|client| async move {
                Ok(super::admin::delete_inbox_entries(&client, retention, max_rows).await?)
            })
            .await
    }
}

/// Applies `events` in one transaction on `client`. The outer error is the database's (nothing
/// applied); the inner one is a projection's (rolled back, nothing applied). Safe to run again
/// after a connection broke during the commit: what did commit comes back as duplicates.
async fn apply_in(
    client: &mut tokio_postgres::Client,
    projections: &Projections,
    consumer: &str,
    events: &[&EventEnvelope],
) -> Result<Result<Vec<ApplyOutcome>, String>, StoreError> {
    let tx = client.transaction().await?;
    let starts: Vec<bool> = events
        .iter()
        .map(|e| projections.starts_aggregate(e))
        .collect();
    let verdicts = accept(&tx, consumer, events, &starts).await?;
    let to_apply: Vec<&EventEnvelope> = events
        .iter()
        .zip(&verdicts)
        .filter(|(_, v)| **v == Verdict::Apply)
        .map(|(e, _)| *e)
        .collect();
    if let Err(error) = project(&tx, projections, &to_apply).await {
        let reason = error.to_string();
        // A projection's statement error leaves the transaction aborted: roll it back. If the
        // connection itself is gone, the rollback fails too, and that is the database's failure
        // (retried on a new connection), not the event's.
        tx.rollback().await?;
        return Ok(Err(reason));
    }
    tx.commit().await?;
    Ok(Ok(verdicts
        .into_iter()
        .map(|v| match v {
            Verdict::Apply => ApplyOutcome::Applied,
            Verdict::Duplicate => ApplyOutcome::Duplicate,
            Verdict::Stale => ApplyOutcome::Stale,
            Verdict::Gap => ApplyOutcome::Gap,
        })
        .collect()))
}
