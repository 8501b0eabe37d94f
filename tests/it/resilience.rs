//! (Past 400 lines: one test per AWS-account fault on a cluster of its own, sharing this file's fixtures.)
//!
//! What a real AWS account does to the functions, against a PostgreSQL cluster of each test's own
//! (so restarts and password changes do not touch the other tests) and Secrets Manager in moto:
//! a rotated password, a rotation caught between its `setSecret` and `finishSecret` steps, a
//! wrong secret, a server restart during a drain, an outage during a command, and a connection
//! that silently stops answering.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox_tests::aws::{create_topic, moto_endpoint, sdk_config_for};
use outbox_tests::cluster::PrivateCluster;
use outbox_tests::fault_proxy::FaultProxy;
use outbox_tests::rotation::{rotate, RotatingSecret, ROLE};
use outbox_tests::sink_fixtures::{payment_projections, payment_stream, sqs_event};
use outbox_tests::tcp_proxy::StallingProxy;
use outbox_tests::{
    invoke, paid_body, paid_request, refund_request, seed_outbox, test_dispatcher_config, TestDb,
};
use payment_command::{HandlerConfig, PaymentCommandHandler};
use payments::store::PgPaymentStore;
use pg_outbox::aws::BusPublisher;
use pg_outbox::dispatcher::{OutboxDispatcher, Target};
use pg_outbox::ports::{ProjectionStore, StoreError};
use pg_outbox::postgres::outbox::PgOutboxStore;
use pg_outbox::postgres::projections::PgProjectionStore;
use pg_outbox::postgres::{ConnectionLimits, DatabaseSettings, Db, TlsMode};
use pg_outbox::sink::{parse_delivery, ApplyOutcome};
use projection_sink::ProjectionSink;

#[tokio::test]
async fn a_rotated_password_costs_the_payment_command_no_request() {
    let cluster = PrivateCluster::start();
    let db = TestDb::create_on(&cluster).await;
    let secret = RotatingSecret::create(&cluster, &db, "pw-before").await;
    let (conn, reads) = secret.db(Duration::from_secs(5)).await;
    let handler = PaymentCommandHandler::new(PgPaymentStore::new(conn), HandlerConfig::default());

    let first = pay(&handler, "pay_r1").await;
    assert_eq!(first.status, 200, "{}", first.body);

    rotate(&cluster, &secret, "pw-after", "AWSCURRENT").await;
    let mut statuses = Vec::new();
    for n in 2..=4 {
        let payment = format!("pay_r{n}");
        let reply = pay(&handler, &payment).await;
        statuses.push(reply.status);
    }
    assert_eq!(statuses, [200, 200, 200], "{}", cluster.log());
    assert_eq!(
        reads.load(Ordering::SeqCst),
        1,
        "the secret is read once per rotation"
    );
}

#[tokio::test]
async fn a_drain_during_a_rotation_uses_the_pending_value() {
    let cluster = PrivateCluster::start();
    let db = TestDb::create_on(&cluster).await;
    let secret = RotatingSecret::create(&cluster, &db, "pw-before").await;
    let (conn, reads) = secret.db(Duration::from_secs(5)).await;
    let proxy = FaultProxy::standalone_sns().await;
    let dispatcher = OutboxDispatcher::new(
        PgOutboxStore::new(conn),
        BusPublisher::new(
            &sdk_config_for(&proxy.endpoint).await,
            &Target::Sns {
                topic_arn: "arn:aws:sns:us-east-1:123456789012:standalone".into(),
            },
        )
        .await
        .expect("publisher"),
        test_dispatcher_config(),
        "rotation-test",
    );
    let admin = db.client().await;
    seed_outbox(&admin, "acme", &["pay_a".into(), "pay_b".into()], 3, "{}").await;
    let before = dispatcher
        .drain(Instant::now() + Duration::from_secs(20))
        .await
        .expect("drain before the rotation");
    assert_eq!(before.published, 6);

    // setSecret done, finishSecret not yet: the database has the new password, AWSCURRENT
    // still holds the old one, AWSPENDING the new.
    rotate(&cluster, &secret, "pw-pending", "AWSPENDING").await;
    seed_outbox(&admin, "acme", &["pay_c".into()], 4, "{}").await;
    let after = dispatcher
        .drain(Instant::now() + Duration::from_secs(20))
        .await
        .expect("drain after the rotation");
    assert_eq!(after.published, 4, "{after:?}");
    assert_eq!(
        after.store_errors, 0,
        "the rotation cost no failed operation: {after:?}"
    );
    assert_eq!(reads.load(Ordering::SeqCst), 1);
    assert_eq!(
        db.count(&admin, "outbox WHERE status <> 'published'").await,
        0
    );
}

#[tokio::test]
async fn a_sink_batch_after_a_rotation_is_applied() {
    let cluster = PrivateCluster::start();
    let db = TestDb::create_on(&cluster).await;
    let secret = RotatingSecret::create(&cluster, &db, "pw-before").await;
    let (conn, reads) = secret.db(Duration::from_secs(5)).await;
    let sink = ProjectionSink::new(
        PgProjectionStore::new(conn, payment_projections()),
        projection_sink::DEFAULT_CONSUMER,
    );
    // One committed-sample-shaped paid event per batch, a different payment each time.
    let batch = |seed: u64| {
        let event = payment_stream(seed, 1).remove(0);
        sqs_event(&[(uuid::Uuid::new_v4().to_string(), event.body)])
    };
    let (response, report) = sink.apply_batch(batch(1)).await;
    assert!(response.batch_item_failures.is_empty(), "{report:?}");

    rotate(&cluster, &secret, "pw-after", "AWSCURRENT").await;
    let (response, report) = sink.apply_batch(batch(2)).await;
    assert!(
        response.batch_item_failures.is_empty(),
        "{report:?} {}",
        cluster.log()
    );
    assert_eq!(report.applied, 1);
    assert_eq!(reads.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_wrong_secret_is_reread_at_most_once_per_interval_and_fails_clearly() {
    let cluster = PrivateCluster::start();
    let db = TestDb::create_on(&cluster).await;
    let secret = RotatingSecret::create(&cluster, &db, "pw-before").await;
    let (conn, reads) = secret.db(Duration::from_millis(1_500)).await;
    let store = PgProjectionStore::new(conn, payment_projections());

    // The password changes in the database but nobody updates the secret.
    cluster.set_password(ROLE, "pw-nobody-knows").await;
    cluster.terminate_sessions(ROLE).await;
    let failure = |result: Result<Vec<ApplyOutcome>, StoreError>| match result {
        Err(e) => pg_outbox::telemetry::error_chain(&e),
        Ok(outcomes) => panic!("expected the batch to fail, got {outcomes:?}"),
    };
    let body = payment_stream(3, 1).remove(0).body;
    let envelope = parse_delivery(&body).expect("the sample stream's first event parses");
    for _ in 0..5 {
        let reason = failure(
            store
                .apply_events("c", std::slice::from_ref(&envelope))
                .await,
        );
        assert!(
            reason.contains("refused the credentials") && !reason.contains("pw-"),
            "{reason}"
        );
    }
    assert_eq!(reads.load(Ordering::SeqCst), 1, "five failures, one read");
    tokio::time::sleep(Duration::from_millis(1_600)).await;
    failure(
        store
            .apply_events("c", std::slice::from_ref(&envelope))
            .await,
    );
    assert_eq!(
        reads.load(Ordering::SeqCst),
        2,
        "read again after the interval"
    );

    // Someone fixes the secret: the next read after the interval connects.
    secret.put("pw-nobody-knows", "AWSCURRENT").await;
    tokio::time::sleep(Duration::from_millis(1_600)).await;
    let outcomes = store
        .apply_events("c", std::slice::from_ref(&envelope))
        .await
        .expect("applied once the secret is fixed");
    assert_eq!(outcomes, vec![ApplyOutcome::Applied]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_carries_on_through_a_restart_and_the_sink_applies_everything_once() {
    let cluster = Arc::new(PrivateCluster::start());
    let db = TestDb::create_on(&cluster).await;
    // Real payment events through the command handler: 400 payments, each paid and refunded
    // four times (versions 1 to 5).
    let payments = 400;
    let handler = db.payment_handler();
    for p in 0..payments {
        let payment = format!("pay_{p}");
        let reply = invoke(
            &handler,
            paid_request("acme", &payment, paid_body(1_000, "EUR")),
        )
        .await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        for r in 0..4 {
            let key = format!("{payment}-r{r}");
            let reply = invoke(&handler, refund_request("acme", &payment, &key, 100)).await;
            assert_eq!(reply.status, 201, "{}", reply.body);
        }
    }
    let admin = db.client().await;
    let total = db.count(&admin, "outbox").await;
    assert_eq!(total, payments * 5);
    drop(admin);

    let sdk = sdk_config_for(&moto_endpoint()).await;
    let topic_arn = create_topic(&sdk, false).await;
    let proxy = FaultProxy::start(&moto_endpoint()).await;
    proxy.stats.keep_bodies.store(true, Ordering::Relaxed);
    // Slow enough that the restart lands in the middle of the drain.
    proxy.set_latency(Duration::from_millis(30));
    let mut config = test_dispatcher_config();
    config.batch_size = 100;
    config.lease = Duration::from_secs(5);
    let dispatcher = OutboxDispatcher::new(
        PgOutboxStore::new(Db::new(db.settings.clone())),
        BusPublisher::new(
            &sdk_config_for(&proxy.endpoint).await,
            &Target::Sns { topic_arn },
        )
        .await
        .expect("publisher"),
        config,
        "restart-test",
    );
    let restarted = {
        let stats = proxy.stats.clone();
        let cluster = cluster.clone();
        tokio::spawn(async move {
            while stats.event_ids.lock().unwrap().len() < 300 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let published = stats.event_ids.lock().unwrap().len();
            // Down for a second: the drain, which claims or records every few tens of
            // milliseconds, meets the server down (a restart alone may fall between two of its
            // operations, which then find their connections closed and open new ones without an
            // error).
            tokio::task::spawn_blocking(move || {
                cluster.stop();
                std::thread::sleep(Duration::from_secs(1));
                cluster.start_again();
            })
            .await
            .expect("restart");
            (published, Instant::now())
        })
    };
    let summary = dispatcher
        .drain(Instant::now() + Duration::from_secs(60))
        .await
        .expect("the drain outlives the restart");
    let drained = Instant::now();
    let (restarted_after, back) = restarted.await.expect("restart task");
    assert!(
        (restarted_after as i64) < total && back < drained,
        "the restart did not happen in the middle of the drain"
    );
    assert!(summary.store_errors >= 1, "no failure seen: {summary:?}");
    println!(
        "restart mid-drain: restarted after {restarted_after} of {total} events on the bus; \
         drain published {} with {} failed store operations and carried on, {} ms in all",
        summary.published, summary.store_errors, summary.duration_ms
    );

    // Rows leased by a claim whose answer the restart swallowed go out after their lease.
    let admin = db.client().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = db.count(&admin, "outbox WHERE status <> 'published'").await;
        if left == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{left} rows never published");
        dispatcher
            .drain(Instant::now() + Duration::from_secs(10))
            .await
            .expect("later drain");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let arrived: std::collections::HashSet<String> = proxy
        .stats
        .event_ids
        .lock()
        .unwrap()
        .iter()
        .cloned()
        .collect();
    let ids: Vec<String> = admin
        .query("SELECT event_id::text FROM outbox", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let lost = ids.iter().filter(|id| !arrived.contains(*id)).count();
    assert_eq!(lost, 0, "published rows that never reached the bus");

    // Everything the bus got (duplicates included) through the sink: applied once each.
    let sink = ProjectionSink::new(
        PgProjectionStore::new(Db::new(db.settings.clone()), payment_projections()),
        projection_sink::DEFAULT_CONSUMER,
    );
    let bodies: Vec<String> = proxy.stats.bodies.lock().unwrap().clone();
    let mut pending: Vec<(String, String)> = bodies
        .into_iter()
        .map(|b| (uuid::Uuid::new_v4().to_string(), b))
        .collect();
    for _ in 0..50 {
        let mut failed = Vec::new();
        for chunk in pending.chunks(10) {
            let (response, _) = sink.apply_batch(sqs_event(chunk)).await;
            let ids: std::collections::HashSet<String> = response
                .batch_item_failures
                .into_iter()
                .map(|f| f.item_identifier)
                .collect();
            failed.extend(chunk.iter().filter(|m| ids.contains(&m.0)).cloned());
        }
        pending = failed;
        if pending.is_empty() {
            break;
        }
    }
    assert!(
        pending.is_empty(),
        "{} deliveries never applied",
        pending.len()
    );
    assert_eq!(db.count(&admin, "processed_events").await, total);
    assert_eq!(
        db.count(
            &admin,
            "payment_projection WHERE last_version = 5 AND refunded_minor = 400"
        )
        .await,
        payments
    );
}

#[tokio::test]
async fn a_command_during_an_outage_gets_a_503_and_the_next_one_succeeds() {
    let cluster = PrivateCluster::start();
    let db = TestDb::create_on(&cluster).await;
    let handler = db.payment_handler();
    let ok = pay(&handler, "pay_o1").await;
    assert_eq!(ok.status, 200);

    cluster.stop();
    let started = Instant::now();
    let down = pay(&handler, "pay_o2").await;
    let took = started.elapsed();
    assert_eq!(down.status, 503, "{}", down.body);
    assert!(
        !down.body.to_string().contains("connect"),
        "internal error text reached the client: {}",
        down.body
    );
    assert!(took < ConnectionLimits::default().operation, "{took:?}");
    println!("command while the server is down: 503 after {took:?}");

    cluster.start_again();
    let again = pay(&handler, "pay_o2").await;
    assert_eq!(again.status, 200, "{}", again.body);
    // The 503 wrote nothing: the retry is the first and only payment.
    let admin = db.client().await;
    assert_eq!(
        db.count(&admin, "outbox WHERE aggregate_id = 'pay_o2'")
            .await,
        1
    );
}

#[tokio::test]
async fn a_connection_that_stops_answering_is_given_up_within_the_bound() {
    let cluster = PrivateCluster::start();
    let db = TestDb::create_on(&cluster).await;
    let proxy = StallingProxy::start(cluster.port).await;
    let limits = ConnectionLimits {
        connect: Duration::from_millis(500),
        operation: Duration::from_millis(1_500),
        ..ConnectionLimits::default()
    };
    let through_proxy = || {
        let url = db
            .url
            .replace(&format!(":{}/", cluster.port), &format!(":{}/", proxy.port));
        let config: tokio_postgres::Config = url.parse().unwrap();
        Db::new(DatabaseSettings::new(config, TlsMode::Disable)).with_limits(limits)
    };
    let handler = PaymentCommandHandler::new(
        PgPaymentStore::new(through_proxy()),
        HandlerConfig::default(),
    );
    let sns = FaultProxy::standalone_sns().await;
    let dispatcher = OutboxDispatcher::new(
        PgOutboxStore::new(through_proxy()),
        BusPublisher::new(
            &sdk_config_for(&sns.endpoint).await,
            &Target::Sns {
                topic_arn: "arn:aws:sns:us-east-1:123456789012:standalone".into(),
            },
        )
        .await
        .expect("publisher"),
        test_dispatcher_config(),
        "stall-test",
    );
    let ok = pay(&handler, "pay_h1").await;
    assert_eq!(ok.status, 200);

    proxy.stall();
    // The command: a 503 once the operation bound passes, not the Lambda timeout.
    let started = Instant::now();
    let stuck = pay(&handler, "pay_h2").await;
    let took = started.elapsed();
    assert_eq!(stuck.status, 503, "{}", stuck.body);
    assert!(
        took >= limits.operation && took < limits.operation + Duration::from_millis(500),
        "gave up after {took:?}"
    );
    println!(
        "silent connection: the command answered 503 after {took:?} (operation bound {:?})",
        limits.operation
    );
    // The drain: every operation bounded; with the database silent for the whole invocation
    // it fails (so the error alarm fires) by its deadline plus one bound.
    let started = Instant::now();
    let drained = dispatcher
        .drain(Instant::now() + Duration::from_secs(4))
        .await;
    let took = started.elapsed();
    assert!(drained.is_err(), "{drained:?}");
    assert!(
        took < Duration::from_secs(4) + limits.operation + Duration::from_millis(500),
        "drain returned after {took:?}"
    );
    println!("silent connection: a drain with a 4 s deadline failed after {took:?}");

    proxy.resume();
    let back = pay(&handler, "pay_h3").await;
    assert_eq!(back.status, 200, "{}", back.body);
    let summary = dispatcher
        .drain(Instant::now() + Duration::from_secs(10))
        .await
        .expect("drain after the network came back");
    assert!(summary.published >= 2, "{summary:?}");
}

/// A paid command of 100 EUR for `payment` of tenant acme, through the handler.
async fn pay<W: pg_outbox::ports::WakeDispatcher>(
    handler: &PaymentCommandHandler<PgPaymentStore, W>,
    payment: &str,
) -> outbox_tests::Reply {
    invoke(
        handler,
        paid_request("acme", payment, paid_body(100, "EUR")),
    )
    .await
}

/// The pid of the backend that ran one operation, which holds its connection for `hold` first.
async fn backend_pid(db: &Db, hold: Duration) -> i32 {
    db.run(|client| async move {
        let row = client
            .query_one(
                "SELECT pg_backend_pid(), pg_sleep($1)::text",
                &[&hold.as_secs_f64()],
            )
            .await?;
        Ok(row.get::<_, i32>(0))
    })
    .await
    .expect("operation")
}

#[tokio::test]
async fn overlapping_operations_take_a_second_connection_only_when_allowed_and_needed() {
    let db = TestDb::create().await;
    let hold = Duration::from_millis(300);

    // Default (2): one after the other they share one connection; overlapping, they get two,
    // and a third overlapping one waits for one of them.
    let two = Db::new(db.settings.clone());
    let first = backend_pid(&two, Duration::ZERO).await;
    assert_eq!(backend_pid(&two, Duration::ZERO).await, first);
    let (a, b, c) = tokio::join!(
        backend_pid(&two, hold),
        backend_pid(&two, hold),
        backend_pid(&two, hold)
    );
    assert_ne!(a, b, "two overlapping operations, two connections");
    assert!(
        [a, b].contains(&first) && [a, b].contains(&c),
        "at most two: {a} {b} {c}"
    );

    // With 1 they take turns on the one connection.
    let one = Db::new(db.settings.clone()).with_limits(ConnectionLimits {
        max_connections: 1,
        ..ConnectionLimits::default()
    });
    let (a, b) = tokio::join!(backend_pid(&one, hold), backend_pid(&one, hold));
    assert_eq!(a, b);

    // Both connections ended by the server: each slot opens a new one on its next operation.
    let admin = db.client().await;
    for pid in [first, c] {
        admin
            .execute("SELECT pg_terminate_backend($1)", &[&pid])
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (a, b) = tokio::join!(backend_pid(&two, hold), backend_pid(&two, hold));
    assert_ne!(a, b);
    assert!(
        ![first, c].contains(&a) && ![first, c].contains(&b),
        "new connections"
    );
}
