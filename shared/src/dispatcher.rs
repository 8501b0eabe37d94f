//! The dispatcher: claim a batch, publish it in bus-sized calls (several in flight), record each
//! row's outcome, and repeat until the outbox has nothing due or the deadline is near. The three
//! steps are pipelined: while one batch is at the bus (on tasks of its own), the database records
//! the one before and, on a second connection, leases the one after, so none waits for another.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{self, StreamExt};
use serde::Serialize;

use crate::config::{optional_env, ranged_env, required_env, ConfigError};
use crate::envelope::EventEnvelope;
use crate::outbox::{ClaimedEvent, Outcomes};
use crate::ports::{OutboxStore, OutgoingMessage, PublishOutcome, Publisher, StoreError};

/// Where events go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// An SNS topic (standard or FIFO).
    Sns {
        /// Topic ARN.
        topic_arn: String,
    },
    /// An EventBridge bus.
    EventBridge {
        /// Bus name or ARN.
        bus_name: String,
    },
    /// NATS JetStream subjects (see [`crate::nats`]).
    Nats(crate::nats::NatsSettings),
}

/// Dispatcher settings, read once at cold start.
#[derive(Debug, Clone, PartialEq)]
pub struct DispatcherConfig {
    /// Rows per claim (`DISPATCH_BATCH_SIZE`, 1..=5000, default 500).
    pub batch_size: i64,
    /// Publish calls in flight at once (`DISPATCH_MAX_IN_FLIGHT`, 1..=128, default 50): with 10
    /// entries per call, 50 calls cover a 500-row claim in one round trip to the bus.
    pub max_in_flight: usize,
    /// How long a claim is leased (`DISPATCH_LEASE_SECONDS`, 5..=900, default 60). Longer than
    /// the SDK's whole-operation timeout, so a live dispatcher never loses its lease mid-publish.
    pub lease: Duration,
    /// Attempts before a row is dead (`DISPATCH_MAX_ATTEMPTS`, 1..=100, default 10).
    pub max_attempts: i32,
    /// First retry delay cap (`DISPATCH_BACKOFF_BASE_MS`, default 1000).
    pub backoff_base: Duration,
    /// Largest retry delay (`DISPATCH_BACKOFF_CAP_MS`, default 300000).
    pub backoff_cap: Duration,
    /// Stop claiming when less than this is left before the deadline
    /// (`DISPATCH_SAFETY_MARGIN_MS`, default 10000).
    pub safety_margin: Duration,
    /// When a claim finds nothing due: `None` returns, `Some(pause)` polls again after `pause`
    /// until the deadline (`DISPATCH_IDLE_POLL_MS`, 0 = return, default 0; the template sets
    /// 100 so an invocation keeps publishing new rows within 100 ms for its whole run).
    pub idle_poll: Option<Duration>,
    /// Published rows older than this are deleted between claims (`OUTBOX_RETENTION_HOURS`,
    /// 0 = keep them, default 168 = 7 days).
    pub retention: Option<Duration>,
    /// Rows deleted per cleanup statement (`OUTBOX_CLEANUP_BATCH`, 100..=50000, default 5000):
    /// one short transaction each, so cleanup never holds locks for long.
    pub cleanup_batch: i32,
}

/// How long a heartbeat holds: commands do not wake the dispatcher while it does.
pub const HEARTBEAT_TTL: Duration = Duration::from_secs(3);
/// How often a polling drain renews its heartbeat.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
/// Pause between cleanup statements while expired rows remain: at most one 5000-row delete a
/// second beside the claims, so a large backlog of expired rows never crowds out publishing.
pub const CLEANUP_BUSY_PAUSE: Duration = Duration::from_secs(1);
/// Pause after a cleanup statement found less than a full batch (or failed).
pub const CLEANUP_IDLE_PAUSE: Duration = Duration::from_secs(60);

impl Default for DispatcherConfig {
    fn default() -> Self {
        Self {
            batch_size: 500,
            max_in_flight: 50,
            lease: Duration::from_secs(60),
            max_attempts: 10,
            backoff_base: Duration::from_millis(1_000),
            backoff_cap: Duration::from_millis(300_000),
            safety_margin: Duration::from_millis(10_000),
            idle_poll: None,
            retention: Some(Duration::from_secs(168 * 3600)),
            cleanup_batch: 5_000,
        }
    }
}

impl DispatcherConfig {
    /// Reads and validates the settings, falling back to the defaults.
    pub fn from_env() -> Result<Self, ConfigError> {
        let d = Self::default();
        let ms = |d: Duration| d.as_millis() as u64;
        let config = Self {
            batch_size: ranged_env("DISPATCH_BATCH_SIZE", d.batch_size, 1, 5_000)?,
            max_in_flight: ranged_env("DISPATCH_MAX_IN_FLIGHT", d.max_in_flight, 1, 128)?,
            lease: Duration::from_secs(ranged_env(
                "DISPATCH_LEASE_SECONDS",
                d.lease.as_secs(),
                5,
                900,
            )?),
            max_attempts: ranged_env("DISPATCH_MAX_ATTEMPTS", d.max_attempts, 1, 100)?,
            backoff_base: Duration::from_millis(ranged_env(
                "DISPATCH_BACKOFF_BASE_MS",
                ms(d.backoff_base),
                1,
                3_600_000,
            )?),
            backoff_cap: Duration::from_millis(ranged_env(
                "DISPATCH_BACKOFF_CAP_MS",
                ms(d.backoff_cap),
                1,
                86_400_000,
            )?),
            safety_margin: Duration::from_millis(ranged_env(
                "DISPATCH_SAFETY_MARGIN_MS",
                ms(d.safety_margin),
                0,
                600_000,
            )?),
            idle_poll: match ranged_env("DISPATCH_IDLE_POLL_MS", 0u64, 0, 60_000)? {
                0 => None,
                ms => Some(Duration::from_millis(ms)),
            },
            retention: match ranged_env("OUTBOX_RETENTION_HOURS", 168u64, 0, 100_000)? {
                0 => None,
                hours => Some(Duration::from_secs(hours * 3600)),
            },
            cleanup_batch: ranged_env("OUTBOX_CLEANUP_BATCH", d.cleanup_batch, 100, 50_000)?,
        };
        if config.backoff_cap < config.backoff_base {
            return Err(ConfigError::Invalid {
                name: "DISPATCH_BACKOFF_CAP_MS",
                reason: "must not be smaller than DISPATCH_BACKOFF_BASE_MS".into(),
            });
        }
        Ok(config)
    }
}

impl Target {
    /// Reads `OUTBOX_TARGET` (`sns`, `eventbridge` or `nats`) and `SNS_TOPIC_ARN`,
    /// `EVENT_BUS_NAME` or the `NATS_*` settings.
    pub fn from_env() -> Result<Self, ConfigError> {
        match required_env("OUTBOX_TARGET")?.as_str() {
            "sns" => Ok(Self::Sns {
                topic_arn: required_env("SNS_TOPIC_ARN")?,
            }),
            "eventbridge" => Ok(Self::EventBridge {
                bus_name: optional_env("EVENT_BUS_NAME").unwrap_or_else(|| "default".into()),
            }),
            "nats" => Ok(Self::Nats(crate::nats::NatsSettings::from_env()?)),
            other => Err(ConfigError::Invalid {
                name: "OUTBOX_TARGET",
                reason: format!("{other:?} is not one of sns, eventbridge, nats"),
            }),
        }
    }
}

/// Delay before attempt `attempts + 1`: exponential backoff with full jitter, a uniformly random
/// delay between zero and `min(cap, base · 2^(attempts−1))`, so rows that failed together do not
/// retry together.
pub fn backoff_delay(attempts: i32, base: Duration, cap: Duration) -> Duration {
    let exponent = attempts.saturating_sub(1).clamp(0, 30) as u32;
    let ceiling = base.saturating_mul(1u32 << exponent).min(cap);
    ceiling.mul_f64(fastrand::f64())
}

/// Why a drain stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// A claim found nothing due.
    Empty,
    /// The deadline minus the safety margin was reached.
    Deadline,
}

/// What one invocation did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DispatchSummary {
    /// Rows claimed.
    pub claimed: usize,
    /// Rows published.
    pub published: usize,
    /// Rows scheduled for another attempt.
    pub retried: usize,
    /// Rows dead-lettered.
    pub dead: usize,
    /// Claims made (the last one may have been empty).
    pub claims: usize,
    /// Publish calls made.
    pub publish_calls: usize,
    /// Publish calls that failed as a whole (every entry to be retried): the bus, or the route
    /// to it, was down.
    pub failed_publish_calls: usize,
    /// Published rows deleted by the retention cleanup.
    pub cleaned: u64,
    /// Store operations that failed because the database was unavailable (restarting, failing
    /// over, refusing credentials, not answering); the drain paused and carried on after each.
    pub store_errors: usize,
    /// Wall time, milliseconds.
    pub duration_ms: u64,
    /// Why it stopped.
    pub stopped: Option<StopReason>,
    /// The outbox after the drain, when measured (the Lambda handler does, for its metrics).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backlog: Option<crate::outbox::Backlog>,
    /// How long each claim statement took.
    #[serde(skip)]
    pub claim_latencies: Vec<Duration>,
    /// How long each publish call to the bus took.
    #[serde(skip)]
    pub publish_latencies: Vec<Duration>,
}

impl DispatchSummary {
    fn add(&mut self, batch: DispatchSummary) {
        self.claims += batch.claim_latencies.len();
        self.claimed += batch.claimed;
        self.published += batch.published;
        self.retried += batch.retried;
        self.dead += batch.dead;
        self.publish_calls += batch.publish_calls;
        self.failed_publish_calls += batch.failed_publish_calls;
        self.claim_latencies.extend(batch.claim_latencies);
        self.publish_latencies.extend(batch.publish_latencies);
    }

    /// The summary as CloudWatch metrics (EMF), with the backlog when it was measured.
    pub fn metrics(&self, service: &str) -> crate::metrics::MetricsDocument {
        use crate::metrics::{MetricsDocument, Unit};
        let mut doc = MetricsDocument::from_env(service);
        doc.count("Published", self.published)
            .count("Retried", self.retried)
            .count("DeadLettered", self.dead)
            .count("Claimed", self.claimed)
            .count("Cleaned", self.cleaned as usize)
            .count("StoreErrors", self.store_errors)
            .latencies("ClaimLatency", &self.claim_latencies)
            .latencies("PublishLatency", &self.publish_latencies);
        if let Some(backlog) = self.backlog {
            doc.count("PendingRows", backlog.pending.max(0) as usize)
                .value(
                    "OldestPendingAge",
                    Unit::Seconds,
                    backlog.oldest_pending_age_seconds,
                )
                .count("DeadRows", backlog.dead.max(0) as usize)
                .value(
                    "OldestTransactionAge",
                    Unit::Seconds,
                    backlog.oldest_transaction_age_seconds,
                );
        }
        doc.property("claims", self.claims)
            .property("publishCalls", self.publish_calls)
            .property("durationMs", self.duration_ms)
            .property(
                "stopped",
                serde_json::to_value(self.stopped).unwrap_or_default(),
            );
        doc
    }
}

/// A spawned part of a drain that ends with it: a drain dropped mid-publish (the invocation
/// timed out) leaves no publish running behind it.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T: Send + 'static> AbortOnDrop<T> {
    /// Spawns `future` in the current span.
    fn spawn(future: impl std::future::Future<Output = T> + Send + 'static) -> Self {
        Self(tokio::spawn(tracing::Instrument::in_current_span(future)))
    }

    /// Its output; a panic in it goes on in the caller.
    async fn join(mut self) -> T {
        match (&mut self.0).await {
            Ok(output) => output,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The claim → publish → record loop over a store and a bus.
pub struct OutboxDispatcher<S, P> {
    store: S,
    /// The publisher and the settings (shared with the publishing tasks).
    bus: Arc<Bus<P>>,
    worker_id: String,
}

impl<S: OutboxStore, P: Publisher + 'static> OutboxDispatcher<S, P> {
    /// A dispatcher; `worker_id` names it in `locked_by` (with a fresh suffix per claim).
    pub fn new(
        store: S,
        publisher: P,
        config: DispatcherConfig,
        worker_id: impl Into<String>,
    ) -> Self {
        Self {
            store,
            bus: Arc::new(Bus { publisher, config }),
            worker_id: worker_id.into(),
        }
    }

    /// The store, for wiring.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Drains batch after batch until a claim comes back empty (or, with `idle_poll`, until
    /// `deadline` minus the safety margin, polling meanwhile), deleting expired published rows
    /// between claims.
    ///
    /// A database that becomes unavailable (a restart, a failover, a rotated password, a
    /// connection that stops answering) does not end the drain: it pauses (100 ms, doubling to
    /// 2 s) and carries on until the deadline, recording first the outcomes it could not record,
    /// so rows already published are not published again. It returns an error only when the
    /// store failed for good (a statement error) or never answered during the whole drain.
    pub async fn drain(&self, deadline: Instant) -> Result<DispatchSummary, StoreError> {
        let started = Instant::now();
        let stop_at = deadline
            .checked_sub(self.bus.config.safety_margin)
            .unwrap_or(started);
        let mut summary = DispatchSummary::default();
        let owner = format!("{}/{}", self.worker_id, uuid::Uuid::new_v4().simple());
        let mut next_heartbeat = started;
        let mut next_cleanup = started;
        let mut outage = Outage::default();
        // Outcomes not recorded yet: the database was away, or an appender held the rows.
        let mut unrecorded: Vec<ClaimedBatch> = Vec::new();
        // Claimed and leased, not published yet: it goes to the bus while the database records
        // the previous batch's outcomes and claims the next one.
        let mut ahead: Option<Claim> = None;
        loop {
            let now = Instant::now();
            if now >= stop_at {
                summary.stopped = Some(StopReason::Deadline);
                break;
            }
            if self.bus.config.idle_poll.is_some() && now >= next_heartbeat {
                if let Err(e) = self.store.heartbeat(&owner, HEARTBEAT_TTL).await {
                    outage.pause(e, &mut summary, stop_at).await?;
                    continue;
                }
                next_heartbeat = now + HEARTBEAT_EVERY;
            }
            if now >= next_cleanup {
                next_cleanup = now + self.clean_up(&mut summary).await;
            }
            // The pipeline: the bus takes batch k while the database records batch k-1 (which
            // promotes its aggregates' next events) and, on a second connection, leases batch
            // k+1. No transaction spans the publish, and at most `max_in_flight` calls are at
            // the bus.
            let publishing = ahead.take();
            let was_publishing = publishing.is_some();
            let recorded_before = summary.published + summary.retried + summary.dead;
            let (published, recorded, claimed) = tokio::join!(
                async {
                    match publishing {
                        Some(claim) => Some(self.publish(claim).await),
                        None => None,
                    }
                },
                self.record_all(&mut unrecorded, &mut summary),
                self.claim(),
            );
            unrecorded.extend(published);
            let claim = match (recorded, claimed) {
                (Ok(()), Ok(claim)) => claim,
                (recorded, claimed) => {
                    // Keep what was leased; pause for the failure.
                    let claim_failure = match claimed {
                        Ok(claim) if claim.events.is_empty() => {
                            unrecorded.push(ClaimedBatch::empty(&claim));
                            None
                        }
                        Ok(claim) => {
                            ahead = Some(claim);
                            None
                        }
                        Err(e) => Some(e),
                    };
                    if let Some(e) = recorded.err().or(claim_failure) {
                        outage.pause(e, &mut summary, stop_at).await?;
                    }
                    continue;
                }
            };
            outage.over();
            if !claim.events.is_empty() {
                ahead = Some(claim);
                continue;
            }
            unrecorded.push(ClaimedBatch::empty(&claim));
            if was_publishing
                || summary.published + summary.retried + summary.dead > recorded_before
            {
                // The batch just published, or the outcomes recorded beside this claim, may have
                // promoted successors the claim could not see yet: claim again at once.
                continue;
            }
            if let Err(e) = self.record_all(&mut unrecorded, &mut summary).await {
                outage.pause(e, &mut summary, stop_at).await?;
                continue;
            }
            let Some(pause) = self.bus.config.idle_poll else {
                summary.stopped = Some(StopReason::Empty);
                break;
            };
            tokio::time::sleep(pause.min(stop_at.saturating_duration_since(Instant::now()))).await;
        }
        // A batch leased just before the deadline goes out now (the margin is for this), and
        // what is published is recorded once more before giving up on it.
        if let Some(claim) = ahead.take() {
            unrecorded.push(self.publish(claim).await);
        }
        if !unrecorded.is_empty() {
            match self.record_all(&mut unrecorded, &mut summary).await {
                Ok(()) => {}
                Err(e) if e.is_transient() => summary.store_errors += 1,
                Err(e) => return Err(e),
            }
        }
        let left: usize = unrecorded.iter().map(|b| b.outcomes.ids().len()).sum();
        if left > 0 {
            tracing::warn!(
                rows = left,
                "outcomes not recorded before the deadline; the rows are claimable again when \
                 their lease ends, and published ones go out once more (consumers dedupe)"
            );
        }
        if self.bus.config.idle_poll.is_some() {
            match self.store.release(&owner).await {
                Ok(()) => {
                    // A command that committed while the heartbeat still held did not wake
                    // anyone: take what is due now, in the first quarter of the margin, so a
                    // claim that then hits a silent database (bounded by the operation
                    // timeout, 5 s by default, under the default 10 s margin) still ends before
                    // the deadline.
                    let final_stop = stop_at + self.bus.config.safety_margin / 4;
                    while unrecorded.is_empty() && Instant::now() < final_stop {
                        let batch = self.dispatch_batch().await;
                        match batch {
                            Ok(batch) if batch.claimed == 0 => {
                                summary.add(batch);
                                break;
                            }
                            Ok(batch) => summary.add(batch),
                            Err(e) if e.is_transient() => {
                                summary.store_errors += 1;
                                break;
                            }
                            Err(e) => return Err(e),
                        }
                    }
                }
                // Not released: it expires by itself within its TTL.
                Err(e) if e.is_transient() => summary.store_errors += 1,
                Err(e) => return Err(e),
            }
        }
        if summary.claims == 0 {
            if let Some(e) = outage.last_error.take() {
                // Not one claim went through during the whole invocation: fail it, so the
                // function's error metric (and its alarm) shows the outage.
                return Err(e);
            }
        }
        summary.duration_ms = started.elapsed().as_millis() as u64;
        tracing::info!(
            claimed = summary.claimed,
            published = summary.published,
            retried = summary.retried,
            dead = summary.dead,
            cleaned = summary.cleaned,
            claims = summary.claims,
            store_errors = summary.store_errors,
            duration_ms = summary.duration_ms,
            stopped = ?summary.stopped,
            "drain finished"
        );
        Ok(summary)
    }

    /// One retention cleanup statement; returns how long to wait before the next. A failure is
    /// logged, not returned: cleanup must never stop publishing.
    async fn clean_up(&self, summary: &mut DispatchSummary) -> Duration {
        let Some(retention) = self.bus.config.retention else {
            return CLEANUP_IDLE_PAUSE;
        };
        match self
            .store
            .delete_published(retention, self.bus.config.cleanup_batch)
            .await
        {
            Ok(deleted) => {
                summary.cleaned += deleted;
                if deleted >= self.bus.config.cleanup_batch as u64 {
                    CLEANUP_BUSY_PAUSE
                } else {
                    CLEANUP_IDLE_PAUSE
                }
            }
            Err(error) => {
                tracing::warn!(error = %crate::telemetry::error_chain(&error), "retention cleanup failed");
                CLEANUP_IDLE_PAUSE
            }
        }
    }

    /// One claim, published and recorded. Outcomes of rows an appender holds right now are
    /// recorded once more, right away and then every 50 ms for up to a second; after that their
    /// rows are claimable again when the lease ends.
    pub async fn dispatch_batch(&self) -> Result<DispatchSummary, StoreError> {
        let mut unrecorded = vec![self.claim_and_publish().await?];
        let mut summary = DispatchSummary::default();
        for _ in 0..20 {
            self.record_all(&mut unrecorded, &mut summary).await?;
            if unrecorded.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(summary)
    }

    /// Records every batch's outcomes; keeps in `batches` only what could not be recorded yet.
    async fn record_all(
        &self,
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
            match self.record_batch(batch).await {
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

    /// One claim, published; the outcomes are not recorded yet.
    async fn claim_and_publish(&self) -> Result<ClaimedBatch, StoreError> {
        let claim = self.claim().await?;
        if claim.events.is_empty() {
            return Ok(ClaimedBatch::empty(&claim));
        }
        Ok(self.publish(claim).await)
    }

    /// Leases the next batch under a fresh lease owner.
    #[tracing::instrument(skip_all, fields(lease_owner))]
    async fn claim(&self) -> Result<Claim, StoreError> {
        let lease_owner = format!("{}/{}", self.worker_id, uuid::Uuid::new_v4().simple());
        tracing::Span::current().record("lease_owner", lease_owner.as_str());
        let started = Instant::now();
        let events = self
            .store
            .claim_batch(
                self.bus.config.batch_size,
                self.bus.config.lease,
                &lease_owner,
            )
            .await?;
        Ok(Claim {
            lease_owner,
            events,
            latency: started.elapsed(),
        })
    }

    /// Publishes a leased batch on a task of its own, so serializing and signing its calls
    /// never delays this drain's database round trips (the pipeline's other half).
    async fn publish(&self, claim: Claim) -> ClaimedBatch {
        AbortOnDrop::spawn(Arc::clone(&self.bus).publish(claim))
            .join()
            .await
    }

    /// Records a published batch's outcomes: what was recorded as a summary, and the batch with
    /// the outcomes still to record (rows an appender holds), if any. On failure hands the batch
    /// back to try again.
    async fn record_batch(
        &self,
        mut batch: ClaimedBatch,
    ) -> Result<(DispatchSummary, Option<ClaimedBatch>), (ClaimedBatch, StoreError)> {
        let mut later = Outcomes::default();
        if !batch.outcomes.is_empty() {
            match self
                .store
                .record_outcomes(&batch.lease_owner, &batch.outcomes)
                .await
            {
                Ok(left) => later = left,
                Err(e) => return Err((batch, e)),
            }
        }
        let later_ids: std::collections::HashSet<i64> = later.ids().into_iter().collect();
        let recorded = std::mem::take(&mut batch.outcomes).split(|id| !later_ids.contains(&id));
        let rest = (!later.is_empty()).then(|| ClaimedBatch {
            lease_owner: batch.lease_owner.clone(),
            claimed: 0,
            outcomes: later,
            publish_calls: 0,
            failed_publish_calls: 0,
            // Its claim is counted with the batch it was left over from.
            claim_latency: None,
            publish_latencies: Vec::new(),
        });
        let outcomes = recorded.0;
        Ok((
            DispatchSummary {
                claimed: batch.claimed,
                published: outcomes.published.len(),
                retried: outcomes.retries.len(),
                dead: outcomes.dead.len(),
                publish_calls: batch.publish_calls,
                failed_publish_calls: batch.failed_publish_calls,
                claim_latencies: batch.claim_latency.into_iter().collect(),
                publish_latencies: batch.publish_latencies,
                ..DispatchSummary::default()
            },
            rest,
        ))
    }
}

/// The publisher and the dispatcher's settings, shared with the tasks that publish its batches.
struct Bus<P> {
    publisher: P,
    config: DispatcherConfig,
}

impl<P: Publisher + 'static> Bus<P> {
    /// Publishes a leased batch in bus-sized calls, at most `max_in_flight` at once, and notes
    /// each row's outcome (not recorded yet).
    #[tracing::instrument(skip_all, fields(lease_owner = %claim.lease_owner, rows = claim.events.len()))]
    async fn publish(self: Arc<Self>, claim: Claim) -> ClaimedBatch {
        let mut batch = ClaimedBatch {
            lease_owner: claim.lease_owner,
            claimed: claim.events.len(),
            outcomes: Outcomes::default(),
            publish_calls: 0,
            failed_publish_calls: 0,
            claim_latency: Some(claim.latency),
            publish_latencies: Vec::new(),
        };
        let (messages, rejected) = self.prepare(claim.events);
        for (event, reason) in rejected {
            self.record(&mut batch.outcomes, &event, PublishOutcome::Reject(reason));
        }
        let calls = self.plan_calls(messages);
        batch.publish_calls = calls.len();
        let results: Vec<(Vec<OutgoingMessage>, Vec<PublishOutcome>, Duration)> =
            stream::iter(calls)
                .map(|call| {
                    // Each call is a task of its own, so the SDK's serializing, signing and
                    // parsing spread over the runtime's threads.
                    let bus = Arc::clone(&self);
                    let task = AbortOnDrop::spawn(async move {
                        let started = Instant::now();
                        let results = bus.publisher.publish(&call).await;
                        (call, results, started.elapsed())
                    });
                    task.join()
                })
                .buffer_unordered(self.config.max_in_flight)
                .collect()
                .await;
        batch.publish_latencies = results.iter().map(|r| r.2).collect();
        for (call, results, _) in results {
            if results
                .iter()
                .all(|r| matches!(r, PublishOutcome::Retry(_)))
            {
                batch.failed_publish_calls += 1;
            }
            for (message, outcome) in call.iter().zip(results) {
                self.record(&mut batch.outcomes, &message.event, outcome);
            }
        }
        batch
    }

    /// Serializes each row's envelope; rows that cannot be published at all (unreadable metadata,
    /// larger than the bus takes) come back as rejected with the reason.
    fn prepare(
        &self,
        claimed: Vec<ClaimedEvent>,
    ) -> (Vec<OutgoingMessage>, Vec<(ClaimedEvent, String)>) {
        let limit = self.publisher.limits().max_entry_bytes;
        let mut ready = Vec::with_capacity(claimed.len());
        let mut rejected = Vec::new();
        for event in claimed {
            let body = match EventEnvelope::body_of(&event) {
                Ok(body) => body,
                Err(e) => {
                    rejected.push((
                        event,
                        format!("malformed event, cannot build its envelope: {e}"),
                    ));
                    continue;
                }
            };
            let message = OutgoingMessage { event, body };
            let size = self.publisher.entry_size(&message);
            if size > limit {
                rejected.push((
                    message.event,
                    format!("message too large: {size} bytes, the bus takes at most {limit}"),
                ));
            } else {
                ready.push(message);
            }
        }
        (ready, rejected)
    }

    /// Groups messages into publish calls within the bus's entry count and byte limits.
    fn plan_calls(&self, messages: Vec<OutgoingMessage>) -> Vec<Vec<OutgoingMessage>> {
        let limits = self.publisher.limits();
        let mut calls = Vec::new();
        let mut current: Vec<OutgoingMessage> = Vec::with_capacity(limits.max_entries);
        let mut bytes = 0;
        for message in messages {
            let size = self.publisher.entry_size(&message);
            if !current.is_empty()
                && (current.len() == limits.max_entries || bytes + size > limits.max_batch_bytes)
            {
                calls.push(std::mem::take(&mut current));
                bytes = 0;
            }
            bytes += size;
            current.push(message);
        }
        if !current.is_empty() {
            calls.push(current);
        }
        calls
    }

    fn record(&self, outcomes: &mut Outcomes, event: &ClaimedEvent, outcome: PublishOutcome) {
        match outcome {
            PublishOutcome::Published => outcomes.published.push(event.id),
            PublishOutcome::Reject(reason) => {
                tracing::warn!(event_id = %event.event_id, tenant_id = %event.tenant_id, %reason, "event dead-lettered");
                outcomes.dead.push((event.id, reason));
            }
            PublishOutcome::Retry(reason) if event.attempts >= self.config.max_attempts => {
                let reason = format!("gave up after {} attempts: {reason}", event.attempts);
                tracing::warn!(event_id = %event.event_id, tenant_id = %event.tenant_id, %reason, "event dead-lettered");
                outcomes.dead.push((event.id, reason));
            }
            PublishOutcome::Retry(reason) => {
                let delay = backoff_delay(
                    event.attempts,
                    self.config.backoff_base,
                    self.config.backoff_cap,
                );
                outcomes.retries.push((event.id, delay, reason));
            }
        }
    }
}

/// A leased batch, not published yet.
struct Claim {
    lease_owner: String,
    events: Vec<ClaimedEvent>,
    latency: Duration,
}

/// A claim that was published but whose outcomes are not recorded yet.
struct ClaimedBatch {
    lease_owner: String,
    claimed: usize,
    outcomes: Outcomes,
    publish_calls: usize,
    failed_publish_calls: usize,
    /// How long its claim took; `None` for outcomes left over from an earlier record, whose
    /// claim is counted already.
    claim_latency: Option<Duration>,
    publish_latencies: Vec<Duration>,
}

impl ClaimedBatch {
    /// A claim that found nothing: only its latency is left to count.
    fn empty(claim: &Claim) -> Self {
        Self {
            lease_owner: claim.lease_owner.clone(),
            claimed: 0,
            outcomes: Outcomes::default(),
            publish_calls: 0,
            failed_publish_calls: 0,
            claim_latency: Some(claim.latency),
            publish_latencies: Vec::new(),
        }
    }
}

/// Pacing while the database is unavailable.
#[derive(Default)]
struct Outage {
    pause: Duration,
    last_error: Option<StoreError>,
}

/// First pause after a store failure; doubled after each further one.
const OUTAGE_FIRST_PAUSE: Duration = Duration::from_millis(100);
/// Longest pause between attempts while the database is unavailable.
const OUTAGE_MAX_PAUSE: Duration = Duration::from_secs(2);

impl Outage {
    /// After a failed store operation: a transient failure pauses (never past `stop_at`) and
    /// counts; any other failure ends the drain.
    async fn pause(
        &mut self,
        error: StoreError,
        summary: &mut DispatchSummary,
        stop_at: Instant,
    ) -> Result<(), StoreError> {
        if !error.is_transient() {
            return Err(error);
        }
        summary.store_errors += 1;
        self.pause = if self.pause.is_zero() {
            OUTAGE_FIRST_PAUSE
        } else {
            (self.pause * 2).min(OUTAGE_MAX_PAUSE)
        };
        tracing::warn!(error = %crate::telemetry::error_chain(&error),
            pause_ms = self.pause.as_millis() as u64, "database unavailable; the drain waits and carries on");
        self.last_error = Some(error);
        tokio::time::sleep(
            self.pause
                .min(stop_at.saturating_duration_since(Instant::now())),
        )
        .await;
        Ok(())
    }

    /// A store operation went through: the next failure starts pacing afresh.
    fn over(&mut self) {
        self.pause = Duration::ZERO;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_full_jitter_under_an_exponential_ceiling() {
        let base = Duration::from_millis(100);
        let cap = Duration::from_secs(10);
        for attempts in 1..=12 {
            let ceiling = (base * 2u32.pow(attempts as u32 - 1)).min(cap);
            let delays: Vec<Duration> = (0..200)
                .map(|_| backoff_delay(attempts, base, cap))
                .collect();
            assert!(delays.iter().all(|d| *d <= ceiling), "attempt {attempts}");
            // Full jitter spreads over the whole range, not a band near the ceiling.
            assert!(
                delays.iter().any(|d| *d < ceiling / 4),
                "attempt {attempts}"
            );
            assert!(
                delays.iter().any(|d| *d > ceiling / 2),
                "attempt {attempts}"
            );
        }
        assert!(backoff_delay(1_000, base, cap) <= cap);
        assert!(backoff_delay(0, base, cap) <= base);
    }
}
