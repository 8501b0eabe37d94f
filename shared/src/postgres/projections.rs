//! The inbox on PostgreSQL (`processed_events`, `inbox_positions`, functions `inbox_take` and
//! `inbox_record` of migration V5) and the registered projections applied in its transaction.

use tokio_postgres::types::Type;

use super::Db;
use crate::consumer::{ProjectionError, Projections};
use crate::envelope::EventEnvelope;
use crate::ports::{ProjectionStore, StoreError};
use crate::sink::ApplyOutcome;

/// Locks the positions of the batch's aggregates and writes its inbox rows (function of
/// migration V5, so the server keeps the plans).
const TAKE: &str = "SELECT * FROM inbox_take($1, $2, $3, $4, $5, $6)";

/// Advances positions and forgets gaps (migration V5).
const RECORD: &str = "SELECT inbox_record($1, $2, $3, $4, $5, $6)";

/// The inbox's verdict on one event (computed in [`accept`]).
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
/// Two calls per batch, whatever its size, each set-based: `inbox_take` locks the positions and
/// writes the inbox rows, the verdicts are computed here in delivery order, then
/// [`Accepted::record`] advances the positions (and removes gaps' inbox rows), sent alongside the
/// projections' writes.
pub async fn accept<'e>(
    tx: &tokio_postgres::Transaction<'_>,
    consumer: &str,
    events: &[&'e EventEnvelope],
    starts: &[bool],
) -> Result<Accepted<'e>, StoreError> {
    use std::collections::{HashMap, HashSet};
    let ids: Vec<uuid::Uuid> = events.iter().map(|e| e.id).collect();
    let tenants: Vec<&str> = events.iter().map(|e| e.tenantid.as_str()).collect();
    let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
    let aggregate_types: Vec<&str> = events.iter().map(|e| e.aggregatetype.as_str()).collect();
    let aggregate_ids: Vec<&str> = events.iter().map(|e| e.aggregateid.as_str()).collect();
    let row = tx
        .query_typed_one(
            TAKE,
            &[
                (&consumer, Type::TEXT),
                (&ids, Type::UUID_ARRAY),
                (&tenants, Type::TEXT_ARRAY),
                (&types, Type::TEXT_ARRAY),
                (&aggregate_types, Type::TEXT_ARRAY),
                (&aggregate_ids, Type::TEXT_ARRAY),
            ],
        )
        .await?;
    // array_agg of nothing is NULL.
    let new_ids: Vec<uuid::Uuid> = row.try_get::<_, Option<_>>(0)?.unwrap_or_default();
    let found: [Vec<String>; 3] = [
        row.try_get::<_, Option<_>>(1)?.unwrap_or_default(),
        row.try_get::<_, Option<_>>(2)?.unwrap_or_default(),
        row.try_get::<_, Option<_>>(3)?.unwrap_or_default(),
    ];
    let found_versions: Vec<i64> = row.try_get::<_, Option<_>>(4)?.unwrap_or_default();
    // The batch's aggregates, keyed by its own strings.
    type Key<'e> = (&'e str, &'e str, &'e str);
    let keys: HashMap<(String, String, String), Key<'e>> = events
        .iter()
        .map(|e| {
            let key = (
                e.tenantid.as_str(),
                e.aggregatetype.as_str(),
                e.aggregateid.as_str(),
            );
            ((key.0.to_owned(), key.1.to_owned(), key.2.to_owned()), key)
        })
        .collect();
    let mut position: HashMap<Key<'e>, i64> = HashMap::new();
    for (i, version) in found_versions.into_iter().enumerate() {
        let found = (
            found[0][i].clone(),
            found[1][i].clone(),
            found[2][i].clone(),
        );
        if let Some(key) = keys.get(&found) {
            position.insert(*key, version);
        }
    }
    let mut new: HashSet<uuid::Uuid> = new_ids.into_iter().collect();
    let mut advanced: HashMap<Key<'e>, i64> = HashMap::new();
    let mut gaps: Vec<uuid::Uuid> = Vec::new();
    let mut verdicts = Vec::with_capacity(events.len());
    for (event, starts) in events.iter().zip(starts) {
        if !new.remove(&event.id) {
            verdicts.push(Verdict::Duplicate);
            continue;
        }
        let key = (
            event.tenantid.as_str(),
            event.aggregatetype.as_str(),
            event.aggregateid.as_str(),
        );
        let version = event.aggregateversion;
        let verdict = match position.get(&key) {
            None if *starts => Verdict::Apply,
            None => Verdict::Gap,
            Some(&last) if version <= last => Verdict::Stale,
            Some(&last) if version == last + 1 => Verdict::Apply,
            Some(_) => Verdict::Gap,
        };
        match verdict {
            Verdict::Apply => {
                position.insert(key, version);
                advanced.insert(key, version);
            }
            Verdict::Gap => gaps.push(event.id),
            _ => {}
        }
        verdicts.push(verdict);
    }
    let mut advanced: Vec<_> = advanced.into_iter().collect();
    advanced.sort();
    Ok(Accepted {
        verdicts,
        advanced,
        gaps,
    })
}

/// The inbox's verdicts on a batch, and the writes that make them stick.
#[derive(Debug)]
pub struct Accepted<'e> {
    /// One per event, in delivery order.
    pub verdicts: Vec<Verdict>,
    /// New positions, in key order.
    advanced: Vec<((&'e str, &'e str, &'e str), i64)>,
    /// Events whose inbox rows go again.
    gaps: Vec<uuid::Uuid>,
}

impl Accepted<'_> {
    /// Advances the positions and forgets the gaps, in `tx`. Independent of the projections'
    /// writes: sent alongside them. Nothing to send when nothing advanced and nothing was a gap.
    pub async fn record(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        consumer: &str,
    ) -> Result<(), tokio_postgres::Error> {
        if self.advanced.is_empty() && self.gaps.is_empty() {
            return Ok(());
        }
        let tenants: Vec<&str> = self.advanced.iter().map(|k| k.0 .0).collect();
        let aggregate_types: Vec<&str> = self.advanced.iter().map(|k| k.0 .1).collect();
        let aggregate_ids: Vec<&str> = self.advanced.iter().map(|k| k.0 .2).collect();
        let versions: Vec<i64> = self.advanced.iter().map(|k| k.1).collect();
        tx.query_typed(
            RECORD,
            &[
                (&consumer, Type::TEXT),
                (&tenants, Type::TEXT_ARRAY),
                (&aggregate_types, Type::TEXT_ARRAY),
                (&aggregate_ids, Type::TEXT_ARRAY),
                (&versions, Type::INT8_ARRAY),
                (&self.gaps, Type::UUID_ARRAY),
            ],
        )
        .await?;
        Ok(())
    }
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
    let accepted = accept(&tx, consumer, events, &starts).await?;
    let to_apply: Vec<&EventEnvelope> = events
        .iter()
        .zip(&accepted.verdicts)
        .filter(|(_, v)| **v == Verdict::Apply)
        .map(|(e, _)| *e)
        .collect();
    // The inbox's writes and the projections' go out together (pipelined on the connection).
    let (recorded, projected) = tokio::join!(
        accepted.record(&tx, consumer),
        project(&tx, projections, &to_apply)
    );
    if let Err(error) = projected {
        let reason = error.to_string();
        // A projection's statement error leaves the transaction aborted: roll it back. If the
        // connection itself is gone, the rollback fails too, and that is the database's failure
        // (retried on a new connection), not the event's.
        tx.rollback().await?;
        return Ok(Err(reason));
    }
    recorded?;
    tx.commit().await?;
    Ok(Ok(accepted
        .verdicts
        .into_iter()
        .map(|v| match v {
            Verdict::Apply => ApplyOutcome::Applied,
            Verdict::Duplicate => ApplyOutcome::Duplicate,
            Verdict::Stale => ApplyOutcome::Stale,
            Verdict::Gap => ApplyOutcome::Gap,
        })
        .collect()))
}
