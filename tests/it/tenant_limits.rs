//! (Past 400 lines: each rule of the tenants' limits in one named scenario, with the inputs tried.)
//!
//! Tenants weighted, capped and paused in the claim (`outbox_tenant_limits`, migration V19), on
//! the real PostgreSQL: each rule named once here; the seeded model in `fairness.rs` checks the
//! shares, allowances and buckets after every claim of random schedules.
//!
//! Inputs tried against the table and the admin API: weights 0, 1,001, -1 and 1,000; caps 0, -5
//! and 1; tokens -1; an empty tenant id; a change with nothing in it; on the command line weights
//! 0 and -1, a cap of 0, `--max-per-second` with `--no-cap`. Accepted ones are read back.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use outbox_tests::{outboxctl, stderr, stdout, TestDb};
use pg_outbox::dispatcher::OutboxDispatcher;
use pg_outbox::memory::MemoryPublisher;
use pg_outbox::ports::OutboxStore;
use pg_outbox::postgres::admin::tenants::{self, LimitsChange, LimitsError};
use pg_outbox::postgres::outbox::PgOutboxStore;
use pg_outbox::postgres::Db;
use tokio_postgres::Client;

const LEASE: Duration = Duration::from_secs(600);

/// `aggregates` aggregates of `tenant`, `versions` events each.
async fn append(client: &Client, tenant: &str, aggregates: usize, versions: i64) {
    client
        .execute(
            "INSERT INTO outbox (tenant_id, aggregate_type, aggregate_id, event_type,
                                 schema_version, payload, metadata)
             SELECT $1, 'account', $1 || '-' || a, 'account.changed', 1,
                    jsonb_build_object('v', v),
                    '{\"correlation_id\":\"limits\",\"source\":\"limits\"}'
             FROM generate_series(1, $2::int) a, generate_series(1, $3::bigint) v
             ORDER BY v, a",
            &[&tenant, &(aggregates as i32), &versions],
        )
        .await
        .expect("append");
}

/// The tenants of a claim's rows.
async fn cut(client: &Client, limit: i64, after: &str) -> Vec<String> {
    client
        .query(
            "SELECT tenant_id FROM outbox_claim($1, 600, gen_random_uuid()::text, $2)",
            &[&limit, &after],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

fn counts<S: AsRef<str>>(tenants: impl IntoIterator<Item = S>) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for t in tenants {
        *counts.entry(t.as_ref().to_owned()).or_default() += 1;
    }
    counts
}

fn weight(w: i32) -> LimitsChange {
    LimitsChange {
        weight: Some(w),
        ..LimitsChange::default()
    }
}

#[tokio::test]
async fn weights_share_each_claim_round_by_round() {
    let db = TestDb::create().await;
    let client = db.client().await;
    append(&client, "heavy", 200, 1).await;
    append(&client, "light", 200, 1).await;
    append(&client, "plain", 200, 1).await;
    tenants::set(&client, "heavy", &weight(3)).await.unwrap();
    // 3 + 1 + 1: a claim of 100 gives 60, 20, 20.
    let rows = cut(&client, 100, "").await;
    assert_eq!(
        counts(&rows),
        BTreeMap::from([
            ("heavy".into(), 60),
            ("light".into(), 20),
            ("plain".into(), 20)
        ])
    );
    // A claim of 7 (less than two rounds of 5): one round (heavy's three, then one each), then
    // the next round cut after heavy's two.
    let rows = cut(&client, 7, "").await;
    assert_eq!(
        counts(&rows),
        BTreeMap::from([
            ("heavy".into(), 5),
            ("light".into(), 1),
            ("plain".into(), 1)
        ])
    );
    // Without its row, even shares again (34, 33, 33).
    assert!(tenants::clear(&client, "heavy").await.unwrap());
    let rows = cut(&client, 100, "").await;
    assert_eq!(
        counts(&rows).into_values().collect::<Vec<_>>(),
        [34, 33, 33]
    );
}

#[tokio::test]
async fn a_light_tenant_is_served_in_turn_when_the_batch_is_smaller_than_the_weights() {
    // Weight 4 against 1 and claims of 1 through a dispatcher's store (its rotation): the light
    // tenant is served every other claim. Cut by turn / weight instead of by rounds, the heavy
    // tenant's first turn (1/4) came before the light one's (1) in every claim: the light tenant
    // got nothing while the heavy one had rows.
    let db = TestDb::create().await;
    let client = db.client().await;
    append(&client, "heavy", 50, 1).await;
    append(&client, "light", 50, 1).await;
    tenants::set(&client, "heavy", &weight(4)).await.unwrap();
    let store = PgOutboxStore::new(Db::new(db.settings.clone()));
    let mut served = Vec::new();
    for n in 0..10 {
        let claimed = store
            .claim_batch(1, LEASE, &format!("d/{n}"))
            .await
            .unwrap();
        assert_eq!(claimed.len(), 1);
        served.push(claimed[0].tenant_id.clone());
    }
    assert_eq!(counts(&served)["light"], 5, "{served:?}");
    // With a batch of 5 (one whole round), 4 and 1 every claim.
    for n in 0..3 {
        let claimed = store
            .claim_batch(5, LEASE, &format!("e/{n}"))
            .await
            .unwrap();
        assert_eq!(
            counts(claimed.iter().map(|e| e.tenant_id.as_str())),
            BTreeMap::from([("heavy".into(), 4), ("light".into(), 1)])
        );
    }
}

#[tokio::test]
async fn a_cap_holds_over_concurrent_claims_and_refills_with_time() {
    let db = TestDb::create().await;
    let client = db.client().await;
    append(&client, "capped", 300, 1).await;
    append(&client, "free", 1_000, 1).await;
    let cap = LimitsChange {
        max_per_second: Some(Some(20)),
        ..LimitsChange::default()
    };
    tenants::set(&client, "capped", &cap).await.unwrap();
    // Four dispatchers claim 25 at once, five times, the bucket full (20) each time: it is spent
    // by one claim at a time, the others skipping the tenant, so together they take at most 20 of
    // its events, not up to 4 x 13 (plus what the bucket refilled between statements that did not
    // overlap: 20 a second).
    let stores: Vec<PgOutboxStore> = (0..4)
        .map(|_| PgOutboxStore::new(Db::new(db.settings.clone())))
        .collect();
    for round in 0..5 {
        client
            .execute(
                "UPDATE outbox_tenant_limits SET tokens = NULL WHERE tenant_id = 'capped'",
                &[],
            )
            .await
            .unwrap();
        let started = Instant::now();
        let owners: Vec<String> = (0..stores.len()).map(|d| format!("r{round}/{d}")).collect();
        let claims = futures_util::future::join_all(
            stores
                .iter()
                .zip(&owners)
                .map(|(s, owner)| s.claim_batch(25, LEASE, owner)),
        )
        .await;
        let took = started.elapsed();
        let taken: Vec<_> = claims.into_iter().flat_map(Result::unwrap).collect();
        let taken = counts(taken.iter().map(|e| e.tenant_id.as_str()));
        let refilled = (20.0 * took.as_secs_f64()).floor() as usize;
        // At least one claim took its share (12 or 13 of 25, by the rotation); claims skipping the
        // bucket another holds take none, so the total may stay below the bucket.
        assert!(
            (12..=20 + refilled).contains(&taken["capped"]),
            "round {round}: {taken:?} in {took:?}"
        );
        // The other tenant fills the batches.
        assert_eq!(taken["capped"] + taken["free"], 100, "{taken:?}");
    }
    // One claim spends a full bucket.
    client
        .execute(
            "UPDATE outbox_tenant_limits SET tokens = NULL WHERE tenant_id = 'capped'",
            &[],
        )
        .await
        .unwrap();
    let a = &stores[0];
    let started = Instant::now();
    let spent = a.claim_batch(100, LEASE, "a/1").await.unwrap();
    let spent_at = Instant::now();
    assert_eq!(spent.iter().filter(|e| e.tenant_id == "capped").count(), 20);
    // The bucket refills at 20 a second: after half a second, about 10 more. Bounded by the
    // times this test saw: at least 20 * (time since the claims) and at most 20 * (time since
    // they started), whole tokens.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = Instant::now();
    let next = a.claim_batch(100, LEASE, "a/2").await.unwrap();
    let after = Instant::now();
    let got = next.iter().filter(|e| e.tenant_id == "capped").count() as f64;
    let least = (20.0 * (before - spent_at).as_secs_f64()).floor();
    let most = (20.0 * (after - started).as_secs_f64()).floor();
    assert!(
        (least..=most).contains(&got),
        "{got} after {:?}: expected {least} to {most}",
        before - spent_at
    );
    // A bucket left alone for an hour holds one second's worth, not an hour's: 20.
    client
        .execute(
            "UPDATE outbox_tenant_limits SET tokens = 0, refilled_at = now() - interval '1 hour'
             WHERE tenant_id = 'capped'",
            &[],
        )
        .await
        .unwrap();
    let burst = a.claim_batch(100, LEASE, "a/burst").await.unwrap();
    assert_eq!(burst.iter().filter(|e| e.tenant_id == "capped").count(), 20);
    // Setting the same cap again keeps the bucket (spent: no second burst); a new cap fills it.
    tenants::set(&client, "capped", &cap).await.unwrap();
    let again = a.claim_batch(100, LEASE, "a/again").await.unwrap();
    assert!(again.iter().filter(|e| e.tenant_id == "capped").count() <= 1);
    let higher = LimitsChange {
        max_per_second: Some(Some(30)),
        ..LimitsChange::default()
    };
    tenants::set(&client, "capped", &higher).await.unwrap();
    let filled = a.claim_batch(100, LEASE, "a/higher").await.unwrap();
    assert_eq!(
        filled.iter().filter(|e| e.tenant_id == "capped").count(),
        30
    );
    // Taking the cap off: the tenant shares claims as any other.
    let uncap = LimitsChange {
        max_per_second: Some(None),
        ..LimitsChange::default()
    };
    tenants::set(&client, "capped", &uncap).await.unwrap();
    let next = a.claim_batch(100, LEASE, "a/3").await.unwrap();
    assert_eq!(
        counts(next.iter().map(|e| e.tenant_id.as_str()))["capped"],
        50
    );
}

#[tokio::test]
async fn a_claim_reads_the_limits_of_its_tenants_only_however_many_have_limits() {
    // 10,000 tenants with limits (half of them capped), two with events (one capped): each claim,
    // under either plan, reads the table by key, never all of it. The spend of the buckets first
    // joined the whole table: 10,001 rows read, 2.4-2.6 ms a claim.
    let db = TestDb::create().await;
    let client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO outbox_tenant_limits (tenant_id, weight, max_per_second)
             SELECT 'other' || g, 2, CASE WHEN g % 2 = 0 THEN 100 END
             FROM generate_series(1, 10000) g;
             INSERT INTO outbox_tenant_limits (tenant_id, max_per_second) VALUES ('capped', 1000000);",
        )
        .await
        .unwrap();
    append(&client, "capped", 1_000, 1).await;
    append(&client, "free", 1_000, 1).await;
    client.batch_execute("ANALYZE").await.unwrap();
    for mode in ["force_generic_plan", "force_custom_plan"] {
        client
            .batch_execute(&format!("SET plan_cache_mode = {mode}"))
            .await
            .unwrap();
        for claim in [
            "SELECT count(*) FROM outbox_claim(100, 600, gen_random_uuid()::text, '')",
            "SELECT count(*) FROM outbox_claim_waiting(50, 600, gen_random_uuid()::text, '{}')",
        ] {
            // Twice: the second run uses the plan the first one cached.
            for _ in 0..2 {
                client.batch_execute("BEGIN").await.unwrap();
                let taken: i64 = client.query_one(claim, &[]).await.unwrap().get(0);
                let (seq_scans, read): (i64, i64) = client
                    .query_one(
                        "SELECT seq_scan, seq_tup_read FROM pg_stat_xact_user_tables
                         WHERE relname = 'outbox_tenant_limits'",
                        &[],
                    )
                    .await
                    .map(|r| (r.get(0), r.get(1)))
                    .unwrap();
                let spent: f64 = client
                    .query_one(
                        "SELECT tokens FROM outbox_tenant_limits WHERE tenant_id = 'capped'",
                        &[],
                    )
                    .await
                    .unwrap()
                    .get(0);
                client.batch_execute("ROLLBACK").await.unwrap();
                assert!(taken > 0, "{mode}: {claim}");
                assert_eq!(
                    (seq_scans, read),
                    (0, 0),
                    "{mode}: {claim} scanned the tenants' limits"
                );
                // The capped tenant's bucket was spent by what the claim took of it.
                assert!(spent < 1_000_000.0, "{mode}: {claim}: {spent}");
            }
        }
    }
}

#[tokio::test]
async fn a_paused_tenant_keeps_its_events_in_order_until_resumed() {
    let db = TestDb::create().await;
    let client = db.client().await;
    // Three versions of 20 aggregates each.
    append(&client, "paused", 20, 3).await;
    append(&client, "running", 20, 3).await;
    let pause = |paused| LimitsChange {
        paused: Some(paused),
        ..LimitsChange::default()
    };
    tenants::set(&client, "paused", &pause(true)).await.unwrap();
    let store = PgOutboxStore::new(Db::new(db.settings.clone()));
    // Neither the claim nor the lane's claim takes its events.
    let lane = store.claim_waiting(50, LEASE, "lane/1", &[]).await.unwrap();
    assert!(lane.iter().all(|e| e.tenant_id == "running"), "{lane:?}");
    store
        .record_outcomes(
            "lane/1",
            &pg_outbox::outbox::Outcomes {
                published: lane.iter().map(|e| e.id).collect(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    // A drain publishes the other tenant's 60 and ends, the paused tenant's 60 still pending.
    let bus = MemoryPublisher::new();
    let dispatcher = OutboxDispatcher::new(
        store,
        bus.clone(),
        outbox_tests::test_dispatcher_config(),
        "limits".to_owned(),
    );
    let summary = dispatcher
        .drain(Instant::now() + Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(summary.published + lane.len(), 60, "{summary:?}");
    assert!(bus.delivered().iter().all(|e| e.tenant_id == "running"));
    assert_eq!(
        db.count(
            &client,
            "outbox WHERE tenant_id = 'paused' AND status = 'pending' AND attempts = 0"
        )
        .await,
        60
    );
    // Resumed: every event goes, each aggregate's in version order.
    tenants::set(&client, "paused", &pause(false))
        .await
        .unwrap();
    dispatcher
        .drain(Instant::now() + Duration::from_secs(30))
        .await
        .unwrap();
    let mut versions: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for e in bus.delivered().iter().filter(|e| e.tenant_id == "paused") {
        versions
            .entry(e.aggregate_id.clone())
            .or_default()
            .push(e.aggregate_version);
    }
    assert_eq!(versions.len(), 20);
    assert!(versions.values().all(|v| v == &[1, 2, 3]), "{versions:?}");
}

#[tokio::test]
async fn bad_limits_are_refused_with_what_is_allowed() {
    let db = TestDb::create().await;
    let client = db.client().await;
    // The table's own checks, for plain SQL.
    for (sql, constraint) in [
        (
            "INSERT INTO outbox_tenant_limits (tenant_id, weight) VALUES ('t', 0)",
            "outbox_tenant_limits_weight_check",
        ),
        (
            "INSERT INTO outbox_tenant_limits (tenant_id, weight) VALUES ('t', 1001)",
            "outbox_tenant_limits_weight_check",
        ),
        (
            "INSERT INTO outbox_tenant_limits (tenant_id, max_per_second) VALUES ('t', 0)",
            "outbox_tenant_limits_max_per_second_check",
        ),
        (
            "INSERT INTO outbox_tenant_limits (tenant_id, tokens) VALUES ('t', -1)",
            "outbox_tenant_limits_tokens_check",
        ),
    ] {
        let err = client.execute(sql, &[]).await.unwrap_err();
        let db_err = err.as_db_error().expect("a database error");
        assert_eq!(db_err.constraint(), Some(constraint), "{sql}");
    }
    // The admin API says what is allowed before it reaches the database.
    for (tenant, change, expected) in [
        ("t", weight(0), LimitsError::Weight(0)),
        ("t", weight(-1), LimitsError::Weight(-1)),
        ("t", weight(1_001), LimitsError::Weight(1_001)),
        (
            "t",
            LimitsChange {
                max_per_second: Some(Some(-5)),
                ..LimitsChange::default()
            },
            LimitsError::Cap(-5),
        ),
        ("", weight(2), LimitsError::NoTenant),
        ("t", LimitsChange::default(), LimitsError::Nothing),
    ] {
        match tenants::set(&client, tenant, &change).await {
            Err(tenants::ChangeError::Invalid(e)) => assert_eq!(e, expected),
            other => panic!("{change:?}: {other:?}"),
        }
    }
    assert!(
        tenants::list(&client).await.unwrap().is_empty(),
        "nothing written"
    );
    // Accepted: the bounds themselves.
    let row = tenants::set(
        &client,
        "t",
        &LimitsChange {
            weight: Some(1_000),
            max_per_second: Some(Some(1)),
            paused: None,
        },
    )
    .await
    .unwrap();
    assert_eq!(
        (row.weight, row.max_per_second, row.paused),
        (1_000, Some(1), false)
    );
}

#[tokio::test]
async fn outboxctl_sets_lists_pauses_and_clears_a_tenants_limits() {
    let db = TestDb::create().await;
    let run = |args: &[&str]| {
        let out = outboxctl(&db, args);
        (out.status.success(), stdout(&out), stderr(&out))
    };
    let (ok, out, _) = run(&[
        "tenants",
        "set",
        "acme",
        "--weight",
        "3",
        "--max-per-second",
        "50",
    ]);
    assert!(ok && out.contains("acme") && out.contains("50"), "{out}");
    let (ok, out, _) = run(&["tenants", "pause", "acme"]);
    assert!(ok && out.contains("paused"), "{out}");
    let (ok, out, _) = run(&["tenants", "list", "--json"]);
    assert!(ok, "{out}");
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(rows[0]["tenantId"], "acme");
    assert_eq!(rows[0]["weight"], 3);
    assert_eq!(rows[0]["maxPerSecond"], 50);
    assert_eq!(rows[0]["paused"], true);
    let (ok, out, _) = run(&["tenants", "resume", "acme", "--json"]);
    assert!(ok, "{out}");
    let row: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (row["paused"].as_bool(), row["weight"].as_i64()),
        (Some(false), Some(3))
    );
    let (ok, out, _) = run(&["tenants", "set", "acme", "--no-cap"]);
    assert!(ok && !out.contains("50"), "{out}");
    // Refused, with what is allowed: a weight out of range, a cap of 0, both a cap and --no-cap.
    let (ok, _, err) = run(&["tenants", "set", "acme", "--weight", "0"]);
    assert!(!ok && err.contains("a weight is 1 to 1000"), "{err}");
    let (ok, _, err) = run(&["tenants", "set", "acme", "--weight", "-1"]);
    assert!(!ok && err.contains("weight -1 is out of range"), "{err}");
    let (ok, _, err) = run(&["tenants", "set", "acme", "--max-per-second", "0"]);
    assert!(!ok && err.contains("pause the tenant"), "{err}");
    let (ok, _, err) = run(&[
        "tenants",
        "set",
        "acme",
        "--max-per-second",
        "5",
        "--no-cap",
    ]);
    assert!(!ok && err.contains("cannot be used with"), "{err}");
    let (ok, out, _) = run(&["tenants", "clear", "acme"]);
    assert!(ok && out.contains("settings removed"), "{out}");
    let (ok, out, _) = run(&["tenants", "list"]);
    assert!(ok && out.contains("no tenant has settings"), "{out}");
}
