//! The drain's rules against the in-memory store and bus: no PostgreSQL, no bus, each test well
//! under a second. What each would have caught is said beside it.

use std::time::{Duration, Instant};

use super::*;
use crate::memory::{MemoryPublisher, MemoryStatus, MemoryStore, StoreCall};
use crate::ports::OutboxStore;

fn config() -> DispatcherConfig {
    DispatcherConfig {
        batch_size: 10,
        max_in_flight: 4,
        lease: Duration::from_secs(5),
        max_attempts: 3,
        backoff_base: Duration::ZERO,
        backoff_cap: Duration::ZERO,
        safety_margin: Duration::ZERO,
        idle_poll: None,
        lane_poll: None,
        retention: None,
        cleanup_batch: 5_000,
    }
}

fn order(store: &MemoryStore, aggregate: &str, event_type: &str) -> i64 {
    store.append(
        "acme",
        "order",
        aggregate,
        event_type,
        serde_json::json!({}),
    )
}

async fn drain(
    store: &MemoryStore,
    bus: &MemoryPublisher,
    config: DispatcherConfig,
    for_ms: u64,
) -> Result<DispatchSummary, crate::ports::StoreError> {
    OutboxDispatcher::new(store.clone(), bus.clone(), config, "test")
        .drain(Instant::now() + Duration::from_millis(for_ms))
        .await
}

/// Per aggregate, the versions in the order the bus took them.
fn versions_on_the_bus(bus: &MemoryPublisher, aggregate: &str) -> Vec<i64> {
    bus.delivered()
        .iter()
        .filter(|e| e.aggregate_id == aggregate)
        .map(|e| e.aggregate_version)
        .collect()
}

#[tokio::test]
async fn successors_promoted_by_a_record_are_claimed_again_at_once() {
    // Only each aggregate's first version is due at first: the drain must claim again after
    // recording, not stop at the first empty claim.
    let store = MemoryStore::new();
    for _ in 0..4 {
        order(&store, "o-1", "order.step");
    }
    order(&store, "o-2", "order.step");
    let bus = MemoryPublisher::new();
    let summary = drain(&store, &bus, config(), 2_000).await.unwrap();
    assert_eq!(summary.published, 5);
    assert_eq!(summary.stopped, Some(StopReason::Empty));
    assert_eq!(versions_on_the_bus(&bus, "o-1"), [1, 2, 3, 4]);
    assert_eq!(versions_on_the_bus(&bus, "o-2"), [1]);
    assert!(store
        .rows()
        .iter()
        .all(|r| r.status == MemoryStatus::Published && r.times_published == 1));
}

#[tokio::test]
async fn outcomes_an_appender_holds_are_recorded_before_the_drain_stops_as_empty() {
    // The code before the split stopped as empty with v1's outcome unrecorded (held three
    // records in a row): v2 stayed behind, and v1 went out again after its lease.
    let store = MemoryStore::new();
    let v1 = order(&store, "o-1", "order.placed");
    order(&store, "o-1", "order.shipped");
    store.hold(v1, 3);
    let bus = MemoryPublisher::new();
    let summary = drain(&store, &bus, config(), 2_000).await.unwrap();
    assert_eq!(summary.stopped, Some(StopReason::Empty));
    assert_eq!(summary.published, 2);
    assert_eq!(
        versions_on_the_bus(&bus, "o-1"),
        [1, 2],
        "v1 published once"
    );
    assert!(store.calls(StoreCall::Record) >= 4);
    assert!(store
        .rows()
        .iter()
        .all(|r| r.status == MemoryStatus::Published));
}

#[tokio::test]
async fn a_publish_that_outlives_the_stop_is_recorded_before_the_drain_returns() {
    let store = MemoryStore::new();
    order(&store, "o-1", "order.placed");
    order(&store, "o-2", "order.placed");
    // Each call takes 300 ms; the drain stops claiming after 150 ms (a 250 ms deadline less its
    // 100 ms margin, under half of the 250 ms).
    let bus = MemoryPublisher::new().with_delay(Duration::from_millis(300));
    let mut config = config();
    config.safety_margin = Duration::from_millis(100);
    let started = Instant::now();
    let summary = drain(&store, &bus, config, 250).await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(summary.stopped, Some(StopReason::Deadline));
    assert_eq!((summary.claimed, summary.published), (2, 2));
    assert!(store
        .rows()
        .iter()
        .all(|r| r.status == MemoryStatus::Published && r.lease.is_none()));
}

#[tokio::test]
async fn a_batch_leased_ahead_when_the_drain_stops_goes_out_and_is_recorded() {
    // One event a claim: while the first is at the bus (200 ms), the second is leased ahead;
    // the stop (100 ms) falls meanwhile, and the leased one must still go out, not wait for its
    // lease to end.
    let store = MemoryStore::new();
    order(&store, "o-1", "order.placed");
    order(&store, "o-2", "order.placed");
    let bus = MemoryPublisher::new().with_delay(Duration::from_millis(200));
    let mut config = config();
    config.batch_size = 1;
    config.safety_margin = Duration::from_millis(100);
    let summary = drain(&store, &bus, config, 200).await.unwrap();
    assert_eq!(summary.stopped, Some(StopReason::Deadline));
    assert_eq!((summary.claimed, summary.published), (2, 2));
    assert_eq!(bus.delivered().len(), 2);
    assert!(store
        .rows()
        .iter()
        .all(|r| r.status == MemoryStatus::Published && r.lease.is_none()));
}

#[tokio::test]
async fn a_store_unavailable_mid_drain_pauses_it_and_loses_no_outcome() {
    let store = MemoryStore::new();
    for i in 0..25 {
        order(&store, &format!("o-{i}"), "order.placed");
    }
    // The first record fails as a database that does not answer; later, a claim.
    let bus = MemoryPublisher::new();
    let d = OutboxDispatcher::new(store.clone(), bus.clone(), config(), "test");
    store.fail_next(StoreCall::Record, 1, true);
    let summary = d
        .drain(Instant::now() + Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(summary.store_errors, 1);
    assert_eq!(summary.published, 25);
    assert_eq!(bus.delivered().len(), 25, "nothing published twice");
    assert!(store
        .rows()
        .iter()
        .all(|r| r.status == MemoryStatus::Published));

    for i in 0..5 {
        order(&store, &format!("p-{i}"), "order.placed");
    }
    store.fail_next(StoreCall::Claim, 1, true);
    let summary = d
        .drain(Instant::now() + Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!((summary.store_errors, summary.published), (1, 5));
}

#[tokio::test]
async fn a_statement_error_ends_the_drain_with_it() {
    let store = MemoryStore::new();
    order(&store, "o-1", "order.placed");
    store.fail_next(StoreCall::Claim, 1, false);
    let error = drain(&store, &MemoryPublisher::new(), config(), 1_000)
        .await
        .unwrap_err();
    assert!(!error.is_transient(), "{error}");
}

#[tokio::test]
async fn a_store_that_never_answers_fails_the_invocation() {
    let store = MemoryStore::new();
    order(&store, "o-1", "order.placed");
    store.fail_next(StoreCall::Claim, 1_000, true);
    let error = drain(&store, &MemoryPublisher::new(), config(), 300)
        .await
        .unwrap_err();
    assert!(error.is_transient(), "{error}");
    assert!(store.calls(StoreCall::Claim) >= 2, "it tried again");
}

#[tokio::test]
async fn a_margin_longer_than_half_the_time_left_is_cut_to_half() {
    // The default 10 s margin with a 1 s deadline: before, the drain claimed nothing at all.
    let store = MemoryStore::new();
    order(&store, "o-1", "order.placed");
    let bus = MemoryPublisher::new();
    let summary = drain(&store, &bus, DispatcherConfig::default(), 1_000)
        .await
        .unwrap();
    assert_eq!(summary.published, 1);
}

#[tokio::test]
async fn refusals_dead_letter_and_park_failures_retry_until_the_last_attempt() {
    let store = MemoryStore::new();
    order(&store, "o-1", "order.placed");
    order(&store, "o-1", "order.poisoned");
    order(&store, "o-1", "order.shipped");
    order(&store, "o-2", "order.placed");
    let bus = MemoryPublisher::new().with_max_entries(1);
    bus.refuse("order.poisoned");
    // The first two calls fail as a whole: whichever events they carried are retried.
    bus.fail_next_calls(2, "503 Service Unavailable");
    let summary = drain(&store, &bus, config(), 2_000).await.unwrap();
    assert_eq!(summary.dead, 1);
    assert_eq!(summary.failed_publish_calls, 2);
    assert_eq!(summary.retried, 2);
    let rows = store.rows();
    let status = |t: &str, a: &str| {
        rows.iter()
            .find(|r| r.event.event_type == t && r.event.aggregate_id == a)
            .map(|r| (r.status, r.last_error.clone()))
            .unwrap()
    };
    assert_eq!(status("order.placed", "o-1").0, MemoryStatus::Published);
    assert_eq!(
        status("order.poisoned", "o-1"),
        (MemoryStatus::Dead, Some("order.poisoned refused".into()))
    );
    assert_eq!(
        status("order.shipped", "o-1").0,
        MemoryStatus::Pending,
        "parked behind the dead one"
    );
    assert_eq!(status("order.placed", "o-2").0, MemoryStatus::Published);

    // A bus down for longer than the attempts: given up, with the count in the reason.
    let o3 = order(&store, "o-3", "order.placed");
    bus.fail_next_calls(3, "503 Service Unavailable");
    let summary = drain(&store, &bus, config(), 2_000).await.unwrap();
    assert_eq!((summary.retried, summary.dead), (2, 1));
    let row = store.rows().into_iter().find(|r| r.event.id == o3).unwrap();
    assert_eq!(row.status, MemoryStatus::Dead);
    assert_eq!(
        row.last_error.as_deref(),
        Some("gave up after 3 attempts: 503 Service Unavailable")
    );
}

#[tokio::test]
async fn a_polling_drain_heartbeats_publishes_what_arrives_and_stops_at_the_deadline() {
    let store = MemoryStore::new();
    let bus = MemoryPublisher::new();
    let mut config = config();
    config.idle_poll = Some(Duration::from_millis(10));
    let appender = {
        let store = store.clone();
        tokio::spawn(async move {
            for i in 0..5 {
                tokio::time::sleep(Duration::from_millis(40)).await;
                order(&store, &format!("o-{i}"), "order.placed");
            }
        })
    };
    let summary = drain(&store, &bus, config, 400).await.unwrap();
    appender.await.unwrap();
    assert_eq!(summary.stopped, Some(StopReason::Deadline));
    assert_eq!(summary.published, 5);
    // The first heartbeat and the release, at least.
    assert!(store.calls(StoreCall::Heartbeat) >= 2);
}

#[tokio::test]
async fn dispatch_batch_is_one_claim_published_and_recorded() {
    let store = MemoryStore::new();
    for i in 0..15 {
        order(&store, &format!("o-{i}"), "order.placed");
    }
    let d = OutboxDispatcher::new(store.clone(), MemoryPublisher::new(), config(), "test");
    let first = d.dispatch_batch().await.unwrap();
    assert_eq!((first.claimed, first.published, first.claims), (10, 10, 1));
    let second = d.dispatch_batch().await.unwrap();
    assert_eq!((second.claimed, second.published), (5, 5));
    assert_eq!(d.dispatch_batch().await.unwrap().claimed, 0);
}

#[tokio::test]
async fn the_memory_store_shares_claims_between_tenants_as_the_database_does() {
    let store = MemoryStore::new();
    for n in 0..50 {
        store.append(
            "busy",
            "order",
            &format!("b-{n}"),
            "order.placed",
            serde_json::json!({}),
        );
    }
    for tenant in ["quiet", "calm"] {
        store.append(
            tenant,
            "order",
            "q-1",
            "order.placed",
            serde_json::json!({}),
        );
    }
    let lease = Duration::from_secs(60);
    let tenants = |claimed: &[crate::outbox::ClaimedEvent]| -> Vec<String> {
        claimed.iter().map(|e| e.tenant_id.clone()).collect()
    };
    // One row of each tenant per turn: the quiet ones are in the first claim.
    let first = store.claim_batch(5, lease, "d1").await.unwrap();
    assert_eq!(tenants(&first), ["busy", "calm", "quiet", "busy", "busy"]);
    // Alone, the busy tenant gets whole batches, oldest first.
    let next = store.claim_batch(5, lease, "d1").await.unwrap();
    assert_eq!(
        next.iter()
            .map(|e| e.aggregate_id.as_str())
            .collect::<Vec<_>>(),
        ["b-3", "b-4", "b-5", "b-6", "b-7"]
    );
    // More tenants than the batch: served in rotation, after the last tenant served.
    let store = MemoryStore::new();
    for tenant in ["t1", "t2", "t3", "t4", "t5"] {
        for n in 0..3 {
            store.append(
                tenant,
                "order",
                &format!("{tenant}-{n}"),
                "order.placed",
                serde_json::json!({}),
            );
        }
    }
    let mut served = Vec::new();
    for _ in 0..3 {
        served.push(tenants(&store.claim_batch(2, lease, "d1").await.unwrap()));
    }
    assert_eq!(served, [["t1", "t2"], ["t3", "t4"], ["t5", "t1"]]);
}
