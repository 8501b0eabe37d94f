//! Delayed events (migration V10): appended with a `deliver_at`, never claimed before it, the
//! aggregate's later events held back behind them in order, the delay visible in the backlog and
//! in `outboxctl status`. The clock is the database's: "before" is a drain whose check after it
//! finds the database's `now() < deliver_at`, so a slow machine cannot fail it; the delay (8 s)
//! leaves room for the set-up before the first drain.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;

use outbox_tests::fault_proxy::FaultProxy;
use outbox_tests::{dispatcher, test_dispatcher_config, TestDb};
use pg_outbox::dispatcher::Target;
use pg_outbox::outbox::EventMetadata;
use pg_outbox::ports::OutboxStore;
use pg_outbox::producer::{append, OutboxEvent};

#[derive(Serialize)]
struct Reminder {
    #[serde(skip)]
    tenant: &'static str,
    #[serde(skip)]
    deliver_at: Option<DateTime<Utc>>,
    account: String,
    note: &'static str,
}

impl OutboxEvent for Reminder {
    const EVENT_TYPE: &'static str = "account.reminded";
    const SCHEMA_VERSION: i32 = 1;
    const AGGREGATE_TYPE: &'static str = "account";
    fn tenant_id(&self) -> &str {
        self.tenant
    }
    fn aggregate_id(&self) -> &str {
        &self.account
    }
    fn deliver_at(&self) -> Option<DateTime<Utc>> {
        self.deliver_at
    }
}

fn reminder(account: &str, note: &'static str, deliver_at: Option<DateTime<Utc>>) -> Reminder {
    Reminder {
        tenant: "acme",
        deliver_at,
        account: account.into(),
        note,
    }
}

#[tokio::test]
async fn a_delayed_event_waits_for_its_time_and_holds_its_aggregate_back() {
    let db = TestDb::create().await;
    let mut client = db.client().await;
    let db_now: DateTime<Utc> = client.query_one("SELECT now()", &[]).await.unwrap().get(0);
    let at = db_now + chrono::Duration::seconds(8);
    let metadata = EventMetadata::new("delayed-test", "corr");
    let tx = client.transaction().await.unwrap();
    // Account a: a delayed event, then one without delay behind it; account b: one without.
    append(&tx, &reminder("a", "first, in 8 s", Some(at)), &metadata)
        .await
        .unwrap();
    append(
        &tx,
        &reminder("a", "second, after the first", None),
        &metadata,
    )
    .await
    .unwrap();
    append(&tx, &reminder("b", "now", None), &metadata)
        .await
        .unwrap();
    // A deliver_at already past is no delay.
    let past = db_now - chrono::Duration::seconds(60);
    append(&tx, &reminder("c", "past", Some(past)), &metadata)
        .await
        .unwrap();
    tx.commit().await.unwrap();

    // From plain SQL too: the column alone.
    client
        .execute(
            "INSERT INTO outbox (tenant_id, aggregate_type, aggregate_id, event_type, schema_version,
                                 payload, deliver_at)
             VALUES ('acme', 'account', 'd', 'account.reminded', 1, '{}', $1)",
            &[&at],
        )
        .await
        .unwrap();
    // An aggregate appended an hour ago whose first event is delayed: neither it nor the event
    // behind it is an hour old for the backlog (the alarm on the oldest pending age would fire).
    client
        .batch_execute(&format!(
            "INSERT INTO outbox (tenant_id, aggregate_type, aggregate_id, event_type, schema_version,
                                 payload, deliver_at, created_at)
             VALUES ('acme', 'account', 'e', 'account.reminded', 1, '{{}}', '{at}', now() - interval '1 hour'),
                    ('acme', 'account', 'e', 'account.reminded', 1, '{{}}', NULL, now() - interval '1 hour')"
        ))
        .await
        .unwrap();
    // The time is set on append: changing it afterwards would not move the event, so it is refused.
    let moved = client
        .execute(
            "UPDATE outbox SET deliver_at = now() WHERE aggregate_id = 'd'",
            &[],
        )
        .await
        .expect_err("deliver_at changed after the append");
    assert_eq!(
        moved.code(),
        Some(&tokio_postgres::error::SqlState::INTEGRITY_CONSTRAINT_VIOLATION),
        "{moved}"
    );

    let endpoint = FaultProxy::standalone_sns().await;
    let d = dispatcher(
        &db,
        &endpoint.endpoint,
        Target::Sns {
            topic_arn: "arn:aws:sns:us-east-1:123456789012:delayed".into(),
        },
        test_dispatcher_config(),
    )
    .await;
    let backlog = d.store().backlog().await.unwrap();
    assert_eq!((backlog.pending, backlog.delayed), (7, 3), "{backlog:?}");
    assert!(
        backlog.oldest_pending_age_seconds < 600.0,
        "neither a delayed event nor its aggregate's events behind it age before its time: {backlog:?}"
    );
    let status = std::process::Command::new(outbox_tests::workspace_binary("outboxctl"))
        .arg("status")
        .env("DATABASE_URL", &db.url)
        .env("DATABASE_TLS", "disable")
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&status.stdout);
    assert!(
        shown.contains("Delayed: 3 pending events"),
        "{shown}\n{}",
        String::from_utf8_lossy(&status.stderr)
    );

    // Before its time (by the database's clock, read after each drain): only b and c go.
    let mut drains_before = 0;
    loop {
        d.drain(Instant::now() + Duration::from_secs(5))
            .await
            .unwrap();
        let still_before: bool = client
            .query_one("SELECT now() < $1", &[&at])
            .await
            .unwrap()
            .get(0);
        if !still_before {
            break;
        }
        drains_before += 1;
        let published = db
            .texts(
                &client,
                "SELECT aggregate_id || '/' || aggregate_version FROM outbox
                 WHERE status = 'published' ORDER BY 1",
            )
            .await;
        assert_eq!(published, ["b/1", "c/1"], "before deliver_at");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        drains_before >= 1,
        "no drain ran before deliver_at: the test proved nothing"
    );

    // After it: a's two events, in order, d, and e's two, within a drain or two of the time.
    let deadline = Instant::now() + Duration::from_secs(20);
    while db.count(&client, "outbox WHERE status = 'pending'").await > 0 {
        assert!(
            Instant::now() < deadline,
            "the delayed events were not published after their time"
        );
        d.drain(Instant::now() + Duration::from_secs(5))
            .await
            .unwrap();
    }
    let rows = client
        .query(
            "SELECT aggregate_id, aggregate_version, published_at, deliver_at, now() FROM outbox
             WHERE aggregate_id IN ('a', 'd') ORDER BY aggregate_id, aggregate_version",
            &[],
        )
        .await
        .unwrap();
    let first_published: DateTime<Utc> = rows[0].get(2);
    let second_published: DateTime<Utc> = rows[1].get(2);
    assert!(first_published >= at, "published before its time");
    assert!(second_published >= first_published, "the aggregate's order");
    let d_published: DateTime<Utc> = rows[2].get(2);
    assert!(d_published >= at);
    // Taken by the first drain after its time: the loop above drains every 200 ms (deployed, the
    // next drain is the dispatcher's next run: at most the schedule's period after the time).
    assert!(
        first_published - at < chrono::Duration::seconds(3),
        "published {} after its time",
        first_published - at
    );
    // The column keeps what was asked; a retry would move next_attempt_at only.
    let kept: DateTime<Utc> = rows[0].get(3);
    assert_eq!(kept, at);
}
