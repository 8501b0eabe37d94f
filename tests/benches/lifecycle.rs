//! An event's whole life, as PostgreSQL pays for it: append, claim, record, retention, each with
//! the vacuum of what it left, in this project's outbox and in a minimal outbox measured in the
//! same run, each phase's PostgreSQL CPU per event and the ratio between the two.
//!
//! Both sides get the same work in the same shape: `BENCH_LIFE_EVENTS` events (default 100,000)
//! over half as many aggregates (a payment paid, then refunded), appended by 2 connections in
//! transactions of 100 events, one `INSERT` each; drained by 2 connections in claims of 500,
//! each marked published in a second statement; then deleted by retention in statements of
//! 5,000. Autovacuum is off for the run and each phase ends with a measured `VACUUM` (of the
//! outbox and, for the project, of `outbox_aggregates`, which its appends write). The project
//! appends through its public API (`pg_outbox::producer::append`), claims and records through
//! its store (`PgOutboxStore`), and deletes with its retention function
//! (`outbox_delete_published`); the minimal outbox (9
//! columns, a primary key and one partial index) runs the plain statements of a lease queue:
//! `INSERT`, `UPDATE ... WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED) RETURNING`, an
//! `UPDATE` of the status, and `DELETE`. No bus: this is the database's share.
//!
//! The project runs twice: as migrated, and with the outbox's fillfactor set back to V13's 70
//! (what V14 changed for the claim and the record), so V14's effect is a ratio of one run too.
//!
//! Run: `cargo bench -p outbox-tests --bench lifecycle` with `.local/env` sourced.

use std::time::Duration;

use outbox_tests::bench::{env_usize, mark_published, Stopwatch, Throughput};
use outbox_tests::TestDb;
use pg_outbox::outbox::EventMetadata;
use pg_outbox::ports::OutboxStore;
use pg_outbox::postgres::outbox::PgOutboxStore;
use pg_outbox::postgres::Db;
use pg_outbox::producer::{append, OutboxEvent};
use tokio_postgres::types::Type;

const CONNECTIONS: usize = 2;
const PER_TRANSACTION: usize = 100;
const BATCH: i64 = 500;
const RETENTION_BATCH: i32 = 5_000;

const MINIMAL: &str = "
    CREATE TABLE minimal_outbox (
        id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        event_id          uuid        NOT NULL,
        aggregate_type    text        NOT NULL,
        aggregate_id      text        NOT NULL,
        event_type        text        NOT NULL,
        payload           jsonb       NOT NULL,
        status            text        NOT NULL DEFAULT 'pending',
        locked_until      timestamptz,
        created_at        timestamptz NOT NULL DEFAULT now());
    CREATE INDEX minimal_outbox_pending ON minimal_outbox (id) WHERE status = 'pending'";

const MINIMAL_INSERT: &str = "
    INSERT INTO minimal_outbox (event_id, aggregate_type, aggregate_id, event_type, payload)
    VALUES ($1, 'payment', $2, $3, $4)";
const MINIMAL_CLAIM: &str = "
    UPDATE minimal_outbox SET locked_until = now() + interval '60 seconds'
    WHERE id IN (SELECT id FROM minimal_outbox
                 WHERE status = 'pending' AND (locked_until IS NULL OR locked_until <= now())
                 ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED)
    RETURNING id, event_id, aggregate_type, aggregate_id, event_type, payload, created_at";
const MINIMAL_MARK: &str =
    "UPDATE minimal_outbox SET status = 'published' WHERE id = ANY ($1) AND status = 'pending'";
const MINIMAL_DELETE: &str = "
    DELETE FROM minimal_outbox
    WHERE id IN (SELECT id FROM minimal_outbox WHERE status = 'published' ORDER BY id LIMIT $1)";

/// A payment event of the size the other benchmarks use (~300 bytes of payload).
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct PaymentEvent {
    payment_id: String,
    amount_minor: i64,
    currency: &'static str,
    verification_method: &'static str,
    verified_by: &'static str,
    note: String,
}

impl OutboxEvent for PaymentEvent {
    const EVENT_TYPE: &'static str = "payment.changed";
    const SCHEMA_VERSION: i32 = 1;
    const AGGREGATE_TYPE: &'static str = "payment";
    fn tenant_id(&self) -> &str {
        "bench"
    }
    fn aggregate_id(&self) -> &str {
        &self.payment_id
    }
}

/// The run's `n`th event: the first half of the run's events and the second half change the same
/// payments, so every aggregate has two events, appended apart.
fn event(n: usize, events: usize) -> PaymentEvent {
    let aggregates = (events / 2).max(1);
    PaymentEvent {
        payment_id: format!("p-{}", n % aggregates),
        amount_minor: 1250,
        currency: "EUR",
        verification_method: "card_3ds",
        verified_by: "acs.examplebank.com",
        note: "x".repeat(150),
    }
}

/// Each connection's share of `0..events`, in transactions of [`PER_TRANSACTION`].
fn shares(events: usize) -> Vec<Vec<usize>> {
    (0..CONNECTIONS)
        .map(|w| (0..events).filter(|n| n % CONNECTIONS == w).collect())
        .collect()
}

/// The three phases' throughput, each with its vacuum: append, claim + record, retention.
struct Life {
    append: Throughput,
    drain: Throughput,
    retention: Throughput,
}

impl Life {
    fn total_postgres_us(&self) -> f64 {
        self.append.cpu.postgres_us + self.drain.cpu.postgres_us + self.retention.cpu.postgres_us
    }
}

/// Before each phase: the previous phase's dirty pages written out, so the checkpointer's work
/// is not counted in the next phase.
async fn settle(db: &TestDb) {
    db.client()
        .await
        .batch_execute("CHECKPOINT")
        .await
        .expect("checkpoint");
}

/// Autovacuum off for `table` during the run: its work would land in whichever phase it
/// happened to run in; each phase ends with a `VACUUM`, measured with it, instead.
async fn without_autovacuum(db: &TestDb, table: &str) {
    // The table name is one of two constants of this file.
    db.client()
        .await
        .batch_execute(&format!(
            "ALTER TABLE {table} SET (autovacuum_enabled = false)"
        ))
        .await
        .expect("autovacuum off");
}

/// The phase's own vacuum of `tables` (one or more constants of this file), measured with it (autovacuum is off for the run, so each phase pays
/// for the dead rows it leaves, whenever a real autovacuum would have come).
async fn vacuum(db: &TestDb, tables: &str) {
    db.client()
        .await
        .batch_execute(&format!("VACUUM {tables}"))
        .await
        .expect("vacuum");
}

async fn minimal_life(events: usize) -> Life {
    let db = TestDb::create().await;
    db.client()
        .await
        .batch_execute(MINIMAL)
        .await
        .expect("minimal outbox");
    without_autovacuum(&db, "minimal_outbox").await;
    settle(&db).await;

    let watch = Stopwatch::start();
    let workers: Vec<_> = shares(events)
        .into_iter()
        .map(|share| {
            let db = db.settings.clone();
            tokio::spawn(async move {
                let mut client = db.connect().await.expect("connect");
                for chunk in share.chunks(PER_TRANSACTION) {
                    let tx = client.transaction().await.expect("begin");
                    for &n in chunk {
                        let e = event(n, events);
                        let payload = serde_json::to_value(&e).expect("payload");
                        tx.query_typed(
                            MINIMAL_INSERT,
                            &[
                                (&uuid::Uuid::now_v7(), Type::UUID),
                                (&e.payment_id, Type::TEXT),
                                (&PaymentEvent::EVENT_TYPE, Type::TEXT),
                                (&payload, Type::JSONB),
                            ],
                        )
                        .await
                        .expect("insert");
                    }
                    tx.commit().await.expect("commit");
                }
            })
        })
        .collect();
    for w in workers {
        w.await.expect("appender");
    }
    vacuum(&db, "minimal_outbox").await;
    let append = watch.stop(events);

    settle(&db).await;
    let watch = Stopwatch::start();
    let workers: Vec<_> = (0..CONNECTIONS)
        .map(|_| {
            let db = db.settings.clone();
            tokio::spawn(async move {
                let client = db.connect().await.expect("connect");
                let mut done = 0;
                loop {
                    let rows = client
                        .query_typed(MINIMAL_CLAIM, &[(&BATCH, Type::INT8)])
                        .await
                        .expect("claim");
                    if rows.is_empty() {
                        return done;
                    }
                    let ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
                    client
                        .query_typed(MINIMAL_MARK, &[(&ids, Type::INT8_ARRAY)])
                        .await
                        .expect("mark");
                    done += ids.len();
                }
            })
        })
        .collect();
    let mut drained = 0;
    for w in workers {
        drained += w.await.expect("drainer");
    }
    assert_eq!(drained, events);
    vacuum(&db, "minimal_outbox").await;
    let drain = watch.stop(events);

    settle(&db).await;
    let client = db.client().await;
    let watch = Stopwatch::start();
    let mut deleted = 0;
    loop {
        let n = client
            .execute(MINIMAL_DELETE, &[&i64::from(RETENTION_BATCH)])
            .await
            .expect("delete");
        if n == 0 {
            break;
        }
        deleted += n as usize;
    }
    assert_eq!(deleted, events);
    vacuum(&db, "minimal_outbox").await;
    let retention = watch.stop(events);
    drop(client);
    db.drop_database().await;
    Life {
        append,
        drain,
        retention,
    }
}

/// `fillfactor`: the outbox's, when not the migrations' (70 measures the outbox as V13 left it).
async fn project_life(events: usize, fillfactor: Option<u32>) -> Life {
    let db = TestDb::create().await;
    if let Some(fillfactor) = fillfactor {
        db.client()
            .await
            .batch_execute(&format!(
                "ALTER TABLE outbox SET (fillfactor = {fillfactor})"
            ))
            .await
            .expect("fillfactor");
    }
    without_autovacuum(&db, "outbox").await;
    without_autovacuum(&db, "outbox_aggregates").await;
    settle(&db).await;

    let watch = Stopwatch::start();
    let workers: Vec<_> = shares(events)
        .into_iter()
        .map(|share| {
            let db = db.settings.clone();
            tokio::spawn(async move {
                let mut client = db.connect().await.expect("connect");
                let metadata = EventMetadata::new("payments", "bench");
                for chunk in share.chunks(PER_TRANSACTION) {
                    let tx = client.transaction().await.expect("begin");
                    for &n in chunk {
                        append(&tx, &event(n, events), &metadata)
                            .await
                            .expect("append");
                    }
                    tx.commit().await.expect("commit");
                }
            })
        })
        .collect();
    for w in workers {
        w.await.expect("appender");
    }
    vacuum(&db, "outbox, outbox_aggregates").await;
    let append = watch.stop(events);

    settle(&db).await;
    let watch = Stopwatch::start();
    let workers: Vec<_> = (0..CONNECTIONS)
        .map(|w| {
            let store = PgOutboxStore::new(Db::new(db.settings.clone()));
            tokio::spawn(async move {
                let owner = format!("life-{w}");
                let mut done = 0;
                let mut empty_claims = 0;
                // An aggregate's second event becomes claimable when the first is recorded,
                // maybe by the other connection: a connection stops after two empty claims
                // in a row with a pause between.
                while empty_claims < 2 {
                    let claimed = store
                        .claim_batch(BATCH, Duration::from_secs(60), &owner)
                        .await
                        .expect("claim");
                    if claimed.is_empty() {
                        empty_claims += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                    empty_claims = 0;
                    done += claimed.len();
                    mark_published(&store, &owner, &claimed).await;
                }
                done
            })
        })
        .collect();
    let mut drained = 0;
    for w in workers {
        drained += w.await.expect("drainer");
    }
    assert_eq!(drained, events, "every event claimed and recorded once");
    vacuum(&db, "outbox, outbox_aggregates").await;
    let drain = watch.stop(events);

    settle(&db).await;
    let client = db.client().await;
    let watch = Stopwatch::start();
    let mut deleted = 0;
    loop {
        let n =
            pg_outbox::postgres::admin::delete_published(&client, Duration::ZERO, RETENTION_BATCH)
                .await
                .expect("retention");
        if n == 0 {
            break;
        }
        deleted += n as usize;
    }
    assert_eq!(deleted, events, "retention deleted every published event");
    vacuum(&db, "outbox, outbox_aggregates").await;
    let retention = watch.stop(events);
    drop(client);
    db.drop_database().await;
    Life {
        append,
        drain,
        retention,
    }
}

#[tokio::main]
async fn main() {
    let events = env_usize("BENCH_LIFE_EVENTS", 100_000);
    let minimal = minimal_life(events).await;
    let project = project_life(events, None).await;
    let before = project_life(events, Some(70)).await;
    println!(
        "## An event's whole life: PostgreSQL CPU per event ({events} events over {} aggregates, \
         {CONNECTIONS} connections, appends in transactions of {PER_TRANSACTION}, claims of \
         {BATCH}, retention statements of {RETENTION_BATCH})\n",
        events / 2
    );
    println!(
        "| phase | minimal outbox µs/event (events/s) | this project µs/event (events/s) | ratio | \
         this project at V13's fillfactor (70) µs/event (events/s) | V14 / fillfactor 70 |"
    );
    println!("|---|---|---|---|---|---|");
    let phases = [
        (
            "append + its vacuum",
            minimal.append,
            project.append,
            before.append,
        ),
        (
            "claim + record + its vacuum",
            minimal.drain,
            project.drain,
            before.drain,
        ),
        (
            "retention (DELETE) + its vacuum",
            minimal.retention,
            project.retention,
            before.retention,
        ),
    ];
    for (name, m, p, b) in phases {
        println!(
            "| {name} | {:.1} ({:.0}) | {:.1} ({:.0}) | {:.2}x | {:.1} ({:.0}) | {:.2}x |",
            m.cpu.postgres_us,
            m.rate,
            p.cpu.postgres_us,
            p.rate,
            p.cpu.postgres_us / m.cpu.postgres_us,
            b.cpu.postgres_us,
            b.rate,
            p.cpu.postgres_us / b.cpu.postgres_us
        );
    }
    let whole = project.total_postgres_us() / minimal.total_postgres_us();
    println!(
        "| **whole life** | {:.1} | {:.1} | **{whole:.2}x** (target ≤ 1.5x: {}) | {:.1} | {:.2}x |",
        minimal.total_postgres_us(),
        project.total_postgres_us(),
        if whole <= 1.5 { "met" } else { "not met" },
        before.total_postgres_us(),
        project.total_postgres_us() / before.total_postgres_us()
    );
}
