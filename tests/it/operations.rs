//! (Past 400 lines: one test per operator command run as a process, sharing this file's fixtures.)
//!
//! Operating the outbox: `outboxctl status | redrive | replay | cleanup` run as a real process
//! against a real database, retention inside the dispatcher's drain, the dispatcher heartbeat and
//! the command handler's wake-up call, and the metrics the functions write.

use std::process::Output;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lambda_runtime::{Context, LambdaEvent};
use serde_json::Value;
use tokio_postgres::Client;

use outbox_tests::aws::{moto_endpoint, sdk_config_for};
use outbox_tests::fake_lambda::FakeLambda;
use outbox_tests::{
    dispatcher, invoke, outboxctl, paid_body, paid_request, seed_outbox, stderr, stdout,
    test_dispatcher_config, TestDb,
};
use payment_command::{HandlerConfig, PaymentCommandHandler};
use payments::ports::PaymentCommandStore;
use payments::store::PgPaymentStore;
use pg_outbox::aws::wake::LambdaWake;
use pg_outbox::dispatcher::{DispatcherConfig, StopReason, Target};
use pg_outbox::ports::{OutboxStore, WakeDispatcher};
use pg_outbox::postgres::outbox::PgOutboxStore;
use pg_outbox::postgres::Db;

fn json_of(output: &Output) -> Value {
    assert!(
        output.status.success(),
        "outboxctl failed: {}{}",
        stdout(output),
        stderr(output)
    );
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", stdout(output)))
}

async fn event_id(client: &Client, aggregate: &str, version: i64) -> String {
    client
        .query_one(
            "SELECT event_id::text FROM outbox WHERE aggregate_id = $1 AND aggregate_version = $2",
            &[&aggregate, &version],
        )
        .await
        .expect("event id")
        .get(0)
}

async fn status_of(client: &Client, aggregate: &str) -> Vec<String> {
    client
        .query(
            "SELECT status FROM outbox WHERE aggregate_id = $1 ORDER BY aggregate_version",
            &[&aggregate],
        )
        .await
        .expect("statuses")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Inserted oldest first, as real rows are (ids follow creation time):
/// acme: pay_c created 30 days ago, v1 and v2 dead, v3 waiting; pay_f created 20 days ago and
/// published just now; pay_a created and published 10 days ago; pay_b v1 published, v2 dead, v3
/// waiting; pay_d v1 failing (retrying in an hour), v2 and v3 pending; pay_e all published.
/// globex: pay_x v1 and v2 published.
async fn seed_operations(db: &TestDb) -> Client {
    let client = db.client().await;
    let ids = |names: &[&str]| names.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    seed_outbox(&client, "acme", &ids(&["pay_c"]), 3, "{}").await;
    seed_outbox(&client, "acme", &ids(&["pay_f"]), 1, "{}").await;
    seed_outbox(&client, "acme", &ids(&["pay_a"]), 3, "{}").await;
    seed_outbox(&client, "acme", &ids(&["pay_b", "pay_d", "pay_e"]), 3, "{}").await;
    seed_outbox(&client, "globex", &ids(&["pay_x"]), 2, "{}").await;
    client
        .batch_execute(
            "UPDATE outbox SET created_at = now() - interval '30 days' WHERE aggregate_id = 'pay_c';
             UPDATE outbox SET status = 'dead', last_error = 'rejected: c' || aggregate_version,
                    attempts = 10, failed_at = now() - interval '2 minutes'
             WHERE aggregate_id = 'pay_c' AND aggregate_version < 3;
             UPDATE outbox SET created_at = now() - interval '20 days', status = 'published',
                    published_at = now()
             WHERE aggregate_id = 'pay_f';
             UPDATE outbox SET status = 'published', published_at = now() - interval '10 days',
                    created_at = now() - interval '10 days'
             WHERE aggregate_id = 'pay_a';
             UPDATE outbox SET status = 'published', published_at = now()
             WHERE aggregate_id IN ('pay_e', 'pay_x') OR (aggregate_id = 'pay_b' AND aggregate_version = 1);
             UPDATE outbox SET status = 'dead', last_error = 'rejected: b2', attempts = 10,
                    failed_at = now() - interval '1 minute'
             WHERE aggregate_id = 'pay_b' AND aggregate_version = 2;
             UPDATE outbox SET last_error = 'throttled', attempts = 2, failed_at = now(),
                    next_attempt_at = now() + interval '1 hour'
             WHERE aggregate_id = 'pay_d' AND aggregate_version = 1;",
        )
        .await
        .expect("shape the outbox");
    client
}

#[tokio::test]
async fn status_shows_counts_parked_aggregates_and_last_errors() {
    let db = TestDb::create().await;
    let client = seed_operations(&db).await;

    let report = json_of(&outboxctl(&db, &["status", "--json"]));
    let tenants = report["tenants"].as_array().expect("tenants");
    assert_eq!(tenants.len(), 2);
    assert_eq!(tenants[0]["tenantId"], "acme");
    assert_eq!(
        (
            &tenants[0]["pending"],
            &tenants[0]["published"],
            &tenants[0]["dead"]
        ),
        (&Value::from(5), &Value::from(8), &Value::from(3))
    );
    assert_eq!(tenants[1]["tenantId"], "globex");
    assert_eq!(tenants[1]["published"], 2);
    assert_eq!(report["backlog"]["pending"], 5);
    assert_eq!(report["backlog"]["dead"], 3);
    // The oldest pending row is pay_c v3, created 30 days ago.
    let age = report["backlog"]["oldestPendingAgeSeconds"]
        .as_f64()
        .unwrap();
    assert!((29.0 * 86_400.0..31.0 * 86_400.0).contains(&age), "{age}");
    let oldest = event_id(&client, "pay_c", 3).await;
    assert_eq!(report["oldestPending"]["eventId"], oldest.as_str());
    // pay_c is held back by two dead events, pay_b by one; each has one event waiting.
    let parked = report["parked"].as_array().expect("parked");
    let parked: Vec<(&str, i64, i64, i64)> = parked
        .iter()
        .map(|p| {
            (
                p["aggregateId"].as_str().unwrap(),
                p["deadVersion"].as_i64().unwrap(),
                p["deadEvents"].as_i64().unwrap(),
                p["waiting"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(parked, vec![("pay_c", 1, 2, 1), ("pay_b", 2, 1, 1)]);
    // Newest failure first: the retrying pay_d v1, then pay_b v2, then pay_c.
    let errors: Vec<(&str, &str)> = report["lastErrors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["lastError"].as_str().unwrap(),
                e["status"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(errors[0], ("throttled", "pending"));
    assert_eq!(errors[1], ("rejected: b2", "dead"));
    assert_eq!(errors.len(), 4);

    // One tenant only.
    let globex = json_of(&outboxctl(&db, &["status", "--tenant", "globex", "--json"]));
    assert_eq!(globex["tenants"].as_array().unwrap().len(), 1);
    assert_eq!(globex["backlog"]["dead"], 0);
    assert_eq!(globex["parked"], Value::Array(vec![]));

    // The readable page: a table per section.
    let text = outboxctl(&db, &["status"]);
    assert!(text.status.success(), "{}", stderr(&text));
    let text = stdout(&text);
    for expected in [
        "TENANT",
        "PENDING",
        "acme",
        "globex",
        "(all tenants)",
        "Oldest pending:",
        "Parked aggregates",
        "payment/pay_c",
        "Last errors",
        "throttled",
        "Dispatcher: not draining",
    ] {
        assert!(
            text.contains(expected),
            "{expected:?} missing from:\n{text}"
        );
    }
}

#[tokio::test]
async fn redrive_lists_only_the_blockers_of_what_it_selected() {
    let db = TestDb::create().await;
    let client = seed_operations(&db).await;
    // By aggregate: pay_b's dead v2 has nothing dead before it. pay_c's dead v1 (same tenant)
    // holds back rows outside the selection and must not be listed.
    let out = json_of(&outboxctl(
        &db,
        &[
            "redrive",
            "--aggregate",
            "payment/pay_b",
            "--tenant",
            "acme",
            "--yes",
            "--json",
        ],
    ));
    assert_eq!(out["changed"], 1);
    assert_eq!(out["stillBlockedBy"], serde_json::json!([]), "{out}");
    assert_eq!(
        status_of(&client, "pay_b").await,
        ["published", "pending", "pending"]
    );

    // By event type in one tenant: only globex's own blockers (none) are listed.
    client
        .batch_execute(
            "UPDATE outbox SET status = 'dead', last_error = 'x'
             WHERE tenant_id = 'globex' AND aggregate_version = 2",
        )
        .await
        .unwrap();
    let out = json_of(&outboxctl(
        &db,
        &[
            "redrive",
            "--tenant",
            "globex",
            "--event-type",
            "payment.paid",
            "--yes",
            "--json",
        ],
    ));
    assert_eq!(out["changed"], 1);
    assert_eq!(out["stillBlockedBy"], serde_json::json!([]), "{out}");
}

#[tokio::test]
async fn redrive_puts_dead_events_back_in_aggregate_order_and_asks_first() {
    let db = TestDb::create().await;
    let client = seed_operations(&db).await;
    let c2 = event_id(&client, "pay_c", 2).await;

    // Not on a terminal and no --yes: refused, nothing changes.
    let refused = outboxctl(&db, &["redrive", "--event-id", &c2]);
    assert!(!refused.status.success());
    assert!(stderr(&refused).contains("--yes"), "{}", stderr(&refused));
    assert_eq!(
        status_of(&client, "pay_c").await,
        ["dead", "dead", "pending"]
    );

    // By event id: c2 goes back, and the output says c1 still holds it back.
    let out = json_of(&outboxctl(
        &db,
        &["redrive", "--event-id", &c2, "--yes", "--json"],
    ));
    assert_eq!(out["changed"], 1);
    let blocked: Vec<&str> = out["stillBlockedBy"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["eventId"].as_str().unwrap())
        .collect();
    let c1 = event_id(&client, "pay_c", 1).await;
    assert_eq!(blocked, vec![c1.as_str()]);
    assert_eq!(
        status_of(&client, "pay_c").await,
        ["dead", "pending", "pending"]
    );

    // By aggregate: the rest of pay_c.
    let out = json_of(&outboxctl(
        &db,
        &[
            "redrive",
            "--aggregate",
            "payment/pay_c",
            "--tenant",
            "acme",
            "--yes",
            "--json",
        ],
    ));
    assert_eq!(out["changed"], 1);
    let row = client
        .query_one(
            "SELECT attempts, last_error, failed_at IS NULL FROM outbox
             WHERE aggregate_id = 'pay_c' AND aggregate_version = 1",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 0, "attempts start again");
    assert_eq!(row.get::<_, Option<String>>(1), None);
    assert!(row.get::<_, bool>(2));

    // The claim takes each aggregate's first version only: pay_c v1 and pay_b (still dead v2)
    // nothing; pay_d is backing off.
    let store = PgOutboxStore::new(Db::new(db.settings.clone()));
    let claimed = store
        .claim_batch(100, Duration::from_secs(30), "test")
        .await
        .expect("claim");
    let claimed: Vec<(String, i64)> = claimed
        .iter()
        .map(|e| (e.aggregate_id.clone(), e.aggregate_version))
        .collect();
    assert_eq!(claimed, vec![("pay_c".to_string(), 1)]);

    // By type with --all: what is left dead (pay_b v2).
    let out = json_of(&outboxctl(
        &db,
        &[
            "redrive",
            "--event-type",
            "payment.paid",
            "--all",
            "--yes",
            "--json",
        ],
    ));
    assert_eq!(out["changed"], 1);
    assert_eq!(db.count(&client, "outbox WHERE status = 'dead'").await, 0);
    // Nothing left: a second run says so and changes nothing.
    let again = outboxctl(&db, &["redrive", "--all", "--yes"]);
    assert!(again.status.success());
    assert!(stdout(&again).contains("no dead events match"));
}

#[tokio::test]
async fn replay_republishes_an_aggregate_or_a_time_range() {
    let db = TestDb::create().await;
    let client = seed_operations(&db).await;

    let out = json_of(&outboxctl(
        &db,
        &[
            "replay",
            "--aggregate",
            "payment/pay_e",
            "--tenant",
            "acme",
            "--yes",
            "--json",
        ],
    ));
    assert_eq!(out["changed"], 3);
    // A replay re-delivers: the events stay published (done), each marked for delivery again.
    assert_eq!(
        status_of(&client, "pay_e").await,
        ["published", "published", "published"]
    );
    assert_eq!(
        db.count(&client, "outbox WHERE aggregate_id = 'pay_e' AND replay")
            .await,
        3
    );
    // Replays of one aggregate go in version order among themselves: only v1 is claimable.
    let store = PgOutboxStore::new(Db::new(db.settings.clone()));
    let claimed = store
        .claim_batch(100, Duration::from_secs(30), "test")
        .await
        .expect("claim");
    let pay_e: Vec<i64> = claimed
        .iter()
        .filter(|e| e.aggregate_id == "pay_e")
        .map(|e| e.aggregate_version)
        .collect();
    assert_eq!(pay_e, vec![1]);

    // A time range: pay_x v1 at 09:00, v2 at 11:00; replay 08:00..10:00 takes v1 only.
    client
        .batch_execute(
            "UPDATE outbox SET created_at = '2026-11-20T09:00:00Z' WHERE aggregate_id = 'pay_x' AND aggregate_version = 1;
             UPDATE outbox SET created_at = '2026-11-20T11:00:00Z' WHERE aggregate_id = 'pay_x' AND aggregate_version = 2;",
        )
        .await
        .unwrap();
    let out = json_of(&outboxctl(
        &db,
        &[
            "replay",
            "--from",
            "2026-11-20T08:00:00Z",
            "--to",
            "2026-11-20T10:00:00Z",
            "--tenant",
            "globex",
            "--yes",
            "--json",
        ],
    ));
    assert_eq!(out["changed"], 1);
    assert_eq!(
        db.texts(
            &client,
            "SELECT aggregate_version::text FROM outbox WHERE aggregate_id = 'pay_x' AND replay"
        )
        .await,
        ["1"]
    );
}

#[tokio::test]
async fn cleanup_deletes_only_published_rows_past_the_retention_in_batches() {
    let db = TestDb::create().await;
    let client = seed_operations(&db).await;
    let before = db.count(&client, "outbox").await;

    let refused = outboxctl(&db, &["cleanup", "--older-than", "7d"]);
    assert!(!refused.status.success());
    assert!(stderr(&refused).contains("--yes"));
    assert_eq!(db.count(&client, "outbox").await, before);

    let out = json_of(&outboxctl(
        &db,
        &[
            "cleanup",
            "--older-than",
            "7d",
            "--batch-size",
            "2",
            "--yes",
            "--json",
        ],
    ));
    assert_eq!(out["expired"], 3);
    assert_eq!(out["deleted"], 3);
    assert_eq!(out["statements"], 2, "batches of 2: 2 + 1");
    assert_eq!(status_of(&client, "pay_a").await, Vec::<String>::new());
    // Dead rows from 30 days ago, pending rows and recent publications stay, even of an event
    // created 20 days ago: retention counts from publication.
    assert_eq!(
        status_of(&client, "pay_c").await,
        ["dead", "dead", "pending"]
    );
    assert_eq!(status_of(&client, "pay_f").await, ["published"]);
    assert_eq!(db.count(&client, "outbox").await, before - 3);
    let again = outboxctl(&db, &["cleanup", "--older-than", "7d", "--yes"]);
    assert!(
        stdout(&again).contains("no events published more than 7d 0h ago"),
        "{}",
        stdout(&again)
    );
}

#[tokio::test]
async fn bad_command_lines_are_refused_with_a_reason() {
    let db = TestDb::create().await;
    let client = seed_operations(&db).await;
    let before: Vec<(String, String)> = client
        .query("SELECT event_id::text, status FROM outbox ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let cases: &[(&[&str], &str)] = &[
        (&["redrive", "--yes"], "--all"),
        (
            &["redrive", "--event-id", "not-a-uuid", "--yes"],
            "not-a-uuid",
        ),
        (
            &[
                "redrive",
                "--aggregate",
                "payment",
                "--tenant",
                "acme",
                "--yes",
            ],
            "TYPE/ID",
        ),
        (
            &["redrive", "--aggregate", "payment/pay_c", "--yes"],
            "--tenant",
        ),
        (&["replay", "--tenant", "acme", "--yes"], "time range"),
        (&["replay", "--from", "yesterday", "--yes"], "RFC 3339"),
        (
            &[
                "replay",
                "--from",
                "2026-11-22T10:00:00Z",
                "--to",
                "2026-11-22T09:00:00Z",
                "--yes",
            ],
            "not before",
        ),
        (&["cleanup", "--older-than", "7w", "--yes"], "7d, 36h"),
        (
            &[
                "cleanup",
                "--older-than",
                "7d",
                "--batch-size",
                "0",
                "--yes",
            ],
            "batch-size",
        ),
        (
            &[
                "cleanup",
                "--older-than",
                "7d",
                "--duty-cycle",
                "0",
                "--yes",
            ],
            "between 0.01 and 1",
        ),
        (
            &[
                "cleanup",
                "--older-than",
                "7d",
                "--duty-cycle",
                "1.5",
                "--yes",
            ],
            "between 0.01 and 1",
        ),
        (&["status", "--bogus"], "--bogus"),
    ];
    for (args, says) in cases {
        let out = outboxctl(&db, args);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(
            stderr(&out).contains(says),
            "{args:?}: expected {says:?} in {}",
            stderr(&out)
        );
    }
    let after: Vec<(String, String)> = client
        .query("SELECT event_id::text, status FROM outbox ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(before, after, "a refused command changed nothing");
}

#[tokio::test]
async fn the_drain_deletes_expired_published_rows_between_claims() {
    let db = TestDb::create().await;
    let client = db.client().await;
    let aggregates: Vec<String> = (0..30).map(|i| format!("old_{i}")).collect();
    seed_outbox(&client, "acme", &aggregates, 1, "{}").await;
    client
        .batch_execute(
            "UPDATE outbox SET status = 'published', published_at = now() - interval '9 days',
                    created_at = now() - interval '9 days'",
        )
        .await
        .unwrap();
    seed_outbox(&client, "acme", &["new_1".to_string()], 2, "{}").await;
    let config = DispatcherConfig {
        retention: Some(Duration::from_secs(7 * 86_400)),
        cleanup_batch: 100,
        ..test_dispatcher_config()
    };
    let topic =
        outbox_tests::aws::create_topic(&sdk_config_for(&moto_endpoint()).await, false).await;
    let d = dispatcher(
        &db,
        &moto_endpoint(),
        Target::Sns { topic_arn: topic },
        config,
    )
    .await;
    let summary = d
        .drain(Instant::now() + Duration::from_secs(30))
        .await
        .expect("drain");
    assert_eq!(summary.cleaned, 30);
    assert_eq!(summary.published, 2);
    assert_eq!(
        db.count(&client, "outbox WHERE aggregate_id LIKE 'old_%'")
            .await,
        0
    );
    assert_eq!(
        db.count(&client, "outbox WHERE aggregate_id = 'new_1'")
            .await,
        2
    );
}

#[tokio::test]
async fn one_caller_wakes_the_dispatcher_per_debounce_and_none_while_it_drains() {
    let db = TestDb::create().await;
    let debounce = Duration::from_millis(400);
    // Eight instances asking at once: exactly one is told to wake the dispatcher.
    let stores: Vec<PgPaymentStore> = (0..8)
        .map(|_| PgPaymentStore::new(Db::new(db.settings.clone())))
        .collect();
    let decisions =
        futures_util::future::join_all(stores.iter().map(|s| s.request_wake(debounce))).await;
    let wakes = decisions
        .iter()
        .filter(|d| d.as_ref().expect("decision").wake)
        .count();
    assert_eq!(wakes, 1);
    for d in &decisions {
        assert!(d.as_ref().unwrap().quiet_for <= debounce);
    }
    // After the window, one more.
    tokio::time::sleep(debounce + Duration::from_millis(50)).await;
    assert!(stores[0].request_wake(debounce).await.unwrap().wake);

    // A draining dispatcher's heartbeat silences every caller, however old the last wake-up.
    let outbox = PgOutboxStore::new(Db::new(db.settings.clone()));
    outbox
        .heartbeat("dispatcher-1", Duration::from_secs(3))
        .await
        .unwrap();
    tokio::time::sleep(debounce + Duration::from_millis(50)).await;
    let quiet = stores[1].request_wake(debounce).await.unwrap();
    assert!(!quiet.wake);
    assert!(quiet.quiet_for > Duration::from_secs(2), "{quiet:?}");
    // Another owner's release leaves it; the owner's own release ends it.
    outbox.release("dispatcher-2").await.unwrap();
    assert!(!stores[2].request_wake(debounce).await.unwrap().wake);
    outbox.release("dispatcher-1").await.unwrap();
    assert!(stores[3].request_wake(debounce).await.unwrap().wake);
}

#[tokio::test]
async fn a_polling_drain_holds_a_heartbeat_publishes_new_rows_and_releases_it() {
    let db = TestDb::create().await;
    let client = db.client().await;
    let topic =
        outbox_tests::aws::create_topic(&sdk_config_for(&moto_endpoint()).await, false).await;
    let config = DispatcherConfig {
        idle_poll: Some(Duration::from_millis(50)),
        ..test_dispatcher_config()
    };
    let d = dispatcher(
        &db,
        &moto_endpoint(),
        Target::Sns { topic_arn: topic },
        config,
    )
    .await;
    let drain = tokio::spawn(async move { d.drain(Instant::now() + Duration::from_secs(3)).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let active = db
        .count(
            &client,
            "outbox_dispatcher_heartbeats WHERE active_until > now()",
        )
        .await;
    assert_eq!(active, 1, "a polling drain announces itself");
    let status = json_of(&outboxctl(&db, &["status", "--json"]));
    assert_eq!(status["dispatcher"]["active"].as_array().unwrap().len(), 1);
    // Committed while it polls: published by the same invocation, without a wake-up.
    seed_outbox(
        &client,
        "acme",
        &["late_1".to_string(), "late_2".to_string()],
        1,
        "{}",
    )
    .await;
    let summary = drain.await.unwrap().expect("drain");
    assert_eq!(summary.stopped, Some(StopReason::Deadline));
    assert_eq!(summary.published, 2);
    assert!(
        summary.claims > 5,
        "it kept polling: {} claims",
        summary.claims
    );
    assert_eq!(
        db.count(&client, "outbox_dispatcher_heartbeats").await,
        0,
        "the heartbeat is withdrawn at the end"
    );
}

/// Counts wake-ups instead of invoking anything.
#[derive(Clone, Default)]
struct CountingWake(Arc<AtomicUsize>);

impl WakeDispatcher for CountingWake {
    async fn wake(&self) -> Result<(), String> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

#[tokio::test]
async fn new_events_wake_the_dispatcher_once_replays_and_a_draining_dispatcher_do_not() {
    let db = TestDb::create().await;
    let wakes = CountingWake::default();
    let config = HandlerConfig {
        wake_debounce: Duration::from_secs(60),
        ..HandlerConfig::default()
    };
    let handler =
        PaymentCommandHandler::new(PgPaymentStore::new(Db::new(db.settings.clone())), config)
            .with_wake(wakes.clone());
    for i in 0..10 {
        let reply = invoke(
            &handler,
            paid_request("acme", &format!("pay_{i}"), paid_body(100, "EUR")),
        )
        .await;
        assert_eq!(reply.status, 200);
    }
    assert_eq!(
        wakes.0.load(Ordering::SeqCst),
        1,
        "one wake-up per debounce window"
    );

    // A replay writes no event and wakes nobody, even with the window reopened.
    let client = db.client().await;
    client
        .batch_execute("UPDATE outbox_dispatch_state SET kicked_at = NULL")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let replay = invoke(
        &handler,
        paid_request("acme", "pay_0", paid_body(100, "EUR")),
    )
    .await;
    assert_eq!(replay.status, 200);
    assert_eq!(wakes.0.load(Ordering::SeqCst), 1);

    // While a dispatcher drains, new events do not wake another.
    let outbox = PgOutboxStore::new(Db::new(db.settings.clone()));
    outbox
        .heartbeat("drainer", Duration::from_secs(30))
        .await
        .unwrap();
    let reply = invoke(
        &handler,
        paid_request("acme", "pay_new", paid_body(100, "EUR")),
    )
    .await;
    assert_eq!(reply.status, 200);
    assert_eq!(wakes.0.load(Ordering::SeqCst), 1);
    // Once it is gone, the next event wakes one.
    outbox.release("drainer").await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let reply = invoke(
        &handler,
        paid_request("acme", "pay_newer", paid_body(100, "EUR")),
    )
    .await;
    assert_eq!(reply.status, 200);
    assert_eq!(wakes.0.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn the_lambda_wake_is_an_asynchronous_invoke_of_the_dispatcher_with_its_input_type() {
    let lambda = FakeLambda::start().await;
    let sdk = sdk_config_for(&lambda.endpoint).await;
    let wake = LambdaWake::new(
        aws_sdk_lambda::Client::new(&sdk),
        "outbox-dispatcher",
        "payments",
    );
    wake.wake().await.expect("accepted");
    let calls = lambda.invocations();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].function, "outbox-dispatcher");
    assert_eq!(calls[0].invocation_type.as_deref(), Some("Event"));
    let event: outbox_dispatcher::ScheduledEvent =
        serde_json::from_slice(&calls[0].payload).expect("the dispatcher's input type");
    assert_eq!(event.detail_type, "Outbox Kick");

    // A refused invoke is an error for the caller to log; the command itself still succeeds.
    lambda.answer_with(429);
    let error = wake.wake().await.expect_err("throttled");
    assert!(!error.is_empty());
}

#[tokio::test]
async fn the_dispatcher_function_reports_its_work_and_the_backlog_as_metrics() {
    let db = TestDb::create().await;
    let client = db.client().await;
    seed_outbox(
        &client,
        "acme",
        &["m_1".to_string(), "m_2".to_string()],
        2,
        "{}",
    )
    .await;
    seed_outbox(&client, "acme", &["m_dead".to_string()], 2, "{}").await;
    client
        .batch_execute(
            "UPDATE outbox SET status = 'dead', last_error = 'x'
             WHERE aggregate_id = 'm_dead' AND aggregate_version = 1",
        )
        .await
        .unwrap();
    let topic =
        outbox_tests::aws::create_topic(&sdk_config_for(&moto_endpoint()).await, false).await;
    let d = dispatcher(
        &db,
        &moto_endpoint(),
        Target::Sns { topic_arn: topic },
        test_dispatcher_config(),
    )
    .await;
    let mut context = Context::default();
    context.deadline = 60_000;
    let payload: outbox_dispatcher::ScheduledEvent = serde_json::from_value(
        outbox_tests::sample_json("outbox-dispatcher", "scheduled.json"),
    )
    .unwrap();
    let summary = outbox_dispatcher::handle(&d, LambdaEvent::new(payload, context))
        .await
        .expect("invocation");
    assert_eq!(summary.published, 4);
    let backlog = summary.backlog.expect("measured");
    assert_eq!(
        (backlog.pending, backlog.dead),
        (1, 1),
        "m_dead v2 waits behind v1"
    );
    let lines = summary
        .metrics(outbox_dispatcher::SERVICE)
        .render(std::time::SystemTime::now());
    let doc: Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(doc["Service"], "outbox-dispatcher");
    assert_eq!(doc["Published"], 4.0);
    assert_eq!(doc["DeadRows"], 1.0);
    assert_eq!(doc["PendingRows"], 1.0);
    // The one pending row (m_dead v2) was written moments ago.
    let age = doc["OldestPendingAge"].as_f64().unwrap();
    assert!((0.0..60.0).contains(&age), "{age}");
    let claims = doc["ClaimLatency"].as_array().map(Vec::len).unwrap_or(1);
    assert_eq!(claims, summary.claims);
    let names: Vec<&str> = doc["_aws"]["CloudWatchMetrics"][0]["Metrics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["Name"].as_str().unwrap())
        .collect();
    for name in [
        "Published",
        "Retried",
        "DeadLettered",
        "PendingRows",
        "OldestPendingAge",
        "DeadRows",
        "ClaimLatency",
        "PublishLatency",
    ] {
        assert!(names.contains(&name), "{name} missing from {names:?}");
    }
}
