//! The append's cost to the database: PostgreSQL CPU per event of a bulk `INSERT ... SELECT` and
//! of single-row autocommitted inserts, into this project's outbox (versions and heads by its
//! triggers) and into a minimal outbox (9 columns, primary key and one partial index) measured in
//! the same run. `BENCH_APPEND_ROWS` (default 100000, over 5000 aggregates) and
//! `BENCH_APPEND_SINGLE` (default 5000) size it.
//!
//! Then, side by side, this project's append against V17's (`as_v17`): two databases at once,
//! each side's CPU its own backend's (from `/proc`), so the machine's drift touches both alike;
//! per round (`BENCH_ROUNDS`, default 3) the bulk statement, then 20,000 single-row appends in
//! transactions of 100, each the first event of a new aggregate, then 20,000 more, each the
//! second event of one of them. In those transactions 99 appends of 100 are a later append of
//! their transaction, to another aggregate (the path that reads the latest event first).

use outbox_tests::bench::{as_v17, env_usize, Backend, Stopwatch};
use outbox_tests::TestDb;

const MINIMAL: &str = "
    CREATE TABLE minimal_outbox (
        id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        event_id          uuid        NOT NULL,
        aggregate_type    text        NOT NULL,
        aggregate_id      text        NOT NULL,
        aggregate_version bigint      NOT NULL,
        event_type        text        NOT NULL,
        payload           jsonb       NOT NULL,
        status            text        NOT NULL DEFAULT 'pending',
        created_at        timestamptz NOT NULL DEFAULT now());
    CREATE INDEX minimal_outbox_pending ON minimal_outbox (id) WHERE status = 'pending'";

/// ~300-byte payloads, 5000 aggregates, each aggregate's events in order.
fn bulk_sql(table: &str, rows: usize) -> String {
    let aggregates = 5_000.min(rows.max(1));
    match table {
        "minimal_outbox" => format!(
            "INSERT INTO minimal_outbox (event_id, aggregate_type, aggregate_id, aggregate_version,
                                         event_type, payload)
             SELECT gen_random_uuid(), 'order', 'o-' || (n % {aggregates}), n / {aggregates} + 1,
                    'order.changed', jsonb_build_object('note', repeat('x', 250), 'n', n)
             FROM generate_series(0, {rows} - 1) n"
        ),
        _ => format!(
            "INSERT INTO outbox (event_id, tenant_id, aggregate_type, aggregate_id, event_type,
                                 schema_version, payload, metadata)
             SELECT gen_random_uuid(), 'acme', 'order', 'o-' || (n % {aggregates}), 'order.changed',
                    1, jsonb_build_object('note', repeat('x', 250), 'n', n),
                    '{{\"correlation_id\":\"bench\",\"source\":\"bench\"}}'
             FROM generate_series(0, {rows} - 1) n"
        ),
    }
}

fn single_sql(table: &str) -> &'static str {
    match table {
        "minimal_outbox" => {
            "INSERT INTO minimal_outbox (event_id, aggregate_type, aggregate_id, aggregate_version,
                                         event_type, payload)
             VALUES (gen_random_uuid(), 'order', $1, $2, 'order.changed',
                     jsonb_build_object('note', repeat('x', 250), 'n', $2::bigint))"
        }
        _ => {
            "INSERT INTO outbox (event_id, tenant_id, aggregate_type, aggregate_id, event_type,
                                 schema_version, payload, metadata)
             VALUES (gen_random_uuid(), 'acme', 'order', $1, 'order.changed', 1,
                     jsonb_build_object('note', repeat('x', 250), 'n', $2::bigint),
                     '{\"correlation_id\":\"bench\",\"source\":\"bench\"}')"
        }
    }
}

/// (bulk µs/event, bulk seconds, single µs/event, single events/s) of PostgreSQL for `table`.
/// `setup` runs first (the minimal outbox's table, or the project's append put back as V17 left it).
async fn measure(table: &str, setup: &str, rows: usize, single: usize) -> (f64, f64, f64, f64) {
    let db = TestDb::create().await;
    let client = db.client().await;
    client
        .batch_execute(setup)
        .await
        .expect("set up the outbox");
    client
        .batch_execute("CHECKPOINT")
        .await
        .expect("checkpoint");
    let bulk = Stopwatch::start();
    client
        .batch_execute(&bulk_sql(table, rows))
        .await
        .expect("bulk append");
    let bulk = bulk.stop(rows);
    let statement = client
        .prepare(single_sql(table))
        .await
        .expect("prepare the append");
    let one = Stopwatch::start();
    for n in 0..single as i64 {
        // 500 aggregates, each appended to in turn (versions after the bulk's).
        let aggregate = format!("s-{}", n % 500);
        let version = n / 500 + 1;
        client
            .execute(&statement, &[&aggregate, &version])
            .await
            .expect("single append");
    }
    let one = one.stop(single);
    drop(client);
    db.drop_database().await;
    (
        bulk.cpu.postgres_us,
        rows as f64 / bulk.rate,
        one.cpu.postgres_us,
        one.rate,
    )
}

/// One side of the side-by-side rounds: a database with `setup` run, and its session.
struct Side {
    db: TestDb,
    client: tokio_postgres::Client,
    backend: Backend,
}

impl Side {
    async fn new(setup: &str) -> Self {
        let db = TestDb::create().await;
        let client = db.client().await;
        client.batch_execute(setup).await.expect("setup");
        let backend = Backend::of(&client).await;
        Self {
            db,
            client,
            backend,
        }
    }

    /// This side's backend CPU per event for `work` (run on its session) over `events`.
    async fn cpu_per_event(
        &self,
        events: usize,
        work: impl std::future::Future<Output = ()>,
    ) -> f64 {
        let before = self.backend.cpu();
        work.await;
        let spent = self.backend.cpu() - before;
        assert!(!spent.is_zero(), "no CPU read for the backend");
        spent.as_secs_f64() * 1e6 / events as f64
    }
}

/// 20,000 single-row appends in transactions of 100, to aggregates `{prefix}-0..19999`.
async fn singles(client: &tokio_postgres::Client, prefix: &str) {
    let statement = client
        .prepare(
            "INSERT INTO outbox (event_id, tenant_id, aggregate_type, aggregate_id, event_type,
                                 schema_version, payload, metadata)
             VALUES (gen_random_uuid(), 'acme', 'order', $1, 'order.changed', 1,
                     jsonb_build_object('n', $2::bigint), '{}')
             RETURNING aggregate_version",
        )
        .await
        .expect("prepare the append");
    for chunk in 0..200i64 {
        client.batch_execute("BEGIN").await.expect("begin");
        for n in chunk * 100..(chunk + 1) * 100 {
            client
                .query_one(&statement, &[&format!("{prefix}-{n}"), &n])
                .await
                .expect("single append");
        }
        client.batch_execute("COMMIT").await.expect("commit");
    }
}

async fn side_by_side(rows: usize, rounds: usize) {
    println!(
        "\n## Side by side: this project's append / V17's, each side's own backend CPU per event\n"
    );
    println!("| round | bulk µs/event (this / V17) | ratio | first events µs (this / V17) | ratio | second events µs (this / V17) | ratio |");
    println!("|---|---|---|---|---|---|---|");
    for round in 1..=rounds {
        let now = Side::new("").await;
        let before = Side::new(&as_v17()).await;
        let bulk = bulk_sql("outbox", rows);
        let bulk = &bulk;
        let (b_now, b_before) = tokio::join!(
            now.cpu_per_event(rows, async {
                now.client.batch_execute(bulk).await.expect("bulk append")
            }),
            before.cpu_per_event(rows, async {
                before
                    .client
                    .batch_execute(bulk)
                    .await
                    .expect("bulk append")
            })
        );
        let mut line = format!(
            "| {round} | {b_now:.1} / {b_before:.1} | {:.2}x",
            b_now / b_before
        );
        for _pass in ["first", "second"] {
            let (s_now, s_before) = tokio::join!(
                now.cpu_per_event(20_000, singles(&now.client, "s")),
                before.cpu_per_event(20_000, singles(&before.client, "s"))
            );
            line += &format!(" | {s_now:.1} / {s_before:.1} | {:.2}x", s_now / s_before);
        }
        println!("{line} |");
        for side in [now, before] {
            drop(side.client);
            side.db.drop_database().await;
        }
    }
}

#[tokio::main]
async fn main() {
    let rows = env_usize("BENCH_APPEND_ROWS", 100_000);
    let single = env_usize("BENCH_APPEND_SINGLE", 5_000);
    let minimal = measure("minimal_outbox", MINIMAL, rows, single).await;
    // BENCH_APPEND_V17_FIRST=1 measures V17 before this project's append, so that an order
    // effect (the machine warming up, or the cache) shows as a change of the ratio between runs.
    let (project, v17) = if std::env::var("BENCH_APPEND_V17_FIRST").is_ok() {
        let v17 = measure("outbox", &as_v17(), rows, single).await;
        (measure("outbox", "", rows, single).await, v17)
    } else {
        let project = measure("outbox", "", rows, single).await;
        (project, measure("outbox", &as_v17(), rows, single).await)
    };
    println!("## Append: PostgreSQL CPU per event ({rows} events over 5000 aggregates in one INSERT ... SELECT; {single} single-row autocommitted inserts)\n");
    println!("| outbox | bulk µs/event | bulk s | single-row µs/event | single-row events/s |");
    println!("|---|---|---|---|---|");
    for (name, m) in [
        ("minimal (9 columns, PK + 1 partial index)", minimal),
        ("this project", project),
        (
            "this project as V17 left it (each later append of a transaction takes the aggregate's row again)",
            v17,
        ),
    ] {
        println!(
            "| {name} | {:.1} | {:.2} | {:.1} | {:.0} |",
            m.0, m.1, m.2, m.3
        );
    }
    println!(
        "\nratio this project / minimal: bulk {:.2}x, single-row {:.2}x",
        project.0 / minimal.0,
        project.2 / minimal.2
    );
    println!(
        "ratio this project / as V17 left it: bulk {:.2}x, single-row {:.2}x",
        project.0 / v17.0,
        project.2 / v17.2
    );
    side_by_side(rows, env_usize("BENCH_ROUNDS", 3)).await;
}
