//! (Past 400 lines: one test per delivery rule against PostgreSQL and moto, sharing this file's fixtures.)
//!
//! The outbox dispatcher against PostgreSQL and moto over real HTTP: delivery shapes, FIFO order,
//! racing dispatchers, a dispatcher killed mid-flight, injected faults, poison events, the
//! commit-order horizon and the lease.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use serde_json::Value;

use outbox_tests::aws::{self, moto_endpoint, receive};
use outbox_tests::fault_proxy::{Fault, FaultProxy, PoisonRule};
use outbox_tests::{
    dispatcher, drain_until_settled, invoke, paid_body, paid_request, refund_request, seed_outbox,
    test_dispatcher_config, TestDb,
};
use pg_outbox::aws::BusPublisher;
use pg_outbox::dispatcher::{DispatcherConfig, OutboxDispatcher, StopReason, Target};
use pg_outbox::ports::OutboxStore;
use pg_outbox::postgres::outbox::PgOutboxStore;
use pg_outbox::postgres::Db;

fn aggregates(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

/// A topic without subscribers in moto, a fault-injecting proxy in front of moto, and a dispatcher
/// on `db` publishing to that topic through the proxy.
async fn behind_proxy(
    db: &TestDb,
    settings: DispatcherConfig,
) -> (OutboxDispatcher<PgOutboxStore, BusPublisher>, FaultProxy) {
    let config = aws::sdk_config_for(&moto_endpoint()).await;
    let topic_arn = aws::create_topic(&config, false).await;
    let proxy = FaultProxy::start(&moto_endpoint()).await;
    let d = dispatcher(db, &proxy.endpoint, Target::Sns { topic_arn }, settings).await;
    (d, proxy)
}

async fn statuses(db: &TestDb) -> HashMap<String, i64> {
    let client = db.client().await;
    client
        .query("SELECT status, count(*) FROM outbox GROUP BY status", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Three real commands through the handler: two payments paid, one refunded.
async fn three_commands(db: &TestDb) {
    let handler = db.payment_handler();
    assert_eq!(
        invoke(
            &handler,
            paid_request("acme", "pay_a", paid_body(1_000, "EUR"))
        )
        .await
        .status,
        200
    );
    assert_eq!(
        invoke(&handler, refund_request("acme", "pay_a", "k1", 300))
            .await
            .status,
        201
    );
    assert_eq!(
        invoke(
            &handler,
            paid_request("globex", "pay_b", paid_body(5, "USD"))
        )
        .await
        .status,
        200
    );
}

fn envelope_checks(envelope: &Value) {
    assert_eq!(envelope["specversion"], "1.0");
    assert_eq!(envelope["source"], "payments");
    assert_eq!(envelope["datacontenttype"], "application/json");
    assert_eq!(envelope["schemaversion"], 1);
    assert_eq!(envelope["aggregatetype"], "payment");
    assert_eq!(envelope["correlationid"], "demo-flow-1");
    assert_eq!(
        envelope["traceparent"],
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    );
    assert_eq!(envelope["data"]["paymentId"], envelope["aggregateid"]);
    assert!(envelope["id"]
        .as_str()
        .is_some_and(|id| uuid::Uuid::parse_str(id).is_ok()));
}

#[tokio::test]
async fn sns_raw_delivery_carries_the_envelope_and_filterable_attributes() {
    let db = TestDb::create().await;
    three_commands(&db).await;
    let config = aws::sdk_config_for(&moto_endpoint()).await;
    let (topic_arn, queue) = aws::topic_with_queue(&config, false, true).await;
    let d = dispatcher(
        &db,
        &moto_endpoint(),
        Target::Sns { topic_arn },
        test_dispatcher_config(),
    )
    .await;
    let summary = d
        .drain(Instant::now() + Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(
        (summary.published, summary.retried, summary.dead),
        (3, 0, 0)
    );
    assert_eq!(summary.stopped, Some(StopReason::Empty));

    let messages = receive(
        &config,
        &queue,
        3,
        Duration::from_secs(20),
        Duration::from_millis(500),
    )
    .await;
    assert_eq!(messages.len(), 3);
    let client = db.client().await;
    for m in &messages {
        let envelope: Value =
            serde_json::from_str(&m.body).expect("raw delivery: the body is the envelope");
        envelope_checks(&envelope);
        assert_eq!(
            m.attributes["event_type"],
            envelope["type"].as_str().unwrap()
        );
        assert_eq!(
            m.attributes["tenant_id"],
            envelope["tenantid"].as_str().unwrap()
        );
        assert_eq!(m.attributes["event_id"], envelope["id"].as_str().unwrap());
        // The envelope matches the outbox row it came from.
        let id = uuid::Uuid::parse_str(envelope["id"].as_str().unwrap()).unwrap();
        let row = client
            .query_one("SELECT event_type, tenant_id, aggregate_version, payload, status FROM outbox WHERE event_id = $1", &[&id])
            .await
            .unwrap();
        assert_eq!(envelope["type"], row.get::<_, String>(0));
        assert_eq!(envelope["tenantid"], row.get::<_, String>(1));
        assert_eq!(envelope["aggregateversion"], row.get::<_, i64>(2));
        assert_eq!(envelope["data"], row.get::<_, Value>(3));
        assert_eq!(row.get::<_, String>(4), "published");
    }
    let types: HashSet<&str> = messages
        .iter()
        .map(|m| m.attributes["event_type"].as_str())
        .collect();
    assert_eq!(types, HashSet::from(["payment.paid", "payment.refunded"]));
    assert_eq!(
        db.count(&client, "outbox WHERE published_at IS NULL").await,
        0
    );
}

#[tokio::test]
async fn sns_wrapped_delivery_carries_the_envelope_inside_the_notification() {
    let db = TestDb::create().await;
    three_commands(&db).await;
    let config = aws::sdk_config_for(&moto_endpoint()).await;
    let (topic_arn, queue) = aws::topic_with_queue(&config, false, false).await;
    let d = dispatcher(
        &db,
        &moto_endpoint(),
        Target::Sns {
            topic_arn: topic_arn.clone(),
        },
        test_dispatcher_config(),
    )
    .await;
    assert_eq!(
        d.drain(Instant::now() + Duration::from_secs(30))
            .await
            .unwrap()
            .published,
        3
    );
    let messages = receive(
        &config,
        &queue,
        3,
        Duration::from_secs(20),
        Duration::from_millis(500),
    )
    .await;
    for m in &messages {
        let notification: Value = serde_json::from_str(&m.body).unwrap();
        assert_eq!(notification["Type"], "Notification");
        assert_eq!(notification["TopicArn"], topic_arn.as_str());
        let envelope: Value =
            serde_json::from_str(notification["Message"].as_str().unwrap()).unwrap();
        envelope_checks(&envelope);
        let attributes = &notification["MessageAttributes"];
        assert_eq!(attributes["event_id"]["Value"], envelope["id"]);
        assert_eq!(attributes["event_type"]["Value"], envelope["type"]);
        assert_eq!(attributes["tenant_id"]["Value"], envelope["tenantid"]);
    }
}

#[tokio::test]
async fn eventbridge_rule_delivers_the_envelope_as_detail() {
    let db = TestDb::create().await;
    three_commands(&db).await;
    let config = aws::sdk_config_for(&moto_endpoint()).await;
    let (bus_name, queue) = aws::bus_with_queue(&config).await;
    let d = dispatcher(
        &db,
        &moto_endpoint(),
        Target::EventBridge { bus_name },
        test_dispatcher_config(),
    )
    .await;
    let summary = d
        .drain(Instant::now() + Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!((summary.published, summary.dead), (3, 0));
    let messages = receive(
        &config,
        &queue,
        3,
        Duration::from_secs(20),
        Duration::from_millis(500),
    )
    .await;
    assert_eq!(messages.len(), 3);
    for m in &messages {
        let event: Value = serde_json::from_str(&m.body).unwrap();
        assert_eq!(event["source"], "payments");
        let envelope = &event["detail"];
        envelope_checks(envelope);
        assert_eq!(event["detail-type"], envelope["type"]);
    }
}

#[tokio::test]
async fn a_fifo_topic_keeps_every_aggregates_order() {
    let db = TestDb::create().await;
    let client = db.client().await;
    let ids = aggregates("agg", 8);
    seed_outbox(&client, "acme", &ids, 5, "{}").await;
    let config = aws::sdk_config_for(&moto_endpoint()).await;
    let (topic_arn, queue) = aws::topic_with_queue(&config, true, true).await;
    let d = dispatcher(
        &db,
        &moto_endpoint(),
        Target::Sns { topic_arn },
        test_dispatcher_config(),
    )
    .await;
    let summary = d
        .drain(Instant::now() + Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(summary.published, 40);
    // Each published event's time from its append to the bus's answer is in the metrics'
    // sample, and none is longer than the drain (the rows were appended just before it).
    assert_eq!(summary.commit_to_publish.offered(), 40);
    let waited = summary.commit_to_publish.kept();
    assert_eq!(waited.len(), 40);
    assert!(
        waited
            .iter()
            .all(|w| *w > Duration::ZERO && *w < Duration::from_secs(60)),
        "{waited:?}"
    );
    // One event per aggregate per claim: five versions take at least five claims.
    assert!(summary.claims >= 5, "{summary:?}");

    let messages = receive(
        &config,
        &queue,
        40,
        Duration::from_secs(60),
        Duration::from_millis(500),
    )
    .await;
    let mut seen: HashMap<String, Vec<i64>> = HashMap::new();
    for m in &messages {
        let envelope: Value = serde_json::from_str(&m.body).unwrap();
        let aggregate = envelope["aggregateid"].as_str().unwrap().to_owned();
        assert_eq!(
            m.group_id.as_deref(),
            Some(format!("acme:{aggregate}").as_str())
        );
        assert_eq!(m.deduplication_id.as_deref(), envelope["id"].as_str());
        seen.entry(aggregate)
            .or_default()
            .push(envelope["aggregateversion"].as_i64().unwrap());
    }
    assert_eq!(seen.len(), 8);
    for (aggregate, versions) in seen {
        assert_eq!(versions, vec![1, 2, 3, 4, 5], "{aggregate} out of order");
    }
}

#[tokio::test]
async fn two_dispatchers_racing_publish_every_row_exactly_once() {
    let db = TestDb::create().await;
    let client = db.client().await;
    seed_outbox(&client, "acme", &aggregates("agg", 400), 3, "{}").await;
    let config = aws::sdk_config_for(&moto_endpoint()).await;
    let topic_arn = aws::create_topic(&config, false).await;
    let proxy = FaultProxy::start(&moto_endpoint()).await;
    let mut settings = test_dispatcher_config();
    settings.batch_size = 40;
    let a = dispatcher(
        &db,
        &proxy.endpoint,
        Target::Sns {
            topic_arn: topic_arn.clone(),
        },
        settings.clone(),
    )
    .await;
    let b = dispatcher(&db, &proxy.endpoint, Target::Sns { topic_arn }, settings).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let (ra, rb) = tokio::join!(a.drain(deadline), b.drain(deadline));
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert!(
        ra.published > 0 && rb.published > 0,
        "both took part: {ra:?} {rb:?}"
    );
    assert_eq!(ra.published + rb.published, 1_200);

    let ids = proxy.stats.event_ids.lock().unwrap().clone();
    assert_eq!(ids.len(), 1_200, "no row was published twice");
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 1_200);
    assert_eq!(statuses(&db).await.get("published"), Some(&1_200));
    assert_eq!(db.count(&client, "outbox WHERE attempts <> 1").await, 0);
}

#[tokio::test]
async fn a_dispatcher_killed_between_publish_and_mark_is_covered_by_the_lease() {
    let db = TestDb::create().await;
    let client = db.client().await;
    seed_outbox(&client, "acme", &aggregates("agg", 5), 1, "{}").await;
    let config = aws::sdk_config_for(&moto_endpoint()).await;
    let topic_arn = aws::create_topic(&config, false).await;
    let proxy = FaultProxy::start(&moto_endpoint()).await;
    proxy.push_faults([Fault::ForwardThenHang]);

    // A real dispatcher process (`outboxctl dispatch`), killed with SIGKILL once its publish
    // reached the bus and before it could record the outcome.
    let outboxctl = outbox_tests::workspace_binary("outboxctl");
    let mut child = tokio::process::Command::new(&outboxctl)
        .arg("dispatch")
        .env("DATABASE_URL", &db.url)
        .env("DATABASE_TLS", "disable")
        .env("AWS_ENDPOINT_URL", &proxy.endpoint)
        .env("OUTBOX_TARGET", "sns")
        .env("SNS_TOPIC_ARN", &topic_arn)
        .env("DISPATCH_LEASE_SECONDS", "5")
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", outboxctl.display()));
    tokio::time::timeout(Duration::from_secs(30), proxy.forwarded.notified())
        .await
        .expect("the dispatcher process published");
    child.start_kill().expect("SIGKILL");
    let status = child.wait().await.unwrap();
    assert!(!status.success());
    assert_eq!(
        proxy.stats.event_ids.lock().unwrap().len(),
        5,
        "published once before the kill"
    );

    // Published but not recorded: still pending, leased to the dead process.
    assert_eq!(
        db.count(
            &client,
            "outbox WHERE status = 'pending' AND locked_until > now()"
        )
        .await,
        5
    );
    let d = dispatcher(
        &db,
        &proxy.endpoint,
        Target::Sns { topic_arn },
        test_dispatcher_config(),
    )
    .await;
    let early = d
        .drain(Instant::now() + Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(
        early.claimed, 0,
        "the lease keeps other dispatchers off until it runs out"
    );

    tokio::time::sleep(Duration::from_millis(5_200)).await;
    let later = d
        .drain(Instant::now() + Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(later.published, 5);
    let ids = proxy.stats.event_ids.lock().unwrap().clone();
    assert_eq!(
        ids.len(),
        10,
        "every event published again: at least once, never lost"
    );
    assert_eq!(
        ids.iter().collect::<HashSet<_>>().len(),
        5,
        "the re-publish carries the same event ids"
    );
    assert_eq!(
        db.count(
            &client,
            "outbox WHERE status = 'published' AND attempts = 2"
        )
        .await,
        5
    );
}

#[tokio::test]
async fn throttling_5xx_timeouts_and_partial_failures_are_retried_with_backoff() {
    let db = TestDb::create().await;
    let client = db.client().await;
    seed_outbox(&client, "acme", &aggregates("agg", 10), 1, "{}").await;
    let mut settings = test_dispatcher_config();
    settings.backoff_base = Duration::from_secs(2);
    settings.backoff_cap = Duration::from_secs(2);
    settings.max_attempts = 10;
    let (d, proxy) = behind_proxy(&db, settings).await;

    // One call of 10 entries, throttled: every row backs off, attempts and error recorded.
    proxy.push_faults([Fault::Throttle]);
    let before = chrono::Utc::now();
    let first = d.dispatch_batch().await.unwrap();
    assert_eq!((first.claimed, first.retried, first.published), (10, 10, 0));
    let rows = client
        .query(
            "SELECT attempts, next_attempt_at, last_error, locked_until FROM outbox",
            &[],
        )
        .await
        .unwrap();
    for row in &rows {
        assert_eq!(row.get::<_, i32>(0), 1);
        let next: chrono::DateTime<chrono::Utc> = row.get(1);
        assert!(
            next >= before && next <= chrono::Utc::now() + chrono::Duration::seconds(2),
            "{next}"
        );
        assert!(
            row.get::<_, String>(2).contains("Throttling"),
            "{}",
            row.get::<_, String>(2)
        );
        assert!(
            row.get::<_, Option<chrono::DateTime<chrono::Utc>>>(3)
                .is_none(),
            "lease released"
        );
    }
    // Backing-off rows are not claimable before their time...
    client
        .batch_execute("UPDATE outbox SET next_attempt_at = now() + interval '1 hour'")
        .await
        .unwrap();
    assert_eq!(d.dispatch_batch().await.unwrap().claimed, 0);
    client
        .batch_execute("UPDATE outbox SET next_attempt_at = now()")
        .await
        .unwrap();

    // ...then a 5xx, a timeout and a partial failure (entries 0 and 3), each retried.
    proxy.push_faults([
        Fault::ServerError,
        Fault::Timeout,
        Fault::FailEntries {
            positions: vec![0, 3],
            code: "InternalError".into(),
            sender_fault: false,
        },
    ]);
    for expected in ["InternalError", "timeout"] {
        let report = d.dispatch_batch().await.unwrap();
        assert_eq!(report.retried, 10, "{expected}: {report:?}");
        let error: String = client
            .query_one("SELECT last_error FROM outbox LIMIT 1", &[])
            .await
            .unwrap()
            .get(0);
        assert!(
            error.to_lowercase().contains(&expected.to_lowercase()),
            "{error}"
        );
        client
            .batch_execute("UPDATE outbox SET next_attempt_at = now()")
            .await
            .unwrap();
    }
    let partial = d.dispatch_batch().await.unwrap();
    assert_eq!(
        (partial.published, partial.retried),
        (8, 2),
        "an HTTP 200 with Failed entries is a partial failure"
    );
    assert_eq!(
        db.count(
            &client,
            "outbox WHERE status = 'pending' AND last_error LIKE '%InternalError%'"
        )
        .await,
        2
    );

    client
        .batch_execute("UPDATE outbox SET next_attempt_at = now() WHERE status = 'pending'")
        .await
        .unwrap();
    let last = d.dispatch_batch().await.unwrap();
    assert_eq!(last.published, 2);
    assert_eq!(
        statuses(&db).await,
        HashMap::from([("published".to_owned(), 10)])
    );
    assert_eq!(
        proxy.stats.event_ids.lock().unwrap().len(),
        10,
        "nothing published twice"
    );
}

#[tokio::test]
async fn a_row_that_keeps_failing_is_dead_after_the_configured_attempts_and_the_rest_goes_on() {
    let db = TestDb::create().await;
    let client = db.client().await;
    seed_outbox(&client, "acme", &aggregates("ok", 6), 1, "{}").await;
    seed_outbox(
        &client,
        "acme",
        &["flaky".to_owned()],
        1,
        r#"{"marker":"always-throttled"}"#,
    )
    .await;
    let (d, proxy) = behind_proxy(&db, test_dispatcher_config()).await;
    proxy.add_poison(PoisonRule {
        needle: "always-throttled".into(),
        code: "Throttled".into(),
        sender_fault: true,
    });
    drain_until_settled(&d, &db, Duration::from_secs(30)).await;

    let row = client
        .query_one(
            "SELECT status, attempts, last_error FROM outbox WHERE aggregate_id = 'flaky'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "dead");
    assert_eq!(row.get::<_, i32>(1), 3, "max_attempts");
    assert!(
        row.get::<_, String>(2)
            .starts_with("gave up after 3 attempts"),
        "{}",
        row.get::<_, String>(2)
    );
    assert_eq!(
        db.count(&client, "outbox WHERE status = 'published'").await,
        6
    );
}

#[tokio::test]
async fn a_poison_event_is_dead_at_once_and_parks_only_its_aggregate() {
    let db = TestDb::create().await;
    let client = db.client().await;
    seed_outbox(&client, "acme", &aggregates("ok", 5), 3, "{}").await;
    // Aggregate "bad": version 1 is publishable, version 2 is poison, version 3 waits behind it.
    seed_outbox(&client, "acme", &["bad".to_owned()], 3, "{}").await;
    client
        .batch_execute(
            "UPDATE outbox SET payload = payload || '{\"poison\":\"bad-request\"}'
             WHERE aggregate_id = 'bad' AND aggregate_version = 2",
        )
        .await
        .unwrap();
    let (d, proxy) = behind_proxy(&db, test_dispatcher_config()).await;
    proxy.add_poison(PoisonRule {
        needle: "bad-request".into(),
        code: "InvalidParameter".into(),
        sender_fault: true,
    });
    drain_until_settled(&d, &db, Duration::from_secs(30)).await;

    let bad: Vec<(i64, String, i32)> = client
        .query("SELECT aggregate_version, status, attempts FROM outbox WHERE aggregate_id = 'bad' ORDER BY 1", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        bad,
        vec![
            (1, "published".into(), 1),
            (2, "dead".into(), 1),
            (3, "pending".into(), 0)
        ],
        "the poison is dead on its first attempt; the aggregate's later event waits"
    );
    assert_eq!(
        db.count(
            &client,
            "outbox WHERE aggregate_id LIKE 'ok%' AND status = 'published'"
        )
        .await,
        15
    );
    let error: String = client
        .query_one("SELECT last_error FROM outbox WHERE status = 'dead'", &[])
        .await
        .unwrap()
        .get(0);
    assert!(error.contains("InvalidParameter"), "{error}");

    // Re-driven after the cause is fixed, the aggregate resumes in order.
    client
        .batch_execute(
            "UPDATE outbox SET status = 'pending', payload = payload - 'poison', next_attempt_at = now()
             WHERE status = 'dead'",
        )
        .await
        .unwrap();
    drain_until_settled(&d, &db, Duration::from_secs(30)).await;
    assert_eq!(
        db.count(&client, "outbox WHERE status <> 'published'")
            .await,
        0
    );
    let ids = proxy.stats.event_ids.lock().unwrap().clone();
    let order: Vec<i64> = {
        let mut order = Vec::new();
        for id in ids {
            let id = uuid::Uuid::parse_str(&id).unwrap();
            let row = client
                .query_one(
                    "SELECT aggregate_id, aggregate_version FROM outbox WHERE event_id = $1",
                    &[&id],
                )
                .await
                .unwrap();
            if row.get::<_, String>(0) == "bad" {
                order.push(row.get(1));
            }
        }
        order
    };
    assert_eq!(order, vec![1, 2, 3]);
}

#[tokio::test]
async fn an_oversized_event_is_dead_with_the_reason_and_the_batch_goes_on() {
    let db = TestDb::create().await;
    let client = db.client().await;
    seed_outbox(&client, "acme", &aggregates("ok", 9), 1, "{}").await;
    let big = format!(r#"{{"blob":"{}"}}"#, "x".repeat(300_000));
    seed_outbox(&client, "acme", &["huge".to_owned()], 1, &big).await;
    let config = aws::sdk_config_for(&moto_endpoint()).await;
    let (bus_name, _queue) = aws::bus_with_queue(&config).await;
    let d = dispatcher(
        &db,
        &moto_endpoint(),
        Target::EventBridge { bus_name },
        test_dispatcher_config(),
    )
    .await;
    let summary = d
        .drain(Instant::now() + Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(
        (summary.published, summary.dead, summary.retried),
        (9, 1, 0)
    );
    let error: String = client
        .query_one(
            "SELECT last_error FROM outbox WHERE aggregate_id = 'huge' AND status = 'dead'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(error.starts_with("message too large"), "{error}");
}

#[tokio::test]
async fn eventbridge_failed_entries_are_handled_one_by_one() {
    let db = TestDb::create().await;
    let client = db.client().await;
    seed_outbox(&client, "acme", &aggregates("agg", 10), 1, "{}").await;
    seed_outbox(
        &client,
        "acme",
        &["malformed".to_owned()],
        1,
        r#"{"marker":"eb-malformed"}"#,
    )
    .await;
    let config = aws::sdk_config_for(&moto_endpoint()).await;
    let (bus_name, queue) = aws::bus_with_queue(&config).await;
    let proxy = FaultProxy::start(&moto_endpoint()).await;
    proxy.add_poison(PoisonRule {
        needle: "eb-malformed".into(),
        code: "MalformedDetail".into(),
        sender_fault: true,
    });
    proxy.push_faults([Fault::FailEntries {
        positions: vec![1],
        code: "ThrottlingException".into(),
        sender_fault: false,
    }]);
    // One call in flight, so the calls reach the proxy in claim order.
    let mut settings = test_dispatcher_config();
    settings.max_in_flight = 1;
    let d = dispatcher(
        &db,
        &proxy.endpoint,
        Target::EventBridge { bus_name },
        settings,
    )
    .await;
    let first = d.dispatch_batch().await.unwrap();
    // 11 rows in two calls (10 + 1): entry 1 of the first call throttled, the poison refused for good.
    assert_eq!((first.published, first.retried, first.dead), (9, 1, 1));
    drain_until_settled(&d, &db, Duration::from_secs(30)).await;
    let unpublished = db
        .texts(
            &client,
            "SELECT format('%s %s attempts=%s error=%s', aggregate_id, status, attempts, last_error)
             FROM outbox WHERE status <> 'published' ORDER BY id",
        )
        .await;
    assert_eq!(
        db.count(&client, "outbox WHERE status = 'published'").await,
        10,
        "{unpublished:?}"
    );
    assert_eq!(
        db.count(
            &client,
            "outbox WHERE status = 'dead' AND last_error LIKE '%MalformedDetail%'"
        )
        .await,
        1
    );
    receive(
        &config,
        &queue,
        10,
        Duration::from_secs(30),
        Duration::from_millis(300),
    )
    .await;
}

#[tokio::test]
async fn a_lease_keeps_others_off_until_it_expires() {
    let db = TestDb::create().await;
    let client = db.client().await;
    seed_outbox(&client, "acme", &aggregates("agg", 3), 2, "{}").await;
    let store = PgOutboxStore::new(Db::new(db.settings.clone()));
    let first = store
        .claim_batch(100, Duration::from_secs(1), "one")
        .await
        .unwrap();
    // Only version 1 of each aggregate: version 2 waits for it.
    assert_eq!(first.len(), 3);
    assert!(first
        .iter()
        .all(|c| c.aggregate_version == 1 && c.attempts == 1));
    assert!(store
        .claim_batch(100, Duration::from_secs(1), "two")
        .await
        .unwrap()
        .is_empty());
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let again = store
        .claim_batch(100, Duration::from_secs(5), "two")
        .await
        .unwrap();
    assert_eq!(again.len(), 3, "an expired lease is claimable again");
    assert!(again
        .iter()
        .all(|c| c.aggregate_version == 1 && c.attempts == 2));
    // The first holder lost its lease: its outcomes no longer apply to the rows.
    let outcomes = pg_outbox::outbox::Outcomes {
        dead: first.iter().map(|c| (c.id, "late".to_owned())).collect(),
        ..Default::default()
    };
    store.record_outcomes("one", &outcomes).await.unwrap();
    assert_eq!(db.count(&client, "outbox WHERE status = 'dead'").await, 0);
}

#[tokio::test]
async fn the_drain_stops_at_the_deadline_minus_the_safety_margin_at_most_half_its_time() {
    // A 5 s margin and a drain given 2 s: the margin is cut to 1 s, so the drain claims (before,
    // it stopped at once and claimed nothing), polls, and stops claiming after 1 s.
    let db = TestDb::create().await;
    let client = db.client().await;
    seed_outbox(&client, "acme", &aggregates("agg", 3), 1, "{}").await;
    let mut settings = test_dispatcher_config();
    settings.safety_margin = Duration::from_secs(5);
    settings.idle_poll = Some(Duration::from_millis(50));
    let d = dispatcher(
        &db,
        &moto_endpoint(),
        Target::Sns {
            topic_arn: "arn:aws:sns:us-east-1:123456789012:unused".into(),
        },
        settings,
    )
    .await;
    let started = Instant::now();
    let summary = d.drain(started + Duration::from_secs(2)).await.unwrap();
    let took = started.elapsed();
    assert_eq!(summary.stopped, Some(StopReason::Deadline));
    assert!(summary.claims >= 1);
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(2),
        "{took:?}"
    );
    assert_eq!(db.count(&client, "outbox WHERE attempts > 0").await, 3);
}

#[tokio::test]
async fn the_claim_is_served_by_the_partial_index() {
    let db = TestDb::create().await;
    let client = db.client().await;
    seed_outbox(&client, "acme", &aggregates("agg", 2_000), 1, "{}").await;
    client
        .batch_execute(
            "UPDATE outbox SET status = 'published' WHERE aggregate_id <> 'agg7'; ANALYZE outbox",
        )
        .await
        .unwrap();
    let plan = pg_outbox::postgres::outbox::explain_claim(&client, 100, false)
        .await
        .unwrap();
    assert!(plan.contains("outbox_tenant_claim_idx"), "{plan}");
    // Each tenant's share is read in the index's order (the sorts are of the few rows taken).
    assert!(
        plan.lines()
            .filter(|l| l.contains("Index Cond: ((tenant_id = ")
                || l.contains("Index Cond: ((ROW(tenant_id"))
            .count()
            >= 1,
        "{plan}"
    );
    assert!(
        !plan.contains("Seq Scan on outbox "),
        "the claim reads the whole outbox: {plan}"
    );
}

#[tokio::test]
async fn one_drain_publishes_every_version_though_records_and_claims_overlap() {
    // Each batch's outcomes are recorded beside the next claim, so the claim cannot yet see the
    // successors that record promotes: the drain must not take that empty claim for the end.
    let db = TestDb::create().await;
    let client = db.client().await;
    // Few aggregates, many versions: after each batch nothing is claimable until its record
    // commits.
    seed_outbox(&client, "acme", &aggregates("agg", 3), 8, "{}").await;
    let endpoint = FaultProxy::standalone_sns().await;
    let settings = test_dispatcher_config();
    let d = dispatcher(
        &db,
        &endpoint.endpoint,
        Target::Sns {
            topic_arn: "arn:aws:sns:us-east-1:123456789012:versions".into(),
        },
        settings,
    )
    .await;
    let summary = d
        .drain(Instant::now() + Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(summary.stopped, Some(StopReason::Empty));
    assert_eq!(summary.published, 24, "{summary:?}");
    assert_eq!(statuses(&db).await.get("published"), Some(&24));
    // Version order per aggregate on the wire.
    let ids = endpoint.stats.event_ids.lock().unwrap().clone();
    let versions = db.event_versions(&client).await;
    let mut last: HashMap<&str, i64> = HashMap::new();
    for id in &ids {
        let (aggregate, version) = &versions[id];
        let previous = last.insert(aggregate, *version).unwrap_or(0);
        assert_eq!(*version, previous + 1, "{aggregate} out of order");
    }
}

#[tokio::test]
async fn a_drain_dropped_mid_publish_leaves_no_publish_running() {
    // The invocation timing out drops the drain: the batch's remaining calls must not go on
    // without it (their outcomes could never be recorded).
    let db = TestDb::create().await;
    let client = db.client().await;
    seed_outbox(&client, "acme", &aggregates("agg", 50), 1, "{}").await;
    let endpoint = FaultProxy::standalone_sns().await;
    endpoint.set_latency(Duration::from_millis(300));
    let mut settings = test_dispatcher_config();
    settings.max_in_flight = 1;
    let d = dispatcher(
        &db,
        &endpoint.endpoint,
        Target::Sns {
            topic_arn: "arn:aws:sns:us-east-1:123456789012:dropped".into(),
        },
        settings,
    )
    .await;
    let calls = || {
        endpoint
            .stats
            .publish_calls
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let mut drain = Box::pin(d.drain(Instant::now() + Duration::from_secs(60)));
    tokio::select! {
        summary = &mut drain => panic!("the drain ended before its first call: {summary:?}"),
        () = async {
            while calls() == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        } => {}
    }
    // The first call is at the bus (300 ms each, one at a time); four more are still to come.
    drop(drain);
    let at_drop = calls();
    assert_eq!(at_drop, 1);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(
        calls(),
        at_drop,
        "no call after the drop (five were planned)"
    );
}
