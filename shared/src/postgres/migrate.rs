//! Schema migrations: sets of SQL files, embedded at build time and applied in order by
//! refinery, each recorded in a history table of its own.
//!
//! * `migrations/outbox/`: the toolkit (outbox, inbox, dispatcher state, aggregates, feed,
//!   capture and every `outbox_*` / `inbox_*` function), recorded in `outbox_schema_history`
//!   ([`run_outbox_migrations`]).
//! * a service's own set ([`MigrationSet`], [`run_set`]), after the toolkit's, each in
//!   its own history table.
//!
//! None uses refinery's default `refinery_schema_history`, which is left to a service's own
//! runner if it has one. Before the split, one set (`migrations/V1__payments_and_outbox.sql` ...
//! `V7__what_goes_next.sql`) was recorded there; on a database it migrated, the first run of each set
//! records the migrations of the set whose statements it ran as applied, and runs none of them again.

use std::collections::BTreeMap;

use refinery::error::WrapMigrationError;
use refinery::{Runner, SchemaVersion};
use tokio_postgres::Client;

/// The refinery these migrations run on: a service can run its own migrations with it on the same
/// connection, in a history table of its own (refinery's default `refinery_schema_history` is
/// free for that), before or after the toolkit's.
pub use refinery;

/// The history table of the toolkit's migrations.
pub const OUTBOX_HISTORY_TABLE: &str = "outbox_schema_history";

/// A set of migrations, applied in version order and recorded in its own history table: the
/// toolkit's ([`run_outbox_migrations`]), or a service's own, run after it with [`run_set`].
pub struct MigrationSet {
    /// Its folder under `migrations/`, which prefixes the names [`run_set`] returns.
    pub folder: &'static str,
    /// Where refinery records it.
    pub history_table: &'static str,
    /// The runner `refinery::embed_migrations!` generated for it.
    pub runner: fn() -> Runner,
    /// For each migration of the set that existed before the split: the version of the migration
    /// before the split whose statements it holds. A database migrated before the split up to
    /// that version has it applied already. Empty for a set that never was in the single set.
    pub before_split: &'static [(SchemaVersion, SchemaVersion)],
}

mod outbox_set {
    refinery::embed_migrations!("../migrations/outbox");
}

const OUTBOX: MigrationSet = MigrationSet {
    folder: "outbox",
    history_table: OUTBOX_HISTORY_TABLE,
    runner: outbox_set::migrations::runner,
    // Each holds the toolkit's part of the migration of the same version.
    before_split: &[(1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (6, 6), (7, 7)],
};

/// Applies the toolkit's migrations not applied yet (`outbox_schema_history`); returns the names
/// of those it applied. Creates no table of any service.
pub async fn run_outbox_migrations(client: &mut Client) -> Result<Vec<String>, refinery::Error> {
    run_set(client, &OUTBOX).await
}

/// Applies the migrations of `set` not applied yet; returns the names of those it applied
/// (`<folder>/V1__name`, ...). A database migrated before the split is adopted first (below).
/// Runs hold a session lock ([`MIGRATION_LOCK`]) from start to end, so that two at once (two
/// instances deploying together) apply each migration once: the second waits, then finds them
/// applied. Refinery alone would let both run the same migration. The wait is bounded
/// ([`MIGRATION_LOCK_WAIT`]) and said in the log; give `client` a connection of its own, to the
/// database itself (a session lock does not survive a pooler that hands each statement to
/// another server session, such as PgBouncer in transaction mode).
pub async fn run_set(
    client: &mut Client,
    set: &MigrationSet,
) -> Result<Vec<String>, refinery::Error> {
    let what = format!("waiting for other runs of the migrations of {}", set.folder);
    let started = std::time::Instant::now();
    loop {
        let locked: bool = client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&MIGRATION_LOCK])
            .await
            .migration_err(&what, None)?
            .get(0);
        if locked {
            break;
        }
        if started.elapsed() >= MIGRATION_LOCK_WAIT {
            return Err(std::io::Error::other(format!(
                "another run of the migrations has held the advisory lock {MIGRATION_LOCK} for \
                 over {} s (pg_locks: locktype 'advisory', objid {}): is a migration stuck?",
                MIGRATION_LOCK_WAIT.as_secs(),
                MIGRATION_LOCK & 0xffff_ffff
            )))
            .migration_err(&what, None);
        }
        if started.elapsed() < std::time::Duration::from_millis(300) {
            tracing::info!(
                set = set.folder,
                "another run of the migrations is under way: waiting"
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    let result = run_set_locked(client, set).await;
    match client
        .query_one("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await
    {
        Ok(row) if row.get::<_, bool>(0) => {}
        // Not released here: it goes with the session.
        other => tracing::warn!(set = set.folder, result = ?other.map(|r| r.get::<_, bool>(0)),
            "the migrations' advisory lock was not released on this session"),
    }
    result
}

/// How long a run waits for another run's migrations before it fails.
pub const MIGRATION_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(600);

async fn run_set_locked(
    client: &mut Client,
    set: &MigrationSet,
) -> Result<Vec<String>, refinery::Error> {
    adopt_single_set(client, set).await?;
    let mut runner = (set.runner)();
    runner.set_migration_table_name(set.history_table);
    let report = runner.run_async(client).await?;
    Ok(report
        .applied_migrations()
        .iter()
        .map(|m| format!("{}/V{}__{}", set.folder, m.version(), m.name()))
        .collect())
}

// Databases migrated before the split --------------------------------------------------------

/// Where the single set before the split recorded itself (refinery's default table).
const SINGLE_SET_HISTORY_TABLE: &str = "refinery_schema_history";

/// The migrations of the single set, as refinery recorded them: version, name and checksum.
const SINGLE_SET: [(SchemaVersion, &str, u64); 7] = [
    (1, "payments_and_outbox", 15480974530654834731),
    (2, "projections", 6642207332769606639),
    (3, "operations", 986620742178105250),
    (4, "aggregate_order", 7746240445077182929),
    (5, "toolkit", 17971946299397985557),
    (6, "events_feed", 14215021911571090630),
    (7, "what_goes_next", 3128771925944578866),
];

/// A row of `refinery_schema_history`.
struct Recorded {
    version: SchemaVersion,
    name: String,
    applied_on: String,
    checksum: String,
}

/// The advisory lock every run of a set holds ([`run_set`]), and adoptions take again in their
/// transaction (`outbox` in ASCII).
pub const MIGRATION_LOCK: i64 = 0x6f75_7462_6f78;

/// Refinery's history table, as refinery creates it (`refinery-core`, `traits/mod.rs`).
const HISTORY_TABLE_DDL: &str = "CREATE TABLE IF NOT EXISTS %TABLE%(
             version int4 PRIMARY KEY,
             name VARCHAR(255),
             applied_on VARCHAR(255),
             checksum VARCHAR(255));";

/// Adopts a database migrated by the single set before the split: when `refinery_schema_history`
/// holds `V1__payments_and_outbox` and the set's own history table does not exist yet, creates
/// that table and records in it, as refinery would have, every migration of the set whose
/// statements ran already (those whose migration before the split is recorded), with the
/// `applied_on` of that migration; nothing is run. The migrations of the set that are newer run
/// next, as on any database. `refinery_schema_history` is left as it is. One transaction, under
/// an advisory lock: a concurrent first run waits, then finds the table and adopts nothing.
///
/// Fails, changing nothing, when `refinery_schema_history` holds `V1__payments_and_outbox` with
/// migrations the single set never had in that form (another name or checksum): its schema is
/// then not the one the set's migrations assume.
async fn adopt_single_set(client: &mut Client, set: &MigrationSet) -> Result<(), refinery::Error> {
    let what = format!(
        "adopting the migrations before the split into {}",
        set.history_table
    );
    let tx = client.transaction().await.migration_err(&what, None)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .migration_err(&what, None)?;
    let tables = tx
        .query_one(
            "SELECT to_regclass($1) IS NOT NULL, to_regclass($2) IS NOT NULL",
            &[&set.history_table, &SINGLE_SET_HISTORY_TABLE],
        )
        .await
        .migration_err(&what, None)?;
    let (adopted, single_set) = (tables.get::<_, bool>(0), tables.get::<_, bool>(1));
    if adopted || !single_set {
        return Ok(());
    }
    // The table name is one of the constants above: an identifier cannot be a bind parameter.
    let recorded = tx
        .query(
            &format!(
                "SELECT version, name, applied_on, checksum FROM {SINGLE_SET_HISTORY_TABLE} \
                 ORDER BY version"
            ),
            &[],
        )
        .await
        .migration_err(&what, None)?;
    let recorded: Vec<Recorded> = recorded
        .iter()
        .map(|r| Recorded {
            version: r.get(0),
            name: r.get::<_, Option<String>>(1).unwrap_or_default(),
            applied_on: r.get::<_, Option<String>>(2).unwrap_or_default(),
            checksum: r.get::<_, Option<String>>(3).unwrap_or_default(),
        })
        .collect();
    if !recorded
        .iter()
        .any(|r| r.version == 1 && r.name == SINGLE_SET[0].1)
    {
        // Refinery's default table holds another set (a service's own migrations).
        return Ok(());
    }
    let mut applied_on = BTreeMap::new();
    for r in &recorded {
        let known = SINGLE_SET.iter().find(|(v, _, _)| *v == r.version);
        if !known.is_some_and(|(_, name, checksum)| {
            r.name == *name && r.checksum == checksum.to_string()
        }) {
            return Err(std::io::Error::other(format!(
                "{SINGLE_SET_HISTORY_TABLE} records V{}__{} (checksum {}), which is not the \
                 migration V{} of the toolkit before the split: the schema cannot be adopted as \
                 migrated",
                r.version, r.name, r.checksum, r.version,
            )))
            .migration_err(&what, None);
        }
        applied_on.insert(r.version, r.applied_on.as_str());
    }
    tx.batch_execute(&HISTORY_TABLE_DDL.replace("%TABLE%", set.history_table))
        .await
        .migration_err(&what, None)?;
    let insert = format!(
        "INSERT INTO {} (version, name, applied_on, checksum) VALUES ($1, $2, $3, $4)",
        set.history_table
    );
    let runner = (set.runner)();
    for (version, before) in set.before_split {
        let Some(on) = applied_on.get(before) else {
            continue;
        };
        let Some(migration) = runner
            .get_migrations()
            .iter()
            .find(|m| m.version() == *version)
        else {
            continue;
        };
        tx.execute(
            &insert,
            &[
                &migration.version(),
                &migration.name(),
                &on,
                &migration.checksum().to_string(),
            ],
        )
        .await
        .migration_err(&what, None)?;
    }
    tx.commit().await.migration_err(&what, None)
}
