//! The NATS JetStream target against a real `nats-server -js`: per-entity order on the wire, a
//! re-publish after a killed dispatcher dropped by JetStream, a full stream refusing messages,
//! a server restart mid-drain, and the sink consuming a stream through the inbox.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use outbox_tests::nats::PrivateNats;
use outbox_tests::{dispatcher, drain_until_settled, seed_outbox, test_dispatcher_config, TestDb};
use payments::projection::PaymentProjections;
use pg_outbox::consumer::Projections;
use pg_outbox::dispatcher::{DispatcherConfig, Target};
use pg_outbox::envelope::EventEnvelope;
use pg_outbox::nats::{NatsPublisher, HEADER_EVENT_TYPE, HEADER_TENANT};
use pg_outbox::ports::{OutboxStore, OutgoingMessage, PublishOutcome, Publisher};
use pg_outbox::postgres::outbox::PgOutboxStore;
use pg_outbox::postgres::projections::PgProjectionStore;
use pg_outbox::postgres::Db;

const STREAM: &str = "OUTBOX";
const PREFIX: &str = "outbox";

fn aggregates(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("pay_{i}")).collect()
}

/// Checks every message of the stream: envelope body, headers, subject, and each entity's
/// versions 1..=n in order. Returns the number of messages per entity.
async fn assert_stream_in_entity_order(nats: &PrivateNats) -> BTreeMap<String, i64> {
    let mut last: BTreeMap<String, i64> = BTreeMap::new();
    for message in nats.messages(STREAM).await {
        let envelope: EventEnvelope =
            serde_json::from_slice(&message.payload).expect("the body is the envelope");
        let headers = message.headers.as_ref().expect("headers");
        assert_eq!(
            headers.get("Nats-Msg-Id").map(|v| v.as_str()),
            Some(envelope.id.to_string().as_str())
        );
        assert_eq!(
            headers.get(HEADER_EVENT_TYPE).map(|v| v.as_str()),
            Some(envelope.event_type.as_str())
        );
        assert_eq!(
            headers.get(HEADER_TENANT).map(|v| v.as_str()),
            Some(envelope.tenantid.as_str())
        );
        assert_eq!(
            message.subject.as_str(),
            format!("{PREFIX}.payment.{}.payment.paid", envelope.aggregateid)
        );
        let previous = last.insert(envelope.aggregateid.clone(), envelope.aggregateversion);
        assert_eq!(
            envelope.aggregateversion,
            previous.unwrap_or(0) + 1,
            "{}: version {} after {previous:?}",
            envelope.aggregateid,
            envelope.aggregateversion
        );
    }
    last
}

fn nats_config() -> DispatcherConfig {
    DispatcherConfig {
        max_in_flight: 8,
        ..test_dispatcher_config()
    }
}

#[tokio::test]
async fn two_dispatchers_publish_each_entity_in_version_order_with_its_headers() {
    let db = TestDb::create().await;
    let nats = PrivateNats::start().await;
    nats.stream(STREAM, PREFIX, None).await;
    let client = db.client().await;
    seed_outbox(&client, "acme", &aggregates(40), 5, "{}").await;

    let target = Target::Nats(nats.settings(PREFIX));
    // Small claims, so the two take turns on the same aggregates' successive versions.
    let config = DispatcherConfig {
        batch_size: 7,
        ..nats_config()
    };
    let a = dispatcher(&db, "http://127.0.0.1:9", target.clone(), config.clone()).await;
    let b = dispatcher(&db, "http://127.0.0.1:9", target, config).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let (sa, sb) = tokio::join!(a.drain(deadline), b.drain(deadline));
    sa.unwrap();
    sb.unwrap();
    drain_until_settled(&a, &db, Duration::from_secs(30)).await;
    assert_eq!(
        db.count(&client, "outbox WHERE status = 'published'").await,
        200
    );
    let per_entity = assert_stream_in_entity_order(&nats).await;
    assert_eq!(per_entity.len(), 40);
    assert!(per_entity.values().all(|v| *v == 5));
}

/// A dispatcher publishes a claim and dies before recording it. When the lease runs out another
/// publishes the same rows again: JetStream acknowledges them as duplicates and keeps one copy.
#[tokio::test]
async fn a_republish_after_a_killed_dispatcher_is_dropped_by_jetstream() {
    let db = TestDb::create().await;
    let nats = PrivateNats::start().await;
    nats.stream(STREAM, PREFIX, None).await;
    let client = db.client().await;
    seed_outbox(&client, "acme", &aggregates(10), 2, "{}").await;

    // The one that dies: claims, publishes, never records.
    let store = PgOutboxStore::new(Db::new(db.settings.clone()));
    let claimed = store
        .claim_batch(100, Duration::from_secs(1), "doomed")
        .await
        .unwrap();
    assert_eq!(claimed.len(), 10);
    let publisher = NatsPublisher::connect(&nats.settings(PREFIX))
        .await
        .unwrap();
    let batch: Vec<OutgoingMessage> = claimed
        .into_iter()
        .map(|event| {
            let body = serde_json::to_string(&EventEnvelope::from_row(&event).unwrap()).unwrap();
            OutgoingMessage::new(event, body)
        })
        .collect();
    let outcomes = publisher.publish(&batch).await;
    assert!(
        outcomes.iter().all(|o| *o == PublishOutcome::Published),
        "{outcomes:?}"
    );
    drop(store);
    tokio::time::sleep(Duration::from_millis(1_100)).await;

    let survivor = dispatcher(
        &db,
        "http://127.0.0.1:9",
        Target::Nats(nats.settings(PREFIX)),
        nats_config(),
    )
    .await;
    drain_until_settled(&survivor, &db, Duration::from_secs(30)).await;
    assert_eq!(
        db.count(&client, "outbox WHERE status = 'published'").await,
        20
    );
    let js = nats.jetstream().await;
    let info = js
        .get_stream(STREAM)
        .await
        .unwrap()
        .get_info()
        .await
        .unwrap();
    assert_eq!(
        info.state.messages, 20,
        "the 10 re-published events were dropped"
    );
    assert_stream_in_entity_order(&nats).await;
}

/// A stream at its message limit (discard new) refuses the rest: those rows are retried, then
/// dead after `max_attempts`, and the rows it took are published.
#[tokio::test]
async fn a_full_stream_refuses_messages_which_are_retried_then_dead_and_only_those() {
    let db = TestDb::create().await;
    let nats = PrivateNats::start().await;
    nats.stream(STREAM, PREFIX, Some(6)).await;
    let client = db.client().await;
    seed_outbox(&client, "acme", &aggregates(10), 1, "{}").await;
    let config = DispatcherConfig {
        max_attempts: 3,
        ..nats_config()
    };
    let d = dispatcher(
        &db,
        "http://127.0.0.1:9",
        Target::Nats(nats.settings(PREFIX)),
        config,
    )
    .await;
    let first = d
        .drain(Instant::now() + Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(first.published, 6, "{first:?}");
    assert!(first.retried >= 4, "{first:?}");
    drain_until_settled(&d, &db, Duration::from_secs(30)).await;
    assert_eq!(
        db.count(&client, "outbox WHERE status = 'published'").await,
        6
    );
    let dead = client
        .query(
            "SELECT attempts, last_error FROM outbox WHERE status = 'dead'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(dead.len(), 4);
    for row in dead {
        assert_eq!(row.get::<_, i32>(0), 3);
        let error: String = row.get(1);
        assert!(error.contains("maximum messages"), "{error}");
    }
}

/// The server is killed in the middle of a drain and started again a second later. Publishes
/// meanwhile time out and are retried; nothing is lost, nothing is stored twice, order holds.
#[tokio::test]
async fn a_server_restart_mid_drain_loses_nothing() {
    let db = TestDb::create().await;
    let mut nats = PrivateNats::start().await;
    nats.stream(STREAM, PREFIX, None).await;
    let client = db.client().await;
    seed_outbox(&client, "acme", &aggregates(100), 20, "{}").await;
    let mut settings = nats.settings(PREFIX);
    settings.ack_timeout = Duration::from_millis(500);
    let config = DispatcherConfig {
        max_attempts: 100,
        idle_poll: Some(Duration::from_millis(20)),
        ..nats_config()
    };
    let d = dispatcher(&db, "http://127.0.0.1:9", Target::Nats(settings), config).await;
    let drain = tokio::spawn(async move {
        d.drain(Instant::now() + Duration::from_secs(60))
            .await
            .unwrap()
    });
    // Wait until part of it is out, then pull the plug.
    let started = Instant::now();
    while db.count(&client, "outbox WHERE status = 'published'").await < 300 {
        assert!(started.elapsed() < Duration::from_secs(20), "no progress");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    nats.kill();
    let at_kill = db.count(&client, "outbox WHERE status = 'published'").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    nats.restart().await;
    let started = Instant::now();
    while db.count(&client, "outbox WHERE status = 'published'").await < 2_000 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "not all published after the restart"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drain.abort();
    assert!(
        at_kill < 2_000,
        "the kill came mid-drain ({at_kill} published)"
    );
    assert!(
        db.count(&client, "outbox WHERE attempts > 1").await > 0,
        "publishes failed while the server was down and were retried"
    );
    let per_entity = assert_stream_in_entity_order(&nats).await;
    assert_eq!(per_entity.values().sum::<i64>(), 2_000);
    assert!(per_entity.values().all(|v| *v == 20));
}

/// The sink's JetStream path: a durable consumer applies the stream through the inbox; a second
/// durable with the same inbox name gets every message again and changes nothing.
#[tokio::test]
async fn the_sink_applies_a_stream_through_the_inbox_once_in_effect() {
    let db = TestDb::create().await;
    let nats = PrivateNats::start().await;
    nats.stream(STREAM, PREFIX, None).await;
    let handler = db.payment_handler();
    for i in 0..5 {
        let reply = outbox_tests::invoke(
            &handler,
            outbox_tests::paid_request(
                "acme",
                &format!("pay_{i}"),
                outbox_tests::paid_body(1_000 + i, "EUR"),
            ),
        )
        .await;
        assert_eq!(reply.status, 200);
    }
    let d = dispatcher(
        &db,
        "http://127.0.0.1:9",
        Target::Nats(nats.settings(PREFIX)),
        nats_config(),
    )
    .await;
    drain_until_settled(&d, &db, Duration::from_secs(30)).await;

    let store = PgProjectionStore::new(
        Db::new(db.settings.clone()),
        Projections::new().with(PaymentProjections),
    );
    let js = nats.jetstream().await;
    // A message that is not an envelope is terminated, not applied.
    js.publish(format!("{PREFIX}.junk.x.y"), "not json".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let mut reports = Vec::new();
    for durable in ["sink-a", "sink-b"] {
        let consumer = pg_outbox::nats::sink_consumer(&js, STREAM, durable, None, 5)
            .await
            .unwrap();
        let report = pg_outbox::nats::consume(
            &consumer,
            &store,
            None,
            "nats-sink",
            100,
            Duration::from_secs(1),
            Duration::from_millis(100),
        )
        .await
        .unwrap();
        reports.push(report);
    }
    assert_eq!(
        (
            reports[0].received,
            reports[0].acknowledged,
            reports[0].terminated
        ),
        (6, 5, 1)
    );
    assert_eq!(
        (
            reports[1].received,
            reports[1].acknowledged,
            reports[1].terminated
        ),
        (6, 5, 1)
    );
    let client = db.client().await;
    assert_eq!(db.count(&client, "payment_projection").await, 5);
    assert_eq!(
        db.count(&client, "processed_events WHERE consumer = 'nats-sink'")
            .await,
        5
    );
}
