//! (Past 400 lines: the operations benchmarks measured in one run, so their ratios compare.)
//!
//! Operations benchmarks, in one run on the local PostgreSQL:
//! 1. retention: claim latency and dispatcher throughput with 10k published rows retained, with
//!    5M retained, and with those 5M being deleted by a cleanup running back to back meanwhile;
//! 2. wake-up: commit-to-publish latency of commands made through the real handler, with the
//!    dispatcher started only by a one-minute schedule, and with the schedule plus the command
//!    handler's wake-up call (an asynchronous invoke over HTTP to a stand-in for Lambda).
//!
//! Run: `scripts/bench` (or `cargo bench -p outbox-tests --bench operations` with `.local/env`
//! sourced; `BENCH_ONLY=retention-runs BENCH_RUNS=3` repeats the 5M-vs-10k ratios alone).
//! `BENCH_RETAINED_LARGE` (default 5000000), `BENCH_OPS_ROWS` (rows drained per
//! throughput figure, default 100000), `BENCH_WAKE_SECONDS` (per latency scenario, default 150),
//! `BENCH_WAKE_RATE` (commands/s, default 20), `BENCH_INVOKE_START_MS` (time the stand-in takes
//! to start a function after an invoke, default 100: a warm Lambda start, conservatively).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outbox_tests::aws::sdk_config_for;
use outbox_tests::bench::{arrival_latencies, claim_latency, env_usize, pct, seed, Backend};
use outbox_tests::fake_lambda::{FakeLambda, Invocation};
use outbox_tests::fault_proxy::FaultProxy;
use outbox_tests::{dispatcher, invoke, paid_body, paid_request, TestDb};
use payment_command::{HandlerConfig, PaymentCommandHandler};
use payments::store::PgPaymentStore;
use pg_outbox::aws::wake::LambdaWake;
use pg_outbox::aws::BusPublisher;
use pg_outbox::dispatcher::{DispatcherConfig, OutboxDispatcher, Target};
use pg_outbox::ports::WakeDispatcher;
use pg_outbox::postgres::admin;
use pg_outbox::postgres::outbox::PgOutboxStore;
use pg_outbox::postgres::Db;

const DISPATCHERS: usize = 2;
const TOPIC: &str = "arn:aws:sns:us-east-1:123456789012:bench";
const WEEK: Duration = Duration::from_secs(7 * 86_400);

fn throughput_config() -> DispatcherConfig {
    DispatcherConfig {
        batch_size: 500,
        safety_margin: Duration::ZERO,
        retention: None,
        ..DispatcherConfig::default()
    }
}

/// The `rows` pending rows left drained by two dispatchers to a zero-latency SNS endpoint: rows/s.
async fn drain_throughput(db: &TestDb, rows: usize) -> f64 {
    let endpoint = FaultProxy::standalone_sns().await;
    let target = Target::Sns {
        topic_arn: TOPIC.into(),
    };
    let mut dispatchers = Vec::new();
    for _ in 0..DISPATCHERS {
        dispatchers
            .push(dispatcher(db, &endpoint.endpoint, target.clone(), throughput_config()).await);
    }
    let started = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(900);
    let summaries =
        futures_util::future::join_all(dispatchers.iter().map(|d| d.drain(deadline))).await;
    let published: usize = summaries
        .into_iter()
        .map(|s| s.expect("drain").published)
        .sum();
    assert_eq!(published, rows);
    published as f64 / started.elapsed().as_secs_f64()
}

/// A cleanup on its own connection, paced by `pace`, until stopped or nothing is left.
fn start_cleanup(
    db: &TestDb,
    pace: admin::Pace,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<admin::CleanupRun> {
    let settings = db.settings.clone();
    tokio::spawn(async move {
        let client = settings.connect().await.expect("cleanup connection");
        admin::run_cleanup(
            &client,
            admin::Expiring::Outbox,
            WEEK,
            admin::Batches {
                size: 5_000,
                pace,
                max_statements: None,
            },
            &stop,
            |_| {},
        )
        .await
        .expect("cleanup")
    })
}

const CLAIMS: usize = 200;

/// Seeds the pending rows both measurements consume, (optionally) starts a cleanup, measures
/// claim latency then throughput; returns them with what the cleanup did meanwhile.
async fn measure(
    db: &TestDb,
    rows: usize,
    cleanup: Option<admin::Pace>,
) -> (f64, f64, f64, Option<(u64, f64, bool)>) {
    seed(db, CLAIMS * 100 + rows, "pending", Duration::ZERO).await;
    let stop = Arc::new(AtomicBool::new(false));
    let running = cleanup.map(|pace| start_cleanup(db, pace, stop.clone()));
    let (p50, p99) = claim_latency(db, CLAIMS).await;
    let tput = drain_throughput(db, rows).await;
    let during = match running {
        Some(task) => {
            let still_running = !task.is_finished();
            stop.store(true, Ordering::Relaxed);
            let run = task.await.expect("cleanup task");
            Some((run.deleted, run.seconds, still_running))
        }
        None => None,
    };
    (p50, p99, tput, during)
}

struct RetentionRow {
    label: String,
    claim_p50: f64,
    claim_p99: f64,
    rows_per_s: f64,
}

async fn retention_benchmarks(large: usize, rows: usize) {
    let mut results = Vec::new();

    let small = TestDb::create().await;
    seed(&small, 10_000, "published", Duration::ZERO).await;
    let (p50, p99, tput, _) = measure(&small, rows, None).await;
    results.push(RetentionRow {
        label: "10,000 published rows retained".into(),
        claim_p50: p50,
        claim_p99: p99,
        rows_per_s: tput,
    });
    drop(small);

    // The large set was published eight days ago: past a 7-day retention, so the cleanup
    // scenario below deletes exactly these rows.
    let big = TestDb::create().await;
    let seeding = Instant::now();
    seed(&big, large, "published", Duration::from_secs(8 * 86_400)).await;
    let seeded_in = seeding.elapsed().as_secs_f64();
    let size: String = big
        .client()
        .await
        .query_one(
            "SELECT pg_size_pretty(pg_total_relation_size('outbox'))",
            &[],
        )
        .await
        .expect("size")
        .get(0);
    let (p50, p99, tput, _) = measure(&big, rows, None).await;
    results.push(RetentionRow {
        label: format!("{large} published rows retained ({size})"),
        claim_p50: p50,
        claim_p99: p99,
        rows_per_s: tput,
    });
    for (label, pace) in [
        (
            "the dispatchers' own retention pace (one 5,000-row statement a second each, two dispatchers)",
            admin::Pace::Every(Duration::from_millis(500)),
        ),
        (
            "`outboxctl cleanup` (default duty cycle 0.25)",
            admin::Pace::Duty(0.25),
        ),
        (
            "a back-to-back cleanup (`--duty-cycle 1`, the worst case)",
            admin::Pace::Duty(1.0),
        ),
    ] {
        let (p50, p99, tput, during) = measure(&big, rows, Some(pace)).await;
        let (deleted, seconds, still_running) = during.expect("cleanup ran");
        assert!(deleted > 0, "{label} deleted nothing");
        results.push(RetentionRow {
            label: format!(
                "same, while {label} deletes them: {deleted} rows in the {seconds:.1} s of the measurement{}",
                if still_running { "" } else { " (it finished first)" }
            ),
            claim_p50: p50,
            claim_p99: p99,
            rows_per_s: tput,
        });
    }
    // Finish the cleanup back to back and time it alone.
    let rest = start_cleanup(
        &big,
        admin::Pace::Duty(1.0),
        Arc::new(AtomicBool::new(false)),
    )
    .await
    .expect("cleanup task");
    let (rest, rest_seconds) = (rest.deleted, rest.seconds);
    big.drop_database().await;

    println!("## Retention: claim latency and throughput with published rows retained\n");
    println!(
        "Claims of 100 ({CLAIMS} claims, each marked published), then {rows} rows drained by {DISPATCHERS} dispatchers \
         (claims of 500) to a zero-latency SNS endpoint. Seeding {large} rows took {seeded_in:.0} s.\n"
    );
    println!("| outbox | claim p50 ms | claim p99 ms | dispatcher rows/s | claim p50 ratio | throughput ratio |");
    println!("|---|---|---|---|---|---|");
    let base = &results[0];
    for r in &results {
        println!(
            "| {} | {:.2} | {:.2} | {:.0} | {:.2} | {:.2} |",
            r.label,
            r.claim_p50,
            r.claim_p99,
            r.rows_per_s,
            r.claim_p50 / base.claim_p50,
            base.rows_per_s / r.rows_per_s
        );
    }
    println!(
        "\nCleanup alone, back to back (the rest after the measurements): {rest} rows in {rest_seconds:.1} s = {:.0} rows/s.\n",
        rest as f64 / rest_seconds.max(1e-9)
    );
}

/// One simulated Lambda instance of the dispatcher: busy while an invocation runs.
struct Instance {
    dispatcher: OutboxDispatcher<PgOutboxStore, BusPublisher>,
    busy: AtomicBool,
}

/// The dispatcher function as Lambda runs it: at most `instances.len()` at once (reserved
/// concurrency); an asynchronous invoke that finds them all busy waits in Lambda's queue until
/// one is free, for at most a minute (the template's `MaximumEventAgeInSeconds: 60`); each
/// invocation starts `start_delay` after it is taken and drains until 60 s minus the 10 s safety
/// margin, polling every 100 ms.
fn lambda_service(
    instances: Arc<Vec<Instance>>,
    start_delay: Duration,
    invocations: Arc<AtomicUsize>,
) -> Arc<dyn Fn(Instant) + Send + Sync> {
    Arc::new(move |at| {
        let instances = instances.clone();
        let invocations = invocations.clone();
        tokio::spawn(async move {
            let instance = loop {
                let free = instances.iter().find(|i| {
                    i.busy
                        .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
                        .is_ok()
                });
                match free {
                    Some(instance) => break instance,
                    None if at.elapsed() > Duration::from_secs(60) => return,
                    None => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            };
            invocations.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(start_delay).await;
            let _ = instance
                .dispatcher
                .drain(Instant::now() + Duration::from_secs(60))
                .await;
            instance.busy.store(false, Ordering::SeqCst);
        });
    })
}

/// Paid commands for new payments, one every `interval` from `first` until `end`.
async fn produce<W: WakeDispatcher>(
    handler: &PaymentCommandHandler<PgPaymentStore, W>,
    producer: usize,
    first: Instant,
    interval: Duration,
    end: Instant,
) -> usize {
    let mut next = first;
    let mut made = 0;
    while Instant::now() < end {
        tokio::time::sleep_until(next.into()).await;
        let request = paid_request(
            "bench",
            &format!("w{producer}_{made}"),
            paid_body(1_250, "EUR"),
        );
        assert_eq!(invoke(handler, request).await.status, 200);
        made += 1;
        next += interval;
    }
    made
}

struct WakeResult {
    p50: f64,
    p99: f64,
    max: f64,
    events: usize,
    invocations: usize,
    wakes: usize,
}

/// Commands through the real handler at `rate`/s for `seconds`; the dispatcher runs on a
/// one-minute schedule, and (with `wake`) when a command wakes it.
async fn wake_scenario(wake: bool, seconds: u64, rate: usize, start_delay: Duration) -> WakeResult {
    let db = TestDb::create().await;
    let sns = FaultProxy::standalone_sns().await;
    let target = Target::Sns {
        topic_arn: TOPIC.into(),
    };
    let config = DispatcherConfig {
        batch_size: 100,
        safety_margin: Duration::from_secs(10),
        idle_poll: Some(Duration::from_millis(100)),
        retention: None,
        ..DispatcherConfig::default()
    };
    let mut instances = Vec::new();
    for _ in 0..DISPATCHERS {
        instances.push(Instance {
            dispatcher: dispatcher(&db, &sns.endpoint, target.clone(), config.clone()).await,
            busy: AtomicBool::new(false),
        });
    }
    let invocations = Arc::new(AtomicUsize::new(0));
    let service = lambda_service(Arc::new(instances), start_delay, invocations.clone());
    let on_invoke: Arc<dyn Fn(Invocation) + Send + Sync> = {
        let service = service.clone();
        Arc::new(move |inv: Invocation| service(inv.at))
    };
    let lambda = FakeLambda::start_with(on_invoke).await;
    let sdk = sdk_config_for(&lambda.endpoint).await;

    // The schedule rule: now and every minute.
    let schedule = {
        let service = service.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tick.tick().await;
                service(Instant::now());
            }
        })
    };

    // Two command handler instances, each at half the rate.
    let end = Instant::now() + Duration::from_secs(seconds);
    let produced = Arc::new(Mutex::new(0usize));
    let mut producers = Vec::new();
    for p in 0..2 {
        let store = PgPaymentStore::new(Db::new(db.settings.clone()));
        let handler = PaymentCommandHandler::new(store, HandlerConfig::default());
        let lambda_client = aws_sdk_lambda::Client::new(&sdk);
        let produced = produced.clone();
        producers.push(tokio::spawn(async move {
            let interval = Duration::from_secs_f64(2.0 / rate as f64);
            let first = Instant::now() + interval.mul_f64(p as f64 / 2.0);
            let made = if wake {
                let wake = LambdaWake::new(lambda_client, "outbox-dispatcher", "payments");
                produce(&handler.with_wake(wake), p, first, interval, end).await
            } else {
                produce(&handler, p, first, interval, end).await
            };
            *produced.lock().unwrap() += made;
        }));
    }
    for p in producers {
        p.await.expect("producer");
    }
    let produced = *produced.lock().unwrap();
    // Wait for the last events (the next scheduled run at the latest).
    let settle = Instant::now();
    while sns.stats.event_ids.lock().unwrap().len() < produced
        && settle.elapsed() < Duration::from_secs(70)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    schedule.abort();
    // created_at is the command transaction's start: a few ms before its commit, so the
    // latencies below are slightly pessimistic.
    let arrivals = sns.stats.arrivals.lock().unwrap().clone();
    let latencies = arrival_latencies(&db.client().await, "created_at", &arrivals, produced).await;
    WakeResult {
        p50: pct(&latencies, 0.5),
        p99: pct(&latencies, 0.99),
        max: pct(&latencies, 1.0),
        events: produced,
        invocations: invocations.load(Ordering::Relaxed),
        wakes: lambda.invocations().len(),
    }
}

async fn wake_benchmarks(seconds: u64, rate: usize, start_delay: Duration) {
    let without = wake_scenario(false, seconds, rate, start_delay).await;
    let with = wake_scenario(true, seconds, rate, start_delay).await;
    println!("## Commit-to-publish latency: one-minute schedule, with and without the wake-up\n");
    println!(
        "{rate} commands/s through the payment command handler (2 instances) for {seconds} s; the dispatcher \
         (reserved concurrency {DISPATCHERS}, 60 s timeout, 10 s safety margin, polling every 100 ms while it runs) \
         starts {} ms after an invoke. Latency = the event's arrival at the SNS endpoint minus its command \
         transaction's start.\n",
        start_delay.as_millis()
    );
    println!("| started by | events | p50 ms | p99 ms | max ms | dispatcher invocations | wake-up invokes |");
    println!("|---|---|---|---|---|---|---|");
    for (label, r) in [
        ("schedule only", &without),
        ("schedule + wake-up after commit", &with),
    ] {
        println!(
            "| {label} | {} | {:.0} | {:.0} | {:.0} | {} | {} |",
            r.events, r.p50, r.p99, r.max, r.invocations, r.wakes
        );
    }
    println!(
        "\np99 ratio (schedule only / with wake-up): {:.1}\n",
        without.p99 / with.p99
    );
}

#[tokio::main]
async fn main() {
    let large = env_usize("BENCH_RETAINED_LARGE", 5_000_000);
    let rows = env_usize("BENCH_OPS_ROWS", 100_000);
    let seconds = env_usize("BENCH_WAKE_SECONDS", 150) as u64;
    let rate = env_usize("BENCH_WAKE_RATE", 20);
    let start_delay = Duration::from_millis(env_usize("BENCH_INVOKE_START_MS", 100) as u64);
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    if only.is_empty() || only == "wake" {
        wake_benchmarks(seconds, rate, start_delay).await;
    }
    if only.is_empty() || only == "retention" {
        retention_benchmarks(large, rows).await;
    }
    if only == "retention-runs" {
        retention_runs(large, rows, env_usize("BENCH_RUNS", 3)).await;
    }
}

/// The 5M-vs-10k ratios alone (no cleanup scenarios), `runs` times in a row, each run with fresh
/// databases: how much the ratios move from run to run. Each run also deletes
/// `RETENTION_SAMPLE` rows past a week's retention on both, through the retention function in
/// statements of 5,000 as the dispatchers run it: the CPU of the session's backend per row
/// deleted. The vacuum that follows is left out: a vacuum reads every index whole, whatever it
/// deleted, so one after 10,000 rows of 5,000,000 says nothing per row (autovacuum runs it once
/// a fifth of the table is dead; the lifecycle bench measures retention with its vacuum).
async fn retention_runs(large: usize, rows: usize, runs: usize) {
    println!("| run | 10k claim p50 ms | {large} claim p50 ms | claim p50 ratio | 10k rows/s | {large} rows/s | throughput ratio | retention µs/row, 10k | retention µs/row, {large} | retention ratio |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for run in 1..=runs {
        let small = TestDb::create().await;
        // Published eight days ago, as the large set: past a 7-day retention.
        seed(&small, 10_000, "published", Duration::from_secs(8 * 86_400)).await;
        let (small50, _, small_tput, _) = measure(&small, rows, None).await;
        let small_retention = retention_cpu(&small).await;
        small.drop_database().await;
        let big = TestDb::create().await;
        seed(&big, large, "published", Duration::from_secs(8 * 86_400)).await;
        let (big50, _, big_tput, _) = measure(&big, rows, None).await;
        let big_retention = retention_cpu(&big).await;
        big.drop_database().await;
        println!(
            "| {run} | {small50:.2} | {big50:.2} | {:.2} | {small_tput:.0} | {big_tput:.0} | {:.2} | {small_retention:.1} | {big_retention:.1} | {:.2} |",
            big50 / small50,
            small_tput / big_tput,
            big_retention / small_retention
        );
    }
}

/// Rows each run's retention measurement deletes (the small database's whole expired set).
const RETENTION_SAMPLE: usize = 10_000;

/// Deletes `RETENTION_SAMPLE` rows past a week's retention in statements of 5,000 (the
/// dispatchers' retention statement); its backend's CPU per row deleted.
async fn retention_cpu(db: &TestDb) -> f64 {
    let client = db.client().await;
    client
        .batch_execute("CHECKPOINT")
        .await
        .expect("checkpoint");
    // This session's backend alone: an autovacuum the drains started may be running.
    let backend = Backend::of(&client).await;
    let before = backend.cpu();
    let mut deleted = 0;
    while deleted < RETENTION_SAMPLE {
        let n: i32 = client
            .query_one(
                "SELECT outbox_delete_published(make_interval(secs => $1), 5000)",
                &[&(WEEK.as_secs_f64())],
            )
            .await
            .expect("retention")
            .get(0);
        assert!(n > 0, "only {deleted} rows past retention");
        deleted += n as usize;
    }
    backend.cpu().saturating_sub(before).as_secs_f64() * 1e6 / deleted as f64
}
