//! The dispatcher process's own share of a drain: its CPU and heap allocations per event, with
//! the SNS stand-in on a thread of its own so that neither its CPU nor its allocations are
//! counted. PostgreSQL's CPU per event is printed beside it. `scripts/profile-dispatcher` runs
//! this under `perf` and splits the dispatcher's CPU between its own code, the AWS SDK with its
//! HTTP stack, the PostgreSQL client and the runtime.
//!
//! Run: `cargo bench -p outbox-tests --bench client` with `.local/env` sourced; `BENCH_ROWS`
//! (default 100000) rows drained by `BENCH_DISPATCHERS` (default 2) dispatchers, claims of 500,
//! `BENCH_RUNS` (default 1) drains one after another.

use std::time::{Duration, Instant};

use outbox_tests::alloc_count::{self, Counting};
use outbox_tests::bench::{self, env_usize, seed, Stopwatch};
use outbox_tests::fault_proxy::FaultProxy;
use outbox_tests::{dispatcher, TestDb};
use pg_outbox::dispatcher::{DispatcherConfig, Target};

#[global_allocator]
static ALLOC: Counting = Counting;

const BATCH: i64 = 500;

fn config() -> DispatcherConfig {
    bench::drain_config(BATCH)
}

struct Run {
    rate: f64,
    postgres_us: f64,
    process_us: f64,
    stand_in_us: f64,
    allocations: f64,
    bytes: f64,
    calls: usize,
}

async fn drain(rows: usize, dispatchers: usize) -> Run {
    let db = TestDb::create().await;
    seed(&db, rows, "pending", Duration::ZERO).await;
    let endpoint = FaultProxy::standalone_sns_on_own_thread().await;
    let target = Target::Sns {
        topic_arn: "arn:aws:sns:us-east-1:123456789012:bench".into(),
    };
    let mut drains = Vec::new();
    for _ in 0..dispatchers {
        drains.push(dispatcher(&db, &endpoint.endpoint, target.clone(), config()).await);
    }
    let stand_in_before = endpoint.stand_in_cpu().expect("the stand-in's CPU");
    let (allocations_before, bytes_before) = alloc_count::counted();
    perf_control("enable");
    let watch = Stopwatch::start();
    let deadline = Instant::now() + Duration::from_secs(600);
    let summaries = futures_util::future::join_all(drains.iter().map(|d| d.drain(deadline))).await;
    let throughput = watch.stop(rows);
    perf_control("disable");
    let (allocations, bytes) = alloc_count::counted();
    let stand_in = endpoint.stand_in_cpu().expect("the stand-in's CPU") - stand_in_before;
    let published: usize = summaries
        .into_iter()
        .map(|s| s.expect("drain").published)
        .sum();
    assert_eq!(published, rows, "every row published");
    let calls = endpoint
        .stats
        .publish_calls
        .load(std::sync::atomic::Ordering::Relaxed);
    drop(drains);
    db.drop_database().await;
    let per_row = |n: f64| n / rows as f64;
    Run {
        rate: throughput.rate,
        postgres_us: throughput.cpu.postgres_us,
        process_us: throughput.cpu.own_us,
        stand_in_us: per_row(stand_in.as_secs_f64() * 1e6),
        allocations: per_row((allocations - allocations_before) as f64),
        bytes: per_row((bytes - bytes_before) as f64),
        calls,
    }
}

/// Under `perf record --control fifo:FIFO` (as `scripts/profile-dispatcher` runs it, with
/// `PERF_CONTROL_FIFO` naming that FIFO), samples only the drains, not the seeding.
fn perf_control(command: &str) {
    if let Ok(fifo) = std::env::var("PERF_CONTROL_FIFO") {
        std::fs::write(&fifo, format!("{command}\n")).expect("write perf's control FIFO");
    }
}

#[tokio::main]
async fn main() {
    // Under the profiler nothing is counted (counting would skew its figures): the columns say so.
    let counting = std::env::var_os("PERF_CONTROL_FIFO").is_none();
    if !counting {
        alloc_count::disable();
    }
    let rows = env_usize("BENCH_ROWS", 100_000);
    let dispatchers = env_usize("BENCH_DISPATCHERS", 2);
    let runs = env_usize("BENCH_RUNS", 1);
    println!("## The dispatcher's own share ({dispatchers} dispatchers, claims of {BATCH}, {rows} rows, SNS stand-in on its own thread)\n");
    println!("| run | rows/s | publish calls | PostgreSQL CPU µs/event | dispatcher CPU µs/event (process minus stand-in) | stand-in CPU µs/event | allocations/event | allocated bytes/event |");
    println!("|---|---|---|---|---|---|---|---|");
    for run in 1..=runs {
        let r = drain(rows, dispatchers).await;
        let (allocations, bytes) = if counting {
            (format!("{:.0}", r.allocations), format!("{:.0}", r.bytes))
        } else {
            ("not counted (profiler)".into(), "not counted".into())
        };
        println!(
            "| {run} | {:.0} | {} | {:.0} | {:.1} | {:.1} | {allocations} | {bytes} |",
            r.rate,
            r.calls,
            r.postgres_us,
            r.process_us - r.stand_in_us,
            r.stand_in_us,
        );
    }
}
