//! Payment commands per second through the handler function (request parsing, the store's
//! transaction, the outbox insert) against the local PostgreSQL. Each concurrent client is one
//! handler with its own connection, as one Lambda instance would be.
//!
//! Run: `scripts/bench` (or `cargo bench -p outbox-tests --bench payment_command` with
//! `.local/env` sourced). `BENCH_COMMANDS` sets the commands per scenario (default 20000).

use std::time::{Duration, Instant};

use outbox_tests::{invoke, paid_body, paid_request, refund_request, TestDb};
use payment_command::PaymentCommandHandler;
use payments::store::PgPaymentStore;
use pg_outbox::ports::{OutboxStore, WakeDispatcher};
use pg_outbox::postgres::outbox::PgOutboxStore;
use pg_outbox::postgres::Db;

struct Run {
    label: String,
    clients: usize,
    commands: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl Run {
    fn row(&mut self) -> String {
        self.latencies.sort();
        let pct = |p: f64| {
            let i = ((self.latencies.len() as f64 * p) as usize).min(self.latencies.len() - 1);
            self.latencies[i].as_secs_f64() * 1e3
        };
        format!(
            "| {} | {} | {} | {:.0} | {:.2} | {:.2} |",
            self.label,
            self.clients,
            self.commands,
            self.commands as f64 / self.elapsed.as_secs_f64(),
            pct(0.50),
            pct(0.99)
        )
    }
}

#[derive(Clone, Copy)]
enum Scenario {
    /// A new payment marked paid per command: payment insert + outbox insert + commit.
    NewPaid,
    /// The same command again: lock, read, no write.
    Replay,
    /// A partial refund of an existing payment per command.
    Refund,
    /// `NewPaid` by a handler that wakes the dispatcher after each commit while a dispatcher's
    /// heartbeat holds (the steady state in Lambda): the cost of the wake-up check.
    NewPaidWakeCheck,
}

/// Counts nothing, invokes nothing: with a heartbeat held it is never called.
struct NeverCalled;

impl WakeDispatcher for NeverCalled {
    async fn wake(&self) -> Result<(), String> {
        panic!("a dispatcher is draining: nobody should be woken");
    }
}

async fn client<W: WakeDispatcher>(
    handler: PaymentCommandHandler<PgPaymentStore, W>,
    scenario: Scenario,
    tag: String,
    c: usize,
    per_client: usize,
) -> Vec<Duration> {
    let mut latencies = Vec::with_capacity(per_client);
    for i in 0..per_client {
        let request = match scenario {
            Scenario::NewPaid | Scenario::NewPaidWakeCheck => {
                paid_request("bench", &format!("{tag}-{c}-{i}"), paid_body(1_250, "EUR"))
            }
            Scenario::Replay => paid_request(
                "bench",
                &format!("{tag}-{c}"),
                paid_body(1_000_000_000_000, "EUR"),
            ),
            Scenario::Refund => {
                refund_request("bench", &format!("{tag}-{c}"), &format!("{tag}-{c}-{i}"), 1)
            }
        };
        let t = Instant::now();
        let reply = invoke(&handler, request).await;
        latencies.push(t.elapsed());
        assert!(reply.status < 300, "{}", reply.body);
    }
    latencies
}

async fn run(db: &TestDb, scenario: Scenario, clients: usize, commands: usize, tag: &str) -> Run {
    let per_client = commands / clients;
    if let Scenario::Replay | Scenario::Refund = scenario {
        // Each client works on payments paid beforehand.
        let handler = db.payment_handler();
        for c in 0..clients {
            let reply = invoke(
                &handler,
                paid_request(
                    "bench",
                    &format!("{tag}-{c}"),
                    paid_body(1_000_000_000_000, "EUR"),
                ),
            )
            .await;
            assert!(reply.status == 200, "{}", reply.body);
        }
    }
    let started = Instant::now();
    if let Scenario::NewPaidWakeCheck = scenario {
        PgOutboxStore::new(Db::new(db.settings.clone()))
            .heartbeat("bench-dispatcher", Duration::from_secs(3_600))
            .await
            .expect("heartbeat");
    }
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let handler = db.payment_handler();
            let tag = tag.to_owned();
            match scenario {
                Scenario::NewPaidWakeCheck => tokio::spawn(client(
                    handler.with_wake(NeverCalled),
                    scenario,
                    tag,
                    c,
                    per_client,
                )),
                _ => tokio::spawn(client(handler, scenario, tag, c, per_client)),
            }
        })
        .collect();
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.expect("bench client"));
    }
    let label = match scenario {
        Scenario::NewPaid => "paid, new payment (writes payment + outbox row)",
        Scenario::Replay => "paid, replayed (idempotent hit, no write)",
        Scenario::Refund => "refund (writes payment + refund + outbox row)",
        Scenario::NewPaidWakeCheck => {
            "paid, new payment, with the wake-up check (dispatcher draining)"
        }
    };
    Run {
        label: label.into(),
        clients,
        commands: per_client * clients,
        elapsed: started.elapsed(),
        latencies,
    }
}

#[tokio::main]
async fn main() {
    let commands: usize = std::env::var("BENCH_COMMANDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let db = TestDb::create().await;
    // Warm-up: connections, plans, caches.
    run(&db, Scenario::NewPaid, 2, 1_000, "warm").await;

    println!("| command | clients | commands | commands/s | p50 ms | p99 ms |");
    println!("|---|---|---|---|---|---|");
    for clients in [1, 2, 4] {
        for (scenario, tag) in [
            (Scenario::NewPaid, "new"),
            (Scenario::Replay, "replay"),
            (Scenario::Refund, "refund"),
            (Scenario::NewPaidWakeCheck, "wakecheck"),
        ] {
            let mut result =
                run(&db, scenario, clients, commands, &format!("{tag}{clients}")).await;
            println!("{}", result.row());
        }
    }
}
