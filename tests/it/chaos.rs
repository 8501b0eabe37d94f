//! (Past 400 lines: the chaos run is one scenario: producers, operator, faults and the final accounting.)
//!
//! The chaos run: thousands of payment commands from concurrent producers (with client retries),
//! four dispatcher processes killed with SIGKILL at random and restarted, a proxy in front of moto's
//! FIFO topic injecting faults into at least 10% of publish calls, PostgreSQL restarted three times
//! and the application role's password rotated once (secret in moto, producers and dispatchers
//! reading it as on AWS) while the producers run, and a sink fed every published message with
//! extra duplicates in random order. At the end: nothing lost, nothing applied twice, projections
//! equal to the payments table, per-aggregate order kept on the wire, and the dead rows exactly the
//! poisoned events. Beside them, an operator replays published events, redrives dead ones and
//! discards dead notes (an SQL producer's events of its own aggregate type, a few poisoned), while
//! that producer holds each of its transactions open for a second or two across several
//! aggregates: replays change nothing applied, redriven poison dies again, and a discarded note
//! lets its aggregate's next notes go. One summary line; `CHAOS_COMMANDS` scales it (default 5000).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use std::sync::Arc;

use outbox_tests::aws::{self, moto_endpoint};
use outbox_tests::cluster::PrivateCluster;
use outbox_tests::fault_proxy::{FaultProxy, PoisonRule};
use outbox_tests::rotation::{rotate, RotatingSecret};
use outbox_tests::sink_fixtures::{sink, sqs_event};
use outbox_tests::{
    invoke, paid_body, paid_request, refund_request, workspace_binary, Reply, TestDb,
};
use payment_command::{HandlerConfig, PaymentCommandHandler};
use payments::store::PgPaymentStore;
use pg_outbox::postgres::admin::{self, Requeue, Selection};

const POISON: &str = "chaos-poison";
/// In a note's payload: the bus refuses it, the operator discards it.
const POISON_NOTE: &str = "chaos-discard";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_run_loses_nothing_and_applies_everything_once() {
    let commands: usize = std::env::var("CHAOS_COMMANDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_000);
    let started = Instant::now();
    // A cluster of its own: the restarts must not touch the other tests' databases.
    let cluster = Arc::new(PrivateCluster::start());
    let db = TestDb::create_on(&cluster).await;
    let secret = RotatingSecret::create(&cluster, &db, "pw-chaos-1").await;
    let config = aws::sdk_config_for(&moto_endpoint()).await;
    let topic_arn = aws::create_topic(&config, true).await;
    let proxy = FaultProxy::start(&moto_endpoint()).await;
    proxy
        .stats
        .keep_bodies
        .store(true, std::sync::atomic::Ordering::Relaxed);
    proxy.set_random_fault_rate(0.15);
    for needle in [POISON, POISON_NOTE] {
        proxy.add_poison(PoisonRule {
            needle: needle.into(),
            code: "InvalidParameter".into(),
            sender_fault: true,
        });
    }

    // Dispatcher processes, killed at random while the producers run and after.
    let spawn = |i: usize| {
        tokio::process::Command::new(workspace_binary("outboxctl"))
            .args(["dispatch", "--for-seconds", "600"])
            .env_remove("DATABASE_URL")
            .env("DATABASE_SECRET_ARN", &secret.arn)
            .env("DATABASE_TLS", "disable")
            .env("AWS_ENDPOINT_URL", &proxy.endpoint)
            .env("OUTBOX_TARGET", "sns")
            .env("SNS_TOPIC_ARN", &topic_arn)
            .env("DISPATCH_BATCH_SIZE", "100")
            .env("DISPATCH_MAX_IN_FLIGHT", "8")
            .env("DISPATCH_LEASE_SECONDS", "5")
            .env("DISPATCH_MAX_ATTEMPTS", "60")
            .env("DISPATCH_BACKOFF_BASE_MS", "20")
            .env("DISPATCH_BACKOFF_CAP_MS", "300")
            .env("RUST_LOG", "error")
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("dispatcher {i}: {e}"))
    };

    // Producers: 4 tenants, payments paid then refunded in parts, 1 in 10 commands sent twice
    // (a client retry), a few payments poisoned (their paid event can never be published).
    let mut producers = Vec::new();
    for p in 0..4 {
        // Each producer is one warm Lambda instance reading the secret as on AWS.
        let (conn, _) = secret.db(Duration::from_secs(1)).await;
        let handler =
            PaymentCommandHandler::new(PgPaymentStore::new(conn), HandlerConfig::default());
        producers.push(tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(p as u64);
            let tenant = ["acme", "globex", "initech", "umbrella"][p];
            let mut sent = 0;
            let mut unavailable = 0;
            let mut poisoned = Vec::new();
            let mut n = 0;
            while sent < commands / 4 {
                let payment = format!("pay_{p}_{n}");
                n += 1;
                let amount = rng.i64(100..10_000);
                let mut body = paid_body(amount, ["EUR", "USD"][n % 2]);
                if n % 97 == 0 {
                    body["verifiedBy"] = POISON.into();
                    poisoned.push(format!("{tenant}/{payment}"));
                }
                for _ in 0..if rng.u8(0..10) == 0 { 2 } else { 1 } {
                    let reply = until_not_503(&mut unavailable, || {
                        invoke(&handler, paid_request(tenant, &payment, body.clone()))
                    })
                    .await;
                    assert_eq!(reply.status, 200, "{}", reply.body);
                    sent += 1;
                }
                for r in 0..rng.usize(0..3) {
                    let key = format!("{payment}-r{r}");
                    for _ in 0..if rng.u8(0..10) == 0 { 2 } else { 1 } {
                        let reply = until_not_503(&mut unavailable, || {
                            invoke(&handler, refund_request(tenant, &payment, &key, amount / 4))
                        })
                        .await;
                        assert!(reply.status == 201 || reply.status == 200, "{}", reply.body);
                        sent += 1;
                    }
                }
            }
            (sent, poisoned, unavailable)
        }));
    }

    // An SQL producer of notes (its own aggregate type, unknown to the sink): each transaction
    // appends to two or three aggregates in key order and stays open 1-2 s; every fifth
    // transaction carries a poisoned note. And an operator replaying, redriving and discarding
    // while everything runs.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut side_tasks = Some((
        tokio::spawn(note_producer(db.settings.clone(), stop.clone())),
        tokio::spawn(operator(db.settings.clone(), stop.clone())),
    ));

    // While the producers run: three restarts and one rotation, each once the outbox holds this
    // share of the expected events (roughly 1.3 per command).
    let mut faults = vec![
        (0.15, Fault::Restart),
        (0.35, Fault::Restart),
        (0.5, Fault::Rotate),
        (0.7, Fault::Restart),
    ];
    faults.reverse();
    let (mut restarts, mut rotations) = (0, 0);

    let mut dispatchers: Vec<_> = (0..4).map(spawn).collect();
    let mut kills = 0;
    let mut rng = fastrand::Rng::with_seed(42);
    let producers = futures_util::future::join_all(producers);
    tokio::pin!(producers);
    let mut produced = None;
    let mut notes_held = 0;
    let mut actions = Actions::default();
    loop {
        tokio::select! {
            done = &mut producers, if produced.is_none() => produced = Some(done),
            _ = tokio::time::sleep(Duration::from_millis(rng.u64(150..600))) => {
                if let Some((share, fault)) = faults.last().copied() {
                    let written = written_events(&db).await;
                    if written as f64 >= share * commands as f64 {
                        faults.pop();
                        match fault {
                            Fault::Restart => {
                                let cluster = cluster.clone();
                                tokio::task::spawn_blocking(move || cluster.restart())
                                    .await
                                    .expect("restart");
                                restarts += 1;
                            }
                            Fault::Rotate => {
                                rotate(&cluster, &secret, "pw-chaos-2", "AWSCURRENT").await;
                                rotations += 1;
                            }
                        }
                    }
                }
                // A dispatcher that found nothing due has exited, as a Lambda invocation would:
                // start it again, as the schedule would.
                for (i, d) in dispatchers.iter_mut().enumerate() {
                    if d.try_wait().ok().flatten().is_some() {
                        *d = spawn(i);
                    }
                }
                // Kill while the producers run and until 20 kills; then let the drain finish.
                if produced.is_none() || kills < 20 {
                    let victim = rng.usize(0..dispatchers.len());
                    dispatchers[victim].start_kill().expect("SIGKILL");
                    let _ = dispatchers[victim].wait().await;
                    kills += 1;
                    dispatchers[victim] = spawn(victim);
                }
            }
        }
        if produced.is_some() && kills >= 20 {
            if let Some((notes, operator)) = side_tasks.take() {
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
                notes_held = notes.await.expect("note producer");
                actions = operator.await.expect("operator");
            }
            // Dead notes are given up, as an operator would, so their aggregates' notes go.
            let client = db.client().await;
            let note = Selection {
                aggregate_type: Some("note".into()),
                ..Selection::default()
            };
            actions.discarded += admin::discard(&client, &note, "chaos: poisoned note")
                .await
                .expect("discard dead notes")
                .discarded;
            let due = db
                .count(&client, "outbox o WHERE (status = 'pending' AND NOT EXISTS (
                    SELECT 1 FROM outbox e WHERE e.tenant_id = o.tenant_id AND e.aggregate_id = o.aggregate_id
                    AND e.aggregate_version < o.aggregate_version AND e.status = 'dead')) OR replay")
                .await;
            if due == 0 {
                break;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(240),
            "the outbox did not drain in time"
        );
    }
    for d in &mut dispatchers {
        let _ = d.start_kill();
        let _ = d.wait().await;
    }
    let produced: Vec<(usize, Vec<String>, usize)> = produced
        .unwrap()
        .into_iter()
        .map(|r| r.expect("producer"))
        .collect();
    let sent: usize = produced.iter().map(|p| p.0).sum();
    let unavailable: usize = produced.iter().map(|p| p.2).sum();
    let poisoned: HashSet<String> = produced.into_iter().flat_map(|p| p.1).collect();
    let client = db.client().await;

    // 0 lost: every event that is not dead or parked behind a dead one reached the bus.
    let outbox: Vec<(String, String, String, i64, String)> = client
        .query(
            "SELECT event_id::text, tenant_id, aggregate_type || '/' || aggregate_id,
                    aggregate_version, status
             FROM outbox",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect();
    let arrived: Vec<String> = proxy.stats.event_ids.lock().unwrap().clone();
    let arrived_set: HashSet<&String> = arrived.iter().collect();
    let dead: HashSet<String> = outbox
        .iter()
        .filter(|e| e.4 == "dead")
        .map(|e| format!("{}/{}", e.1, e.2))
        .collect();
    // The payments' dead events (named tenant/payment, as the producers name the poisoned ones).
    let dead_payments: HashSet<String> = dead
        .iter()
        .filter_map(|d| d.split_once("/payment/").map(|(t, p)| format!("{t}/{p}")))
        .collect();
    let lost = outbox
        .iter()
        .filter(|e| e.4 == "published" && !arrived_set.contains(&e.0))
        .count();
    let unpublished = outbox
        .iter()
        .filter(|e| e.4 == "pending" && !dead.contains(&format!("{}/{}", e.1, e.2)))
        .count();

    // Order on the wire: per aggregate, versions first arrive in increasing order.
    let by_id: HashMap<&String, (&String, &String, i64)> =
        outbox.iter().map(|e| (&e.0, (&e.1, &e.2, e.3))).collect();
    let mut last_version: HashMap<(String, String), i64> = HashMap::new();
    let mut seen = HashSet::new();
    let mut order_violations = 0;
    for id in &arrived {
        if !seen.insert(id.clone()) {
            continue;
        }
        let (tenant, aggregate, version) = by_id[id];
        let last = last_version
            .entry((tenant.clone(), aggregate.clone()))
            .or_insert(0);
        if version <= *last {
            order_violations += 1;
        }
        *last = version;
    }

    // The sink gets every message that reached the bus, plus 20% more duplicates, shuffled, and
    // SQS-style redelivery of what it reports failed.
    let mut queue: Vec<(String, String)> = Vec::new();
    for body in proxy.stats.bodies.lock().unwrap().iter() {
        for _ in 0..if rng.u8(0..5) == 0 { 2 } else { 1 } {
            queue.push((uuid::Uuid::new_v4().to_string(), body.clone()));
        }
    }
    let deliveries = queue.len();
    rng.shuffle(&mut queue);
    let sink = sink(&db);
    let mut rounds = 0;
    while !queue.is_empty() {
        rounds += 1;
        assert!(rounds < 20_000, "the sink did not converge");
        let batch: Vec<(String, String)> = queue.drain(..queue.len().min(10)).collect();
        let (response, _) = sink.apply_batch(sqs_event(&batch)).await;
        let failed: HashSet<String> = response
            .batch_item_failures
            .into_iter()
            .map(|f| f.item_identifier)
            .collect();
        for message in batch.into_iter().filter(|(id, _)| failed.contains(id)) {
            let at = rng.usize(0..=queue.len());
            queue.insert(at, message);
        }
    }

    // Projections equal the payments table for every payment whose events all went out.
    let mismatches = db
        .count(
            &client,
            "payments p FULL JOIN payment_projection v USING (tenant_id, payment_id)
             WHERE NOT EXISTS (SELECT 1 FROM outbox d WHERE d.status = 'dead'
                               AND d.tenant_id = coalesce(p.tenant_id, v.tenant_id)
                               AND d.aggregate_id = coalesce(p.payment_id, v.payment_id))
               AND (v.payment_id IS NULL OR p.payment_id IS NULL OR p.amount_minor <> v.paid_minor
                    OR p.refunded_minor <> v.refunded_minor OR p.status <> v.status OR p.version <> v.last_version)",
        )
        .await;
    let applied = db
        .count(
            &client,
            "processed_events WHERE event_type LIKE 'payment.%'",
        )
        .await as usize;
    // Notes: every one published or discarded, none dead or waiting.
    let notes_published = db
        .count(
            &client,
            "outbox WHERE aggregate_type = 'note' AND status = 'published'",
        )
        .await;
    let notes_discarded = db
        .count(
            &client,
            "outbox WHERE aggregate_type = 'note' AND status = 'discarded'",
        )
        .await;
    let notes_left = db
        .count(
            &client,
            "outbox WHERE aggregate_type = 'note' AND status NOT IN ('published', 'discarded')",
        )
        .await;
    let notes_arrived = {
        let ids: Vec<String> = client
            .query(
                "SELECT event_id::text FROM outbox WHERE aggregate_type = 'note' AND status = 'published'",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        ids.iter().filter(|id| arrived_set.contains(id)).count() as i64
    };
    let published_events = outbox
        .iter()
        .filter(|e| e.4 == "published" && e.2.starts_with("payment/"))
        .count();
    let duplicates_applied = applied.saturating_sub(published_events);
    let calls = proxy
        .stats
        .publish_calls
        .load(std::sync::atomic::Ordering::Relaxed);
    let faulted = proxy
        .stats
        .faulted_calls
        .load(std::sync::atomic::Ordering::Relaxed);
    let fault_rate = faulted as f64 / calls.max(1) as f64;

    println!(
        "chaos: commands={sent} events={} published={published_events} lost={lost} unpublished={unpublished} \
         duplicates_applied={duplicates_applied} projection_mismatches={mismatches} order_violations={order_violations} \
         dead={} poisoned={} kills={kills} pg_restarts={restarts} rotations={rotations} retried_503={unavailable} publish_calls={calls} faulted={faulted} ({:.1}%) bus_deliveries={} \
         sink_deliveries={deliveries} replays={} redrives={} discards={} notes_published={notes_published} \
         notes_discarded={notes_discarded} notes_left={notes_left} held_open_transactions={notes_held} seconds={:.0}",
        outbox.len(),
        dead_payments.len(),
        poisoned.len(),
        fault_rate * 100.0,
        arrived.len(),
        actions.replayed,
        actions.redriven,
        actions.discarded,
        started.elapsed().as_secs_f64()
    );
    assert!(sent >= commands);
    assert_eq!(lost, 0);
    assert_eq!(unpublished, 0);
    assert_eq!(duplicates_applied, 0);
    assert_eq!(
        applied, published_events,
        "every published event applied once"
    );
    assert_eq!(mismatches, 0);
    assert_eq!(order_violations, 0);
    assert_eq!(
        dead_payments, poisoned,
        "dead rows are exactly the poisoned events"
    );
    assert_eq!(dead.len(), dead_payments.len(), "no dead note is left");
    assert!(kills >= 20);
    assert_eq!(
        (restarts, rotations),
        (3, 1),
        "every planned database fault happened"
    );
    assert!(fault_rate >= 0.10, "fault rate {fault_rate}");
    assert_eq!(notes_left, 0, "every note published or discarded");
    assert_eq!(
        notes_arrived, notes_published,
        "every published note reached the bus"
    );
    assert!(
        notes_discarded > 0 && notes_held > 0,
        "notes were discarded and held open"
    );
    assert!(
        actions.replayed > 0 && actions.redriven > 0,
        "the operator replayed and redrove: {actions:?}"
    );
}

/// What the operator did (rows changed).
#[derive(Debug, Default)]
struct Actions {
    replayed: u64,
    redriven: u64,
    discarded: u64,
}

/// Appends notes by plain SQL until `stop`: each transaction takes 2-3 aggregates in key order
/// (producers of several aggregates must, or they deadlock each other), appends one note to each
/// and stays open 1-2 s. Every fifth transaction carries a poisoned note. A restart ends a
/// transaction: the same notes are tried again on a new connection, so what a transaction holds
/// does not depend on when the faults fall, and the producer does not stop before a poisoned note
/// has committed. Returns how many transactions committed.
async fn note_producer(
    settings: pg_outbox::postgres::DatabaseSettings,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> u64 {
    let mut rng = fastrand::Rng::with_seed(7);
    let mut committed = 0;
    let mut n = 0u64;
    let mut poison_committed = false;
    while !(poison_committed && stop.load(std::sync::atomic::Ordering::Relaxed)) {
        let mut aggregates: Vec<String> = (0..rng.usize(2..=3))
            .map(|_| format!("note-{}", rng.u32(0..40)))
            .collect();
        aggregates.sort();
        aggregates.dedup();
        let poisoned = committed % 5 == 0;
        let notes: Vec<(String, serde_json::Value)> = aggregates
            .into_iter()
            .enumerate()
            .map(|(i, aggregate)| {
                n += 1;
                let text = if poisoned && i == 0 {
                    POISON_NOTE.to_string()
                } else {
                    format!("note {n}")
                };
                (aggregate, serde_json::json!({ "text": text }))
            })
            .collect();
        let hold = Duration::from_millis(rng.u64(1_000..2_000));
        loop {
            let Ok(mut client) = settings.connect().await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let result = async {
                let tx = client.transaction().await?;
                for (aggregate, payload) in &notes {
                    tx.execute(
                        "INSERT INTO outbox (event_id, tenant_id, aggregate_type, aggregate_id,
                                             event_type, schema_version, payload)
                         VALUES (gen_random_uuid(), 'acme', 'note', $1, 'chaos.note', 1, $2)",
                        &[aggregate, payload],
                    )
                    .await?;
                }
                tokio::time::sleep(hold).await;
                tx.commit().await
            }
            .await;
            if result.is_ok() {
                committed += 1;
                poison_committed |= poisoned;
                break;
            }
        }
    }
    committed
}

/// Every 0.3-1 s until `stop`: replays five published payment events, redrives a tenant's dead
/// events, or discards dead notes, each on a fresh connection (a restart ends sessions; a failed
/// action is tried at the next tick). It goes on after `stop` until it has replayed and redriven
/// at least once, so a slow run still interleaves both with the dispatchers.
async fn operator(
    settings: pg_outbox::postgres::DatabaseSettings,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Actions {
    let mut rng = fastrand::Rng::with_seed(11);
    let mut actions = Actions::default();
    while !(stop.load(std::sync::atomic::Ordering::Relaxed)
        && actions.replayed > 0
        && actions.redriven > 0)
    {
        tokio::time::sleep(Duration::from_millis(rng.u64(300..1_000))).await;
        let Ok(client) = settings.connect().await else {
            continue;
        };
        let tenant = ["acme", "globex", "initech", "umbrella"][rng.usize(0..4)];
        match rng.u32(0..3) {
            0 => {
                let Ok(rows) = client
                    .query(
                        "SELECT event_id FROM outbox
                         WHERE tenant_id = $1 AND aggregate_type = 'payment' AND status = 'published'
                         ORDER BY random() LIMIT 5",
                        &[&tenant],
                    )
                    .await
                else {
                    continue;
                };
                let selection = Selection {
                    event_ids: rows.iter().map(|r| r.get(0)).collect(),
                    tenant_id: Some(tenant.into()),
                    ..Selection::default()
                };
                if !selection.event_ids.is_empty() {
                    if let Ok(n) = admin::requeue(&client, Requeue::Published, &selection).await {
                        actions.replayed += n;
                    }
                }
            }
            1 => {
                let selection = Selection {
                    tenant_id: Some(tenant.into()),
                    aggregate_type: Some("payment".into()),
                    ..Selection::default()
                };
                if let Ok(n) = admin::requeue(&client, Requeue::Dead, &selection).await {
                    actions.redriven += n;
                }
            }
            _ => {
                let selection = Selection {
                    aggregate_type: Some("note".into()),
                    ..Selection::default()
                };
                if let Ok(report) =
                    admin::discard(&client, &selection, "chaos: poisoned note").await
                {
                    actions.discarded += report.discarded;
                }
            }
        }
    }
    actions
}

#[derive(Debug, Clone, Copy)]
enum Fault {
    Restart,
    Rotate,
}

/// Events in the outbox so far, on a fresh connection (a restart ends every session); 0 while
/// the server is down.
async fn written_events(db: &TestDb) -> i64 {
    match db.settings.connect().await {
        Ok(client) => match client.query_one("SELECT count(*) FROM outbox", &[]).await {
            Ok(row) => row.get(0),
            Err(_) => 0,
        },
        Err(_) => 0,
    }
}

/// A client's retry: a 503 (the database restarting) is sent again after a short pause, as the
/// API's clients are told to; every other answer is returned. Counts the 503s.
async fn until_not_503<F, Fut>(unavailable: &mut usize, send: F) -> Reply
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Reply>,
{
    for _ in 0..600 {
        let reply = send().await;
        if reply.status != 503 {
            return reply;
        }
        *unavailable += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the command kept failing with 503 for 30 s");
}
