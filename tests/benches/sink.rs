//! Projection sink throughput: events applied per second through `ProjectionSink::apply_batch`,
//! in batches of 10 as SQS delivers them, against the local PostgreSQL. Each concurrent sink is
//! one Lambda instance with one connection and gets its own payments (as SQS FIFO groups, or
//! standard queues at steady state, would spread them).
//!
//! Run: `scripts/bench` (or `cargo bench -p outbox-tests --bench sink` with `.local/env` sourced).
//! `BENCH_PAYMENTS` sets the payments per run (default 8000, about 20000 events).

use std::time::Instant;

use outbox_tests::sink_fixtures::{payment_stream, sink, sqs_event};
use outbox_tests::TestDb;

#[tokio::main]
async fn main() {
    let payments: usize = std::env::var("BENCH_PAYMENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8_000);
    println!("| concurrent sinks | events | batches of | events/s |");
    println!("|---|---|---|---|");
    for sinks in [1usize, 2, 4] {
        let db = TestDb::create().await;
        // One stream per sink: disjoint payments, each in commit order.
        let streams: Vec<_> = (0..sinks)
            .map(|s| payment_stream(1_000 + s as u64, payments / sinks))
            .collect();
        let events: usize = streams.iter().map(Vec::len).sum();
        let started = Instant::now();
        let tasks: Vec<_> = streams
            .into_iter()
            .map(|stream| {
                let sink = sink(&db);
                tokio::spawn(async move {
                    let mut applied = 0;
                    for chunk in stream.chunks(10) {
                        let records: Vec<(String, String)> = chunk
                            .iter()
                            .map(|e| (e.event_id.to_string(), e.body.clone()))
                            .collect();
                        let (response, report) = sink.apply_batch(sqs_event(&records)).await;
                        assert!(response.batch_item_failures.is_empty(), "{report:?}");
                        applied += report.applied;
                    }
                    applied
                })
            })
            .collect();
        let mut applied = 0;
        for t in tasks {
            applied += t.await.expect("sink task");
        }
        let elapsed = started.elapsed();
        assert_eq!(applied, events);
        println!(
            "| {sinks} | {events} | 10 | {:.0} |",
            events as f64 / elapsed.as_secs_f64()
        );
    }
}
