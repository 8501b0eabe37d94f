//! (Past 400 lines: one test per order rule, sharing this file's fixtures.)
//!
//! Per-aggregate order without a cluster-wide horizon (migration V4): appending locks the
//! aggregate, so a version commits only after its predecessor; only heads are claimable; publishing
//! a head promotes its successor. Against the real PostgreSQL.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use outbox_tests::aws::sdk_config_for;
use outbox_tests::fault_proxy::{FaultProxy, PoisonRule};
use outbox_tests::{test_dispatcher_config, TestDb};
use pg_outbox::aws::BusPublisher;
use pg_outbox::dispatcher::OutboxDispatcher;
use pg_outbox::outbox::Outcomes;
use pg_outbox::ports::OutboxStore;
use pg_outbox::postgres::admin::{self, Requeue, Selection};
use pg_outbox::postgres::outbox::PgOutboxStore;
use pg_outbox::postgres::Db;
use tokio_postgres::GenericClient;

/// Appends one event of `aggregate`, its version left to the outbox.
async fn append(client: &impl GenericClient, aggregate: &str, marker: &str) {
    client
        .execute(
            "INSERT INTO outbox (event_id, tenant_id, aggregate_type, aggregate_id, event_type,
                                 schema_version, payload, metadata)
             VALUES (gen_random_uuid(), 'acme', 'customer', $1, 'customer.renamed', 1,
                     jsonb_build_object('marker', $2::text),
                     '{\"correlation_id\":\"order-test\",\"source\":\"customers\"}')",
            &[&aggregate, &marker],
        )
        .await
        .expect("append");
}

fn standalone_dispatcher(
    db: &TestDb,
    sdk: &aws_config::SdkConfig,
    name: &str,
) -> OutboxDispatcher<PgOutboxStore, BusPublisher> {
    let mut config = test_dispatcher_config();
    config.max_attempts = 2;
    OutboxDispatcher::new(
        PgOutboxStore::new(Db::new(db.settings.clone())),
        BusPublisher::Sns(pg_outbox::aws::sns::SnsPublisher::new(
            aws_sdk_sns::Client::new(sdk),
            "arn:aws:sns:us-east-1:123456789012:standalone".into(),
        )),
        config,
        name,
    )
}

#[tokio::test]
async fn an_open_write_transaction_in_another_database_holds_back_nothing() {
    let db = TestDb::create().await;
    let other = TestDb::create().await;
    // A session left idle in a write transaction in another database of the cluster (a
    // migration, a backfill): it holds an xid, so pg_snapshot_xmin cannot pass it.
    let mut idle = other.client().await;
    let idle_tx = idle.transaction().await.unwrap();
    idle_tx
        .execute("CREATE TABLE backfill (n int)", &[])
        .await
        .unwrap();
    idle_tx
        .execute("INSERT INTO backfill VALUES (1)", &[])
        .await
        .unwrap();
    let opened = Instant::now();

    let client = db.client().await;
    for i in 0..100 {
        append(&client, &format!("c{i}"), "x").await;
    }
    let committed = Instant::now();
    let proxy = FaultProxy::standalone_sns().await;
    let sdk = sdk_config_for(&proxy.endpoint).await;
    let dispatcher = standalone_dispatcher(&db, &sdk, "idle-tx");
    let summary = dispatcher
        .drain(Instant::now() + Duration::from_secs(10))
        .await
        .unwrap();
    let took = committed.elapsed();
    assert_eq!(summary.published, 100, "{summary:?}");
    assert!(took < Duration::from_secs(1), "published after {took:?}");
    println!("100 events published {took:?} after their commit, a write transaction open in another database");

    // It no longer holds back publishing, but it holds back vacuum: the metrics and
    // `outboxctl status` show its age.
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let open_for = opened.elapsed().as_secs_f64();
    let backlog = dispatcher.store().backlog().await.unwrap();
    assert!(
        backlog.oldest_transaction_age_seconds >= open_for - 0.05,
        "{backlog:?} while a transaction has been open {open_for} s"
    );
    let summary = pg_outbox::dispatcher::DispatchSummary {
        backlog: Some(backlog),
        ..Default::default()
    };
    let lines = summary
        .metrics("outbox-dispatcher")
        .render(std::time::SystemTime::now());
    assert!(
        lines.iter().any(|l| l.contains("\"OldestTransactionAge\"")),
        "{lines:?}"
    );
    let output = std::process::Command::new(outbox_tests::workspace_binary("outboxctl"))
        .args(["status", "--json"])
        .env("DATABASE_URL", &db.url)
        .env("DATABASE_TLS", "disable")
        .output()
        .expect("run outboxctl status");
    let status: serde_json::Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&output.stderr)));
    let reported = status["backlog"]["oldestTransactionAgeSeconds"]
        .as_f64()
        .unwrap();
    assert!(reported >= open_for - 0.05, "{status}");
    idle_tx.rollback().await.unwrap();
}

#[tokio::test]
async fn an_aggregates_next_version_waits_for_the_previous_ones_commit() {
    let db = TestDb::create().await;
    let store = PgOutboxStore::new(Db::new(db.settings.clone()));
    let mut first = db.client().await;
    let second = db.client().await;
    let tx = first.transaction().await.unwrap();
    append(&tx, "c1", "first").await;
    // The second appender of the same aggregate blocks on the aggregate's lock: it cannot commit
    // (or even get its version) before the first ends.
    let blocked = tokio::spawn(async move {
        append(&second, "c1", "second").await;
        second
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!blocked.is_finished(), "the second append did not wait");
    assert!(
        store
            .claim_batch(10, Duration::from_secs(5), "t")
            .await
            .unwrap()
            .is_empty(),
        "nothing of the aggregate is visible yet"
    );
    tx.commit().await.unwrap();
    blocked.await.unwrap();

    let client = db.client().await;
    let versions: Vec<(String, i64, bool)> = client
        .query(
            "SELECT payload->>'marker', aggregate_version, is_head FROM outbox ORDER BY aggregate_version",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        versions,
        [("first".into(), 1, true), ("second".into(), 2, false)]
    );
    // Only the head is claimable; publishing it makes the next one the head.
    let claimed = store
        .claim_batch(10, Duration::from_secs(5), "t")
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].aggregate_version, 1);
    let left = store
        .record_outcomes(
            "t",
            &Outcomes {
                published: vec![claimed[0].id],
                ..Outcomes::default()
            },
        )
        .await
        .unwrap();
    assert!(left.is_empty());
    let claimed = store
        .claim_batch(10, Duration::from_secs(5), "t")
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].aggregate_version, 2);
}

#[tokio::test]
async fn a_snapshot_producer_behind_another_append_gets_a_serialization_failure_and_its_retry_goes_on(
) {
    // A producer in REPEATABLE READ (or SERIALIZABLE) whose snapshot is older than another
    // producer's committed append to the same aggregate cannot see the version that append took.
    // It must fail as a serialization failure (40001, which a producer's framework retries), not
    // as a duplicate version (23505, which reads as "already appended"), whether the aggregate
    // is new or had events before. Then its retry takes the next version.
    let db = TestDb::create().await;
    let mut late = db.client().await;
    let other = db.client().await;
    append(&other, "known", "v1").await;
    for aggregate in ["known", "new"] {
        let tx = late
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .start()
            .await
            .unwrap();
        tx.query_one("SELECT 1", &[]).await.unwrap(); // the snapshot
        append(&other, aggregate, "the other producer's").await;
        let err = tx
            .execute(
                "INSERT INTO outbox (event_id, tenant_id, aggregate_type, aggregate_id, event_type,
                                     schema_version, payload)
                 VALUES (gen_random_uuid(), 'acme', 'customer', $1, 'customer.renamed', 1, '{}')",
                &[&aggregate],
            )
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            Some(&tokio_postgres::error::SqlState::T_R_SERIALIZATION_FAILURE),
            "{aggregate}: {err:?}"
        );
        tx.rollback().await.unwrap();
        let retry = late
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .start()
            .await
            .unwrap();
        append(&retry, aggregate, "the retry").await;
        retry.commit().await.unwrap();
    }
    let versions: Vec<(String, i64, String)> = late
        .query(
            "SELECT aggregate_id, aggregate_version, payload->>'marker' FROM outbox
             ORDER BY aggregate_id, aggregate_version",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let expected: Vec<(String, i64, String)> = [
        ("known", 1, "v1"),
        ("known", 2, "the other producer's"),
        ("known", 3, "the retry"),
        ("new", 1, "the other producer's"),
        ("new", 2, "the retry"),
    ]
    .iter()
    .map(|(a, v, m)| (a.to_string(), *v, m.to_string()))
    .collect();
    assert_eq!(versions, expected);
}

#[tokio::test]
async fn an_explicit_version_at_or_below_the_last_is_refused_as_a_duplicate() {
    let db = TestDb::create().await;
    let client = db.client().await;
    append(&client, "c1", "v1").await;
    append(&client, "c1", "v2").await;
    let err = client
        .execute(
            "INSERT INTO outbox (event_id, tenant_id, aggregate_type, aggregate_id, aggregate_version,
                                 event_type, schema_version, payload)
             VALUES (gen_random_uuid(), 'acme', 'customer', 'c1', 2, 'customer.renamed', 1, '{}')",
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION),
        "{err:?}"
    );
    assert_eq!(db.count(&client, "outbox").await, 2);
}

#[tokio::test]
async fn parked_and_backing_off_rows_are_not_read_by_the_claim() {
    let db = TestDb::create().await;
    let client = db.client().await;
    // 20,000 aggregates parked behind a dead first event, 20,000 whose head backs off for an
    // hour, all older than 100 fresh heads.
    outbox_tests::bench::seed_parked_and_backing_off(&client, 20_000).await;
    client
        .batch_execute(
            "INSERT INTO outbox (event_id, tenant_id, aggregate_type, aggregate_id, aggregate_version,
                                 event_type, schema_version, payload, metadata)
             SELECT gen_random_uuid(), 'acme', 'customer', 'f' || a, 1, 'customer.renamed', 1, '{}',
                    '{\"correlation_id\":\"x\",\"source\":\"customers\"}'
             FROM generate_series(1, 100) a;",
        )
        .await
        .unwrap();
    client.batch_execute("VACUUM ANALYZE outbox").await.unwrap();
    assert_eq!(
        db.count(&client, "outbox WHERE status = 'pending' AND NOT is_head")
            .await,
        20_000,
        "the parked rows are not heads"
    );
    let plan = pg_outbox::postgres::outbox::explain_claim(&client, 500, true)
        .await
        .unwrap();
    // The scans of the claim's index (the walk over tenants and each tenant's share), not the
    // update of the rows they found: each scan's line, then its counts.
    let lines: Vec<&str> = plan.lines().collect();
    let scans: Vec<usize> = (0..lines.len())
        .filter(|&i| lines[i].contains("Scan using outbox_tenant_claim_idx"))
        .collect();
    assert!(
        !scans.is_empty(),
        "the claim does not read its index: {plan}"
    );
    let mut buffers = 0u64;
    for &i in &scans {
        let scan = &lines[i..];
        let end = scan[1..]
            .iter()
            .position(|l| l.contains("->") || l.contains("InitPlan") || l.contains("SubPlan"))
            .map_or(scan.len(), |p| p + 1);
        let scan = &scan[..end];
        assert!(
            !scan.iter().any(|l| l.contains("Rows Removed by Filter")),
            "the scan filtered rows out: {plan}"
        );
        buffers += scan
            .iter()
            .find_map(|l| l.trim().strip_prefix("Buffers: shared hit="))
            .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0);
    }
    println!(
        "claim of 500 with 40,000 parked or backing-off rows ahead: the index scans read {buffers} buffers\n{plan}"
    );
    // The 100 due heads' index entries: a handful of pages, not one per parked row (40,000).
    assert!(buffers > 0 && buffers < 50, "{buffers} buffers: {plan}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producers_two_dispatchers_and_a_redrive_at_once_leave_nothing_stuck_or_out_of_order() {
    let db = TestDb::create().await;
    let proxy = FaultProxy::standalone_sns().await;
    proxy.stats.keep_bodies.store(true, Ordering::Relaxed);
    // Some events can never be published until redriven: they go dead and park their aggregate.
    proxy.add_poison(PoisonRule {
        needle: "poison".into(),
        code: "InvalidParameter".into(),
        sender_fault: true,
    });
    let sdk = sdk_config_for(&proxy.endpoint).await;
    let aggregates = 40;
    let per_producer = 150;
    let producers: Vec<_> = (0..4)
        .map(|p| {
            let db_settings = db.settings.clone();
            tokio::spawn(async move {
                let mut client = db_settings.connect().await.unwrap();
                let mut rng = fastrand::Rng::with_seed(p);
                for n in 0..per_producer {
                    let aggregate = format!("c{}", rng.usize(0..aggregates));
                    let marker = if n % 50 == 7 {
                        format!("poison-{p}-{n}")
                    } else {
                        format!("{p}-{n}")
                    };
                    // Some appends in longer transactions, so successors are appended while
                    // their predecessors are being published.
                    let tx = client.transaction().await.unwrap();
                    append(&tx, &aggregate, &marker).await;
                    if rng.u8(0..4) == 0 {
                        tokio::time::sleep(Duration::from_millis(rng.u64(1..30))).await;
                    }
                    tx.commit().await.unwrap();
                }
            })
        })
        .collect();
    let a = standalone_dispatcher(&db, &sdk, "a");
    let b = standalone_dispatcher(&db, &sdk, "b");
    let drains = async {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut redriven = false;
        loop {
            let (ra, rb) = tokio::join!(
                a.drain(Instant::now() + Duration::from_secs(2)),
                b.drain(Instant::now() + Duration::from_secs(2))
            );
            ra.unwrap();
            rb.unwrap();
            let client = db.client().await;
            let dead = db.count(&client, "outbox WHERE status = 'dead'").await;
            if dead > 0 && producers_done(&db).await {
                // The bus takes the poison now (every poisoned event, also those still parked
                // behind a dead one); redrive while the dispatchers run again.
                client
                    .execute(
                        "UPDATE outbox SET payload = jsonb_set(payload, '{marker}', '\"cured\"')
                         WHERE payload->>'marker' LIKE 'poison%'",
                        &[],
                    )
                    .await
                    .unwrap();
                let selection = Selection {
                    all: true,
                    ..Selection::default()
                };
                admin::requeue(&client, Requeue::Dead, &selection)
                    .await
                    .unwrap();
                redriven = true;
            }
            let left = db
                .count(&client, "outbox WHERE status <> 'published'")
                .await;
            if redriven && left == 0 {
                return;
            }
            if Instant::now() >= deadline {
                let stuck = db
                    .texts(
                        &client,
                        "SELECT concat_ws(' ', aggregate_id, aggregate_version, status, is_head,
                                attempts, locked_until > now(), next_attempt_at > now(), last_error)
                         FROM outbox o WHERE EXISTS (SELECT 1 FROM outbox u WHERE u.status <> 'published'
                              AND u.aggregate_id = o.aggregate_id)
                         ORDER BY aggregate_id, aggregate_version",
                    )
                    .await;
                panic!("{left} events never published:\n{}", stuck.join("\n"));
            }
        }
    };
    let (produced, ()) = tokio::join!(futures_util::future::join_all(producers), drains);
    for p in produced {
        p.unwrap();
    }

    // On the wire: each aggregate's versions first arrived in increasing order, none missing.
    let client = db.client().await;
    let rows = db.event_versions(&client).await;
    assert_eq!(rows.len(), 4 * per_producer as usize);
    let mut last: HashMap<String, i64> = HashMap::new();
    let mut seen = HashSet::new();
    for id in proxy.stats.event_ids.lock().unwrap().iter() {
        if !seen.insert(id.clone()) {
            continue;
        }
        let (aggregate, version) = &rows[id];
        let previous = last.insert(aggregate.clone(), *version).unwrap_or(0);
        assert_eq!(
            *version,
            previous + 1,
            "{aggregate}: v{version} after v{previous}"
        );
    }
    assert_eq!(seen.len(), rows.len(), "every event reached the bus");
}

async fn producers_done(db: &TestDb) -> bool {
    let client = db.client().await;
    db.count(&client, "outbox").await == 4 * 150
}

#[tokio::test]
async fn recording_never_waits_for_an_appender_and_still_promotes_its_event() {
    let db = TestDb::create().await;
    let store = PgOutboxStore::new(Db::new(db.settings.clone()));
    let client = db.client().await;
    append(&client, "c1", "v1").await;
    let claimed = store
        .claim_batch(10, Duration::from_secs(30), "t")
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    // An appender of v2 holds its aggregate until it commits (a long transaction, say), but no row
    // the record needs: it looks at v1 again only in its COMMIT (migration V7).
    let mut appender = db.client().await;
    let tx = appender.transaction().await.unwrap();
    append(&tx, "c1", "v2").await;
    let published = Outcomes {
        published: vec![claimed[0].id],
        ..Outcomes::default()
    };
    let started = Instant::now();
    let left = store.record_outcomes("t", &published).await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "the record waited"
    );
    assert!(left.is_empty(), "v1 is recorded at once: {left:?}");
    // v2 was appended behind a pending v1; its commit sees v1 published and makes it head.
    tx.commit().await.unwrap();
    let claimed = store
        .claim_batch(10, Duration::from_secs(30), "u")
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].aggregate_version, 2);
}
