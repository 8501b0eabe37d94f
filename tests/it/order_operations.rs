//! Scenario tests for the operations of issue "order and delivery hold under every operation":
//! capture independent of the writer's session, capture keys without collisions, discard, and
//! capture refusing the outbox's own tables, replays of one aggregate one at a time. (Replay, redrive, ON CONFLICT, explicit versions,
//! late outcomes and open producer transactions are covered by the order model.)

use outbox_tests::TestDb;
use pg_outbox::postgres::admin::{self, Selection};

async fn captured(client: &tokio_postgres::Client) -> Vec<(String, String, i64)> {
    client
        .query(
            "SELECT event_type, aggregate_id, aggregate_version FROM public.outbox ORDER BY id",
            &[],
        )
        .await
        .expect("read the outbox")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

#[tokio::test]
async fn capture_works_whatever_the_writers_search_path() {
    let db = TestDb::create().await;
    let client = db.client().await;
    client
        .batch_execute(
            "CREATE SCHEMA crm;
             CREATE TABLE crm.accounts (tenant text NOT NULL, id text PRIMARY KEY, name text);
             SELECT outbox_capture_enable('crm.accounts', 'account', 'tenant');
             -- A table of the same name as the outbox in the writer's schema.
             CREATE TABLE crm.outbox (id int);",
        )
        .await
        .expect("set up the captured table");
    client
        .batch_execute(
            "SET search_path = crm;
             INSERT INTO accounts VALUES ('acme', 'a1', 'Ada');
             SET search_path = crm, public;
             UPDATE accounts SET name = 'Ada L.' WHERE id = 'a1';
             RESET search_path;",
        )
        .await
        .expect("captured writes succeed whatever the search_path");
    assert_eq!(
        captured(&client).await,
        [
            ("accounts.created".to_owned(), "a1".to_owned(), 1),
            ("accounts.updated".to_owned(), "a1".to_owned(), 2)
        ]
    );
    let stray: i64 = client
        .query_one("SELECT count(*) FROM crm.outbox", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(stray, 0, "nothing went into the writer's own outbox table");
}

#[tokio::test]
async fn capture_keys_are_the_key_columns_without_collisions_and_a_key_change_moves_the_aggregate()
{
    let db = TestDb::create().await;
    let client = db.client().await;
    client
        .batch_execute(
            "CREATE TABLE lines (tenant text NOT NULL, a text, b text, note text,
                                 PRIMARY KEY (a, b) INCLUDE (note));
             SELECT outbox_capture_enable('lines', 'line', 'tenant');
             INSERT INTO lines VALUES ('acme', 'x/y', 'z', 'n1'), ('acme', 'x', 'y/z', 'n2');
             UPDATE lines SET note = 'n3' WHERE a = 'x/y';
             UPDATE lines SET b = 'w' WHERE a = 'x';
             UPDATE lines SET tenant = 'globex' WHERE a = 'x/y';",
        )
        .await
        .expect("captured writes");
    let events: Vec<(String, String, String, i64)> = client
        .query(
            "SELECT tenant_id, event_type, aggregate_id, aggregate_version FROM outbox ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    let e = |t: &str, ty: &str, id: &str, v: i64| (t.to_owned(), ty.to_owned(), id.to_owned(), v);
    assert_eq!(
        events,
        [
            // Two rows, two aggregates: '/' inside a value is escaped.
            e("acme", "lines.created", "x%2Fy/z", 1),
            e("acme", "lines.created", "x/y%2Fz", 1),
            // An INCLUDE column is not part of the key: the same aggregate, next version.
            e("acme", "lines.updated", "x%2Fy/z", 2),
            // A key change: a delete of the old aggregate, a create of the new one.
            e("acme", "lines.deleted", "x/y%2Fz", 2),
            e("acme", "lines.created", "x/w", 1),
            // A tenant change likewise: the old tenant's aggregate ends, the new tenant's begins.
            e("acme", "lines.deleted", "x%2Fy/z", 3),
            e("globex", "lines.created", "x%2Fy/z", 1),
        ]
    );
}

#[tokio::test]
async fn capturing_the_outbox_itself_is_refused() {
    let db = TestDb::create().await;
    let client = db.client().await;
    for table in ["outbox", "outbox_aggregates", "processed_events"] {
        let err = client
            .execute(
                "SELECT outbox_capture_enable($1::text::regclass, 'x', 'tenant_id')",
                &[&table],
            )
            .await
            .expect_err("refused");
        let message = err.as_db_error().map(|d| d.message().to_owned());
        assert!(
            message
                .as_deref()
                .is_some_and(|m| m.contains("own tables cannot be captured")),
            "{table}: {message:?}"
        );
    }
    // Appends still work.
    client
        .execute(
            "INSERT INTO outbox (event_id, tenant_id, aggregate_type, aggregate_id, event_type,
                                 schema_version, payload)
             VALUES (gen_random_uuid(), 'acme', 'x', 'x1', 'x.made', 1, '{}')",
            &[],
        )
        .await
        .expect("append after the refused capture");
}

#[tokio::test]
async fn a_discarded_dead_event_is_kept_never_published_and_unparks_its_aggregate() {
    let db = TestDb::create().await;
    let client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO outbox (event_id, tenant_id, aggregate_type, aggregate_id, event_type,
                                 schema_version, payload)
             SELECT gen_random_uuid(), 'acme', 'order', 'o1', 'order.changed', 1, '{}'
             FROM generate_series(1, 3);
             UPDATE outbox SET status = 'dead', last_error = 'too large' WHERE aggregate_version = 1;",
        )
        .await
        .unwrap();
    let selection = Selection {
        aggregate_id: Some("o1".into()),
        tenant_id: Some("acme".into()),
        ..Selection::default()
    };
    let report = admin::discard(&client, &selection, "payload over the bus limit")
        .await
        .expect("discard");
    assert_eq!(report.discarded, 1);
    assert_eq!(report.held, 0);
    assert_eq!(
        report
            .unparked
            .iter()
            .map(|e| e.aggregate_version)
            .collect::<Vec<_>>(),
        [2]
    );
    let rows: Vec<(i64, String, bool, Option<String>)> = client
        .query(
            "SELECT aggregate_version, status, is_head, discard_reason FROM outbox ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert_eq!(
        rows,
        [
            (
                1,
                "discarded".to_owned(),
                false,
                Some("payload over the bus limit".to_owned())
            ),
            (2, "pending".to_owned(), true, None),
            (3, "pending".to_owned(), false, None),
        ]
    );
    // Kept: retention never deletes it, and neither can a plain DELETE.
    let err = client
        .execute("DELETE FROM outbox WHERE aggregate_version = 2", &[])
        .await
        .expect_err("a pending event is never deleted");
    assert!(format!("{err:?}").contains("only published events are deleted"));
}

/// The versions `owner` claims now (the claim's own function, as the dispatcher calls it).
async fn claim(client: &impl tokio_postgres::GenericClient, owner: &str) -> Vec<i64> {
    client
        .query(
            "SELECT aggregate_version FROM outbox_claim(10, 30, $1, '') ORDER BY 1",
            &[&owner],
        )
        .await
        .expect("claim")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Aggregate order/o1 of tenant acme at versions 1 and 2, both published.
async fn published_aggregate(client: &tokio_postgres::Client) {
    client
        .batch_execute(
            "INSERT INTO outbox (event_id, tenant_id, aggregate_type, aggregate_id, event_type,
                                 schema_version, payload)
             SELECT gen_random_uuid(), 'acme', 'order', 'o1', 'order.changed', 1, '{}'
             FROM generate_series(1, 2);
             UPDATE outbox SET status = 'published', published_at = now(), is_head = false;",
        )
        .await
        .unwrap();
}

async fn replay(client: &tokio_postgres::Client, version: i64) {
    client
        .execute(
            "SELECT outbox_replay(ARRAY(SELECT id FROM outbox WHERE aggregate_version = $1))",
            &[&version],
        )
        .await
        .expect("replay");
}

#[tokio::test]
async fn a_replay_asked_for_while_a_later_one_is_in_flight_goes_after_it_never_beside_it() {
    // Fault: the operator replays v2, a dispatcher claims it, then the operator replays v1. Before
    // V11, a second dispatcher took v1 at once and both were published at the same time.
    let db = TestDb::create().await;
    let client = db.client().await;
    published_aggregate(&client).await;
    replay(&client, 2).await;
    assert_eq!(claim(&client, "d1").await, [2]);
    replay(&client, 1).await;
    assert_eq!(
        claim(&client, "d2").await,
        Vec::<i64>::new(),
        "v2 is in flight"
    );
    client
        .execute(
            "SELECT outbox_record('d1', ARRAY(SELECT id FROM outbox WHERE aggregate_version = 2),
                                  '{}', '{}', '{}', '{}', '{}')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(claim(&client, "d2").await, [1], "v1 once v2 is delivered");
}

#[tokio::test]
async fn a_replay_waits_for_a_claim_of_its_aggregate_still_committing() {
    // Fault: a claim leases v2's replay and has not committed when the operator's replay of v1
    // commits. A claim whose snapshot sees v1 marked but not v2's lease would take v1 beside it;
    // so the replay waits for that claim to commit before it does (the aggregate's advisory
    // lock, V11).
    let db = TestDb::create().await;
    let mut claimer = db.client().await;
    let operator = db.client().await;
    let other = db.client().await;
    published_aggregate(&operator).await;
    replay(&operator, 2).await;
    let open = claimer.transaction().await.unwrap();
    assert_eq!(claim(&open, "d1").await, [2]);
    let waiting = tokio::spawn(async move {
        replay(&operator, 1).await;
        operator
    });
    // The replay waits on the open claim's lock (and v1 is not marked meanwhile).
    let mut waited = false;
    for _ in 0..50 {
        let n = db
            .count(
                &other,
                "pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'
                   AND query LIKE '%outbox_replay%'",
            )
            .await;
        if n == 1 {
            waited = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(waited, "the replay of v1 did not wait for the claim of v2");
    assert_eq!(claim(&other, "d2").await, Vec::<i64>::new());
    open.commit().await.unwrap();
    let operator = waiting.await.unwrap();
    assert_eq!(db.count(&operator, "outbox WHERE replay").await, 2);
    assert_eq!(
        claim(&other, "d2").await,
        Vec::<i64>::new(),
        "v2 is in flight"
    );
}

#[tokio::test]
async fn a_replay_in_flight_is_not_marked_again_so_its_aggregate_stays_held() {
    // Fault: v2's replay is in flight when the operator replays the aggregate again (v1 and v2).
    // Marking v2 again would clear its lease, and the next claim would take v1 beside it.
    let db = TestDb::create().await;
    let client = db.client().await;
    published_aggregate(&client).await;
    replay(&client, 2).await;
    assert_eq!(claim(&client, "d1").await, [2]);
    let (changed, held): (Vec<i64>, Vec<i64>) = client
        .query_one(
            "SELECT changed, held FROM outbox_replay(ARRAY(SELECT id FROM outbox ORDER BY id))",
            &[],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!((changed.len(), held.len()), (1, 1), "v1 marked, v2 held");
    assert_eq!(
        claim(&client, "d2").await,
        Vec::<i64>::new(),
        "v2 is still in flight"
    );
}
