//! The projection sink against a real PostgreSQL: every delivery shape, duplicates, replays,
//! shuffled and duplicated delivery, racing sinks, poison messages, and the whole flow end to end.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use aws_lambda_events::sqs::SqsEvent;
use outbox_tests::aws::{self, moto_endpoint, receive};
use outbox_tests::sink_fixtures::{payment_stream, sink, snapshot, sqs_event, StreamEvent};
use outbox_tests::{
    dispatcher, invoke, paid_body, paid_request, refund_request, sample_files, sample_json,
    test_dispatcher_config, typed, TestDb,
};
use pg_outbox::dispatcher::Target;

fn failures(response: &aws_lambda_events::sqs::SqsBatchResponse) -> Vec<String> {
    response
        .batch_item_failures
        .iter()
        .map(|f| f.item_identifier.clone())
        .collect()
}

/// File → (message ids reported failed, applied, duplicates, unknown types), each on a fresh database.
const EXPECTED: &[(&str, &[&str], usize, usize, usize)] = &[
    ("duplicate.json", &[], 1, 1, 0),
    ("eventbridge.json", &[], 3, 0, 0),
    (
        "malformed.json",
        &[
            "a1b2c3d4-0006-4000-8000-000000000001",
            "a1b2c3d4-0006-4000-8000-000000000003",
            "a1b2c3d4-0006-4000-8000-000000000004",
        ],
        1,
        0,
        1,
    ),
    (
        "out-of-order.json",
        &["a1b2c3d4-0005-4000-8000-000000000001"],
        1,
        0,
        0,
    ),
    ("sns-raw.json", &[], 3, 0, 0),
    ("sns-wrapped.json", &[], 3, 0, 0),
];

#[tokio::test]
async fn every_sink_sample_parses_and_reports_only_its_bad_messages() {
    let files = sample_files("projection-sink");
    let names: Vec<String> = files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        EXPECTED.iter().map(|e| e.0).collect::<Vec<_>>(),
        "every sample needs an expectation"
    );
    let mut shapes = Vec::new();
    for (name, failed, applied, duplicates, unknown) in EXPECTED {
        let db = TestDb::create().await;
        let event: SqsEvent = typed(sample_json("projection-sink", name));
        let (response, report) = sink(&db).apply_batch(event).await;
        assert_eq!(failures(&response), *failed, "{name}");
        assert_eq!(
            (report.applied, report.duplicates, report.unknown_types),
            (*applied, *duplicates, *unknown),
            "{name}"
        );
        shapes.push(snapshot(&db).await);
    }
    // Raw, wrapped and EventBridge deliveries of the same events give the same projections.
    assert_eq!(shapes[1], shapes[4]);
    assert_eq!(shapes[4], shapes[5]);
    let (payments, revenue) = &shapes[4];
    assert_eq!(
        payments,
        &vec![
            "acme|pay_2001|partially_refunded|EUR|12500|2500|2".to_owned(),
            "acme|pay_2002|paid|USD|4999|0|1".to_owned(),
        ]
    );
    assert_eq!(
        revenue,
        &vec![
            "acme|2026-11-22|EUR|12500|2500|10000".to_owned(),
            "acme|2026-11-22|USD|4999|0|4999".to_owned()
        ]
    );
}

#[tokio::test]
async fn an_event_ahead_of_its_predecessor_is_redelivered_and_then_applied() {
    let db = TestDb::create().await;
    let event: SqsEvent = typed(sample_json("projection-sink", "out-of-order.json"));
    let refund = event.records[0].clone();
    let sink = sink(&db);
    let (response, _) = sink.apply_batch(event).await;
    assert_eq!(failures(&response).len(), 1);
    // SQS delivers the failed message again; now its predecessor is there.
    let mut redelivery = SqsEvent::default();
    redelivery.records = vec![refund];
    let (response, report) = sink.apply_batch(redelivery).await;
    assert!(failures(&response).is_empty());
    assert_eq!(report.applied, 1);
    assert_eq!(
        snapshot(&db).await.0,
        vec!["acme|pay_2001|partially_refunded|EUR|12500|2500|2".to_owned()]
    );
}

fn batches(events: &[StreamEvent], size: usize) -> Vec<SqsEvent> {
    events
        .chunks(size)
        .map(|chunk| {
            sqs_event(
                &chunk
                    .iter()
                    .map(|e| (uuid::Uuid::new_v4().to_string(), e.body.clone()))
                    .collect::<Vec<_>>(),
            )
        })
        .collect()
}

#[tokio::test]
async fn replaying_the_whole_stream_changes_nothing() {
    let db = TestDb::create().await;
    let stream = payment_stream(7, 40);
    let sink = sink(&db);
    for batch in batches(&stream, 10) {
        assert!(failures(&sink.apply_batch(batch).await.0).is_empty());
    }
    let once = snapshot(&db).await;
    assert_eq!(once.0.len(), 40);
    for _ in 0..2 {
        for batch in batches(&stream, 10) {
            let (response, report) = sink.apply_batch(batch).await;
            assert!(failures(&response).is_empty());
            assert_eq!(report.applied, 0);
        }
        assert_eq!(snapshot(&db).await, once, "a replay changed a projection");
    }
    let client = db.client().await;
    assert_eq!(
        db.count(&client, "processed_events").await,
        stream.len() as i64
    );
}

/// Property: any order of delivery, with any duplication, converges to the projections of
/// in-order delivery once SQS has redelivered what was reported failed. 30 random cases, each
/// seed printed on failure.
#[tokio::test]
async fn shuffled_and_duplicated_delivery_converges_to_in_order_delivery() {
    for seed in 1..=30u64 {
        let stream = payment_stream(seed, 12);
        let in_order = TestDb::create().await;
        for batch in batches(&stream, 10) {
            sink(&in_order).apply_batch(batch).await;
        }
        let expected = snapshot(&in_order).await;

        let db = TestDb::create().await;
        let sink = sink(&db);
        let mut rng = fastrand::Rng::with_seed(seed);
        // Every message one to three times, in random order.
        let mut queue: Vec<(String, String)> = stream
            .iter()
            .flat_map(|e| std::iter::repeat_n(e.body.clone(), rng.usize(1..=3)))
            .map(|body| (uuid::Uuid::new_v4().to_string(), body))
            .collect();
        rng.shuffle(&mut queue);
        let mut rounds = 0;
        while !queue.is_empty() {
            rounds += 1;
            assert!(rounds < 200, "seed {seed}: did not converge");
            let take = rng.usize(1..=10).min(queue.len());
            let batch: Vec<(String, String)> = queue.drain(..take).collect();
            let (response, _) = sink.apply_batch(sqs_event(&batch)).await;
            let failed: HashSet<String> = failures(&response).into_iter().collect();
            // Redelivered later, somewhere in the queue.
            for message in batch.into_iter().filter(|(id, _)| failed.contains(id)) {
                let at = rng.usize(0..=queue.len());
                queue.insert(at, message);
            }
        }
        assert_eq!(snapshot(&db).await, expected, "seed {seed}");
    }
}

#[tokio::test]
async fn two_sinks_applying_the_same_events_at_once_apply_each_once() {
    let db = TestDb::create().await;
    let stream = payment_stream(99, 30);
    let (a, b) = (sink(&db), sink(&db));
    for batch in batches(&stream, 10) {
        let size = batch.records.len();
        let (ra, rb) = tokio::join!(a.apply_batch(batch.clone()), b.apply_batch(batch));
        assert!(ra.1.applied + rb.1.applied <= size, "{:?} {:?}", ra.1, rb.1);
        assert!(
            ra.1.duplicates + rb.1.duplicates > 0 || ra.1.failures + rb.1.failures > 0,
            "no overlap"
        );
    }
    // Redeliver anything either reported failed (a refund that raced ahead of its payment).
    for batch in batches(&stream, 10) {
        a.apply_batch(batch).await;
    }
    let reference = TestDb::create().await;
    for batch in batches(&stream, 10) {
        sink(&reference).apply_batch(batch).await;
    }
    assert_eq!(
        snapshot(&db).await,
        snapshot(&reference).await,
        "an event was applied twice or not at all"
    );
    let client = db.client().await;
    assert_eq!(
        db.count(&client, "processed_events").await,
        stream.len() as i64
    );
}

#[tokio::test]
async fn end_to_end_commands_to_projections_through_sns_and_sqs() {
    let db = TestDb::create().await;
    let handler = db.payment_handler();
    let mut rng = fastrand::Rng::with_seed(2026);
    for p in 0..12 {
        let tenant = ["acme", "globex", "initech"][p % 3];
        let payment = format!("pay_e2e_{p}");
        let currency = ["EUR", "USD"][p % 2];
        let amount = rng.i64(1_000..50_000);
        assert_eq!(
            invoke(
                &handler,
                paid_request(tenant, &payment, paid_body(amount, currency))
            )
            .await
            .status,
            200
        );
        for r in 0..rng.usize(0..3) {
            let reply = invoke(
                &handler,
                refund_request(tenant, &payment, &format!("{payment}-r{r}"), amount / 4),
            )
            .await;
            assert_eq!(reply.status, 201);
        }
    }
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
        .drain(Instant::now() + Duration::from_secs(60))
        .await
        .unwrap();
    let client = db.client().await;
    let events = db.count(&client, "outbox").await as usize;
    assert_eq!(summary.published, events);

    let messages = receive(
        &config,
        &queue,
        events,
        Duration::from_secs(60),
        Duration::from_millis(500),
    )
    .await;
    let sink = sink(&db);
    let mut pending: Vec<(String, String)> = messages
        .into_iter()
        .map(|m| (uuid::Uuid::new_v4().to_string(), m.body))
        .collect();
    let mut rounds = 0;
    while !pending.is_empty() {
        rounds += 1;
        assert!(rounds < 50, "sink did not converge");
        let batch: Vec<(String, String)> = pending.drain(..pending.len().min(10)).collect();
        let (response, _) = sink.apply_batch(sqs_event(&batch)).await;
        let failed: HashSet<String> = failures(&response).into_iter().collect();
        pending.extend(batch.into_iter().filter(|(id, _)| failed.contains(id)));
    }

    // The projections agree with the write side.
    let mismatches = db
        .count(
            &client,
            "payments p FULL JOIN payment_projection v USING (tenant_id, payment_id)
             WHERE v.payment_id IS NULL OR p.payment_id IS NULL
                OR p.amount_minor <> v.paid_minor OR p.refunded_minor <> v.refunded_minor
                OR p.status <> v.status OR p.version <> v.last_version OR p.currency <> v.currency",
        )
        .await;
    assert_eq!(mismatches, 0);
    let revenue_mismatches = db
        .count(
            &client,
            "(SELECT tenant_id, currency, sum(paid_minor) AS paid, sum(refunded_minor) AS refunded
              FROM tenant_daily_revenue GROUP BY 1, 2) r
             FULL JOIN (SELECT tenant_id, currency, sum(amount_minor) AS paid, sum(refunded_minor) AS refunded
                        FROM payments GROUP BY 1, 2) w USING (tenant_id, currency)
             WHERE r.paid IS DISTINCT FROM w.paid OR r.refunded IS DISTINCT FROM w.refunded",
        )
        .await;
    assert_eq!(revenue_mismatches, 0);
    assert_eq!(db.count(&client, "processed_events").await as usize, events);
}

/// Tenant isolation on the read side: an event of another tenant naming the same payment id, or
/// crafted identifiers, never touch the first tenant's projections.
#[tokio::test]
async fn one_tenants_events_never_change_another_tenants_projections() {
    let db = TestDb::create().await;
    let sink = sink(&db);
    let acme = sample_json("projection-sink", "sns-raw.json");
    let acme_paid = acme["Records"][0]["body"].as_str().unwrap().to_owned();
    let event: SqsEvent = typed(acme.clone());
    assert!(failures(&sink.apply_batch(event).await.0).is_empty());
    let before = snapshot(&db).await;

    let mut envelope: serde_json::Value = serde_json::from_str(&acme_paid).unwrap();
    // Globex pays a payment with acme's id: its own row, acme's untouched.
    envelope["tenantid"] = "globex".into();
    envelope["id"] = uuid::Uuid::new_v4().to_string().into();
    let globex = envelope.to_string();
    // Crafted identifiers are refused, not interpreted.
    let mut crafted = envelope.clone();
    crafted["id"] = uuid::Uuid::new_v4().to_string().into();
    crafted["tenantid"] = "acme' OR '1'='1".into();
    let mut crafted_payment = envelope.clone();
    crafted_payment["id"] = uuid::Uuid::new_v4().to_string().into();
    crafted_payment["aggregateid"] = "pay_2001'; --".into();
    crafted_payment["data"]["paymentId"] = "pay_2001'; --".into();
    let batch = sqs_event(&[
        ("g".into(), globex),
        ("c1".into(), crafted.to_string()),
        ("c2".into(), crafted_payment.to_string()),
    ]);
    let (response, report) = sink.apply_batch(batch).await;
    assert_eq!(failures(&response), vec!["c1".to_owned(), "c2".to_owned()]);
    assert_eq!(report.applied, 1);
    let (payments, revenue) = snapshot(&db).await;
    for row in &before.0 {
        assert!(
            payments.contains(row),
            "acme's projection changed: {payments:?}"
        );
    }
    for row in &before.1 {
        assert!(revenue.contains(row), "acme's revenue changed: {revenue:?}");
    }
    assert!(
        payments.contains(&"globex|pay_2001|paid|EUR|12500|0|1".to_owned()),
        "{payments:?}"
    );
}
