//! Claim: a batch's two trips to the store. It is leased under a fresh owner, and once published
//! its outcomes are recorded, fenced by that owner. Outcomes the store could not record yet
//! (an appender holds the aggregate's next row) are kept to record again.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use super::summary::{DispatchSummary, LatencySample};
use crate::outbox::{ClaimedEvent, Outcomes};
use crate::ports::{OutboxStore, StoreError};

/// A leased batch, not published yet.
pub(super) struct Claim {
    pub(super) lease_owner: String,
    pub(super) events: Vec<ClaimedEvent>,
    /// How long its claim statement took; `None` for the part of a claim split off (the
    /// statement is counted with the rest, [`Claim::split`]).
    pub(super) latency: Option<Duration>,
}

impl Claim {
    /// Splits a claim of `limit` rows into the rows of the tenants drained in bulk, and those of
    /// every other tenant (the lane's, to publish at once), if any. The tenants drained in bulk
    /// are those with a whole share of a full claim, at least `limit / tenants in it` rows:
    /// they may have more due, and the next claim takes more of theirs. A tenant with fewer had
    /// every due row it has taken. A claim that is not full stays whole: the pipeline is not
    /// loaded. Returns (ahead, at once).
    pub(super) fn split(self, limit: i64) -> (Claim, Option<Claim>) {
        let mut rows: std::collections::HashMap<&str, usize> = Default::default();
        for event in &self.events {
            *rows.entry(event.tenant_id.as_str()).or_default() += 1;
        }
        if (self.events.len() as i64) < limit {
            return (self, None);
        }
        // A whole share (the database's shares are ceil(limit / tenants) and what is left; a
        // tenant with fewer had all its due rows taken).
        let share = self.events.len() / rows.len().max(1);
        let bulk: HashSet<String> = rows
            .into_iter()
            .filter(|(_, n)| *n >= share)
            .map(|(tenant, _)| tenant.to_owned())
            .collect();
        let (ahead, now): (Vec<_>, Vec<_>) = self
            .events
            .into_iter()
            .partition(|e| bulk.contains(&e.tenant_id));
        // The statement's latency is counted once: with the rows published at once, if any.
        let (ahead_latency, now_latency) = if now.is_empty() {
            (self.latency, None)
        } else {
            (None, self.latency)
        };
        let now = (!now.is_empty()).then(|| Claim {
            lease_owner: self.lease_owner.clone(),
            events: now,
            latency: now_latency,
        });
        let ahead = Claim {
            lease_owner: self.lease_owner,
            events: ahead,
            latency: ahead_latency,
        };
        (ahead, now)
    }

    /// The tenants whose rows it holds (sorted, once each).
    pub(super) fn tenants(&self) -> Vec<String> {
        let mut tenants: Vec<String> = self.events.iter().map(|e| e.tenant_id.clone()).collect();
        tenants.sort();
        tenants.dedup();
        tenants
    }
}

/// A claim that was published but whose outcomes are not recorded yet.
pub(super) struct ClaimedBatch {
    pub(super) lease_owner: String,
    pub(super) claimed: usize,
    pub(super) outcomes: Outcomes,
    pub(super) publish_calls: usize,
    pub(super) failed_publish_calls: usize,
    /// How long its claim took; `None` for outcomes left over from an earlier record, whose
    /// claim is counted already.
    pub(super) claim_latency: Option<Duration>,
    pub(super) publish_latencies: Vec<Duration>,
    /// For each live event published, the time from its append to the bus's answer.
    pub(super) commit_to_publish: Vec<Duration>,
    /// Invalid `traceparent`s left out of the envelopes.
    pub(super) trace_contexts_dropped: usize,
}

impl ClaimedBatch {
    /// A claim that found nothing: only its latency is left to count.
    pub(super) fn empty(claim: &Claim) -> Self {
        Self {
            lease_owner: claim.lease_owner.clone(),
            claimed: 0,
            outcomes: Outcomes::default(),
            publish_calls: 0,
            failed_publish_calls: 0,
            claim_latency: claim.latency,
            publish_latencies: Vec::new(),
            commit_to_publish: Vec::new(),
            trace_contexts_dropped: 0,
        }
    }

    /// Outcomes still to record.
    pub(super) fn rows(&self) -> usize {
        self.outcomes.ids().len()
    }
}

/// Leases up to `limit` due events under a fresh lease owner named after `worker_id`: with
/// `skip`, the lane's claim of every tenant but those ([`OutboxStore::claim_waiting`]), else
/// the main claim.
#[tracing::instrument(skip_all, fields(lease_owner, lane = skip.is_some()))]
pub(super) async fn lease<S: OutboxStore>(
    store: &S,
    worker_id: &str,
    limit: i64,
    lease: Duration,
    skip: Option<&[String]>,
) -> Result<Claim, StoreError> {
    let lease_owner = format!("{worker_id}/{}", uuid::Uuid::new_v4().simple());
    tracing::Span::current().record("lease_owner", lease_owner.as_str());
    let started = Instant::now();
    let events = match skip {
        Some(skip) => {
            store
                .claim_waiting(limit, lease, &lease_owner, skip)
                .await?
        }
        None => store.claim_batch(limit, lease, &lease_owner).await?,
    };
    Ok(Claim {
        lease_owner,
        events,
        latency: Some(started.elapsed()),
    })
}

/// Records every batch's outcomes, adding what was recorded to `summary`; keeps in `batches`
/// only what could not be recorded yet. Stops at the first failure (the rest keep their turn).
pub(super) async fn record_all<S: OutboxStore>(
    store: &S,
    batches: &mut Vec<ClaimedBatch>,
    summary: &mut DispatchSummary,
) -> Result<(), StoreError> {
    let mut left = Vec::new();
    let mut failure = None;
    for batch in batches.drain(..) {
        if failure.is_some() {
            left.push(batch);
            continue;
        }
        match record(store, batch).await {
            Ok((done, rest)) => {
                summary.add(done);
                left.extend(rest);
            }
            Err((batch, e)) => {
                left.push(batch);
                failure = Some(e);
            }
        }
    }
    *batches = left;
    failure.map_or(Ok(()), Err)
}

/// Records a published batch's outcomes: what was recorded as a summary, and the batch with the
/// outcomes still to record (rows an appender holds), if any. On failure hands the batch back.
async fn record<S: OutboxStore>(
    store: &S,
    mut batch: ClaimedBatch,
) -> Result<(DispatchSummary, Option<ClaimedBatch>), (ClaimedBatch, StoreError)> {
    let mut later = Outcomes::default();
    if !batch.outcomes.is_empty() {
        match store
            .record_outcomes(&batch.lease_owner, &batch.outcomes)
            .await
        {
            Ok(left) => later = left,
            Err(e) => return Err((batch, e)),
        }
    }
    let later_ids: HashSet<i64> = later.ids().into_iter().collect();
    let (recorded, _) = std::mem::take(&mut batch.outcomes).split(|id| !later_ids.contains(&id));
    let rest = (!later.is_empty()).then(|| ClaimedBatch {
        lease_owner: batch.lease_owner.clone(),
        claimed: 0,
        outcomes: later,
        publish_calls: 0,
        failed_publish_calls: 0,
        // Its claim is counted with the batch it was left over from.
        claim_latency: None,
        publish_latencies: Vec::new(),
        commit_to_publish: Vec::new(),
        trace_contexts_dropped: 0,
    });
    let summary = DispatchSummary {
        claimed: batch.claimed,
        published: recorded.published.len(),
        retried: recorded.retries.len(),
        dead: recorded.dead.len(),
        publish_calls: batch.publish_calls,
        failed_publish_calls: batch.failed_publish_calls,
        claim_latencies: batch.claim_latency.into_iter().collect(),
        publish_latencies: batch.publish_latencies,
        commit_to_publish: LatencySample::all(batch.commit_to_publish),
        trace_contexts_dropped: batch.trace_contexts_dropped,
        ..DispatchSummary::default()
    };
    Ok((summary, rest))
}
