//! (Past 400 lines: the dispatcher benchmarks measured in one run, so their ratios compare.)
//!
//! Dispatcher benchmarks, all in one run on the local PostgreSQL:
//! 1. the SQL floor: claim then mark published, two statements, no bus;
//! 2. the dispatcher loop against a zero-latency SNS-compatible endpoint on loopback;
//! 3. the same with 20 ms added to every publish call;
//! 4. commit-to-publish latency while dispatchers drain and producers commit;
//! 5. claim latency with 10k and with 1M published rows retained.
//!
//! Run: `scripts/bench` (or `cargo bench -p outbox-tests --bench dispatcher` with `.local/env`
//! sourced). `BENCH_ROWS` sets the rows per throughput scenario (default 200000),
//! `BENCH_RETAINED` the large retained set (default 1000000).

use std::time::{Duration, Instant};

use outbox_tests::bench::{
    self, arrival_latencies, env_usize, mark_published, pct, seed, Stopwatch, Throughput,
};
use outbox_tests::fault_proxy::FaultProxy;
use outbox_tests::{dispatcher, TestDb};
use pg_outbox::dispatcher::{DispatcherConfig, Target};
use pg_outbox::ports::OutboxStore;
use pg_outbox::postgres::outbox::PgOutboxStore;
use pg_outbox::postgres::Db;

const DISPATCHERS: usize = 2;
const BATCH: i64 = 500;

fn config() -> DispatcherConfig {
    bench::drain_config(BATCH)
}

/// 1: claim + mark published through the store, no bus, `DISPATCHERS` connections.
async fn sql_floor(rows: usize) -> Throughput {
    let db = TestDb::create().await;
    seed(&db, rows, "pending", Duration::ZERO).await;
    let watch = Stopwatch::start();
    let workers: Vec<_> = (0..DISPATCHERS)
        .map(|w| {
            let store = PgOutboxStore::new(Db::new(db.settings.clone()));
            tokio::spawn(async move {
                let mut done = 0;
                loop {
                    let owner = format!("floor-{w}");
                    let claimed = store
                        .claim_batch(BATCH, Duration::from_secs(60), &owner)
                        .await
                        .expect("claim");
                    if claimed.is_empty() {
                        return done;
                    }
                    done += claimed.len();
                    mark_published(&store, &owner, &claimed).await;
                }
            })
        })
        .collect();
    let mut total = 0;
    for w in workers {
        total += w.await.expect("worker");
    }
    assert_eq!(total, rows);
    watch.stop(total)
}

/// The reference: a plain lease queue's two statements, claim (`UPDATE … WHERE id IN (SELECT …
/// FOR UPDATE SKIP LOCKED) RETURNING`) then mark published, sent as raw SQL on `DISPATCHERS`
/// connections to the same seeded table, through its plain pending index, with no per-aggregate
/// order and no promotion.
async fn plain_sql_reference(rows: usize) -> Throughput {
    const CLAIM: &str = "
        UPDATE outbox SET locked_until = now() + interval '60 seconds', locked_by = $2,
                          attempts = attempts + 1
        WHERE id IN (SELECT id FROM outbox
                     WHERE status = 'pending' AND next_attempt_at <= now()
                       AND (locked_until IS NULL OR locked_until <= now())
                     ORDER BY next_attempt_at, id LIMIT $1 FOR UPDATE SKIP LOCKED)
        RETURNING id, event_id, tenant_id, aggregate_type, aggregate_id, aggregate_version,
                  event_type, schema_version, payload, metadata, attempts, created_at";
    const MARK: &str = "
        UPDATE outbox SET status = 'published', published_at = now(), locked_until = NULL
        WHERE id = ANY($1)";
    let db = TestDb::create().await;
    seed(&db, rows, "pending", Duration::ZERO).await;
    let mut clients = Vec::new();
    for _ in 0..DISPATCHERS {
        clients.push(db.client().await);
    }
    let watch = Stopwatch::start();
    let workers: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(w, client)| {
            tokio::spawn(async move {
                let claim = client.prepare(CLAIM).await.expect("prepare");
                let mark = client.prepare(MARK).await.expect("prepare");
                let owner = format!("plain-{w}");
                let mut done = 0;
                loop {
                    let claimed = client
                        .query(&claim, &[&BATCH, &owner])
                        .await
                        .expect("claim");
                    if claimed.is_empty() {
                        return done;
                    }
                    done += claimed.len();
                    let ids: Vec<i64> = claimed.iter().map(|r| r.get(0)).collect();
                    client.execute(&mark, &[&ids]).await.expect("mark");
                }
            })
        })
        .collect();
    let mut total = 0;
    for w in workers {
        total += w.await.expect("worker");
    }
    assert_eq!(total, rows);
    watch.stop(total)
}

/// 2 and 3: the dispatcher loop publishing to the standalone SNS endpoint.
async fn dispatcher_loop(rows: usize, latency: Duration) -> (Throughput, usize) {
    dispatcher_loop_of(DISPATCHERS, rows, latency).await
}

async fn dispatcher_loop_of(
    dispatchers: usize,
    rows: usize,
    latency: Duration,
) -> (Throughput, usize) {
    let db = TestDb::create().await;
    seed(&db, rows, "pending", Duration::ZERO).await;
    let endpoint = FaultProxy::standalone_sns().await;
    endpoint.set_latency(latency);
    let target = Target::Sns {
        topic_arn: "arn:aws:sns:us-east-1:123456789012:bench".into(),
    };
    let rate = timed_drain(&db, dispatchers, &endpoint.endpoint, target, rows).await;
    let calls = endpoint
        .stats
        .publish_calls
        .load(std::sync::atomic::Ordering::Relaxed);
    (rate, calls)
}

/// Drains `db`'s `rows` pending rows with `dispatchers` dispatchers to `target`.
async fn timed_drain(
    db: &TestDb,
    dispatchers: usize,
    endpoint: &str,
    target: Target,
    rows: usize,
) -> Throughput {
    let mut drains = Vec::new();
    for _ in 0..dispatchers {
        drains.push(dispatcher(db, endpoint, target.clone(), config()).await);
    }
    let watch = Stopwatch::start();
    let deadline = Instant::now() + Duration::from_secs(600);
    let summaries = futures_util::future::join_all(drains.iter().map(|d| d.drain(deadline))).await;
    let throughput = watch.stop(rows);
    let published: usize = summaries
        .into_iter()
        .map(|s| s.expect("drain").published)
        .sum();
    assert_eq!(published, rows);
    throughput
}

/// 4: a producer commits events of tenant `quiet` at `rate`/s for `seconds` while dispatchers
/// drain continuously; latency from the row's commit to its arrival at the endpoint. With a
/// `backlog`, another tenant has that many events waiting, older than all of them, when the
/// producer starts; the last figure is how many of them were still waiting when it stopped.
async fn commit_to_publish(
    rate: usize,
    seconds: u64,
    idle_elsewhere: bool,
    backlog: usize,
) -> (f64, f64, f64, usize, i64) {
    let db = TestDb::create().await;
    let client = db.client().await;
    if backlog > 0 {
        seed(&db, backlog, "pending", Duration::ZERO).await;
        client
            .batch_execute("VACUUM ANALYZE outbox")
            .await
            .expect("vacuum");
    }
    // A session left idle in a write transaction in another database of the cluster for the
    // whole run (it holds an xid, so the old commit-order horizon could not pass it).
    let other = TestDb::create().await;
    let mut idle = other.client().await;
    let idle_tx = idle.transaction().await.expect("begin elsewhere");
    if idle_elsewhere {
        idle_tx
            .batch_execute("CREATE TABLE backfill (n int); INSERT INTO backfill VALUES (1)")
            .await
            .expect("write elsewhere");
    }
    // The producer stamps commit time itself: clock_timestamp() at the end of its transaction.
    client
        .batch_execute("ALTER TABLE outbox ADD COLUMN bench_committed_at timestamptz")
        .await
        .expect("bench column");
    let endpoint = FaultProxy::standalone_sns().await;
    let target = Target::Sns {
        topic_arn: "arn:aws:sns:us-east-1:123456789012:bench".into(),
    };
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    // The lane polls as often as an idle dispatcher does below (5 ms), unless
    // `BENCH_LANE_POLL_MS` says otherwise (`bench::drain_config`).
    let config = match std::env::var("BENCH_LANE_POLL_MS") {
        Ok(_) => config(),
        Err(_) => DispatcherConfig {
            lane_poll: Some(Duration::from_millis(5)),
            ..config()
        },
    };
    for _ in 0..DISPATCHERS {
        let d = dispatcher(&db, &endpoint.endpoint, target.clone(), config.clone()).await;
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let summary = d
                    .drain(Instant::now() + Duration::from_secs(60))
                    .await
                    .expect("drain");
                if summary.published == 0 {
                    // An idle dispatcher polls; in Lambda the schedule (and the kick) do this.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }));
    }
    let producer = db.client().await;
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let end = Instant::now() + Duration::from_secs(seconds);
    let mut next = Instant::now();
    let mut produced = 0usize;
    while Instant::now() < end {
        producer
            .batch_execute(&format!(
                "BEGIN;
                 INSERT INTO outbox (event_id, tenant_id, aggregate_type, aggregate_id, aggregate_version,
                                     event_type, schema_version, payload, metadata, bench_committed_at)
                 VALUES (gen_random_uuid(), 'quiet', 'payment', 'lat{produced}', 1, 'payment.paid', 1,
                         '{{\"paymentId\":\"lat\"}}', '{{\"correlation_id\":\"b\",\"source\":\"payments\"}}',
                         clock_timestamp());
                 COMMIT;"
            ))
            .await
            .expect("produce");
        produced += 1;
        next += interval;
        tokio::time::sleep_until(next.into()).await;
    }
    let backlog_left = db
        .count(
            &client,
            "outbox WHERE tenant_id = 'bench' AND status = 'pending'",
        )
        .await;
    // Let the last ones go out.
    let settle = Instant::now();
    while db
        .count(
            &client,
            "outbox WHERE tenant_id = 'quiet' AND status = 'pending'",
        )
        .await
        > 0
        && settle.elapsed() < Duration::from_secs(60)
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in tasks {
        t.await.expect("dispatcher task");
    }
    idle_tx
        .rollback()
        .await
        .expect("end the transaction elsewhere");
    let arrivals = endpoint.stats.arrivals.lock().unwrap().clone();
    let latencies = arrival_latencies(&client, "bench_committed_at", &arrivals, produced).await;
    (
        pct(&latencies, 0.5),
        pct(&latencies, 0.99),
        pct(&latencies, 1.0),
        produced,
        backlog_left,
    )
}

/// 5: claim latency (batch of 100, each claim marked published right after) with `retained`
/// published rows in the table.
async fn retained_claim_latency(retained: usize, claims: usize) -> (f64, f64) {
    let db = TestDb::create().await;
    seed(&db, retained, "published", Duration::ZERO).await;
    seed(&db, claims * 100, "pending", Duration::ZERO).await;
    if retained >= 1_000_000 {
        let client = db.client().await;
        let plan = pg_outbox::postgres::outbox::explain_claim(&client, 100, true)
            .await
            .expect("explain");
        println!("\nEXPLAIN ANALYZE of the claim, {retained} published rows retained, {} pending:\n\n```\n{plan}\n```\n", claims * 100);
    }
    let latency = bench::claim_latency(&db, claims).await;
    db.drop_database().await;
    latency
}

/// 6: claims of 500 with `parked` aggregates parked behind a dead first event and `parked`
/// heads backing off for an hour, all older than the fresh rows claimed.
async fn parked_claim_latency(parked: usize, claims: usize) -> (f64, f64) {
    let db = TestDb::create().await;
    bench::seed_parked_and_backing_off(&db.client().await, parked).await;
    seed(&db, claims * 500, "pending", Duration::ZERO).await;
    bench::claim_latency_of(&db, claims, 500).await
}

#[tokio::main]
async fn main() {
    if std::env::var("BENCH_ONLY").as_deref() == Ok("order") {
        return order_benchmarks().await;
    }
    if std::env::var("BENCH_ONLY").as_deref() == Ok("retention-plans") {
        return retention_plans().await;
    }
    let rows = env_usize("BENCH_ROWS", 200_000);
    let retained = env_usize("BENCH_RETAINED", 1_000_000);
    if std::env::var("BENCH_ONLY").as_deref() == Ok("feed") {
        return feed_benchmarks(env_usize("BENCH_FEED_RETAINED", 5_000_000)).await;
    }
    if std::env::var("BENCH_ONLY").as_deref() == Ok("nats") {
        return nats_benchmarks(env_usize("BENCH_NATS_ROWS", 100_000)).await;
    }

    if std::env::var("BENCH_ONLY").as_deref() == Ok("tenants") {
        return tenant_benchmarks(env_usize("BENCH_BACKLOG", 200_000)).await;
    }

    if std::env::var("BENCH_ONLY").as_deref() == Ok("drain") {
        // One drain alone, e.g. under a profiler or to compare two builds.
        let latency = Duration::from_millis(env_usize("BENCH_LATENCY_MS", 0) as u64);
        let dispatchers = env_usize("BENCH_DISPATCHERS", DISPATCHERS);
        let _split = std::env::var("BENCH_SEPARATE_CPUS")
            .is_ok_and(|v| v == "1")
            .then(bench::SeparateCpus::pin)
            .flatten();
        let (drain, calls) = dispatcher_loop_of(dispatchers, rows, latency).await;
        return println!(
            "drain, {dispatchers} dispatcher(s), {} ms per call: {:.0} rows/s, {calls} calls, \
             CPU per row: postgres {:.0} µs, bench process {:.0} µs",
            latency.as_millis(),
            drain.rate,
            drain.cpu.postgres_us,
            drain.cpu.own_us
        );
    }
    throughput_table(rows, "all processes on all CPUs").await;
    if let Some(_split) = bench::SeparateCpus::pin() {
        throughput_table(
            rows,
            "PostgreSQL on one CPU, the dispatchers and the SNS stand-in on the other",
        )
        .await;
    }
    if std::env::var("BENCH_ONLY").as_deref() == Ok("throughput") {
        return;
    }

    let (p50, p99, max, produced, _) = commit_to_publish(1_000, 20, false, 0).await;
    println!("\n## Commit-to-publish latency (1000 events/s committed for 20 s, {DISPATCHERS} dispatchers polling every 5 ms when idle)\n");
    println!("| events | p50 ms | p99 ms | max ms |");
    println!("|---|---|---|---|");
    println!("| {produced} | {p50:.1} | {p99:.1} | {max:.1} |");

    let (small50, small99) = retained_claim_latency(10_000, 200).await;
    let (large50, large99) = retained_claim_latency(retained, 200).await;
    println!("## Claim latency (batch of 100, 200 claims each)\n");
    println!("| published rows retained | p50 ms | p99 ms |");
    println!("|---|---|---|");
    println!("| 10000 | {small50:.2} | {small99:.2} |");
    println!("| {retained} | {large50:.2} | {large99:.2} |");
    println!("\nratio (p50, large / small): {:.2}", large50 / small50);
}

/// A quiet tenant's commit-to-publish while another tenant has `backlog` events waiting, against
/// the same with nothing waiting, in one run.
async fn tenant_benchmarks(backlog: usize) {
    let rate = 100;
    let seconds = 15;
    let quiet = commit_to_publish(rate, seconds, false, 0).await;
    let busy = commit_to_publish(rate, seconds, false, backlog).await;
    println!("## A quiet tenant beside another tenant's backlog ({rate} events/s committed by the quiet tenant for {seconds} s, {DISPATCHERS} dispatchers, claims of {BATCH}, the lane polling every {} ms, 0 = not)\n", env_usize("BENCH_LANE_POLL_MS", 5));
    println!("| the other tenant's events waiting at the start | quiet tenant's events | p50 ms | p99 ms | max ms | the other's still waiting when the producer stopped |");
    println!("|---|---|---|---|---|---|");
    for (waiting, (p50, p99, max, produced, left)) in [(0, quiet), (backlog, busy)] {
        println!("| {waiting} | {produced} | {p50:.1} | {p99:.1} | {max:.1} | {left} |");
    }
    println!(
        "\nratio (p99, with / without the backlog): {:.2}",
        busy.1 / quiet.1
    );
}

/// Scenarios 0 to 3 in one table: the plain-SQL reference, the store floor, and the drain to a
/// zero-latency and a 20 ms SNS endpoint, with each one's CPU per row.
async fn throughput_table(rows: usize, placement: &str) {
    let plain = plain_sql_reference(rows).await;
    let floor = sql_floor(rows).await;
    let (zero, zero_calls) = dispatcher_loop(rows, Duration::ZERO).await;
    let (slow, slow_calls) = dispatcher_loop(rows, Duration::from_millis(20)).await;
    println!("## Dispatcher throughput ({DISPATCHERS} dispatchers, claims of {BATCH}, {rows} rows each; {placement})\n");
    println!("| scenario | rows/s | publish calls | ratio to plain SQL | ratio to store floor | postgres CPU µs/row | bench process CPU µs/row |");
    println!("|---|---|---|---|---|---|---|");
    let scenarios = [
        (
            "0. plain SQL: lease claim + mark, two statements, no order",
            plain,
            0,
        ),
        (
            "1. store floor: the store's claim + record outcomes, no bus",
            floor,
            0,
        ),
        (
            "2. dispatcher → zero-latency SNS endpoint",
            zero,
            zero_calls,
        ),
        (
            "3. dispatcher → SNS endpoint with 20 ms per call",
            slow,
            slow_calls,
        ),
    ];
    for (name, measured, calls) in &scenarios {
        println!(
            "| {name} | {:.0} | {calls} | {:.2} | {:.2} | {:.0} | {:.0} |",
            measured.rate,
            measured.rate / plain.rate,
            measured.rate / floor.rate,
            measured.cpu.postgres_us,
            measured.cpu.own_us
        );
    }
    println!();
    let memory_mb = dispatcher_memory_mb();
    println!("Per million events published ({placement}; the dispatcher's Lambda at {memory_mb} MB, billed for the wall time of its drains):\n");
    println!("| scenario | PostgreSQL CPU-seconds (claim + record) | dispatcher GB-seconds | bus requests |");
    println!("|---|---|---|---|");
    for (name, measured, calls) in &scenarios[2..] {
        // µs per row is CPU-seconds per million rows.
        let drain_seconds = rows as f64 / measured.rate;
        let gb_seconds = DISPATCHERS as f64 * drain_seconds * memory_mb / 1024.0;
        let per_million = 1e6 / rows as f64;
        println!(
            "| {name} | {:.0} | {:.0} | {:.0} |",
            measured.cpu.postgres_us,
            gb_seconds * per_million,
            *calls as f64 * per_million
        );
    }
    println!();
}

/// The dispatcher's memory: `MemorySize` of the template's function globals, or
/// `BENCH_MEMORY_MB`.
fn dispatcher_memory_mb() -> f64 {
    if let Some(mb) = std::env::var("BENCH_MEMORY_MB")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return mb;
    }
    let template =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../template.yaml"))
            .expect("template.yaml");
    template
        .lines()
        .find_map(|l| l.trim().strip_prefix("MemorySize:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("a MemorySize in template.yaml")
}

/// The claim redesign's figures: parked and backing-off rows ahead of the claim, and a write
/// transaction open in another database while events are committed and published.
async fn order_benchmarks() {
    let parked = env_usize("BENCH_PARKED", 100_000);
    let (none50, none99) = parked_claim_latency(0, 40).await;
    let (many50, many99) = parked_claim_latency(parked, 40).await;
    println!("## Claim of 500 with parked and backing-off rows ahead (40 claims each)\n");
    println!("| rows ahead of the fresh ones | p50 ms | p99 ms |");
    println!("|---|---|---|");
    println!("| none | {none50:.2} | {none99:.2} |");
    println!("| {parked} parked + {parked} backing off | {many50:.2} | {many99:.2} |");
    println!("\nratio (p50, with / without): {:.2}\n", many50 / none50);

    let (p50, p99, max, produced, _) = commit_to_publish(1_000, 20, false, 0).await;
    let (ip50, ip99, imax, iproduced, _) = commit_to_publish(1_000, 20, true, 0).await;
    println!("## Commit-to-publish latency (1000 events/s for 20 s, {DISPATCHERS} dispatchers polling every 5 ms when idle)\n");
    println!("| while | events | p50 ms | p99 ms | max ms |");
    println!("|---|---|---|---|---|");
    println!("| nothing else runs | {produced} | {p50:.1} | {p99:.1} | {max:.1} |");
    println!("| a write transaction stays open in another database for the whole run | {iproduced} | {ip50:.1} | {ip99:.1} | {imax:.1} |");
}

/// Updates and HOT updates of the outbox so far (statistics flushed first).
async fn hot_counts(client: &tokio_postgres::Client) -> (i64, i64) {
    client
        .batch_execute("SELECT pg_stat_force_next_flush()")
        .await
        .expect("flush stats");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let row = client
        .query_one(
            "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'outbox'",
            &[],
        )
        .await
        .expect("stats");
    (row.get(0), row.get(1))
}

/// Retention at 5M, looked into: for random (v4) and time-ordered (v7) event ids, the claim's and
/// the mark's `EXPLAIN (ANALYZE, BUFFERS)`, claim latency of 200 claims of 100 (each marked
/// published), and the share of HOT updates meanwhile.
async fn retention_plans() {
    let retained = env_usize("BENCH_RETAINED_LARGE", 5_000_000);
    println!("## Claim and mark with {retained} published rows retained\n");
    for ids in [bench::EventIds::Random, bench::EventIds::TimeOrdered] {
        let db = TestDb::create().await;
        let week = Duration::from_secs(8 * 86_400);
        bench::seed_with_ids(&db, retained, "published", week, ids).await;
        bench::seed_with_ids(&db, 30_000, "pending", Duration::ZERO, ids).await;
        let client = db.client().await;
        let (upd0, hot0) = hot_counts(&client).await;
        let (p50, p99) = bench::claim_latency(&db, 200).await;
        let (upd1, hot1) = hot_counts(&client).await;
        let claim = pg_outbox::postgres::outbox::explain_claim(&client, 100, true)
            .await
            .expect("explain claim");
        let mark = pg_outbox::postgres::outbox::explain_mark(&client, 100)
            .await
            .expect("explain mark");
        let size: String = client
            .query_one(
                "SELECT string_agg(indexrelname || ' ' || pg_size_pretty(pg_relation_size(indexrelid)), ', ')
                 FROM pg_stat_user_indexes WHERE relname = 'outbox'",
                &[],
            )
            .await
            .expect("sizes")
            .get(0);
        println!(
            "### event ids {ids:?}\n\nclaim p50 {p50:.2} ms, p99 {p99:.2} ms; updates {} of which HOT {} ({:.0} %)\n\nindexes: {size}\n\nclaim of 100:\n\n```\n{claim}\n```\n\nmark of 100:\n\n```\n{mark}\n```\n",
            upd1 - upd0,
            hot1 - hot0,
            100.0 * (hot1 - hot0) as f64 / ((upd1 - upd0).max(1)) as f64
        );
        drop(client);
        db.drop_database().await;
    }
}

/// Pages of the events feed with `retained` published events of the tenant: `pages` reads of 100
/// events after a random cursor, then `pages` polls at the end of the feed (an empty page).
async fn feed_pages(retained: usize, pages: usize) -> ((f64, f64), (f64, f64)) {
    use payments::domain::TenantId;
    use pg_outbox::feed::{FeedCursor, FeedQuery};
    use pg_outbox::ports::EventFeedStore;
    let db = TestDb::create().await;
    seed(&db, retained, "published", Duration::ZERO).await;
    let client = db.client().await;
    let (low, high): (i64, i64) = {
        let row = client
            .query_one(
                "SELECT min(feed_position), max(feed_position) FROM outbox",
                &[],
            )
            .await
            .expect("positions");
        (row.get(0), row.get(1))
    };
    let store = payments::store::PgPaymentStore::new(Db::new(db.settings.clone()));
    let tenant = TenantId::parse("bench").expect("tenant");
    let measure = |positions: Vec<i64>| {
        let store = &store;
        let tenant = tenant.clone();
        async move {
            let mut latencies = Vec::with_capacity(positions.len());
            for position in positions {
                let query = FeedQuery::parse(
                    tenant.clone(),
                    [
                        ("limit", "100"),
                        ("after", FeedCursor { position }.encode(&tenant).as_str()),
                    ],
                )
                .expect("query");
                let started = Instant::now();
                let page = store.feed_page(&query).await.expect("page");
                latencies.push(started.elapsed());
                assert!(page.events.len() <= 100);
            }
            latencies.sort();
            (pct(&latencies, 0.50), pct(&latencies, 0.99))
        }
    };
    // Warm-up, then the measured reads.
    measure((0..50).map(|_| fastrand::i64(low..high)).collect()).await;
    let middle = measure(
        (0..pages)
            .map(|_| fastrand::i64(low..high.max(low + 1) - 100))
            .collect(),
    )
    .await;
    let tail = measure(vec![high; pages]).await;
    drop(client);
    db.drop_database().await;
    (middle, tail)
}

async fn feed_benchmarks(retained: usize) {
    let (small_mid, small_tail) = feed_pages(10_000, 2_000).await;
    let (large_mid, large_tail) = feed_pages(retained, 2_000).await;
    println!(
        "## Events feed: one page of 100 through the store (2000 pages each, one connection)\n"
    );
    println!("| published events retained | page at a random cursor p50 / p99 ms | poll at the end p50 / p99 ms |");
    println!("|---|---|---|");
    println!(
        "| 10000 | {:.2} / {:.2} | {:.2} / {:.2} |",
        small_mid.0, small_mid.1, small_tail.0, small_tail.1
    );
    println!(
        "| {retained} | {:.2} / {:.2} | {:.2} / {:.2} |",
        large_mid.0, large_mid.1, large_tail.0, large_tail.1
    );
    println!(
        "\nratio (p50, {retained} / 10000): page {:.2}, poll {:.2}",
        large_mid.0 / small_mid.0,
        large_tail.0 / small_tail.0
    );
}

/// The drain to NATS JetStream (a nats-server of its own, file storage) beside the same drain to
/// the zero-latency SNS stand-in, `rows` each, two dispatchers, in one run.
async fn nats_benchmarks(rows: usize) {
    let sns = dispatcher_loop(rows, Duration::ZERO).await.0.rate;
    let nats = outbox_tests::nats::PrivateNats::start().await;
    nats.stream("OUTBOX", "outbox", None).await;
    let db = TestDb::create().await;
    seed(&db, rows, "pending", Duration::ZERO).await;
    let target = Target::Nats(nats.settings("outbox"));
    let rate = timed_drain(&db, DISPATCHERS, "http://127.0.0.1:9", target, rows)
        .await
        .rate;
    let js = nats.jetstream().await;
    let stored = js
        .get_stream("OUTBOX")
        .await
        .expect("stream")
        .get_info()
        .await
        .expect("info")
        .state
        .messages;
    assert_eq!(stored as usize, rows);
    db.drop_database().await;
    println!("## Drain to NATS JetStream beside SNS ({DISPATCHERS} dispatchers, claims of {BATCH}, {rows} rows each)\n");
    println!("| target | rows/s |");
    println!("|---|---|");
    println!("| zero-latency SNS stand-in (loopback HTTP) | {sns:.0} |");
    println!("| NATS JetStream (nats-server, file storage, every ack awaited) | {rate:.0} |");
    println!("\nratio (JetStream / SNS): {:.2}", rate / sns);
}
