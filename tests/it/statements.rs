//! What the claim, the record and the append ask of PostgreSQL, read from the plans of the
//! statements they run inside (auto_explain, nested statements logged): no JIT compilation, a
//! record that examines only the rows it records, however many others are waiting, and an append
//! that looks rows up by index whatever the table's statistics say; and a claim whose leases add
//! no index entries.

use outbox_tests::{seed_outbox, TestDb};

fn aggregates(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

/// Runs `statements` in one psql session with every statement's plan logged (nested ones
/// included; with `analyze`, as EXPLAIN ANALYZE), after `settings`. Returns each logged plan.
fn logged_plans(db: &TestDb, settings: &[&str], analyze: bool, statements: &[&str]) -> Vec<String> {
    let mut command = std::process::Command::new("psql");
    command
        .arg(&db.url)
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1"]);
    let analyze = if analyze { "on" } else { "off" };
    let setup = [
        "LOAD 'auto_explain'".to_owned(),
        "SET auto_explain.log_min_duration = 0".to_owned(),
        "SET auto_explain.log_nested_statements = on".to_owned(),
        format!("SET auto_explain.log_analyze = {analyze}"),
        "SET auto_explain.log_level = notice".to_owned(),
    ];
    for sql in setup
        .iter()
        .map(String::as_str)
        .chain(settings.iter().copied())
        .chain(statements.iter().copied())
    {
        command.args(["-c", sql]);
    }
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("psql: cannot run it ({e}); is it on PATH? (`. .local/env`)"));
    assert!(output.status.success(), "{output:?}");
    String::from_utf8_lossy(&output.stderr)
        .split("duration: ")
        .skip(1)
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn claims_and_records_are_never_jit_compiled() {
    // With JIT on (PostgreSQL's default) the claim's estimate was over jit_above_cost, and every
    // claim compiled itself for 50-100 ms before reading 3 ms' worth. Here every statement of the
    // session is over the threshold (0): those inside the claim and the record must still run
    // without JIT (migration V8), while the session's own statements show that JIT is on.
    let db = TestDb::create().await;
    let client = db.client().await;
    let available: bool = client
        .query_one("SELECT pg_jit_available()", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        available,
        "this PostgreSQL has no JIT provider (Debian's postgresql-15 brings one): the test cannot tell"
    );
    seed_outbox(&client, "acme", &aggregates("agg", 50), 1, "{}").await;
    let plans = logged_plans(
        &db,
        &["SET jit_above_cost = 0"],
        false,
        &[
            "CREATE TEMP TABLE c AS SELECT id FROM outbox_claim(20, 600, 'jit', '')",
            "SELECT outbox_record('jit', (SELECT array_agg(id) FROM c), '{}', '{}', '{}', '{}', '{}')",
        ],
    );
    let (outer, inner): (Vec<&String>, Vec<&String>) = plans.iter().partition(|p| {
        p.contains("Query Text: CREATE TEMP TABLE")
            || p.contains("Query Text: SELECT outbox_record")
    });
    assert_eq!(outer.len(), 2, "{plans:?}");
    assert!(
        outer.iter().all(|p| p.contains("JIT:")),
        "JIT is not on here: {plans:?}"
    );
    assert!(
        inner.iter().any(|p| p.contains("Update on outbox"))
            && inner.iter().any(|p| p.contains("outbox_mark_done")),
        "the claim's and the record's statements were not logged: {plans:?}"
    );
    let compiled: Vec<&&String> = inner.iter().filter(|p| p.contains("JIT:")).collect();
    assert!(compiled.is_empty(), "compiled: {compiled:?}");
    assert_eq!(
        db.count(&client, "outbox WHERE status = 'published'").await,
        20
    );
}

/// The most rows one plan node of `plan` read (or paired) only to throw away: its "Rows Removed
/// by Filter" / "Rows Removed by Join Filter", which EXPLAIN gives per loop, times its loops.
fn rows_thrown_away(plan: &str) -> u64 {
    let mut loops = 1;
    let mut most = 0;
    for line in plan.lines() {
        if let Some((_, rest)) = line.split_once(" loops=") {
            loops = rest.trim_end_matches(')').parse::<u64>().unwrap_or(1);
        }
        if let Some((_, rest)) = line.trim().split_once("Rows Removed by ") {
            if let Some(n) = rest
                .rsplit_once(": ")
                .and_then(|(_, n)| n.trim().parse::<u64>().ok())
            {
                most = most.max(n * loops);
            }
        }
    }
    most
}

#[tokio::test]
async fn recording_a_claim_reads_only_its_rows_however_many_wait() {
    // The fault (migration V7's record): it found the claim's live published rows with two
    // `= ANY` arrays that the planner served from the pending index, reading every pending row's
    // entry and comparing it with both arrays: 10.7 ms of a 47 ms record of 500 with 100,000
    // rows pending, growing with the backlog; its statement for published replays had the same
    // shape over the replay index. Here two claims of 500 are recorded published while 50,000
    // live events and 20,000 replays wait, once with the plans PL/pgSQL makes for the first
    // calls and once with the generic plans it switches to later; no statement inside the
    // record may throw away more rows than the claim has.
    let db = TestDb::create().await;
    let client = db.client().await;
    seed_outbox(&client, "acme", &aggregates("claimed", 1_000), 1, "{}").await;
    for owner in ["custom", "generic"] {
        let claimed = db
            .count(&client, &format!("outbox_claim(500, 600, '{owner}', '')"))
            .await;
        assert_eq!(claimed, 500);
    }
    seed_outbox(&client, "acme", &aggregates("waiting", 50_000), 1, "{}").await;
    seed_outbox(&client, "acme", &aggregates("replayed", 20_000), 1, "{}").await;
    // Published long ago and being replayed (written past the append's triggers).
    client
        .batch_execute(
            "BEGIN;
             SET LOCAL session_replication_role = replica;
             UPDATE outbox SET status = 'published', replay = true, is_head = false,
                               published_at = now(), feed_position = nextval('outbox_feed_position_seq')
             WHERE aggregate_id LIKE 'replayed%';
             COMMIT;",
        )
        .await
        .unwrap();
    client.batch_execute("VACUUM ANALYZE outbox").await.unwrap();
    for (owner, plan_cache_mode) in [("custom", "auto"), ("generic", "force_generic_plan")] {
        let setting = format!("SET plan_cache_mode = {plan_cache_mode}");
        let record = format!(
            "SELECT outbox_record('{owner}', (SELECT array_agg(id) FROM outbox WHERE locked_by = '{owner}'), \
             '{{}}', '{{}}', '{{}}', '{{}}', '{{}}')"
        );
        let plans = logged_plans(&db, &[&setting], true, &[&record]);
        let inner: Vec<&String> = plans
            .iter()
            .filter(|p| !p.contains("Query Text: SELECT outbox_record"))
            .collect();
        assert!(
            inner.iter().any(|p| p.contains("Update on outbox")),
            "the record's statements were not logged: {plans:?}"
        );
        let wasteful: Vec<(u64, &&String)> = inner
            .iter()
            .map(|p| (rows_thrown_away(p), p))
            .filter(|(n, _)| *n > 500)
            .collect();
        assert!(
            wasteful.is_empty(),
            "{plan_cache_mode}: statements of the record that read past its 500 rows: {wasteful:#?}"
        );
    }
    assert_eq!(
        db.count(&client, "outbox WHERE status = 'published' AND NOT replay")
            .await,
        1_000
    );
    assert_eq!(
        db.count(&client, "outbox WHERE status = 'pending'").await,
        50_000
    );
    assert_eq!(db.count(&client, "outbox WHERE replay").await, 20_000);
}

/// Index entries read from the outbox's primary key so far in this transaction.
async fn primary_key_reads(client: &impl tokio_postgres::GenericClient) -> i64 {
    client
        .query_one(
            "SELECT pg_stat_get_xact_tuples_returned('outbox_pkey'::regclass)",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// A claim of 200 under `owner`: the ids of tenant acme's rows it took, in id order.
async fn claim_acme(client: &tokio_postgres::Client, owner: &str) -> Vec<i64> {
    client
        .query(
            "SELECT id FROM outbox_claim(200, 600, $1, '') WHERE tenant_id = 'acme' ORDER BY id",
            &[&owner],
        )
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test]
async fn a_record_finds_each_of_its_rows_three_times_not_five() {
    // Before V17 the record found each published row by id five times: the owner check, the
    // lock, the row with its successor, its tenant for the feed's lock, and the update. Now three:
    // the lock, the row with its successor, the update; and each successor twice (its lock and its
    // promotion). A claim of 200 takes tenant acme's 100 heads beside 20,000 waiting events (so every lookup is by index), half of
    // the claimed aggregates with a second version to promote, recorded published in a
    // transaction whose own index counts are read before and after; then a record where one row
    // is held by another session (deferred, and read again for it) and one given id is no longer
    // this owner's (neither recorded nor deferred).
    let db = TestDb::create().await;
    let mut client = db.client().await;
    seed_outbox(&client, "acme", &aggregates("two-", 50), 2, "{}").await;
    seed_outbox(&client, "acme", &aggregates("one-", 50), 1, "{}").await;
    seed_outbox(&client, "busy", &aggregates("waiting-", 20_000), 1, "{}").await;
    client.batch_execute("VACUUM ANALYZE outbox").await.unwrap();
    // The 100 heads of tenant acme (the claim shares a batch between tenants: 100 each).
    let ours = claim_acme(&client, "o1").await;
    assert_eq!(ours.len(), 100);
    let tx = client.transaction().await.unwrap();
    let before = primary_key_reads(&tx).await;
    let deferred: Vec<i64> = tx
        .query_one(
            "SELECT outbox_record('o1', $1, '{}', '{}', '{}', '{}', '{}')",
            &[&ours],
        )
        .await
        .unwrap()
        .get(0);
    let reads = primary_key_reads(&tx).await - before;
    tx.commit().await.unwrap();
    assert!(deferred.is_empty(), "{deferred:?}");
    assert_eq!(
        db.count(
            &client,
            "outbox WHERE tenant_id = 'acme' AND status = 'published'"
        )
        .await,
        100
    );
    assert_eq!(
        db.count(
            &client,
            "outbox WHERE tenant_id = 'acme' AND is_head AND status = 'pending'"
        )
        .await,
        50,
        "the second versions were promoted"
    );
    // At most: a statement the planner serves by a hash join instead reads fewer. At least the
    // lock's read of each row, so the count is known to be live.
    assert!(
        (100..=3 * 100 + 2 * 50).contains(&reads),
        "primary key entries read by a record of 100 rows with 50 successors: {reads}"
    );

    // The second versions: one held by another session, one leased again by another owner.
    let ids = claim_acme(&client, "o2").await;
    assert_eq!(ids.len(), 50);
    client
        .execute(
            "UPDATE outbox SET locked_by = 'o3' WHERE id = $1",
            &[&ids[1]],
        )
        .await
        .unwrap();
    let holder = db.client().await;
    holder
        .batch_execute(&format!(
            "BEGIN; SELECT 1 FROM outbox WHERE id = {} FOR UPDATE",
            ids[0]
        ))
        .await
        .unwrap();
    let deferred: Vec<i64> = client
        .query_one(
            "SELECT outbox_record('o2', $1, '{}', '{}', '{}', '{}', '{}')",
            &[&ids],
        )
        .await
        .unwrap()
        .get(0);
    holder.batch_execute("COMMIT").await.unwrap();
    assert_eq!(deferred, vec![ids[0]], "only the held row is deferred");
    assert_eq!(
        db.count(
            &client,
            "outbox WHERE tenant_id = 'acme' AND status = 'published'"
        )
        .await,
        148
    );
}

#[tokio::test]
async fn appends_look_rows_up_by_index_after_an_analyze_of_a_small_outbox() {
    // The fault (migration V7's triggers): PL/pgSQL plans the append's key lookups once per
    // session, from the statistics of the moment. After an ANALYZE of a nearly empty outbox (a
    // new deployment, a table emptied by retention) those plans were sequential scans, kept
    // while the table grew: a bulk append of 30,000 events over 5,000 aggregates ran past 60 s
    // instead of 2 s. Here the outbox is analyzed with 3 rows, then 300 events over 30
    // aggregates are appended in one statement (the first plans, then the generic ones PL/pgSQL
    // switches to) and 8 one at a time with generic plans forced: every statement inside the
    // append's triggers, at append or at commit, must read by the index of its key.
    // Not covered, because V13 does not fix it: an outbox analyzed while it held only dead rows
    // (statistics of 0 rows) gets plain scans of the idempotency index, which leads with
    // tenant_id too (migration V13's header).
    let db = TestDb::create().await;
    let client = db.client().await;
    let bulk = "INSERT INTO outbox (tenant_id, aggregate_type, aggregate_id, event_type, schema_version, payload)
                SELECT 'acme', 'order', 'bulk' || (n % 30), 'order.changed', 1, '{}'
                FROM generate_series(0, 299) n";
    let single = "INSERT INTO outbox (tenant_id, aggregate_type, aggregate_id, event_type, schema_version, payload)
                  VALUES ('acme', 'order', 'bulk7', 'order.changed', 1, '{}')";
    let key_indexes = [
        "outbox_tenant_id_aggregate_type_aggregate_id_aggregate_vers_key on outbox o",
        "outbox_pkey on outbox",
        "outbox_aggregates_pkey on outbox_aggregates",
    ];
    let state = "3 rows";
    seed_outbox(&client, "acme", &aggregates("early", 3), 1, "{}").await;
    client
        .batch_execute("ANALYZE outbox; ANALYZE outbox_aggregates")
        .await
        .unwrap();
    for (plan_cache_mode, statements) in [
        ("auto", vec![bulk]),
        ("force_generic_plan", vec![single; 8]),
    ] {
        let setting = format!("SET plan_cache_mode = {plan_cache_mode}");
        let plans = logged_plans(&db, &[&setting], false, &statements);
        let inner: Vec<&String> = plans
            .iter()
            .filter(|p| !p.contains("Query Text: INSERT INTO outbox (tenant_id, aggregate_type"))
            .collect();
        for lookup in ["outbox_aggregates", "FROM outbox o"] {
            assert!(
                inner.iter().any(|p| p.contains(lookup)),
                "{state}, {plan_cache_mode}: the triggers' lookups ({lookup}) were not logged: {plans:?}"
            );
        }
        let astray: Vec<&&String> = inner
            .iter()
            .filter(|p| {
                p.lines().any(|line| {
                    (line.contains("Scan") && !line.contains("Result"))
                        && !key_indexes.iter().any(|k| line.contains(k))
                })
            })
            .collect();
        assert!(
            astray.is_empty(),
            "{state}, {plan_cache_mode}: {} statements of the append read past their key's index, e.g. {:?}",
            astray.len(),
            astray.first()
        );
    }
    // And the append did its job: bulk7 has 10 events from the bulk, then 8; the other
    // aggregates 10; each aggregate's first event is its head.
    assert_eq!(
        db.count(
            &client,
            "outbox WHERE aggregate_id = 'bulk7' AND aggregate_version BETWEEN 1 AND 18"
        )
        .await,
        18,
        "{state}"
    );
    assert_eq!(
        db.count(&client, "outbox WHERE aggregate_id LIKE 'bulk%'")
            .await,
        308,
        "{state}"
    );
    assert_eq!(
        db.count(
            &client,
            "outbox WHERE is_head AND aggregate_id LIKE 'bulk%'"
        )
        .await,
        30,
        "{state}"
    );
}

/// The backend's update counts not yet flushed to the shared statistics for `table`, as
/// (updates, HOT updates). No flush happens inside a transaction, so the difference of two
/// readings in one transaction is the work between them.
async fn update_counts(client: &impl tokio_postgres::GenericClient, table: &str) -> (i64, i64) {
    let row = client
        .query_one(
            "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_xact_user_tables WHERE relname = $1",
            &[&table],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

#[tokio::test]
async fn a_claim_writes_every_lease_on_the_rows_own_page() {
    // A lease changes no indexed column, so it can be a HOT update (no index entry written)
    // when the row's page has room for its new version, which is longer than the row by the
    // lease owner the dispatcher writes (its log stream's name, '/', a 32-digit id: ~85 bytes).
    // With V1's fillfactor of 70, 3 leases in 10 were HOT and the others wrote an entry into
    // every index of the outbox; V14's fillfactor (40) leaves room for every row's lease.
    // Inputs tried: events of 11 payload sizes, from an empty note to 1,400 characters of
    // incompressible text (rows of ~260 to ~1,650 bytes, leased ~1,750: all kept on the page,
    // nothing in the outbox's TOAST table; larger rows go to TOAST and leave a small one), 300
    // events each, every one claimed once in claims of 100 under a lease owner as long as the
    // dispatcher's.
    let db = TestDb::create().await;
    let mut client = db.client().await;
    let owner = format!(
        "2026/12/06/[$LATEST]{}/{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    let sizes = [0, 50, 100, 200, 300, 450, 600, 800, 1000, 1200, 1400];
    let mut tried = 0;
    for (round, size) in sizes.into_iter().enumerate() {
        client
            .execute(
                "INSERT INTO outbox (tenant_id, aggregate_type, aggregate_id, event_type,
                                     schema_version, payload, metadata)
                 SELECT 'acme', 'payment', 'p' || $1::int || '-' || g, 'payment.paid', 1,
                        jsonb_build_object('note', (
                            SELECT coalesce(string_agg(md5(g::text || '/' || i::text), ''), '')
                            FROM generate_series(1, $2::int / 32) i)),
                        '{\"source\":\"payments\"}'
                 FROM generate_series(1, 300) g",
                &[&(round as i32), &size],
            )
            .await
            .unwrap();
        let tx = client.transaction().await.unwrap();
        let before = update_counts(&tx, "outbox").await;
        let mut claimed = 0;
        for _ in 0..3 {
            claimed += tx
                .query("SELECT id FROM outbox_claim(100, 600, $1, '')", &[&owner])
                .await
                .unwrap()
                .len();
        }
        let after = update_counts(&tx, "outbox").await;
        tx.commit().await.unwrap();
        // Rows and leased versions alike kept their payloads on the page: nothing was ever
        // written to the outbox's TOAST table (this database is new).
        let toasted: i64 = client
            .query_one(
                "SELECT pg_relation_size(reltoastrelid) FROM pg_class WHERE relname = 'outbox'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(toasted, 0, "a note of {size} characters went to TOAST");
        let (updates, hot) = (after.0 - before.0, after.1 - before.1);
        assert_eq!(claimed, 300, "a note of {size} characters");
        assert_eq!(updates, 300, "a note of {size} characters");
        assert_eq!(
            hot, updates,
            "a note of {size} characters: {hot} of {updates} leases were HOT"
        );
        tried += 1;
    }
    assert_eq!(tried, sizes.len());
    let fillfactor = db
        .count(
            &client,
            "pg_class WHERE relname = 'outbox' AND 'fillfactor=40' = ANY (reloptions)",
        )
        .await;
    assert_eq!(fillfactor, 1);
}

#[test]
fn thrown_away_rows_count_every_loop() {
    let plan = "Nested Loop  (cost=0.1..2.0 rows=5 width=8) (actual time=0.1..0.2 rows=5 loops=1)
  ->  Index Scan using outbox_pkey on outbox  (cost=0.1..1.0 rows=1 width=8) (actual time=0.01..0.02 rows=1 loops=500)
        Filter: (replay)
        Rows Removed by Filter: 100
  ->  Seq Scan on t  (cost=0.1..1.0 rows=1 width=8) (actual time=0.01..0.02 rows=1 loops=1)
        Rows Removed by Join Filter: 30";
    assert_eq!(rows_thrown_away(plan), 50_000);
    assert_eq!(
        rows_thrown_away("Result  (actual time=0.1..0.1 rows=1 loops=1)"),
        0
    );
}
