//! An aggregate's versions within one transaction (migration V18): a transaction's second and
//! later appends to an aggregate take the next version from its own latest event, without reading
//! the aggregate's row again. What must still hold: savepoints rolled back take their versions
//! and their locks with them, the versions retention deleted are never given again, and the
//! transaction the append trusts is the one that appended. Against the real PostgreSQL.

use std::time::Duration;

use outbox_tests::bench::{as_v17, mark_published};
use outbox_tests::TestDb;
use pg_outbox::ports::OutboxStore;
use pg_outbox::postgres::admin;
use pg_outbox::postgres::outbox::PgOutboxStore;
use pg_outbox::postgres::Db;
use tokio_postgres::GenericClient;

/// Appends one event of `aggregate` (version left to the outbox) and returns its version.
async fn append(client: &impl GenericClient, aggregate: &str, payload: &str) -> Option<i64> {
    client
        .query_opt(
            "INSERT INTO outbox (event_id, tenant_id, aggregate_type, aggregate_id, event_type,
                                 schema_version, payload, metadata)
             VALUES (gen_random_uuid(), 'acme', 'customer', $1, 'customer.renamed', 1,
                     jsonb_build_object('note', $2::text),
                     '{\"correlation_id\":\"versions-test\",\"source\":\"customers\"}')
             RETURNING aggregate_version",
            &[&aggregate, &payload],
        )
        .await
        .expect("append")
        .map(|row| row.get(0))
}

/// The committed versions of `aggregate`, in order.
async fn versions(client: &impl GenericClient, aggregate: &str) -> Vec<i64> {
    client
        .query(
            "SELECT aggregate_version FROM outbox WHERE aggregate_id = $1 ORDER BY 1",
            &[&aggregate],
        )
        .await
        .expect("versions")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// Index scans of `outbox_aggregates` in this transaction so far.
async fn aggregate_row_reads(client: &impl GenericClient) -> i64 {
    client
        .query_one(
            "SELECT sum(pg_stat_get_xact_numscans(indexrelid))::bigint FROM pg_index
             WHERE indrelid = 'outbox_aggregates'::regclass",
            &[],
        )
        .await
        .expect("index scans")
        .get(0)
}

/// 20 events of one aggregate in one statement: how many times they looked the aggregate's row
/// up, on `db` with `setup` run first.
async fn reads_for_twenty(setup: &str) -> i64 {
    let db = TestDb::create().await;
    let mut client = db.client().await;
    client.batch_execute(setup).await.expect("setup");
    let tx = client.transaction().await.expect("begin");
    tx.execute(
        "INSERT INTO outbox (event_id, tenant_id, aggregate_type, aggregate_id, event_type,
                             schema_version, payload, metadata)
         SELECT gen_random_uuid(), 'acme', 'customer', 'c1', 'customer.renamed', 1, '{}', '{}'
         FROM generate_series(1, 20)",
        &[],
    )
    .await
    .expect("bulk append");
    let reads = aggregate_row_reads(&tx).await;
    assert_eq!(versions(&tx, "c1").await, (1..=20).collect::<Vec<i64>>());
    tx.commit().await.expect("commit");
    drop(client);
    db.drop_database().await;
    reads
}

#[tokio::test]
async fn a_transactions_later_appends_to_an_aggregate_read_its_row_once_each() {
    // The first append writes the row (one look-up), each later one finds it written by this
    // transaction (one look-up) and takes the version from the event it appended last.
    let now = reads_for_twenty("").await;
    assert_eq!(now, 20, "one look-up of the aggregate's row per event");
    // As V17 left it: each later append read the row a second time for its last_version.
    let before = reads_for_twenty(&as_v17()).await;
    assert_eq!(before, 39, "V17's append, measured the same way");
}

#[tokio::test]
async fn savepoints_rolled_back_take_their_versions_and_locks_with_them() {
    let db = TestDb::create().await;
    let mut client = db.client().await;
    let other = db.client().await;

    // Later appends after a savepoint rolled back: the version after the transaction's own
    // event that is still there.
    let tx = client.transaction().await.expect("begin");
    assert_eq!(append(&tx, "a", "1").await, Some(1));
    tx.batch_execute("SAVEPOINT s").await.expect("savepoint");
    assert_eq!(append(&tx, "a", "2, rolled back").await, Some(2));
    assert_eq!(append(&tx, "a", "3, rolled back").await, Some(3));
    tx.batch_execute("ROLLBACK TO SAVEPOINT s")
        .await
        .expect("rollback to");
    assert_eq!(append(&tx, "a", "2").await, Some(2));
    // A savepoint released keeps its appends, and the next one follows them.
    tx.batch_execute("SAVEPOINT t").await.expect("savepoint");
    assert_eq!(append(&tx, "a", "3").await, Some(3));
    tx.batch_execute("RELEASE SAVEPOINT t")
        .await
        .expect("release");
    assert_eq!(append(&tx, "a", "4").await, Some(4));

    // An aggregate first appended to inside a savepoint that rolls back: its lock goes too, so
    // another producer appends to it at once, and this transaction's next append comes after
    // that one's (a first append again: it takes the lock).
    tx.batch_execute("SAVEPOINT u").await.expect("savepoint");
    assert_eq!(append(&tx, "b", "rolled back").await, Some(1));
    tx.batch_execute("ROLLBACK TO SAVEPOINT u")
        .await
        .expect("rollback to");
    let elsewhere = tokio::time::timeout(Duration::from_secs(5), append(&other, "b", "other"))
        .await
        .expect("another producer's append does not wait for a lock rolled back");
    assert_eq!(elsewhere, Some(1));
    assert_eq!(append(&tx, "b", "after the other").await, Some(2));
    tx.commit().await.expect("commit");

    assert_eq!(versions(&other, "a").await, vec![1, 2, 3, 4]);
    assert_eq!(versions(&other, "b").await, vec![1, 2]);
    let notes: Vec<String> = other
        .query(
            "SELECT payload ->> 'note' FROM outbox WHERE aggregate_id = 'a' ORDER BY aggregate_version",
            &[],
        )
        .await
        .expect("notes")
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(notes, vec!["1", "2", "3", "4"]);
}

#[tokio::test]
async fn versions_retention_deleted_are_not_given_again_after_a_skipped_first_append() {
    // The aggregate's row is the only memory of versions retention deleted. A transaction whose
    // first append to the aggregate a trigger of the service's own skipped holds the row, but
    // its event is not there: the next append must read the row, not trust the events.
    let db = TestDb::create().await;
    let mut client = db.client().await;
    client
        .batch_execute(
            "CREATE FUNCTION skip_drafts() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 IF NEW.payload ->> 'note' = 'draft' THEN RETURN NULL; END IF;
                 RETURN NEW;
             END $$;
             -- Fires after the outbox's own BEFORE INSERT triggers (they go in name order).
             CREATE TRIGGER zz_skip_drafts BEFORE INSERT ON outbox
                 FOR EACH ROW EXECUTE FUNCTION skip_drafts();",
        )
        .await
        .expect("the service's trigger");
    assert_eq!(append(&client, "r", "1").await, Some(1));
    assert_eq!(append(&client, "r", "2").await, Some(2));
    let store = PgOutboxStore::new(Db::new(db.settings.clone()));
    let claimed = store
        .claim_batch(10, Duration::from_secs(60), "versions-test")
        .await
        .expect("claim");
    mark_published(&store, "versions-test", &claimed).await;
    let claimed = store
        .claim_batch(10, Duration::from_secs(60), "versions-test")
        .await
        .expect("claim");
    mark_published(&store, "versions-test", &claimed).await;
    let deleted = admin::delete_published(&client, Duration::ZERO, 100)
        .await
        .expect("retention");
    assert_eq!(deleted, 2, "retention deleted both events");
    assert!(versions(&client, "r").await.is_empty());

    let tx = client.transaction().await.expect("begin");
    assert_eq!(
        append(&tx, "r", "draft").await,
        None,
        "the draft is skipped"
    );
    assert_eq!(
        append(&tx, "r", "3").await,
        Some(3),
        "the version after the deleted ones, not 1 again"
    );
    assert_eq!(append(&tx, "r", "4").await, Some(4));
    tx.commit().await.expect("commit");
    assert_eq!(versions(&client, "r").await, vec![3, 4]);
}

#[tokio::test]
async fn the_appending_transaction_is_recorded_whatever_the_insert_gave() {
    let db = TestDb::create().await;
    let mut client = db.client().await;
    let tx = client.transaction().await.expect("begin");
    let row = tx
        .query_one(
            "INSERT INTO outbox (event_id, tenant_id, aggregate_type, aggregate_id, event_type,
                                 schema_version, payload, metadata, txid)
             VALUES (gen_random_uuid(), 'acme', 'customer', 't', 'customer.renamed', 1, '{}',
                     '{}', '12345'::xid8)
             RETURNING txid = pg_current_xact_id(), txid::text",
            &[],
        )
        .await
        .expect("append with a txid given");
    let (ours, given): (bool, String) = (row.get(0), row.get(1));
    assert!(ours, "txid {given} is not the appending transaction's");
    tx.rollback().await.expect("rollback");
}
