//! The lane: while the drain is loaded, the tenants not being drained in bulk go at once.
//!
//! The drain is a pipeline: each step publishes one batch while it records the one before and
//! claims the one after, and the claim waits as the batch ahead until the next step. That is
//! its throughput, and it is also what a quiet tenant's event waited through beside another
//! tenant's backlog: the rest of the step, the next claim (80-150 ms for 500 rows on a loaded
//! machine), then a step as the batch ahead (537 ms at the p99 against 11 ms with no backlog;
//! docs/benchmarks.md). The lane takes the other tenants out of that wait, in two ways:
//! - the rows of a full claim that belong to tenants with less than a whole share of it (every
//!   due row they had, [`Claim::split`]) are published at once, not held ahead with the bulk;
//! - during a step that has a batch on the bus, the lane claims every `lane_poll` up to
//!   [`LANE_BATCH`] due events of every tenant but that batch's ([`OutboxStore::claim_waiting`],
//!   migration V15) and sends them to the bus at once, claiming on while they are there; after a
//!   full lane claim it claims again at once. It polls only while other tenants are about: for
//!   [`LANE_AWAKE`](super::settings::LANE_AWAKE) after a claim held more than one tenant or the
//!   lane took rows. So a drain of one tenant alone makes no lane claims, and a tenant's first
//!   event after a quiet spell goes out with the next claim (split off at once), its next ones
//!   through the lane.
//!
//! Both are leased, published and recorded as any claim (a fresh lease owner, the same record),
//! so every rule of the drain holds for them: an aggregate's next event is claimable only once
//! this one is recorded. Their publish calls count against the same `max_in_flight`, and their
//! claims share the drain's connections. The lane holds at most two batches on the bus, stops
//! when the step's own work is done (after the claim it is in and the publishes it started), and
//! never runs in the drain's last phase, inside the margin. Its outcomes join the drain's list of
//! outcomes to record: the next step's record takes them, off the lane's path. A step lasts as
//! long as its batch's publish, which the SDK's operation timeout (12 s) bounds well inside the
//! lease (60 s by default), so they are recorded before their lease ends. A store failure of the
//! lane never stops the drain: a database away shows in the drain's own next statement, and any
//! other failure turns the lane off for the rest of the drain. `DISPATCH_LANE_POLL_MS=0` turns
//! off both ways: the drain is then the pipeline alone.

use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::watch;

use super::claim::{Claim, ClaimedBatch};
use super::drain::OutboxDispatcher;
use super::settings::LANE_BATCH;
use crate::ports::{OutboxStore, Publisher, StoreError};

/// What the lane did beside one step of the drain.
#[derive(Default)]
pub(super) struct Lane {
    /// Claims it made (the summary's `lane_claims`).
    pub(super) claims: usize,
    /// Rows they took (the summary's `lane_claimed`).
    pub(super) rows: usize,
    /// When it may claim next: the next step's lane goes on from there, so a drain of short
    /// steps does not claim at the start of each.
    pub(super) next_claim: Option<Instant>,
    /// The main claim held rows of more than one tenant.
    pub(super) several_tenants: bool,
    /// Published, to record with the drain's next record.
    pub(super) unrecorded: Vec<ClaimedBatch>,
    /// The store failure that stopped it.
    pub(super) error: Option<StoreError>,
}

/// Lane batches on the bus at once: the lane claims no more while they are there.
const LANE_IN_FLIGHT: usize = 2;

impl<S: OutboxStore, P: Publisher + 'static> OutboxDispatcher<S, P> {
    /// Leases the next batch and, with `lane`, publishes at once what of it is not the bulk.
    /// Returns the batch ahead, and what went at once.
    pub(super) async fn lease_and_split(&self, lane: bool) -> (Result<Claim, StoreError>, Lane) {
        let mut went = Lane::default();
        let claim = match self.lease(None).await {
            Ok(claim) => claim,
            Err(e) => return (Err(e), went),
        };
        went.several_tenants = claim.tenants().len() > 1;
        if !lane {
            return (Ok(claim), went);
        }
        let (ahead, now) = claim.split(self.config().batch_size);
        if let Some(now) = now {
            went.unrecorded.push(self.publish(now).await);
        }
        (Ok(ahead), went)
    }

    /// The lane beside one step of a loaded drain, skipping the tenants of the batch on the bus
    /// (`skip`), until `step_done` says the step's own work is done (or `stop_at` passes): every
    /// `poll` from `next_claim` on, a claim of the other tenants' due events, sent to the bus at
    /// once. It claims on
    /// while they are there, up to [`LANE_IN_FLIGHT`] batches, and again at once after a full
    /// claim; the drain records them with its next record.
    pub(super) async fn lane(
        &self,
        skip: Vec<String>,
        poll: Duration,
        stop_at: Instant,
        next_claim: Instant,
        mut step_done: watch::Receiver<bool>,
    ) -> Lane {
        let mut lane = Lane::default();
        let limit = LANE_BATCH.min(self.config().batch_size);
        let mut on_bus = FuturesUnordered::new();
        let mut next_claim = next_claim;
        loop {
            let now = Instant::now();
            if now >= stop_at || *step_done.borrow() {
                break;
            }
            if on_bus.len() < LANE_IN_FLIGHT && now >= next_claim {
                lane.claims += 1;
                match self.lease(Some(&skip)).await {
                    Ok(claim) => {
                        let rows = claim.events.len();
                        next_claim = Instant::now()
                            + if rows as i64 >= limit {
                                Duration::ZERO
                            } else {
                                poll
                            };
                        if rows > 0 {
                            lane.rows += rows;
                            on_bus.push(self.publish(claim));
                        }
                    }
                    Err(e) => {
                        lane.error = Some(e);
                        break;
                    }
                }
                continue;
            }
            let room = on_bus.len() < LANE_IN_FLIGHT;
            tokio::select! {
                biased;
                _ = step_done.wait_for(|done| *done) => break,
                Some(published) = on_bus.next(), if !on_bus.is_empty() => {
                    lane.unrecorded.push(published);
                }
                _ = tokio::time::sleep_until(next_claim.into()), if room => {}
            }
        }
        while let Some(published) = on_bus.next().await {
            lane.unrecorded.push(published);
        }
        lane.next_claim = Some(next_claim);
        lane
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::super::claim::Claim;
    use super::super::{DispatcherConfig, OutboxDispatcher};
    use crate::memory::{MemoryPublisher, MemoryStatus, MemoryStore, StoreCall};
    use crate::ports::OutboxStore;

    fn append(store: &MemoryStore, tenant: &str, aggregate: &str) -> i64 {
        store.append(
            tenant,
            "order",
            aggregate,
            "order.placed",
            serde_json::json!({}),
        )
    }

    fn config(lane_poll: Option<Duration>) -> DispatcherConfig {
        DispatcherConfig {
            batch_size: 10,
            max_in_flight: 4,
            safety_margin: Duration::ZERO,
            retention: None,
            lane_poll,
            ..DispatcherConfig::default()
        }
    }

    fn each_published_once(store: &MemoryStore) {
        assert!(store
            .rows()
            .iter()
            .all(|r| r.status == MemoryStatus::Published && r.times_published == 1));
    }

    /// Drains until nothing is due, the lane polling every millisecond.
    async fn drain_with_a_busy_lane(
        store: &MemoryStore,
        bus: &MemoryPublisher,
    ) -> crate::dispatcher::DispatchSummary {
        OutboxDispatcher::new(
            store.clone(),
            bus.clone(),
            config(Some(Duration::from_millis(1))),
            "test",
        )
        .drain(Instant::now() + Duration::from_secs(10))
        .await
        .unwrap()
    }

    /// How long a quiet tenant's event, appended while another tenant's batch is on the bus
    /// (400 ms a call, 10 rows a batch, 40 rows waiting), takes to reach the bus. With `awake`,
    /// the quiet tenant had an event in the first claim (the lane polls for a second after).
    async fn quiet_wait(lane_poll: Option<Duration>, awake: bool) -> Duration {
        let store = MemoryStore::new();
        for n in 0..40 {
            append(&store, "bulk", &format!("b-{n}"));
        }
        if awake {
            append(&store, "quiet", "q-0");
        }
        let bus = MemoryPublisher::new().with_delay(Duration::from_millis(400));
        let d = OutboxDispatcher::new(store.clone(), bus.clone(), config(lane_poll), "test");
        let drain =
            tokio::spawn(async move { d.drain(Instant::now() + Duration::from_secs(10)).await });
        // The first batch is answered at 400 ms: the second is on the bus now, the third
        // leased ahead of the quiet event.
        while bus.calls() < 1 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let quiet = append(&store, "quiet", "q-1");
        let appended = Instant::now();
        while !bus.delivered().iter().any(|e| e.id == quiet) {
            assert!(
                appended.elapsed() < Duration::from_secs(5),
                "never published"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let waited = appended.elapsed();
        let summary = drain.await.unwrap().unwrap();
        assert_eq!(summary.published, 41 + usize::from(awake));
        assert_eq!(
            summary.lane_claimed == 1,
            lane_poll.is_some() && awake,
            "{summary:?}"
        );
        each_published_once(&store);
        waited
    }

    #[tokio::test]
    async fn a_quiet_tenants_event_goes_out_while_another_tenants_batch_is_on_the_bus() {
        // The lane claims it within a poll and publishes it beside the batch on the bus: about
        // 405 ms, one call.
        let lane = Some(Duration::from_millis(5));
        let with_lane = quiet_wait(lane, true).await;
        assert!(with_lane < Duration::from_millis(575), "{with_lane:?}");
        // The lane asleep (the bulk's tenant was alone for over a second): the claim at 800 ms
        // takes it with 9 of the bulk and publishes it at once, not held ahead: about 750 ms.
        let asleep = quiet_wait(lane, false).await;
        assert!(
            asleep > Duration::from_millis(575) && asleep < Duration::from_millis(1_000),
            "{asleep:?}"
        );
        // Without the lane (as before it): the claim at 800 ms takes it, it waits as the batch
        // ahead until 1,200 and goes out with the bulk at 1,600: about 1,150 ms.
        let without = quiet_wait(None, false).await;
        assert!(without > Duration::from_millis(1_000), "{without:?}");
    }

    #[tokio::test]
    async fn the_lane_keeps_every_aggregates_order_and_publishes_each_event_once() {
        // A bulk tenant's 50 events over 10 aggregates wait, and one quiet event (the first
        // claim holds two tenants: the lane polls). While the drain runs the quiet tenant
        // appends 3 versions of 3 aggregates and 9 new aggregates, one event every 3-4 ms: the
        // lane, the split and the main claims all take some of them.
        let store = MemoryStore::new();
        for _ in 0..5 {
            for n in 0..10 {
                append(&store, "bulk", &format!("b-{n}"));
            }
        }
        append(&store, "quiet", "q-start");
        let bus = MemoryPublisher::new().with_delay(Duration::from_millis(20));
        let config = DispatcherConfig {
            idle_poll: Some(Duration::from_millis(2)),
            ..config(Some(Duration::from_millis(1)))
        };
        let d = OutboxDispatcher::new(store.clone(), bus.clone(), config, "test");
        let drain =
            tokio::spawn(async move { d.drain(Instant::now() + Duration::from_secs(1)).await });
        for round in 0..3 {
            for n in 0..3 {
                tokio::time::sleep(Duration::from_millis(4)).await;
                append(&store, "quiet", &format!("q-{n}"));
                tokio::time::sleep(Duration::from_millis(3)).await;
                append(&store, "quiet", &format!("fresh-{round}-{n}"));
            }
        }
        let summary = drain.await.unwrap().unwrap();
        assert_eq!(summary.published, 69);
        assert!(summary.lane_claimed > 0, "{summary:?}");
        let mut seen: std::collections::HashMap<String, i64> = Default::default();
        for event in bus.delivered() {
            let last = seen.entry(event.aggregate_id.clone()).or_insert(0);
            assert_eq!(event.aggregate_version, *last + 1, "{}", event.aggregate_id);
            *last = event.aggregate_version;
        }
        each_published_once(&store);
    }

    #[tokio::test]
    async fn a_lane_that_fails_never_stops_the_drain() {
        // A database not migrated to V15 fails the lane's claim for good: the drain goes on
        // without its lane (one warning), and publishes every event with its main claims.
        let store = MemoryStore::new();
        for n in 0..30 {
            append(&store, "bulk", &format!("b-{n}"));
        }
        append(&store, "quiet", "q-1");
        store.fail_next(StoreCall::ClaimWaiting, 1, false);
        let bus = MemoryPublisher::new().with_delay(Duration::from_millis(20));
        let summary = drain_with_a_busy_lane(&store, &bus).await;
        assert_eq!(summary.published, 31);
        assert_eq!(
            store.calls(StoreCall::ClaimWaiting),
            1,
            "the lane stays off"
        );
        each_published_once(&store);
    }

    #[tokio::test]
    async fn a_full_claim_keeps_only_the_bulk_ahead() {
        let store = MemoryStore::new();
        for n in 0..12 {
            append(&store, "bulk", &format!("b-{n}"));
        }
        append(&store, "calm", "c-1");
        append(&store, "quiet", "q-1");
        append(&store, "quiet", "q-2");
        let lease = Duration::from_secs(60);
        let claimed = |events| Claim {
            lease_owner: "d1/1".into(),
            events,
            latency: Some(Duration::from_millis(3)),
        };
        let tenants = |c: &Claim| c.events.iter().map(|e| e.tenant_id.clone()).collect();
        // Full (10): the bulk's 7 stay ahead, the 3 others go at once, with the statement's
        // latency (counted once).
        let full = claimed(store.claim_batch(10, lease, "d1/1").await.unwrap());
        let (ahead, now) = full.split(10);
        let now = now.expect("the others go at once");
        assert_eq!(ahead.tenants(), ["bulk"]);
        let mut others: Vec<String> = tenants(&now);
        others.sort();
        assert_eq!(others, ["calm", "quiet", "quiet"]);
        assert_eq!(
            (ahead.events.len(), ahead.latency, now.latency),
            (7, None, Some(Duration::from_millis(3)))
        );
        // Not full: whole, ahead.
        let short = claimed(store.claim_batch(10, lease, "d1/2").await.unwrap());
        assert_eq!(short.events.len(), 5);
        let (ahead, now) = short.split(10);
        assert!(now.is_none());
        assert_eq!(ahead.events.len(), 5);
        // Three tenants with more due than the batch holds: 4, 3 and 3 rows, every one a whole
        // share (10 / 3), all of them the bulk.
        let store = MemoryStore::new();
        for n in 0..5 {
            for tenant in ["a", "b", "c"] {
                append(&store, tenant, &format!("{tenant}-{n}"));
            }
        }
        let shared = claimed(store.claim_batch(10, lease, "d1/3").await.unwrap());
        let (ahead, now) = shared.split(10);
        assert!(now.is_none());
        assert_eq!(ahead.tenants(), ["a", "b", "c"]);
    }
}
