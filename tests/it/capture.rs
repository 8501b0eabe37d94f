//! (Past 400 lines: one test per capture rule on real tables, sharing this file's fixtures.)
//!
//! Trigger capture (`outboxctl capture enable|disable`, migration V5) on real tables, and rows
//! appended by SQL producers that do not know the envelope: what the outbox fills in, what it
//! refuses at insert time.

use std::time::Duration;

use serde_json::{json, Value};
use tokio_postgres::Client;

use outbox_tests::aws::{create_topic, moto_endpoint, sdk_config_for};
use outbox_tests::{dispatcher, outboxctl, stderr, stdout, test_dispatcher_config, TestDb};
use pg_outbox::dispatcher::Target;

const TABLE: &str = "
    CREATE SCHEMA crm;
    CREATE TABLE crm.accounts (
        org     text NOT NULL,
        id      int  NOT NULL,
        name    text NOT NULL,
        PRIMARY KEY (org, id));";

/// (event type, aggregate id, version, tenant, payload) of every outbox row, in version order.
async fn captured(client: &Client) -> Vec<(String, String, i64, String, Value)> {
    client
        .query(
            "SELECT event_type, aggregate_id, aggregate_version, tenant_id, payload FROM outbox
             ORDER BY aggregate_id, aggregate_version",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect()
}

#[tokio::test]
async fn captured_inserts_updates_and_deletes_become_ordered_events_and_rollbacks_none() {
    let db = TestDb::create().await;
    let mut client = db.client().await;
    client.batch_execute(TABLE).await.unwrap();
    let out = outboxctl(
        &db,
        &[
            "capture",
            "enable",
            "--table",
            "crm.accounts",
            "--aggregate-type",
            "account",
            "--tenant-column",
            "org",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out).trim(),
        "capturing crm.accounts as account (tenant column org, key org, id)"
    );

    client
        .batch_execute(
            "INSERT INTO crm.accounts VALUES ('acme', 1, 'Ada');
             UPDATE crm.accounts SET name = 'Ada L.' WHERE id = 1;
             INSERT INTO crm.accounts VALUES ('globex', 2, 'Bob');
             DELETE FROM crm.accounts WHERE id = 1;",
        )
        .await
        .unwrap();
    // A rolled-back write leaves no event.
    let tx = client.transaction().await.unwrap();
    tx.execute("INSERT INTO crm.accounts VALUES ('acme', 3, 'Ghost')", &[])
        .await
        .unwrap();
    tx.rollback().await.unwrap();

    let rows = captured(&client).await;
    let ada = |v: Value| v;
    assert_eq!(
        rows,
        vec![
            (
                "accounts.created".into(),
                "acme/1".into(),
                1,
                "acme".into(),
                json!({"before": null, "after": ada(json!({"org": "acme", "id": 1, "name": "Ada"}))})
            ),
            (
                "accounts.updated".into(),
                "acme/1".into(),
                2,
                "acme".into(),
                json!({"before": {"org": "acme", "id": 1, "name": "Ada"},
                       "after": {"org": "acme", "id": 1, "name": "Ada L."}})
            ),
            (
                "accounts.deleted".into(),
                "acme/1".into(),
                3,
                "acme".into(),
                json!({"before": {"org": "acme", "id": 1, "name": "Ada L."}, "after": null})
            ),
            (
                "accounts.created".into(),
                "globex/2".into(),
                1,
                "globex".into(),
                json!({"before": null, "after": {"org": "globex", "id": 2, "name": "Bob"}})
            ),
        ]
    );

    // They are publishable as they are: every one reaches the bus, none is dead-lettered.
    assert_eq!(publish_to_a_new_topic(&db, 10).await, 4);
    let source: String = client
        .query_one("SELECT metadata->>'source' FROM outbox LIMIT 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(source, "capture:crm.accounts");
    // Their ids are time-ordered (UUID version 7), in the order they were written.
    let ids: Vec<uuid::Uuid> = client
        .query("SELECT event_id FROM outbox ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(ids.iter().all(|id| id.get_version_num() == 7), "{ids:?}");
    let millis = |id: &uuid::Uuid| id.as_u128() >> 80;
    assert!(
        ids.windows(2).all(|w| millis(&w[0]) <= millis(&w[1])),
        "{ids:?}"
    );

    // Disabled: writes go on, no more events.
    let out = outboxctl(&db, &["capture", "disable", "--table", "crm.accounts"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "stopped capturing crm.accounts");
    client
        .execute("INSERT INTO crm.accounts VALUES ('acme', 4, 'Cy')", &[])
        .await
        .unwrap();
    assert_eq!(db.count(&client, "outbox").await, 4);
    let again = outboxctl(&db, &["capture", "disable", "--table", "crm.accounts"]);
    assert_eq!(stdout(&again).trim(), "crm.accounts was not captured");
}

#[tokio::test]
async fn two_writers_of_one_row_get_versions_in_commit_order() {
    let db = TestDb::create().await;
    let setup = db.client().await;
    setup.batch_execute(TABLE).await.unwrap();
    setup
        .query_one(
            "SELECT outbox_capture_enable('crm.accounts', 'account', 'org')",
            &[],
        )
        .await
        .unwrap();
    setup
        .execute("INSERT INTO crm.accounts VALUES ('acme', 1, 'v0')", &[])
        .await
        .unwrap();

    let mut first = db.client().await;
    let mut second = db.client().await;
    let tx1 = first.transaction().await.unwrap();
    tx1.execute("UPDATE crm.accounts SET name = 'first' WHERE id = 1", &[])
        .await
        .unwrap();
    // The second writer blocks on the row until the first commits, then writes after it.
    let waiter = tokio::spawn(async move {
        let tx2 = second.transaction().await.unwrap();
        tx2.execute(
            "UPDATE crm.accounts SET name = name || ' then second' WHERE id = 1",
            &[],
        )
        .await
        .unwrap();
        tx2.commit().await.unwrap();
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiter.is_finished(), "the second writer waits for the row");
    tx1.commit().await.unwrap();
    waiter.await.unwrap();

    let rows = captured(&setup).await;
    let names: Vec<(i64, Value)> = rows
        .iter()
        .map(|r| (r.2, r.4["after"]["name"].clone()))
        .collect();
    assert_eq!(
        names,
        vec![
            (1, json!("v0")),
            (2, json!("first")),
            (3, json!("first then second"))
        ]
    );
}

#[tokio::test]
async fn capture_refuses_what_it_cannot_name_with_a_clear_error() {
    let db = TestDb::create().await;
    let client = db.client().await;
    client
        .batch_execute(
            "CREATE TABLE notes (id int PRIMARY KEY, body text);
             CREATE TABLE logs (tenant text, line text);
             CREATE TABLE items (id int PRIMARY KEY, tenant text);",
        )
        .await
        .unwrap();
    // Inputs tried: a table without the tenant column, a table without a primary key, a table
    // that does not exist, an empty aggregate type; then a row with no tenant at write time.
    let cases: [(&[&str], &str); 4] = [
        (
            &[
                "--table",
                "notes",
                "--aggregate-type",
                "note",
                "--tenant-column",
                "tenant",
            ],
            "capture of notes: the table has no column tenant",
        ),
        (
            &[
                "--table",
                "logs",
                "--aggregate-type",
                "log",
                "--tenant-column",
                "tenant",
            ],
            "capture of logs: the table has no primary key",
        ),
        (
            &[
                "--table",
                "nowhere",
                "--aggregate-type",
                "x",
                "--tenant-column",
                "tenant",
            ],
            "relation \"nowhere\" does not exist",
        ),
        (
            &[
                "--table",
                "items",
                "--aggregate-type",
                "",
                "--tenant-column",
                "tenant",
            ],
            "the aggregate type must not be empty",
        ),
    ];
    for (args, message) in cases {
        let mut all = vec!["capture", "enable"];
        all.extend_from_slice(args);
        let out = outboxctl(&db, &all);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(stderr(&out).contains(message), "{args:?}: {}", stderr(&out));
    }
    assert_eq!(
        db.count(&client, "pg_trigger WHERE tgname = 'outbox_capture'")
            .await,
        0
    );

    let out = outboxctl(
        &db,
        &[
            "capture",
            "enable",
            "--table",
            "items",
            "--aggregate-type",
            "item",
            "--tenant-column",
            "tenant",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let refused = client
        .execute("INSERT INTO items VALUES (1, NULL)", &[])
        .await
        .unwrap_err();
    assert!(
        refused.as_db_error().is_some_and(|e| e
            .message()
            .contains("the row has no tenant in column tenant")),
        "{refused:?}"
    );
    assert_eq!(
        db.count(&client, "items").await,
        0,
        "the write is refused whole"
    );
    assert_eq!(db.count(&client, "outbox").await, 0);
}

#[tokio::test]
async fn rows_from_sql_producers_get_envelope_defaults_or_are_refused_at_insert() {
    let db = TestDb::create().await;
    let client = db.client().await;
    // The table's own defaults: no event id, no version, no metadata.
    client
        .execute(
            "INSERT INTO outbox (tenant_id, aggregate_type, aggregate_id, event_type, schema_version, payload)
             VALUES ('acme', 'invoice', 'inv_1', 'invoice.issued', 1, '{\"total\": 5}')",
            &[],
        )
        .await
        .unwrap();
    // A session naming its service.
    client
        .batch_execute(
            "BEGIN; SET LOCAL outbox.source = 'billing';
             INSERT INTO outbox (tenant_id, aggregate_type, aggregate_id, event_type, schema_version, payload, metadata)
             VALUES ('acme', 'invoice', 'inv_1', 'invoice.paid', 1, '{}', '{\"correlation_id\": \"req-9\"}');
             COMMIT;",
        )
        .await
        .unwrap();
    let rows: Vec<(i64, Value, String)> = client
        .query(
            "SELECT aggregate_version, metadata, event_id::text FROM outbox ORDER BY aggregate_version",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(rows[0].0, 1);
    assert_eq!(
        rows[0].1,
        json!({"correlation_id": rows[0].2, "source": "database"})
    );
    assert_eq!(rows[1].0, 2);
    assert_eq!(
        rows[1].1,
        json!({"correlation_id": "req-9", "source": "billing"})
    );

    // Metadata that cannot make an envelope is refused now, not dead-lettered later. Inputs
    // tried: a number as source, a null correlation id, an array, a number as traceparent.
    for bad in [
        r#"{"source": 5}"#,
        r#"{"correlation_id": null}"#,
        r#"[1, 2]"#,
        r#"{"traceparent": 7}"#,
    ] {
        let err = client
            .execute(
                "INSERT INTO outbox (tenant_id, aggregate_type, aggregate_id, event_type, schema_version, payload, metadata)
                 VALUES ('acme', 'invoice', 'inv_2', 'invoice.issued', 1, '{}', $1::text::jsonb)",
                &[&bad],
            )
            .await
            .unwrap_err();
        let constraint = err.as_db_error().and_then(|e| e.constraint());
        assert_eq!(
            constraint,
            Some("outbox_metadata_makes_an_envelope"),
            "{bad}: {err:?}"
        );
    }
    assert_eq!(db.count(&client, "outbox").await, 2);

    // Both go out; nothing dead.
    assert_eq!(publish_to_a_new_topic(&db, 5).await, 2);
}

/// Dispatches the outbox to a new SNS topic in moto, one claim at a time, until a claim comes
/// back empty (at most `max_claims`), asserting that no row was dead-lettered; returns how many
/// were published.
async fn publish_to_a_new_topic(db: &TestDb, max_claims: usize) -> usize {
    let topic_arn = create_topic(&sdk_config_for(&moto_endpoint()).await, false).await;
    let d = dispatcher(
        db,
        &moto_endpoint(),
        Target::Sns { topic_arn },
        test_dispatcher_config(),
    )
    .await;
    let mut published = 0;
    for _ in 0..max_claims {
        let s = d.dispatch_batch().await.unwrap();
        assert_eq!(s.dead, 0, "captured rows make envelopes: {s:?}");
        published += s.published;
        if s.claimed == 0 {
            break;
        }
    }
    published
}
