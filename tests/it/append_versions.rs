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

/// Look-ups of the aggregate's row and of its latest event, in this transaction so far.
async fn reads(client: &impl GenericClient) -> (i64, i64) {
    let row = client
        .query_one(
            "SELECT (SELECT sum(pg_stat_get_xact_numscans(indexrelid))::bigint FROM pg_index
                     WHERE indrelid = 'outbox_aggregates'::regclass),
                    pg_stat_get_xact_numscans(
                        'outbox_tenant_id_aggregate_type_aggregate_id_aggregate_vers_key'::regclass)",
            &[],
        )
        .await
        .expect("index scans");
    (row.get(0), row.get(1))
}

/// 20 events of one aggregate in one statement, on a database where `setup` ran first: the
/// look-ups of the aggregate's row and of its latest event they made.
async fn reads_for_twenty(setup: &str) -> (i64, i64) {
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
    let counted = reads(&tx).await;
    assert_eq!(versions(&tx, "c1").await, (1..=20).collect::<Vec<i64>>());
    tx.commit().await.expect("commit");
    drop(client);
    db.drop_database().await;
    counted
}

#[tokio::test]
async fn a_transactions_later_appends_to_an_aggregate_do_not_read_its_row() {
    // The first append reads the latest event (none) and writes the aggregate's row; each later
    // one reads the latest event, finds it this transaction's, and takes the next version.
    let (rows, latest) = reads_for_twenty("").await;
    assert_eq!(rows, 1, "the aggregate's row, once for 20 events");
    assert_eq!(latest, 20, "the latest event, once per event");
    // As V17 left it: each later append took the row again (its upsert's conflict check) and
    // read its last_version, besides the latest event.
    let (rows, latest) = reads_for_twenty(&as_v17()).await;
    assert_eq!(
        (rows, latest),
        (39, 20),
        "V17's append, counted the same way"
    );
}

/// Until backend `pid` waits for a lock (5 s at most).
async fn wait_for_lock(client: &impl GenericClient, pid: i32) {
    let started = std::time::Instant::now();
    loop {
        let waiting: bool = client
            .query_one(
                "SELECT wait_event_type IS NOT DISTINCT FROM 'Lock' FROM pg_stat_activity
                 WHERE pid = $1",
                &[&pid],
            )
            .await
            .expect("pg_stat_activity")
            .get(0);
        if waiting {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "backend {pid} never waited for the aggregate's lock"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_snapshot_producers_later_append_behind_another_append_fails_to_serialize() {
    // A REPEATABLE READ producer that appended before in its transaction reads the latest event
    // before the aggregate's lock, through its snapshot. When another producer committed an
    // append to the aggregate after that snapshot, the upsert that takes the lock fails as a
    // serialization failure (40001, retried), never as a duplicate version (23505, read as
    // "already appended"), for an aggregate with events and for a new one. (A first append of
    // the transaction: `order::a_snapshot_producer_behind_another_append_gets_a_serialization_failure_and_its_retry_goes_on`.)
    let db = TestDb::create().await;
    let mut late = db.client().await;
    let other = db.client().await;
    assert_eq!(append(&other, "known", "v1").await, Some(1));
    for aggregate in ["known", "new"] {
        let tx = late
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .start()
            .await
            .expect("begin");
        // The snapshot, and the hint that this transaction appended.
        append(&tx, &format!("before-{aggregate}"), "first").await;
        append(&other, aggregate, "the other producer's").await;
        let err = tx
            .query_opt(
                "INSERT INTO outbox (event_id, tenant_id, aggregate_type, aggregate_id, event_type,
                                     schema_version, payload)
                 VALUES (gen_random_uuid(), 'acme', 'customer', $1, 'customer.renamed', 1, '{}')
                 RETURNING aggregate_version",
                &[&aggregate],
            )
            .await
            .expect_err("a version the snapshot cannot see is taken");
        assert_eq!(
            err.code(),
            Some(&tokio_postgres::error::SqlState::T_R_SERIALIZATION_FAILURE),
            "{aggregate}: {err:?}"
        );
        tx.rollback().await.expect("rollback");
    }
    assert_eq!(versions(&late, "known").await, vec![1, 2]);
    assert_eq!(versions(&late, "new").await, vec![1]);
}

#[tokio::test]
async fn an_append_that_waited_for_another_producer_follows_its_events() {
    // In a transaction that appended before, the latest event is read before the aggregate's
    // lock. Here another producer appends and commits while this one waits for the lock: what
    // was read before is stale, and the row's previous writer (the other producer, not visible
    // to that read) says so. (A transaction's first append takes the lock first:
    // `order::an_aggregates_next_version_waits_for_the_previous_ones_commit`.)
    let db = TestDb::create().await;
    let mut first = db.client().await;
    let second = db.client().await;
    assert_eq!(append(&first, "w", "v1").await, Some(1));
    let tx = first.transaction().await.expect("begin");
    assert_eq!(append(&tx, "w", "v2").await, Some(2));
    assert_eq!(append(&tx, "w", "v3").await, Some(3));
    second.batch_execute("BEGIN").await.expect("begin");
    assert_eq!(append(&second, "elsewhere", "first").await, Some(1));
    let pid: i32 = second
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0);
    let waiting = tokio::spawn(async move {
        let version = append(&second, "w", "after").await;
        second.batch_execute("COMMIT").await.expect("commit");
        (second, version)
    });
    // Commit only once the second producer waits for the lock, so that its read came first.
    wait_for_lock(&tx, pid).await;
    tx.commit().await.expect("commit");
    let (second, version) = waiting.await.expect("the second producer");
    assert_eq!(version, Some(4), "after the other producer's v2 and v3");
    let heads: Vec<(i64, bool)> = second
        .query(
            "SELECT aggregate_version, is_head FROM outbox WHERE aggregate_id = 'w' ORDER BY 1",
            &[],
        )
        .await
        .expect("heads")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(heads, vec![(1, true), (2, false), (3, false), (4, false)]);
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
async fn an_event_that_only_names_this_transaction_does_not_pass_for_its_own() {
    // txid is a plain column: an INSERT (or a data-only restore from another cluster) can give
    // any value, this transaction's id included. The latest event counts as this transaction's
    // only if its xmin is this transaction's too; otherwise the append takes the aggregate's
    // lock as a first append does. (This transaction appends elsewhere first: its first append
    // takes the lock whatever it reads.)
    let db = TestDb::create().await;
    let mut client = db.client().await;
    let other = db.client().await;
    let tx = client.transaction().await.expect("begin");
    let me: String = tx
        .query_one("SELECT pg_current_xact_id()::text", &[])
        .await
        .expect("this transaction's id")
        .get(0);
    other
        .execute(
            "INSERT INTO outbox (event_id, tenant_id, aggregate_type, aggregate_id, event_type,
                                 schema_version, payload, metadata, txid)
             VALUES (gen_random_uuid(), 'acme', 'customer', 'f', 'customer.renamed', 1, '{}',
                     '{}', $1::text::xid8)",
            &[&me],
        )
        .await
        .expect("an event naming the other transaction");
    assert_eq!(append(&tx, "g", "first").await, Some(1));
    assert_eq!(append(&tx, "f", "mine").await, Some(2));
    let writer: String = tx
        .query_one(
            "SELECT writer::text FROM outbox_aggregates WHERE aggregate_id = 'f'",
            &[],
        )
        .await
        .expect("the aggregate's row")
        .get(0);
    assert_eq!(writer, me, "the append took the aggregate's row");
    // So another producer waits for this transaction, as behind any append.
    let waiting = tokio::spawn(async move { append(&other, "f", "after").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "another producer did not wait");
    tx.commit().await.expect("commit");
    assert_eq!(waiting.await.expect("the other producer"), Some(3));
}
