//! The inbox as a bounded, reusable piece: retention by the sink and by `outboxctl cleanup
//! --inbox`, and what a redelivery older than the retention does (nothing: the aggregate's
//! position still knows it was applied).

use std::time::Duration;

use outbox_tests::sink_fixtures::{payment_projections, payment_stream, snapshot, sqs_event};
use outbox_tests::{outboxctl, stderr, stdout, TestDb};
use pg_outbox::consumer::InboxRetention;
use pg_outbox::postgres::projections::PgProjectionStore;
use pg_outbox::postgres::Db;
use projection_sink::ProjectionSink;

fn retained_sink(db: &TestDb) -> ProjectionSink<PgProjectionStore> {
    ProjectionSink::new(
        PgProjectionStore::new(Db::new(db.settings.clone()), payment_projections()),
        projection_sink::DEFAULT_CONSUMER,
    )
    .with_retention(InboxRetention {
        every: Duration::ZERO,
        ..InboxRetention::default()
    })
}

#[tokio::test]
async fn expired_inbox_entries_are_deleted_and_their_redelivery_changes_nothing() {
    let db = TestDb::create().await;
    let client = db.client().await;
    let sink = retained_sink(&db);
    let stream = payment_stream(41, 30);
    for chunk in stream.chunks(10) {
        let batch: Vec<(String, String)> = chunk
            .iter()
            .map(|e| (e.event_id.to_string(), e.body.clone()))
            .collect();
        let (response, report) = sink.apply_batch(sqs_event(&batch)).await;
        assert!(response.batch_item_failures.is_empty(), "{report:?}");
    }
    let before = snapshot(&db).await;
    let total = db.count(&client, "processed_events").await;
    assert_eq!(total as usize, stream.len());

    // The first half was applied 15 days ago: past the default 14-day retention.
    let old: Vec<uuid::Uuid> = stream[..stream.len() / 2]
        .iter()
        .map(|e| e.event_id)
        .collect();
    client
        .execute(
            "UPDATE processed_events SET processed_at = now() - interval '15 days'
             WHERE event_id = ANY($1)",
            &[&old],
        )
        .await
        .unwrap();

    // The next batch (everything again: all duplicates or stale) deletes the expired entries.
    let all: Vec<(String, String)> = stream
        .iter()
        .map(|e| (e.event_id.to_string(), e.body.clone()))
        .collect();
    let (response, report) = sink.apply_batch(sqs_event(&all[..10])).await;
    assert!(response.batch_item_failures.is_empty());
    assert_eq!(report.inbox_cleaned as usize, old.len());
    assert_eq!(
        db.count(&client, "processed_events").await as usize,
        stream.len() - old.len() + report.stale,
        "expired entries gone; stale redeliveries write a fresh entry"
    );

    // Every event delivered again: expired ones are stale by their aggregate's position, the rest
    // duplicates; the projections do not move.
    let mut applied = 0;
    for chunk in all.chunks(10) {
        let (response, report) = sink.apply_batch(sqs_event(chunk)).await;
        assert!(response.batch_item_failures.is_empty(), "{report:?}");
        applied += report.applied;
    }
    assert_eq!(applied, 0);
    assert_eq!(snapshot(&db).await, before);
}

#[tokio::test]
async fn outboxctl_cleanup_inbox_deletes_only_expired_entries() {
    let db = TestDb::create().await;
    let client = db.client().await;
    let sink = retained_sink(&db).with_retention(InboxRetention {
        keep: None,
        ..InboxRetention::default()
    });
    let stream = payment_stream(42, 20);
    for chunk in stream.chunks(10) {
        let batch: Vec<(String, String)> = chunk
            .iter()
            .map(|e| (e.event_id.to_string(), e.body.clone()))
            .collect();
        let (_, report) = sink.apply_batch(sqs_event(&batch)).await;
        assert_eq!(report.inbox_cleaned, 0, "retention off keeps everything");
    }
    let total = db.count(&client, "processed_events").await;
    client
        .execute(
            "UPDATE processed_events SET processed_at = now() - interval '20 days'
             WHERE event_id IN (SELECT event_id FROM processed_events ORDER BY event_id LIMIT 7)",
            &[],
        )
        .await
        .unwrap();

    // Not on a terminal and no --yes: refused, nothing deleted.
    let out = outboxctl(&db, &["cleanup", "--inbox"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("delete 7 inbox entries applied more than 14d 0h ago"),
        "{}",
        stderr(&out)
    );
    assert_eq!(db.count(&client, "processed_events").await, total);

    let out = outboxctl(
        &db,
        &["cleanup", "--inbox", "--batch-size", "3", "--yes", "--json"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(report["expired"], 7);
    assert_eq!(report["deleted"], 7);
    assert_eq!(report["statements"], 3, "batches of 3: 3 + 3 + 1");
    assert_eq!(db.count(&client, "processed_events").await, total - 7);
    // The outbox was not touched by an inbox cleanup, and bad input is refused.
    let out = outboxctl(
        &db,
        &["cleanup", "--inbox", "--older-than", "soon", "--yes"],
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--older-than"), "{}", stderr(&out));
}

#[tokio::test]
async fn an_aggregate_seen_first_in_the_middle_waits_for_its_start() {
    let db = TestDb::create().await;
    let sink = retained_sink(&db);
    // A payment's refund (version 2) before its payment.paid: a gap, nothing written.
    let stream = payment_stream(43, 12);
    let refund = stream
        .iter()
        .position(|e| e.body.contains("payment.refunded"))
        .expect("the stream has a refund");
    let paid = refund - 1;
    let one = |i: usize| vec![(stream[i].event_id.to_string(), stream[i].body.clone())];
    let (response, _) = sink.apply_batch(sqs_event(&one(refund))).await;
    assert_eq!(response.batch_item_failures.len(), 1);
    let client = db.client().await;
    assert_eq!(db.count(&client, "processed_events").await, 0);
    assert_eq!(db.count(&client, "inbox_positions").await, 0);
    let (response, report) = sink.apply_batch(sqs_event(&one(paid))).await;
    assert!(response.batch_item_failures.is_empty());
    assert_eq!(report.applied, 1);
    let (response, report) = sink.apply_batch(sqs_event(&one(refund))).await;
    assert!(response.batch_item_failures.is_empty());
    assert_eq!(report.applied, 1);
    let version: i64 = client
        .query_one("SELECT last_version FROM inbox_positions", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(version, 2);
}
