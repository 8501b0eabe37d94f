//! The claim and the record as the database pays for them, this version against the record as
//! V16 left it (`AS_V16`: V7's `outbox_mark_done` and V9's `outbox_record`), side by side.
//!
//! Two databases, each seeded with `BENCH_RECORD_ROWS` events (default 100,000, each its own
//! aggregate), are drained at the same time by two connections each: `outbox_claim` of 500 under
//! a fresh lease owner as long as the dispatcher's, then `outbox_record` of every row claimed as
//! published. Each side's CPU is its own two backends' (from `/proc`, read while they are
//! connected), so the machine's drift during a round touches both sides alike. `BENCH_ROUNDS`
//! rounds (default 3), each on new databases.
//!
//! `BENCH_RECORD_BEFORE=v18-claim`: the other side is this version's record with the claim as
//! V18 left it (V15's, before the tenants' weights and caps of V19) instead. With
//! `BENCH_RECORD_LIMITS=weight` this version's side has a row of `outbox_tenant_limits` for its
//! tenant (weight 2: read by every claim); with `BENCH_RECORD_LIMITS=cap`, weight 2 and a cap of
//! 1,000,000 a second (never reached, but its bucket is locked, refilled and spent by every claim,
//! so the two connections' claims take the tenant one at a time: a claim that finds the bucket
//! held comes back empty, and that connection stops).
//!
//! Run: `cargo bench -p outbox-tests --bench record` with `.local/env` sourced.

use std::time::Duration;

use outbox_tests::bench::{as_v18_claim, env_usize, seed, Backend, AS_V16};
use outbox_tests::TestDb;

const CONNECTIONS: usize = 2;
const BATCH: i64 = 500;

/// Claims and records until a claim comes back empty; returns the rows recorded, and how many of
/// them a record deferred.
async fn drain(client: &tokio_postgres::Client, worker: usize) -> (usize, usize) {
    let claim = client
        .prepare("SELECT coalesce(array_agg(id), '{}') FROM outbox_claim($1, 60, $2, '')")
        .await
        .expect("prepare claim");
    let record = client
        .prepare("SELECT outbox_record($1, $2, '{}', '{}', '{}', '{}', '{}')")
        .await
        .expect("prepare record");
    let (mut recorded, mut deferred) = (0, 0);
    loop {
        // As long as a dispatcher's: its log stream's name, '/', a 32-digit id.
        let owner = format!(
            "2026/12/07/[$LATEST]{:032x}/{}",
            worker,
            uuid::Uuid::new_v4().simple()
        );
        let ids: Vec<i64> = client
            .query_one(&claim, &[&BATCH, &owner])
            .await
            .expect("claim")
            .get(0);
        if ids.is_empty() {
            return (recorded, deferred);
        }
        // Rows another session holds right now are deferred (the other connection's claim
        // locks a row it read before this claim leased it, to find it leased), and recorded
        // again, as the dispatcher does.
        let mut left = ids.clone();
        while !left.is_empty() {
            left = client
                .query_one(&record, &[&owner, &left])
                .await
                .expect("record")
                .get(0);
            deferred += left.len();
        }
        recorded += ids.len();
    }
}

/// One side: its connections' backends, to read their CPU.
struct Side {
    db: TestDb,
    clients: Vec<tokio_postgres::Client>,
    backends: Vec<Backend>,
}

impl Side {
    async fn new(rows: usize, setup: &str) -> Self {
        let db = TestDb::create().await;
        if !setup.is_empty() {
            db.client().await.batch_execute(setup).await.expect("setup");
        }
        seed(&db, rows, "pending", Duration::ZERO).await;
        let mut clients = Vec::new();
        let mut backends = Vec::new();
        for _ in 0..CONNECTIONS {
            let client = db.client().await;
            backends.push(Backend::of(&client).await);
            clients.push(client);
        }
        Self {
            db,
            clients,
            backends,
        }
    }

    fn cpu(&self) -> Duration {
        self.backends.iter().map(Backend::cpu).sum()
    }

    /// Drains it; (rows recorded, rows deferred by a record, its backends' CPU).
    async fn run(&self) -> (usize, usize, Duration) {
        let before = self.cpu();
        let drained = futures_util::future::join_all(
            self.clients.iter().enumerate().map(|(w, c)| drain(c, w)),
        )
        .await;
        let recorded = drained.iter().map(|d| d.0).sum();
        let deferred = drained.iter().map(|d| d.1).sum();
        (recorded, deferred, self.cpu().saturating_sub(before))
    }

    async fn published(&self) -> i64 {
        let client = self.db.client().await;
        self.db
            .count(&client, "outbox WHERE status = 'published'")
            .await
    }
}

#[tokio::main]
async fn main() {
    let rows = env_usize("BENCH_RECORD_ROWS", 100_000);
    let rounds = env_usize("BENCH_ROUNDS", 3);
    let claim_as_v18 = std::env::var("BENCH_RECORD_BEFORE").as_deref() == Ok("v18-claim");
    let limits = std::env::var("BENCH_RECORD_LIMITS").unwrap_or_default();
    let (before_setup, before_name) = if claim_as_v18 {
        (as_v18_claim(), "V18's claim + record")
    } else {
        (AS_V16.to_owned(), "claim + V16's record")
    };
    let (now_setup, now_name) = match limits.as_str() {
        "weight" => (
            "INSERT INTO outbox_tenant_limits (tenant_id, weight) VALUES ('bench', 2)",
            "this version, its tenant weighted",
        ),
        "cap" => (
            "INSERT INTO outbox_tenant_limits (tenant_id, weight, max_per_second) \
             VALUES ('bench', 2, 1000000)",
            "this version, its tenant weighted and capped",
        ),
        "" => ("", "this version"),
        other => panic!("BENCH_RECORD_LIMITS={other}: weight, cap, or unset"),
    };
    println!("## The claim and the record: {before_name} against {now_name}, side by side\n");
    println!("{rows} events each, {CONNECTIONS} connections each, claims of {BATCH}; CPU of each side's backends per row.\n");
    println!("| round | {before_name} µs/row | {now_name} µs/row | ratio | rows handed back as deferred, summed over the records (before, this version) |");
    println!("|---|---|---|---|---|");
    let mut ratios = Vec::new();
    for round in 1..=rounds {
        let before = Side::new(rows, &before_setup).await;
        let now = Side::new(rows, now_setup).await;
        let ((old_rows, old_deferred, old_cpu), (new_rows, new_deferred, new_cpu)) =
            tokio::join!(before.run(), now.run());
        // A claim can come back empty while the other connection's claim holds the last rows:
        // the rows are what was recorded, and the tables say the same.
        assert_eq!(before.published().await, old_rows as i64);
        assert_eq!(now.published().await, new_rows as i64);
        before.db.drop_database().await;
        now.db.drop_database().await;
        let per_row = |cpu: Duration, n: usize| cpu.as_secs_f64() * 1e6 / n.max(1) as f64;
        let (old, new) = (per_row(old_cpu, old_rows), per_row(new_cpu, new_rows));
        ratios.push(new / old);
        println!(
            "| {round} | {old:.1} | {new:.1} | {:.2}x | {old_deferred}, {new_deferred} |",
            new / old
        );
    }
    ratios.sort_by(f64::total_cmp);
    println!("\nmedian ratio: {:.2}x", ratios[ratios.len() / 2]);
}
