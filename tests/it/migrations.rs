//! (Past 400 lines: one test per migration rule (layout, adoption, a service's own set), sharing this file's fixtures.)
//!
//! The migrations: two sets (the toolkit's, then the payments example's), each in its own history
//! table. They apply to an empty database and are a no-op the second time; together they give
//! exactly the schema the single set before the split gave; a database migrated before the split
//! is adopted without running anything; a service's own refinery migrations run beside them.
//!
//! The schema comparisons run `pg_dump` (on `PATH`: `. .local/env`), of the server's version or
//! later.

use std::collections::BTreeMap;

use tokio_postgres::Client;

use outbox_tests::{admin_settings, TestDb};
use payments::migrate::{run_migrations, run_payments_migrations, PAYMENTS_HISTORY_TABLE};
use pg_outbox::dispatcher::OutboxDispatcher;
use pg_outbox::memory::MemoryPublisher;
use pg_outbox::postgres::migrate::refinery::{Migration, Runner};
use pg_outbox::postgres::migrate::{run_outbox_migrations, OUTBOX_HISTORY_TABLE};
use pg_outbox::postgres::outbox::PgOutboxStore;
use pg_outbox::postgres::{DatabaseSettings, Db};

/// `pg_dump --schema-only` of a database migrated before the split (without its history).
const SCHEMA_BEFORE_SPLIT: &str = include_str!("../fixtures/schema-before-split.sql");
/// The rows that database held besides its history.
const DATA_BEFORE_SPLIT: &str = include_str!("../fixtures/data-before-split.sql");
/// Its `refinery_schema_history`, as the code before the split wrote it.
const HISTORY_BEFORE_SPLIT: &str = include_str!("../fixtures/history-before-split.sql");

const OUTBOX_NAMES: [&str; 19] = [
    "outbox/V1__outbox",
    "outbox/V2__inbox",
    "outbox/V3__operations",
    "outbox/V4__aggregate_order",
    "outbox/V5__toolkit",
    "outbox/V6__events_feed",
    "outbox/V7__what_goes_next",
    "outbox/V8__tenant_fair_claim",
    "outbox/V9__record_reads_only_its_rows",
    "outbox/V10__delayed_events",
    "outbox/V11__replays_one_at_a_time",
    "outbox/V12__cloudevents_ranges",
    "outbox/V13__append_by_index",
    "outbox/V14__room_for_the_lease",
    "outbox/V15__a_lane_for_the_waiting",
    "outbox/V16__the_envelope_checked_once",
    "outbox/V17__fewer_reads_in_the_record",
    "outbox/V18__later_appends_in_a_transaction",
    "outbox/V19__tenant_weights_and_caps",
];
/// The toolkit's migrations newer than the split: what a database migrated before it runs.
const AFTER_SPLIT: [&str; 12] = [
    "outbox/V8__tenant_fair_claim",
    "outbox/V9__record_reads_only_its_rows",
    "outbox/V10__delayed_events",
    "outbox/V11__replays_one_at_a_time",
    "outbox/V12__cloudevents_ranges",
    "outbox/V13__append_by_index",
    "outbox/V14__room_for_the_lease",
    "outbox/V15__a_lane_for_the_waiting",
    "outbox/V16__the_envelope_checked_once",
    "outbox/V17__fewer_reads_in_the_record",
    "outbox/V18__later_appends_in_a_transaction",
    "outbox/V19__tenant_weights_and_caps",
];
const PAYMENTS_NAMES: [&str; 4] = [
    "payments/V1__payments",
    "payments/V2__projections",
    "payments/V3__inbox_projection",
    "payments/V4__search_path",
];

#[tokio::test]
async fn migrations_are_idempotent_and_create_the_claim_index() {
    let db = TestDb::create().await;
    let mut client = db.client().await;
    assert!(run_migrations(&mut client).await.unwrap().is_empty());

    let indexdef: String = client
        .query_one(
            "SELECT indexdef FROM pg_indexes WHERE tablename = 'outbox' AND indexname = 'outbox_claim_idx'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(indexdef.contains("(next_attempt_at, id)"), "{indexdef}");
    assert!(
        indexdef.contains("WHERE (status = 'pending'::text)"),
        "{indexdef}"
    );
    // The claim's: pending heads per tenant in due order (V8), in place of one over all tenants.
    let claim_indexes = db
        .texts(
            &client,
            "SELECT indexname || ' ' || indexdef FROM pg_indexes
             WHERE tablename = 'outbox' AND indexname LIKE '%claim%' ORDER BY 1",
        )
        .await;
    assert_eq!(claim_indexes.len(), 3, "{claim_indexes:?}");
    assert!(
        claim_indexes[2].starts_with("outbox_tenant_claim_idx")
            && claim_indexes[2].contains("(tenant_id, next_attempt_at, id)")
            && claim_indexes[2].contains("is_head"),
        "{claim_indexes:?}"
    );

    let options: Vec<String> = client
        .query_one(
            "SELECT reloptions FROM pg_class WHERE relname = 'outbox'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        options
            .iter()
            .any(|o| o == "autovacuum_vacuum_cost_delay=0"),
        "{options:?}"
    );
}

#[tokio::test]
async fn migrations_give_the_schema_of_a_database_migrated_before_the_split_and_on() {
    // Up to the split, the sets give exactly what the single set gave (the fixtures); the
    // migrations after it then run on both alike.
    let db = TestDb::create().await;
    let old = EmptyDb::before_split().await;
    assert_eq!(
        run_migrations(&mut old.client().await).await.unwrap(),
        AFTER_SPLIT
    );
    assert_same_dump(
        "schema",
        &pg_dump(&db.url, &["--schema-only"]).await,
        &pg_dump(&old.url, &["--schema-only"]).await,
    );
    assert_same_dump(
        "data",
        &pg_dump(&db.url, &["--data-only", "--inserts"]).await,
        DATA_BEFORE_SPLIT,
    );
    let client = db.client().await;
    assert_eq!(
        tables(&client, "%schema_history").await,
        [OUTBOX_HISTORY_TABLE, PAYMENTS_HISTORY_TABLE],
        "each set in its own history table, refinery's default left to the service"
    );
}

#[tokio::test]
async fn migrations_record_each_set_in_its_own_history_table() {
    let db = EmptyDb::create().await;
    let mut client = db.client().await;
    assert_eq!(run_migrations(&mut client).await.unwrap(), all_names());
    assert_eq!(
        history(&client, OUTBOX_HISTORY_TABLE)
            .await
            .keys()
            .map(|(v, n)| format!("outbox/V{v}__{n}"))
            .collect::<Vec<_>>(),
        OUTBOX_NAMES
    );
    assert_eq!(
        history(&client, PAYMENTS_HISTORY_TABLE)
            .await
            .keys()
            .map(|(v, n)| format!("payments/V{v}__{n}"))
            .collect::<Vec<_>>(),
        PAYMENTS_NAMES
    );
    assert!(run_migrations(&mut client).await.unwrap().is_empty());
}

#[tokio::test]
async fn the_toolkit_alone_creates_no_table_or_function_of_the_payments_example() {
    let db = EmptyDb::create().await;
    let mut client = db.client().await;
    assert_eq!(
        run_outbox_migrations(&mut client).await.unwrap(),
        OUTBOX_NAMES
    );
    assert!(run_outbox_migrations(&mut client).await.unwrap().is_empty());

    assert_eq!(
        tables(&client, "%").await,
        [
            "inbox_positions",
            "outbox",
            "outbox_aggregates",
            "outbox_dispatch_state",
            "outbox_dispatcher_heartbeats",
            "outbox_feed_acks",
            "outbox_feed_tenants",
            "outbox_schema_history",
            "outbox_tenant_limits",
            "processed_events",
        ]
    );
    let functions = db
        .texts(
            &client,
            "SELECT proname::text FROM pg_proc WHERE pronamespace = 'public'::regnamespace \
             ORDER BY 1",
        )
        .await;
    assert!(!functions.is_empty());
    for function in &functions {
        assert!(
            function.starts_with("outbox_") || function.starts_with("inbox_"),
            "{function} is not the toolkit's: {functions:?}"
        );
    }

    // The payments example then goes on top, as run_migrations does it.
    assert_eq!(
        run_payments_migrations(&mut client).await.unwrap(),
        PAYMENTS_NAMES
    );
    assert!(run_migrations(&mut client).await.unwrap().is_empty());
    let fresh = TestDb::create().await;
    assert_same_dump(
        "schema",
        &pg_dump(&db.url, &["--schema-only"]).await,
        &pg_dump(&fresh.url, &["--schema-only"]).await,
    );
}

#[tokio::test]
async fn a_database_migrated_before_the_split_is_adopted_without_running_anything() {
    let db = EmptyDb::before_split().await;
    let mut client = db.client().await;
    let before = history(&client, "refinery_schema_history").await;
    assert_eq!(before.len(), 7);

    // Nothing before the split runs again; only what is newer.
    assert_eq!(run_migrations(&mut client).await.unwrap(), AFTER_SPLIT);

    // Each set's history is what refinery records on a database it migrates itself (so its next
    // run finds nothing diverging), dated when the migration before the split ran.
    let fresh = TestDb::create().await;
    let fresh_client = fresh.client().await;
    for (table, from) in [
        (OUTBOX_HISTORY_TABLE, [1usize, 2, 3, 4, 5, 6, 7].as_slice()),
        (PAYMENTS_HISTORY_TABLE, [1, 2, 5, 7].as_slice()),
    ] {
        let adopted = history(&client, table).await;
        let migrated = history(&fresh_client, table).await;
        assert_eq!(
            adopted
                .iter()
                .map(|(k, (_, checksum))| (k.clone(), checksum.clone()))
                .collect::<Vec<_>>(),
            migrated
                .iter()
                .map(|(k, (_, checksum))| (k.clone(), checksum.clone()))
                .collect::<Vec<_>>(),
            "{table}"
        );
        let old_dates: Vec<&String> = before.values().map(|(on, _)| on).collect();
        let dates: Vec<&String> = adopted
            .values()
            .take(from.len())
            .map(|(on, _)| on)
            .collect();
        let expected: Vec<&String> = from.iter().map(|v| old_dates[*v - 1]).collect();
        assert_eq!(dates, expected, "{table}");
    }
    // The old history stays as it was; the schema is a fresh database's.
    assert_eq!(history(&client, "refinery_schema_history").await, before);
    assert_same_dump(
        "schema",
        &pg_dump(&db.url, &["--schema-only"]).await,
        &pg_dump(&fresh.url, &["--schema-only"]).await,
    );

    assert!(run_migrations(&mut client).await.unwrap().is_empty());
    // Once adopted, the old history is not read again: it may be dropped.
    client
        .batch_execute("DROP TABLE refinery_schema_history")
        .await
        .unwrap();
    assert!(run_migrations(&mut client).await.unwrap().is_empty());
}

#[tokio::test]
async fn each_set_alone_adopts_its_part_of_a_database_migrated_before_the_split() {
    let db = EmptyDb::before_split().await;
    let mut client = db.client().await;
    assert!(run_payments_migrations(&mut client)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(history(&client, PAYMENTS_HISTORY_TABLE).await.len(), 4);
    assert!(tables(&client, OUTBOX_HISTORY_TABLE).await.is_empty());
    assert_eq!(
        run_outbox_migrations(&mut client).await.unwrap(),
        AFTER_SPLIT
    );
    assert_eq!(
        history(&client, OUTBOX_HISTORY_TABLE).await.len(),
        OUTBOX_NAMES.len()
    );
    assert!(run_migrations(&mut client).await.unwrap().is_empty());
}

#[tokio::test]
async fn two_first_runs_at_once_adopt_a_database_once() {
    let db = EmptyDb::before_split().await;
    let (mut a, mut b) = (db.client().await, db.client().await);
    let (ran_a, ran_b) = tokio::join!(run_migrations(&mut a), run_migrations(&mut b));
    // One runs what is newer than the split; the other waits for it, then finds it applied.
    let mut ran = [ran_a.unwrap(), ran_b.unwrap()];
    ran.sort();
    assert_eq!(ran, [vec![], AFTER_SPLIT.to_vec()]);
    assert_eq!(
        history(&a, OUTBOX_HISTORY_TABLE).await.len(),
        OUTBOX_NAMES.len()
    );
    assert_eq!(history(&a, PAYMENTS_HISTORY_TABLE).await.len(), 4);
}

#[tokio::test]
async fn two_first_runs_at_once_on_an_empty_database_apply_each_migration_once() {
    // Two instances deploying together, before the lock: both ran V1 and one failed on a table
    // the other had just created.
    let db = EmptyDb::create().await;
    let (mut a, mut b) = (db.client().await, db.client().await);
    let (ran_a, ran_b) = tokio::join!(run_migrations(&mut a), run_migrations(&mut b));
    let mut ran = [ran_a.unwrap(), ran_b.unwrap()];
    ran.sort();
    assert_eq!(ran, [vec![], all_names()]);
}

#[tokio::test]
async fn a_history_the_migrations_before_the_split_never_wrote_is_not_adopted() {
    let db = EmptyDb::before_split().await;
    let mut client = db.client().await;
    client
        .batch_execute("UPDATE refinery_schema_history SET checksum = '1' WHERE version = 7")
        .await
        .unwrap();
    let error = run_migrations(&mut client).await.unwrap_err();
    assert!(error.to_string().contains("V7__what_goes_next"), "{error}");
    assert_eq!(
        tables(&client, "%schema_history").await,
        ["refinery_schema_history"]
    );
}

#[tokio::test]
async fn a_services_own_refinery_migrations_run_beside_the_toolkits_in_either_order() {
    // The service's first.
    let db = EmptyDb::create().await;
    let mut client = db.client().await;
    assert_eq!(service_migrations(&mut client).await, ["V1__orders"]);
    assert_eq!(run_migrations(&mut client).await.unwrap(), all_names());
    assert!(service_migrations(&mut client).await.is_empty());
    assert!(run_migrations(&mut client).await.unwrap().is_empty());
    assert_eq!(
        history(&client, "refinery_schema_history")
            .await
            .keys()
            .collect::<Vec<_>>(),
        [&(1, "orders".to_string())]
    );

    // The toolkit's first.
    let db = TestDb::create().await;
    let mut client = db.client().await;
    assert_eq!(service_migrations(&mut client).await, ["V1__orders"]);
    assert!(run_migrations(&mut client).await.unwrap().is_empty());
    assert!(service_migrations(&mut client).await.is_empty());
    assert_eq!(db.count(&client, "orders").await, 0);
}

/// A service's own migrations, in refinery's default history table; the names it applied.
async fn service_migrations(client: &mut Client) -> Vec<String> {
    let orders = Migration::unapplied(
        "V1__orders",
        include_str!("../fixtures/service-migrations/V1__orders.sql"),
    )
    .unwrap();
    Runner::new(&[orders])
        .run_async(client)
        .await
        .unwrap()
        .applied_migrations()
        .iter()
        .map(|m| m.to_string())
        .collect()
}

fn all_names() -> Vec<&'static str> {
    OUTBOX_NAMES
        .iter()
        .chain(&PAYMENTS_NAMES)
        .copied()
        .collect()
}

/// A database of its own, created empty (TestDb::create migrates it).
struct EmptyDb {
    settings: DatabaseSettings,
    url: String,
}

impl EmptyDb {
    async fn create() -> Self {
        let admin = admin_settings();
        // Named as TestDb names its databases, so `scripts/dev-env prune` drops it too.
        let name = format!("t_{}", uuid::Uuid::new_v4().simple());
        admin
            .connect()
            .await
            .expect("connect to the test PostgreSQL")
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create test database");
        let admin_url = std::env::var("OUTBOX_TEST_DATABASE_URL").expect("test database URL");
        let (server, _) = admin_url
            .rsplit_once('/')
            .expect("OUTBOX_TEST_DATABASE_URL ends in a database name");
        Self {
            settings: admin.with_dbname(&name),
            url: format!("{server}/{name}"),
        }
    }

    /// A database as the code before the split left it: its schema, rows and history.
    async fn before_split() -> Self {
        let db = Self::create().await;
        // On a connection of its own: the dumps empty the session's search_path.
        let client = db.client().await;
        for sql in [SCHEMA_BEFORE_SPLIT, DATA_BEFORE_SPLIT, HISTORY_BEFORE_SPLIT] {
            client
                .batch_execute(&executable(sql))
                .await
                .expect("restore the database before the split");
        }
        db
    }

    async fn client(&self) -> Client {
        self.settings
            .connect()
            .await
            .expect("connect to the test database")
    }

    async fn texts(&self, client: &Client, sql: &str) -> Vec<String> {
        client
            .query(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .iter()
            .map(|r| r.get(0))
            .collect()
    }
}

/// A history table's rows: (version, name) -> (applied_on, checksum).
async fn history(client: &Client, table: &str) -> BTreeMap<(i32, String), (String, String)> {
    // The table names are the tests' own constants.
    client
        .query(
            &format!("SELECT version, name, applied_on, checksum FROM {table}"),
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("{table}: {e}"))
        .iter()
        .map(|r| ((r.get(0), r.get(1)), (r.get(2), r.get(3))))
        .collect()
}

/// The tables of the public schema whose name is LIKE `pattern`, sorted.
async fn tables(client: &Client, pattern: &str) -> Vec<String> {
    client
        .query(
            "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' \
             AND tablename LIKE $1 ORDER BY 1",
            &[&pattern],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// `pg_dump` of a database without owners, privileges and history tables.
async fn pg_dump(url: &str, args: &[&str]) -> String {
    let output = tokio::process::Command::new("pg_dump")
        .args([
            "--no-owner",
            "--no-privileges",
            "--exclude-table=*_schema_history",
        ])
        .args(args)
        .arg(format!("--dbname={url}"))
        .output()
        .await
        .unwrap_or_else(|e| {
            panic!("pg_dump: cannot run it ({e}); is it on PATH? (`. .local/env`)")
        });
    assert!(
        output.status.success(),
        "pg_dump failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("pg_dump writes UTF-8")
}

/// A dump without what differs between two dumps of the same schema: pg_dump's comment lines (the
/// fixtures' headers too), its per-dump `\restrict` key, blank lines and trailing spaces.
fn normalized(dump: &str) -> Vec<&str> {
    dump.lines()
        .filter(|l| {
            !l.starts_with("--")
                && !l.starts_with("\\restrict ")
                && !l.starts_with("\\unrestrict ")
                && !l.trim().is_empty()
        })
        .map(str::trim_end)
        .collect()
}

/// A dump as statements the server runs (`\restrict` is for psql only).
fn executable(dump: &str) -> String {
    dump.lines()
        .filter(|l| !l.starts_with('\\'))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Fails naming the lines one dump has and the other has not.
fn assert_same_dump(what: &str, actual: &str, expected: &str) {
    let (actual, expected) = (normalized(actual), normalized(expected));
    if actual == expected {
        return;
    }
    let mut counts: BTreeMap<&str, i64> = BTreeMap::new();
    for line in &actual {
        *counts.entry(line).or_default() += 1;
    }
    for line in &expected {
        *counts.entry(line).or_default() -= 1;
    }
    let extra: Vec<&str> = counts
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(l, _)| *l)
        .collect();
    let missing: Vec<&str> = counts
        .iter()
        .filter(|(_, n)| **n < 0)
        .map(|(l, _)| *l)
        .collect();
    let first = actual
        .iter()
        .zip(&expected)
        .position(|(a, e)| a != e)
        .unwrap_or(actual.len().min(expected.len()));
    panic!(
        "the {what} dump differs from the one expected\n\
         missing ({}):\n  {}\nextra ({}):\n  {}\nfirst difference at line {first}: {:?} (before the split: {:?})",
        missing.len(),
        missing.join("\n  "),
        extra.len(),
        extra.join("\n  "),
        actual.get(first),
        expected.get(first),
    );
}

#[tokio::test]
async fn every_toolkit_function_resolves_names_in_its_own_schema() {
    // A function without its search_path pinned looks `outbox` up by the caller's: a capture
    // fired by a writer whose search_path is `crm`, or a dispatcher role with another default,
    // would not find it. outbox_claim (V8) was created unpinned; V9 pins every function again.
    let db = TestDb::create().await;
    let client = db.client().await;
    let unpinned = db
        .texts(
            &client,
            "SELECT p.oid::regprocedure::text FROM pg_proc p
             WHERE p.pronamespace = 'public'::regnamespace
               AND (p.proname LIKE 'outbox\\_%' OR p.proname LIKE 'inbox\\_%')
               AND NOT coalesce('search_path=public, pg_catalog' = ANY (p.proconfig), false)
             ORDER BY 1",
        )
        .await;
    // One exception (V14): the event id default names only pg_catalog, so it needs no pin, and
    // a pinned SQL function is never inlined (every SQL append paid for the setting's change).
    assert_eq!(unpinned, ["outbox_uuid_v7()"], "unpinned");
    // Inlined where it is used, the outbox's default: the plan of an append shows the body's
    // expression, not a call of the function.
    let plan = db
        .texts(
            &client,
            "EXPLAIN (VERBOSE) INSERT INTO outbox (tenant_id, aggregate_type, aggregate_id,
                 event_type, schema_version, payload) VALUES ('acme', 'a', 'b', 'c', 1, '{}')",
        )
        .await
        .join("\n");
    assert!(
        !plan.contains("outbox_uuid_v7") && plan.contains("gen_random_uuid()"),
        "{plan}"
    );
    // And it resolves nothing through the caller's search_path: a schema ahead of pg_catalog
    // whose look-alikes of every function, the operator and the type of its body fail.
    client
        .batch_execute(
            "CREATE SCHEMA hostile;
             CREATE FUNCTION hostile.fail() RETURNS void LANGUAGE plpgsql AS
                 $$ BEGIN RAISE EXCEPTION 'resolved through the search_path'; END $$;
             CREATE FUNCTION hostile.encode(bytea, text) RETURNS text LANGUAGE sql
                 AS 'SELECT hostile.fail()::text';
             CREATE FUNCTION hostile.set_bit(bytea, bigint, integer) RETURNS bytea LANGUAGE sql
                 AS 'SELECT hostile.fail()::text::bytea';
             CREATE FUNCTION hostile.uuid_send(uuid) RETURNS bytea LANGUAGE sql
                 AS 'SELECT hostile.fail()::text::bytea';
             CREATE FUNCTION hostile.gen_random_uuid() RETURNS uuid LANGUAGE sql
                 AS 'SELECT hostile.fail()::text::uuid';
             CREATE FUNCTION hostile.int8send(bigint) RETURNS bytea LANGUAGE sql
                 AS 'SELECT hostile.fail()::text::bytea';
             CREATE FUNCTION hostile.floor(numeric) RETURNS numeric LANGUAGE sql
                 AS 'SELECT hostile.fail()::text::numeric';
             CREATE FUNCTION hostile.clock_timestamp() RETURNS timestamptz LANGUAGE sql
                 AS 'SELECT hostile.fail()::text::timestamptz';
             CREATE FUNCTION hostile.times(numeric, integer) RETURNS numeric LANGUAGE sql
                 AS 'SELECT hostile.fail()::text::numeric';
             CREATE OPERATOR hostile.* (LEFTARG = numeric, RIGHTARG = integer,
                                        FUNCTION = hostile.times);
             CREATE DOMAIN hostile.uuid AS text CHECK (hostile.fail() IS NULL);
             SET search_path = hostile, pg_catalog, public",
        )
        .await
        .unwrap();
    let id: uuid::Uuid = client
        .query_one("SELECT public.outbox_uuid_v7()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(id.get_version_num(), 7, "{id}");
    let appended: uuid::Uuid = client
        .query_one(
            "INSERT INTO public.outbox (tenant_id, aggregate_type, aggregate_id, event_type,
                                        schema_version, payload)
             VALUES ('acme', 'hostile', 'h-1', 'h.created', 1, '{}') RETURNING event_id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(appended.get_version_num(), 7, "{appended}");
    client
        .batch_execute("RESET search_path; DROP SCHEMA hostile CASCADE")
        .await
        .unwrap();
    let pinned = db
        .count(
            &client,
            "pg_proc WHERE pronamespace = 'public'::regnamespace AND proname = 'outbox_claim'
               AND 'search_path=public, pg_catalog' = ANY (proconfig)",
        )
        .await;
    assert_eq!(pinned, 1, "the claim is among them");
    // The record keeps V7's lock timeout and V8's JIT setting through V9's CREATE OR REPLACE.
    let record = db
        .count(
            &client,
            "pg_proc WHERE pronamespace = 'public'::regnamespace AND proname = 'outbox_record'
               AND proconfig @> '{lock_timeout=2s,jit=off}'",
        )
        .await;
    assert_eq!(record, 1, "outbox_record has lost a setting");
}

#[tokio::test]
async fn a_row_stored_before_the_metadata_check_goes_dead_instead_of_failing_every_claim() {
    // The fault (V5 to V15): the metadata check was a CHECK constraint, NOT VALID, which
    // PostgreSQL checks on every UPDATE of a row. A row stored before V5 whose metadata the
    // envelope cannot carry made the lease update of every claim that took it fail: the whole
    // claim failed at each poll and the events behind it never went out.
    let db = EmptyDb::create().await;
    let mut client = db.client().await;
    // The toolkit as V4 left it, recorded where the toolkit's runner looks.
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../migrations/outbox");
    let first_four: Vec<Migration> = OUTBOX_NAMES[..4]
        .iter()
        .map(|name| {
            let name = name.trim_start_matches("outbox/");
            let sql = std::fs::read_to_string(dir.join(format!("{name}.sql"))).unwrap();
            Migration::unapplied(name, &sql).unwrap()
        })
        .collect();
    Runner::new(&first_four)
        .set_migration_table_name(OUTBOX_HISTORY_TABLE)
        .run_async(&mut client)
        .await
        .unwrap();
    // Stored then: a number as source (the envelope needs a string), and a good event after it.
    client
        .batch_execute(
            r#"INSERT INTO outbox (event_id, tenant_id, aggregate_type, aggregate_id, event_type,
                                   schema_version, payload, metadata)
               VALUES (gen_random_uuid(), 'acme', 'invoice', 'inv-old', 'invoice.issued', 1, '{}',
                       '{"correlation_id": "c-1", "source": 5}'),
                      (gen_random_uuid(), 'acme', 'invoice', 'inv-ok', 'invoice.issued', 1, '{}',
                       '{"correlation_id": "c-2", "source": "billing"}')"#,
        )
        .await
        .unwrap();
    let applied = run_outbox_migrations(&mut client).await.unwrap();
    assert_eq!(applied, OUTBOX_NAMES[4..], "the rest applied");

    let store = PgOutboxStore::new(Db::new(db.settings.clone()));
    let bus = MemoryPublisher::new();
    let dispatcher = OutboxDispatcher::new(
        store,
        bus.clone(),
        outbox_tests::test_dispatcher_config(),
        "old-rows".to_owned(),
    );
    let summary = dispatcher
        .drain(std::time::Instant::now() + std::time::Duration::from_secs(10))
        .await
        .expect("a drain over the old row");
    assert_eq!((summary.published, summary.dead), (1, 1), "{summary:?}");
    let delivered: Vec<String> = bus
        .delivered()
        .iter()
        .map(|e| e.aggregate_id.clone())
        .collect();
    assert_eq!(delivered, ["inv-ok"]);
    let (status, error): (String, String) = client
        .query_one(
            "SELECT status, last_error FROM outbox WHERE aggregate_id = 'inv-old'",
            &[],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!(status, "dead");
    assert!(error.contains("cannot build its envelope"), "{error}");

    // New rows are still checked (the inputs are tried by
    // capture::rows_from_sql_producers_get_envelope_defaults_or_are_refused_at_insert), and so is
    // an update of the metadata. Inputs tried here: a number as causation id (refused), a string
    // one (accepted).
    let err = client
        .execute(
            "UPDATE outbox SET metadata = metadata || '{\"causation_id\": 3}'
             WHERE aggregate_id = 'inv-ok'",
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(
        err.as_db_error().and_then(|e| e.constraint()),
        Some("outbox_metadata_makes_an_envelope"),
        "{err:?}"
    );
    let updated = client
        .execute(
            "UPDATE outbox SET metadata = metadata || '{\"causation_id\": \"req-1\"}'
             WHERE aggregate_id = 'inv-ok'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(updated, 1);
}
