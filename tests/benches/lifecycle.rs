//! An event's whole life, as PostgreSQL pays for it: append, claim, record, retention, each with
//! the vacuum of what it left, in this project's outbox and in a minimal outbox measured in the
//! same run, each phase's PostgreSQL CPU per event and the ratio between the two.
//!
//! Both sides get the same work in the same shape: `BENCH_LIFE_EVENTS` events (default 100,000)
//! over half as many aggregates (a payment paid, then refunded), appended by 2 connections in
//! transactions of 100 events, one `INSERT` each (`BENCH_LIFE_BATCHED=1`: one statement per
//! transaction, the project's `append_all` and the minimal outbox's `INSERT ... SELECT FROM
//! unnest`); drained by 2 connections in claims of 500,
//! each marked published in a second statement; then deleted by retention in statements of
//! 5,000. Autovacuum is off for the benchmark's tables and each phase ends with a measured `VACUUM` (of the
//! outbox and, for the project, of `outbox_aggregates`, which its appends write). The project
//! appends through its public API (`pg_outbox::producer::append`), claims and records through
//! its store (`PgOutboxStore`), and deletes with its retention function
//! (`outbox_delete_published`); the minimal outbox (9 columns, a primary key and one partial
//! index, the project's fillfactor of 40) runs the plain statements of a lease queue:
//! `INSERT`, `UPDATE ... WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED) RETURNING`, an
//! `UPDATE` of the status, and `DELETE`. No bus: this is the database's share.
//!
//! The project runs twice: as migrated, and as V15 left it (the envelope's metadata check a CHECK
//! constraint, which PostgreSQL builds for every statement that writes a row), so V16's effect
//! is a ratio of one run too. The order is minimal, project, project as V15
//! (`BENCH_LIFE_V15_FIRST=1`: minimal, project as V15, project); autovacuum being off,
//! autoanalyze is too.
//!
//! Run: `cargo bench -p outbox-tests --bench lifecycle` with `.local/env` sourced.

use std::time::Duration;

use outbox_tests::bench::{env_usize, mark_published, Stopwatch, Throughput, AS_V15};
use outbox_tests::TestDb;
use pg_outbox::outbox::EventMetadata;
use pg_outbox::ports::OutboxStore;
use pg_outbox::postgres::outbox::PgOutboxStore;
use pg_outbox::postgres::{DatabaseSettings, Db};
use pg_outbox::producer::{append, append_all, OutboxEvent};
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
const MINIMAL_INSERT_ALL: &str = "
    INSERT INTO minimal_outbox (event_id, aggregate_type, aggregate_id, event_type, payload)
    SELECT e.id, 'payment', e.aggregate, $3, e.payload
    FROM unnest($1::uuid[], $2::text[], $4::jsonb[]) WITH ORDINALITY AS e(id, aggregate, payload, n)
    ORDER BY e.n";
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

/// The phase's own vacuum, measured with it (autovacuum is off for the run, so each phase pays
/// for the dead rows it leaves, whenever a real autovacuum would have come).
async fn vacuum(db: &TestDb, outbox: Outbox) {
    db.client()
        .await
        .batch_execute(outbox.vacuum())
        .await
        .expect("vacuum");
}

/// The two outboxes measured.
#[derive(Debug, Clone, Copy)]
enum Outbox {
    /// The minimal lease queue, in plain statements.
    Minimal,
    /// This project, through its API and store, as migrated (`false`) or as V15 left it
    /// (`true`: the metadata check a CHECK constraint again, V16's trigger as V12 wrote it).
    Project(bool),
}

impl Outbox {
    /// Its tables' vacuum (the project's appends write `outbox_aggregates` too).
    fn vacuum(self) -> &'static str {
        match self {
            Self::Minimal => "VACUUM minimal_outbox",
            Self::Project(_) => "VACUUM outbox, outbox_aggregates",
        }
    }

    /// Creates or adjusts its tables in `db`, autovacuum off. The minimal outbox gets the
    /// project's fillfactor (40), so both claims' leases stay on their pages.
    async fn prepare(self, db: &TestDb) {
        let client = db.client().await;
        let sql = match self {
            Self::Minimal => format!(
                "{MINIMAL}; ALTER TABLE minimal_outbox SET (autovacuum_enabled = false, fillfactor = 40)"
            ),
            Self::Project(as_v15) => format!(
                "ALTER TABLE outbox SET (autovacuum_enabled = false);
                 ALTER TABLE outbox_aggregates SET (autovacuum_enabled = false);
                 {}",
                if as_v15 { AS_V15 } else { "" }
            ),
        };
        client
            .batch_execute(&sql)
            .await
            .expect("prepare the outbox");
    }

    /// Appends `events` (these of the run's `total`) in transactions of [`PER_TRANSACTION`]:
    /// one statement per event, or (`batched`) one per transaction.
    async fn append(self, db: DatabaseSettings, events: Vec<usize>, total: usize, batched: bool) {
        let mut client = db.connect().await.expect("connect");
        let metadata = EventMetadata::new("payments", "bench");
        for chunk in events.chunks(PER_TRANSACTION) {
            let tx = client.transaction().await.expect("begin");
            if batched {
                let events: Vec<PaymentEvent> = chunk.iter().map(|&n| event(n, total)).collect();
                match self {
                    Self::Minimal => {
                        let ids: Vec<uuid::Uuid> =
                            events.iter().map(|_| uuid::Uuid::now_v7()).collect();
                        let aggregates: Vec<&str> =
                            events.iter().map(|e| e.payment_id.as_str()).collect();
                        let payloads: Vec<serde_json::Value> = events
                            .iter()
                            .map(|e| serde_json::to_value(e).expect("payload"))
                            .collect();
                        tx.query_typed(
                            MINIMAL_INSERT_ALL,
                            &[
                                (&ids, Type::UUID_ARRAY),
                                (&aggregates, Type::TEXT_ARRAY),
                                (&PaymentEvent::EVENT_TYPE, Type::TEXT),
                                (&payloads, Type::JSONB_ARRAY),
                            ],
                        )
                        .await
                        .expect("insert");
                    }
                    Self::Project(_) => {
                        append_all(&tx, &events, &metadata).await.expect("append");
                    }
                }
                tx.commit().await.expect("commit");
                continue;
            }
            for &n in chunk {
                let e = event(n, total);
                match self {
                    Self::Minimal => {
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
                    Self::Project(_) => {
                        append(&tx, &e, &metadata).await.expect("append");
                    }
                }
            }
            tx.commit().await.expect("commit");
        }
    }

    /// Claims and records until nothing is left for it; how many it claimed.
    async fn drain(self, db: DatabaseSettings, worker: usize) -> usize {
        let client = match self {
            Self::Minimal => Some(db.connect().await.expect("connect")),
            Self::Project(_) => None,
        };
        let store = PgOutboxStore::new(Db::new(db));
        let owner = format!("life-{worker}");
        let mut done = 0;
        let mut empty_claims = 0;
        // An aggregate's second event becomes claimable when the first is recorded, maybe by
        // the other connection: a connection stops after two empty claims in a row with a
        // pause between.
        while empty_claims < 2 {
            let claimed = match self {
                Self::Minimal => {
                    let client = client.as_ref().expect("the minimal outbox's connection");
                    let rows = client
                        .query_typed(MINIMAL_CLAIM, &[(&BATCH, Type::INT8)])
                        .await
                        .expect("claim");
                    let ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
                    if !ids.is_empty() {
                        client
                            .query_typed(MINIMAL_MARK, &[(&ids, Type::INT8_ARRAY)])
                            .await
                            .expect("mark");
                    }
                    ids.len()
                }
                Self::Project(_) => {
                    let claimed = store
                        .claim_batch(BATCH, Duration::from_secs(60), &owner)
                        .await
                        .expect("claim");
                    mark_published(&store, &owner, &claimed).await;
                    claimed.len()
                }
            };
            if claimed == 0 {
                empty_claims += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            } else {
                empty_claims = 0;
                done += claimed;
            }
        }
        done
    }

    /// One retention statement; how many rows it deleted.
    async fn delete_published(self, client: &tokio_postgres::Client) -> usize {
        match self {
            Self::Minimal => client
                .execute(MINIMAL_DELETE, &[&i64::from(RETENTION_BATCH)])
                .await
                .expect("delete") as usize,
            Self::Project(_) => pg_outbox::postgres::admin::delete_published(
                client,
                Duration::ZERO,
                RETENTION_BATCH,
            )
            .await
            .expect("retention") as usize,
        }
    }
}

/// The three phases of `events` in `outbox`, each with its vacuum, on a database of its own.
async fn life(outbox: Outbox, events: usize, batched: bool) -> Life {
    let db = TestDb::create().await;
    outbox.prepare(&db).await;

    settle(&db).await;
    let watch = Stopwatch::start();
    let appenders: Vec<_> = shares(events)
        .into_iter()
        .map(|share| tokio::spawn(outbox.append(db.settings.clone(), share, events, batched)))
        .collect();
    for a in appenders {
        a.await.expect("appender");
    }
    vacuum(&db, outbox).await;
    let append = watch.stop(events);

    settle(&db).await;
    let watch = Stopwatch::start();
    let drainers: Vec<_> = (0..CONNECTIONS)
        .map(|w| tokio::spawn(outbox.drain(db.settings.clone(), w)))
        .collect();
    let mut drained = 0;
    for d in drainers {
        drained += d.await.expect("drainer");
    }
    assert_eq!(drained, events, "{outbox:?}: every event claimed once");
    vacuum(&db, outbox).await;
    let drain = watch.stop(events);

    settle(&db).await;
    let client = db.client().await;
    let watch = Stopwatch::start();
    let mut deleted = 0;
    loop {
        let n = outbox.delete_published(&client).await;
        if n == 0 {
            break;
        }
        deleted += n;
    }
    assert_eq!(deleted, events, "{outbox:?}: retention deleted every event");
    vacuum(&db, outbox).await;
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
    let batched = env_usize("BENCH_LIFE_BATCHED", 0) == 1;
    let minimal = life(Outbox::Minimal, events, batched).await;
    // BENCH_LIFE_V15_FIRST=1 runs the project as V15 left it before it as migrated, to see
    // the order's share in the ratio between them.
    let (project, before) = if env_usize("BENCH_LIFE_V15_FIRST", 0) == 1 {
        let before = life(Outbox::Project(true), events, batched).await;
        (life(Outbox::Project(false), events, batched).await, before)
    } else {
        let project = life(Outbox::Project(false), events, batched).await;
        (project, life(Outbox::Project(true), events, batched).await)
    };
    println!(
        "## An event's whole life: PostgreSQL CPU per event ({events} events over {} aggregates, \
         {CONNECTIONS} connections, appends in transactions of {PER_TRANSACTION}, {}, claims of \
         {BATCH}, retention statements of {RETENTION_BATCH})\n",
        events / 2,
        if batched {
            "one statement per transaction (append_all; the minimal outbox's INSERT ... SELECT FROM unnest)"
        } else {
            "one statement per event"
        }
    );
    println!(
        "| phase | minimal outbox µs/event (events/s) | this project µs/event (events/s) | ratio | \
         this project as V15 left it µs/event (events/s) | V16 / V15 |"
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
