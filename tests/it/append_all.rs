//! The batch append (`pg_outbox::producer::append_all`): many events in one statement, each as
//! `append` appends it. Versions in the slice's order per aggregate, all or none, no deadlock
//! between batches over the same aggregates, and the events published in order. Its place among
//! every other operation is the order model's (`Append::Batch`, tests/it/order_model.rs).

use std::time::{Duration, Instant};

use outbox_tests::{test_dispatcher_config, TestDb};
use pg_outbox::dispatcher::OutboxDispatcher;
use pg_outbox::memory::MemoryPublisher;
use pg_outbox::outbox::EventMetadata;
use pg_outbox::postgres::outbox::PgOutboxStore;
use pg_outbox::postgres::Db;
use pg_outbox::producer::{append, append_all, AppendError, OutboxEvent};

#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct LineAdded {
    #[serde(skip)]
    tenant: String,
    #[serde(skip)]
    order: String,
    line: u32,
    #[serde(skip)]
    key: Option<String>,
    #[serde(skip)]
    at: Option<chrono::DateTime<chrono::Utc>>,
}

impl OutboxEvent for LineAdded {
    const EVENT_TYPE: &'static str = "order.line_added";
    const SCHEMA_VERSION: i32 = 1;
    const AGGREGATE_TYPE: &'static str = "order";
    fn tenant_id(&self) -> &str {
        &self.tenant
    }
    fn aggregate_id(&self) -> &str {
        &self.order
    }
    fn idempotency_key(&self) -> Option<&str> {
        self.key.as_deref()
    }
    fn deliver_at(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        self.at
    }
}

fn line(order: &str, line: u32) -> LineAdded {
    LineAdded {
        tenant: "acme".to_owned(),
        order: order.to_owned(),
        line,
        key: None,
        at: None,
    }
}

fn metadata() -> EventMetadata {
    EventMetadata::new("orders", "req-1")
}

#[tokio::test]
async fn a_batch_gives_each_aggregate_its_next_versions_in_the_slice_order_and_goes_out_in_order() {
    let db = TestDb::create().await;
    let mut client = db.client().await;
    let tx = client.transaction().await.unwrap();
    append(&tx, &line("o-1", 0), &metadata()).await.unwrap();
    tx.commit().await.unwrap();

    // Interleaved aggregates, one with a version already, one delivered later.
    let mut later = line("o-3", 1);
    later.at = Some(chrono::Utc::now() + chrono::Duration::milliseconds(300));
    let batch = [
        line("o-1", 1),
        line("o-2", 1),
        line("o-1", 2),
        later,
        line("o-2", 2),
        line("o-1", 3),
    ];
    let tx = client.transaction().await.unwrap();
    let appended = append_all(&tx, &batch, &metadata()).await.unwrap();
    tx.commit().await.unwrap();
    let versions: Vec<i64> = appended.iter().map(|a| a.aggregate_version).collect();
    assert_eq!(versions, [2, 1, 3, 1, 2, 4]);

    // Each answer is its own event's row: same id, aggregate, version, payload.
    for (event, a) in batch.iter().zip(&appended) {
        let row = client
            .query_one(
                "SELECT aggregate_id, aggregate_version, payload->>'line', metadata->>'source',
                        deliver_at IS NOT NULL
                 FROM outbox WHERE event_id = $1",
                &[&a.event_id],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), event.order);
        assert_eq!(row.get::<_, i64>(1), a.aggregate_version);
        assert_eq!(row.get::<_, String>(2), event.line.to_string());
        assert_eq!(row.get::<_, String>(3), "orders");
        assert_eq!(row.get::<_, bool>(4), event.at.is_some());
        assert_eq!(a.event_id.get_version_num(), 7);
    }

    // Published one at a time per aggregate, in version order.
    let bus = MemoryPublisher::new();
    let dispatcher = OutboxDispatcher::new(
        PgOutboxStore::new(Db::new(db.settings.clone())),
        bus.clone(),
        test_dispatcher_config(),
        "batch".to_owned(),
    );
    let started = Instant::now();
    while bus.delivered().len() < 7 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "not all published"
        );
        dispatcher
            .drain(Instant::now() + Duration::from_secs(5))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let delivered = bus.delivered();
    for order in ["o-1", "o-2", "o-3"] {
        let seen: Vec<i64> = delivered
            .iter()
            .filter(|e| e.aggregate_id == order)
            .map(|e| e.aggregate_version)
            .collect();
        let expected: Vec<i64> = (1..=seen.len() as i64).collect();
        assert_eq!(seen, expected, "{order}");
    }
    assert_eq!(delivered.len(), 7);
}

#[tokio::test]
async fn a_batch_is_all_or_none_and_refuses_bad_input_before_the_database() {
    // Inputs tried: a key already in the outbox in the middle of a batch, one key twice in a
    // batch (and once more for another tenant, accepted), an empty aggregate id third in a
    // batch, an empty batch, an event a trigger of the service's own skips.
    let db = TestDb::create().await;
    let mut client = db.client().await;
    let mut keyed = line("o-1", 0);
    keyed.key = Some("k-1".to_owned());
    let tx = client.transaction().await.unwrap();
    append(&tx, &keyed, &metadata()).await.unwrap();
    tx.commit().await.unwrap();

    let mut again = line("o-2", 1);
    again.key = Some("k-1".to_owned());
    let tx = client.transaction().await.unwrap();
    let err = append_all(&tx, &[line("o-2", 0), again, line("o-3", 0)], &metadata())
        .await
        .unwrap_err();
    assert!(err.is_duplicate(), "{err:?}");
    tx.rollback().await.unwrap();

    // One key twice in the slice: refused before the database (not "already appended"), the
    // transaction still usable. The same key for another tenant is no repeat.
    let mut first = line("o-4", 0);
    first.key = Some("k-2".to_owned());
    let mut second = line("o-5", 0);
    second.key = Some("k-2".to_owned());
    let mut elsewhere = line("o-5", 0);
    elsewhere.tenant = "globex".to_owned();
    elsewhere.key = Some("k-2".to_owned());
    let tx = client.transaction().await.unwrap();
    let err = append_all(&tx, &[first.clone(), second], &metadata())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, AppendError::RepeatedKey { key, .. } if key == "k-2") && !err.is_duplicate(),
        "{err:?}"
    );
    let appended = append_all(&tx, &[first, elsewhere], &metadata())
        .await
        .unwrap();
    assert_eq!(appended.len(), 2);
    tx.rollback().await.unwrap();

    let tx = client.transaction().await.unwrap();
    let err = append_all(
        &tx,
        &[line("o-6", 0), line("o-7", 0), line(" ", 0)],
        &metadata(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            err,
            AppendError::Empty {
                field: "aggregate id",
                ..
            }
        ),
        "{err:?}"
    );
    // Refused before the database: the transaction is still usable, and empty batches append
    // nothing.
    assert!(append_all::<LineAdded>(&tx, &[], &metadata())
        .await
        .unwrap()
        .is_empty());
    tx.commit().await.unwrap();

    assert_eq!(db.count(&client, "outbox").await, 1, "only the first event");

    // A trigger of the service's own that skips an event: the error says which, the others are
    // in the transaction until it rolls back.
    client
        .batch_execute(
            "CREATE FUNCTION skip_thirteen() RETURNS trigger LANGUAGE plpgsql AS
                 $$ BEGIN RETURN NULL; END $$;
             CREATE TRIGGER zz_skip_thirteen BEFORE INSERT ON outbox FOR EACH ROW
                 WHEN (NEW.payload->>'line' = '13') EXECUTE FUNCTION skip_thirteen()",
        )
        .await
        .unwrap();
    let tx = client.transaction().await.unwrap();
    let err = append_all(
        &tx,
        &[line("o-8", 12), line("o-8", 13), line("o-8", 14)],
        &metadata(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, AppendError::Skipped { .. }), "{err:?}");
    let in_tx: i64 = tx
        .query_one(
            "SELECT count(*) FROM outbox WHERE aggregate_id = 'o-8'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(in_tx, 2);
    tx.rollback().await.unwrap();
    assert_eq!(db.count(&client, "outbox").await, 1);
}

#[tokio::test]
async fn a_large_batch_over_many_aggregates_and_two_tenants_keeps_each_aggregates_order() {
    // 1,000 events over 7 aggregate ids and two tenants sharing them, interleaved: enough rows
    // for PostgreSQL's sort to be one that does not keep ties in input order, so each
    // aggregate's order holds only if the batch sorts by its position too.
    let db = TestDb::create().await;
    let mut client = db.client().await;
    let batch: Vec<LineAdded> = (0..1_000u32)
        .map(|n| {
            let mut e = line(&format!("o-{}", (n * 5) % 7), n);
            if n % 3 == 0 {
                e.tenant = "globex".to_owned();
            }
            e
        })
        .collect();
    let tx = client.transaction().await.unwrap();
    let appended = append_all(&tx, &batch, &metadata()).await.unwrap();
    tx.commit().await.unwrap();
    let mut next: std::collections::HashMap<(String, String), i64> = Default::default();
    for (event, a) in batch.iter().zip(&appended) {
        let version = next
            .entry((event.tenant.clone(), event.order.clone()))
            .or_insert(0);
        *version += 1;
        assert_eq!(a.aggregate_version, *version, "line {}", event.line);
    }
    // And the rows say the same: each aggregate's lines rise with its versions.
    let out_of_order = db
        .count(
            &client,
            "outbox o JOIN outbox p ON p.tenant_id = o.tenant_id AND p.aggregate_id = o.aggregate_id
               AND p.aggregate_version = o.aggregate_version + 1
             WHERE (p.payload->>'line')::int < (o.payload->>'line')::int",
        )
        .await;
    assert_eq!(out_of_order, 0);
    assert_eq!(db.count(&client, "outbox").await, 1_000);
}

#[tokio::test]
async fn a_batch_locks_its_aggregates_in_one_order() {
    // A transaction holds o-a (it appended to it) and will append to o-b next. A batch of
    // [o-b, o-a] would take o-b, then wait for o-a: the transaction's append to o-b would wait
    // for the batch, a deadlock that fails one of them. The batch takes its aggregates in id
    // order, so it waits for o-a first, holding nothing the transaction needs.
    let db = TestDb::create().await;
    let mut holder = db.client().await;
    let tx = holder.transaction().await.unwrap();
    append(&tx, &line("o-a", 0), &metadata()).await.unwrap();

    let settings = db.settings.clone();
    let batch = tokio::spawn(async move {
        let mut client = settings.connect().await.unwrap();
        let tx = client.transaction().await.unwrap();
        let appended = append_all(&tx, &[line("o-b", 1), line("o-a", 1)], &metadata()).await;
        tx.commit().await.unwrap();
        appended
    });
    // The batch waits on the holder.
    let watcher = db.client().await;
    let started = Instant::now();
    loop {
        let waiting: i64 = watcher
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if waiting == 1 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the batch never waited"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    append(&tx, &line("o-b", 0), &metadata())
        .await
        .expect("the holder's append after the batch began");
    tx.commit().await.unwrap();
    let appended = batch.await.unwrap().expect("the batch after the holder");
    let versions: Vec<i64> = appended.iter().map(|a| a.aggregate_version).collect();
    assert_eq!(versions, [2, 2], "o-b then o-a, each after the holder's");
}
