//! (Past 400 lines: the drain loop, its phases and the builder that wires the bus read best together.)
//!
//! Drain: the loop and its deadline. Each step claims the next batch while the bus takes the one
//! before and the store records the one before that ([`claim`](super::claim),
//! [`publish`](super::publish)); the loop decides only when to claim again, when to pause and
//! when to stop.
//!
//! The rules, each unit-tested against the in-memory store and bus ([`crate::memory`]):
//! - a claim that found nothing right after outcomes were recorded is made again at once (the
//!   record may have promoted successors the claim could not see);
//! - outcomes the store could not record yet (an appender holds the aggregate) are recorded
//!   again, and a drain does not stop as empty before they are;
//! - a batch leased before the stop goes out and is recorded, even if its publish outlives the
//!   stop;
//! - a store that is unavailable pauses the drain (100 ms doubling to 2 s) until the stop,
//!   keeping every outcome to record; any other store error ends it;
//! - the safety margin is never more than half the time the drain has;
//! - beside a step with a batch on the bus, the lane publishes the other tenants' events at
//!   once ([`lane`](super::lane)).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::claim::{self, Claim, ClaimedBatch};
use super::outage::Outage;
use super::publish::{AbortOnDrop, Bus, ClaimCheck};
use super::settings::{
    DispatcherConfig, CLEANUP_BUSY_PAUSE, CLEANUP_IDLE_PAUSE, HEARTBEAT_EVERY, HEARTBEAT_TTL,
};
use super::summary::{DispatchSummary, StopReason};
use crate::ports::{OutboxStore, Publisher, StoreError};

/// Pause before recording again outcomes an appender held.
const HELD_PAUSE: Duration = Duration::from_millis(50);
/// How long [`OutboxDispatcher::dispatch_batch`] tries to record outcomes an appender holds.
const HELD_PATIENCE: Duration = Duration::from_secs(1);

/// The claim → publish → record loop over a store and a bus.
pub struct OutboxDispatcher<S, P> {
    store: S,
    /// The publisher and the publishing settings (shared with the publishing tasks).
    bus: Arc<Bus<P>>,
    config: DispatcherConfig,
    worker_id: String,
}

/// A drain in progress: what is in flight between steps, and what was done.
struct Run {
    /// Names this drain's heartbeat.
    owner: String,
    summary: DispatchSummary,
    outage: Outage,
    /// Outcomes not recorded yet: the database was away, or an appender held the rows.
    unrecorded: Vec<ClaimedBatch>,
    /// Claimed and leased, not published yet: it goes to the bus while the store records the
    /// previous batch's outcomes and claims the next one.
    ahead: Option<Claim>,
    /// The lane's claim failed for good (not a database away): no lane for the rest of the drain.
    lane_off: bool,
    /// When the lane may claim next (it polls across steps).
    lane_next: Instant,
    /// The lane polls until then (see `LANE_AWAKE`).
    lane_awake_until: Instant,
    next_heartbeat: Instant,
    next_cleanup: Instant,
}

/// One stretch of a drain: the main one, and after the heartbeat is released a short last one.
struct Phase {
    stop_at: Instant,
    /// Poll this often when nothing is due (the main phase of a polling drain), else stop.
    idle_poll: Option<Duration>,
    /// Heartbeat and retention cleanup run in this phase.
    housekeeping: bool,
    /// The first unavailable store ends the phase, with nothing more tried (the last phase,
    /// inside the margin: no pause, no second wait on a silent database).
    stop_on_outage: bool,
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
            bus: Arc::new(Bus {
                publisher,
                max_in_flight: config.max_in_flight,
                calls: tokio::sync::Semaphore::new(config.max_in_flight.max(1)),
                retry: config.retry_policy(),
                claim_check: None,
            }),
            config,
            worker_id: worker_id.into(),
        }
    }

    /// Sends envelopes over the claim check's threshold through S3 (a pointer on the bus).
    /// Called while building, before any drain shares the bus.
    pub fn with_claim_check(mut self, claim_check: ClaimCheck) -> Self {
        Arc::get_mut(&mut self.bus)
            .expect("with_claim_check is called while building the dispatcher")
            .claim_check = Some(claim_check);
        self
    }

    /// The store, for wiring.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The settings it drains with.
    pub fn config(&self) -> &DispatcherConfig {
        &self.config
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
        let margin = self
            .config
            .safety_margin
            .min(deadline.saturating_duration_since(started) / 2);
        let stop_at = deadline.checked_sub(margin).unwrap_or(started);
        let mut run = Run {
            owner: format!("{}/{}", self.worker_id, uuid::Uuid::new_v4().simple()),
            summary: DispatchSummary::default(),
            outage: Outage::default(),
            unrecorded: Vec::new(),
            ahead: None,
            lane_off: false,
            lane_next: started,
            lane_awake_until: started,
            next_heartbeat: started,
            next_cleanup: started,
        };
        let main = Phase {
            stop_at,
            idle_poll: self.config.idle_poll,
            housekeeping: true,
            stop_on_outage: false,
        };
        run.summary.stopped = Some(self.run_phase(&mut run, &main).await?);
        let mut release_failure = None;
        if self.config.idle_poll.is_some() {
            match self.store.release(&run.owner).await {
                // A command that committed while the heartbeat still held did not wake anyone:
                // take what is due now, in the first quarter of the margin, so a claim that then
                // hits a silent database (bounded by the operation timeout, 5 s by default,
                // under the default 10 s margin) still ends before the deadline.
                Ok(()) if run.unrecorded.is_empty() => {
                    let last = Phase {
                        stop_at: stop_at + margin / 4,
                        idle_poll: None,
                        housekeeping: false,
                        stop_on_outage: true,
                    };
                    self.run_phase(&mut run, &last).await?;
                }
                Ok(()) => {}
                // Not released: it expires by itself within its TTL.
                Err(e) if e.is_transient() => run.summary.store_errors += 1,
                Err(e) => release_failure = Some(e),
            }
        }
        let left: usize = run.unrecorded.iter().map(ClaimedBatch::rows).sum();
        if left > 0 {
            tracing::warn!(
                rows = left,
                "outcomes not recorded before the deadline; the rows are claimable again when \
                 their lease ends, and published ones go out once more (consumers dedupe)"
            );
        }
        if let Some(e) = release_failure {
            return Err(e);
        }
        let mut summary = run.summary;
        if summary.claims == 0 {
            if let Some(e) = run.outage.last_error.take() {
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

    /// Steps until the phase stops, then publishes what was leased ahead and records what it
    /// can. Returns why it stopped.
    async fn run_phase(&self, run: &mut Run, phase: &Phase) -> Result<StopReason, StoreError> {
        let mut store_away = false;
        let stopped = loop {
            let now = Instant::now();
            if now >= phase.stop_at {
                break StopReason::Deadline;
            }
            if phase.housekeeping {
                if self.config.idle_poll.is_some() && now >= run.next_heartbeat {
                    if let Err(e) = self.store.heartbeat(&run.owner, HEARTBEAT_TTL).await {
                        run.outage.pause(e, &mut run.summary, phase.stop_at).await?;
                        continue;
                    }
                    run.next_heartbeat = now + HEARTBEAT_EVERY;
                }
                if now >= run.next_cleanup {
                    run.next_cleanup = now + self.clean_up(&mut run.summary).await;
                }
            }
            match self.step(run, phase).await? {
                Step::Again => {}
                Step::Outage => {
                    store_away = true;
                    break StopReason::Deadline;
                }
                Step::Idle => match phase.idle_poll {
                    None => break StopReason::Empty,
                    Some(pause) => {
                        let left = phase.stop_at.saturating_duration_since(Instant::now());
                        tokio::time::sleep(pause.min(left)).await;
                    }
                },
            }
        };
        if store_away {
            // What is leased goes out after its lease; what is published is reported left over.
            return Ok(stopped);
        }
        // A batch leased just before the stop goes out now (the margin is for this), and what
        // is published is recorded once more before giving up on it.
        if let Some(claim) = run.ahead.take() {
            let published = self.publish(claim).await;
            run.unrecorded.push(published);
        }
        if !run.unrecorded.is_empty() {
            match claim::record_all(&self.store, &mut run.unrecorded, &mut run.summary).await {
                Ok(()) => {}
                Err(e) if e.is_transient() => run.summary.store_errors += 1,
                Err(e) => return Err(e),
            }
        }
        Ok(stopped)
    }

    /// One step of the pipeline: the bus takes batch k while the store records batch k-1 (which
    /// promotes its aggregates' next events) and, on a second connection, leases batch k+1. No
    /// transaction spans the publish, and at most `max_in_flight` calls are at the bus.
    async fn step(&self, run: &mut Run, phase: &Phase) -> Result<Step, StoreError> {
        let publishing = run.ahead.take();
        let was_publishing = publishing.is_some();
        let recorded_before = run.summary.recorded();
        // The lane: not when turned off, for this drain or by the settings, nor in the short
        // last phase (inside the margin). It polls beside a loaded step (a batch on the bus),
        // skipping that batch's tenants.
        let lane_poll = self
            .config
            .lane_poll
            .filter(|_| !run.lane_off && !phase.stop_on_outage);
        // It polls only while other tenants are about (LANE_AWAKE).
        let skip = publishing
            .as_ref()
            .filter(|_| lane_poll.is_some() && Instant::now() < run.lane_awake_until)
            .map(Claim::tenants);
        let lane_next = run.lane_next;
        let (done, step_done) = tokio::sync::watch::channel(false);
        let main = async {
            let out = tokio::join!(
                async {
                    match publishing {
                        Some(claim) => Some(self.publish(claim).await),
                        None => None,
                    }
                },
                claim::record_all(&self.store, &mut run.unrecorded, &mut run.summary),
                self.lease_and_split(lane_poll.is_some()),
            );
            let _ = done.send(true);
            out
        };
        let lane = async {
            match (skip, lane_poll) {
                (Some(skip), Some(poll)) => Some(
                    self.lane(skip, poll, phase.stop_at, lane_next, step_done)
                        .await,
                ),
                _ => None,
            }
        };
        let ((published, recorded, (claimed, split)), lane) = tokio::join!(main, lane);
        run.unrecorded.extend(published);
        for lane in [Some(split), lane].into_iter().flatten() {
            run.summary.lane_claims += lane.claims;
            run.summary.lane_claimed += lane.rows;
            run.lane_next = lane.next_claim.unwrap_or(run.lane_next);
            if lane.several_tenants || lane.rows > 0 {
                run.lane_awake_until = Instant::now() + super::settings::LANE_AWAKE;
            }
            run.unrecorded.extend(lane.unrecorded);
            match lane.error {
                // The lane only speeds other tenants up: its failure never stops the drain. A
                // database that is away shows in the drain's own next statement.
                Some(e) if e.is_transient() => run.summary.store_errors += 1,
                Some(e) => {
                    // A database not migrated to V15, say: no lane for the rest of this drain.
                    tracing::warn!(error = %crate::telemetry::error_chain(&e),
                        "the lane's claim failed; the lane is off for the rest of this drain (other tenants' events wait for the main claims)");
                    run.lane_off = true;
                }
                None => {}
            }
        }
        let claim = match (recorded, claimed) {
            (Ok(()), Ok(claim)) => claim,
            (recorded, claimed) => {
                // Keep what was leased; pause for the failure.
                let claim_failure = match claimed {
                    Ok(claim) if claim.events.is_empty() => {
                        run.unrecorded.push(ClaimedBatch::empty(&claim));
                        None
                    }
                    Ok(claim) => {
                        run.ahead = Some(claim);
                        None
                    }
                    Err(e) => Some(e),
                };
                if let Some(e) = recorded.err().or(claim_failure) {
                    return self.after_failure(run, phase, e).await;
                }
                return Ok(Step::Again);
            }
        };
        run.outage.over();
        if !claim.events.is_empty() {
            run.ahead = Some(claim);
            return Ok(Step::Again);
        }
        run.unrecorded.push(ClaimedBatch::empty(&claim));
        if was_publishing || run.summary.recorded() > recorded_before {
            // The batch just published, or the outcomes recorded beside this claim, may have
            // promoted successors the claim could not see yet: claim again at once.
            return Ok(Step::Again);
        }
        if let Err(e) = claim::record_all(&self.store, &mut run.unrecorded, &mut run.summary).await
        {
            return self.after_failure(run, phase, e).await;
        }
        if run.summary.recorded() > recorded_before {
            // What this record just settled may have promoted successors too.
            return Ok(Step::Again);
        }
        if run.unrecorded.iter().any(|b| b.rows() > 0) {
            // An appender holds rows whose outcomes are known: not empty until they are recorded.
            let left = phase.stop_at.saturating_duration_since(Instant::now());
            tokio::time::sleep(HELD_PAUSE.min(left)).await;
            return Ok(Step::Again);
        }
        Ok(Step::Idle)
    }

    /// After a failed store operation: pause and step again, or (in a phase that stops on an
    /// outage) end the phase; a failure that is not transient ends the drain.
    async fn after_failure(
        &self,
        run: &mut Run,
        phase: &Phase,
        error: StoreError,
    ) -> Result<Step, StoreError> {
        if phase.stop_on_outage && error.is_transient() {
            run.summary.store_errors += 1;
            run.outage.last_error = Some(error);
            return Ok(Step::Outage);
        }
        run.outage
            .pause(error, &mut run.summary, phase.stop_at)
            .await?;
        Ok(Step::Again)
    }

    /// One claim, published and recorded. Outcomes of rows an appender holds right now are
    /// recorded once more every 50 ms for up to a second; after that their rows are claimable
    /// again when the lease ends.
    pub async fn dispatch_batch(&self) -> Result<DispatchSummary, StoreError> {
        let claim = self.lease(None).await?;
        let mut unrecorded = vec![if claim.events.is_empty() {
            ClaimedBatch::empty(&claim)
        } else {
            self.publish(claim).await
        }];
        let mut summary = DispatchSummary::default();
        let give_up = Instant::now() + HELD_PATIENCE;
        loop {
            claim::record_all(&self.store, &mut unrecorded, &mut summary).await?;
            if unrecorded.is_empty() || Instant::now() >= give_up {
                return Ok(summary);
            }
            tokio::time::sleep(HELD_PAUSE).await;
        }
    }

    /// One retention cleanup statement; returns how long to wait before the next. A failure is
    /// logged, not returned: cleanup must never stop publishing.
    async fn clean_up(&self, summary: &mut DispatchSummary) -> Duration {
        let Some(retention) = self.config.retention else {
            return CLEANUP_IDLE_PAUSE;
        };
        match self
            .store
            .delete_published(retention, self.config.cleanup_batch)
            .await
        {
            Ok(deleted) => {
                summary.cleaned += deleted;
                if deleted >= self.config.cleanup_batch as u64 {
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

    /// The main claim (a batch), or with `skip` the lane's ([`super::lane`]).
    pub(super) async fn lease(&self, skip: Option<&[String]>) -> Result<Claim, StoreError> {
        let limit = match skip {
            Some(_) => super::settings::LANE_BATCH.min(self.config.batch_size),
            None => self.config.batch_size,
        };
        claim::lease(&self.store, &self.worker_id, limit, self.config.lease, skip).await
    }

    /// Publishes a leased batch on a task of its own, so serializing and signing its calls
    /// never delays this drain's database round trips (the pipeline's other half).
    pub(super) async fn publish(&self, claim: Claim) -> ClaimedBatch {
        AbortOnDrop::spawn(Arc::clone(&self.bus).publish(claim))
            .join()
            .await
    }
}

/// What a step leaves the loop to do.
enum Step {
    /// Step again at once.
    Again,
    /// Nothing was due and nothing is in flight.
    Idle,
    /// The store is unavailable and the phase stops on that.
    Outage,
}
