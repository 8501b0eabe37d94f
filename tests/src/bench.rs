//! (Past 400 lines: the benchmarks' shared seeding, measuring and reporting, which every bench binary imports from one place.)
//!
//! Helpers shared by the benchmarks: seeding the outbox in bulk, percentiles, settings from the
//! environment.

use std::time::Duration;

use pg_outbox::outbox::{ClaimedEvent, Outcomes};
use pg_outbox::ports::OutboxStore;
use pg_outbox::postgres::outbox::PgOutboxStore;

use crate::TestDb;

/// A benchmark setting from the environment, or `default`.
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Inserts `rows` events with `status`, each of its own aggregate (so every claim is full),
/// ~300 B payloads; published ones were published `published_ago` ago. Vacuums, analyzes and
/// checkpoints, so the writes of seeding a large table are not still being flushed while the
/// measurement runs.
pub async fn seed(db: &TestDb, rows: usize, status: &str, published_ago: Duration) {
    seed_with_ids(db, rows, status, published_ago, EventIds::Random).await
}

/// How seeded event ids are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventIds {
    /// Random (UUID v4): inserts land anywhere in the event_id index.
    Random,
    /// Time-ordered (UUID v7, as the producers write them): inserts at the index's right edge.
    TimeOrdered,
}

/// [`seed`] with a choice of event ids.
pub async fn seed_with_ids(
    db: &TestDb,
    rows: usize,
    status: &str,
    published_ago: Duration,
    ids: EventIds,
) {
    let client = db.client().await;
    let id_function = match ids {
        EventIds::Random => "gen_random_uuid()",
        EventIds::TimeOrdered => "outbox_uuid_v7()",
    };
    let tag = uuid::Uuid::new_v4().simple().to_string();
    // The id function is one of two fixed names above, never input.
    let sql = format!(
        "INSERT INTO outbox (event_id, tenant_id, aggregate_type, aggregate_id, aggregate_version,
                                 event_type, schema_version, payload, metadata, status, published_at,
                                 created_at, feed_position)
             SELECT {id_function}, 'bench', 'payment', 'p' || g || '-' || $3, 1, 'payment.paid', 1,
                    jsonb_build_object('paymentId', 'p' || g, 'amountMinor', 1250, 'currency', 'EUR',
                        'verificationMethod', 'card_3ds', 'verifiedBy', 'acs.examplebank.com',
                        'paidAt', now(), 'note', repeat('x', 120)),
                    '{{\"correlation_id\":\"bench\",\"causation_id\":\"bench\",\"source\":\"payments\"}}',
                    $2, CASE WHEN $2 = 'published' THEN now() - make_interval(secs => $4) END,
                    CASE WHEN $2 = 'published' THEN now() - make_interval(secs => $4) ELSE now() END,
                    CASE WHEN $2 = 'published' THEN nextval('outbox_feed_position_seq') END
             FROM generate_series(1, $1::bigint) AS g"
    );
    // Appends are pending (migration V7's trigger refuses anything else): rows seeded as
    // already published skip the triggers, as if appended, published and given their feed
    // position long ago.
    let mut client = client;
    let tx = client.transaction().await.expect("begin");
    if status != "pending" {
        tx.batch_execute("SET LOCAL session_replication_role = replica")
            .await
            .expect("skip triggers");
    }
    tx.execute(
        &sql,
        &[&(rows as i64), &status, &tag, &published_ago.as_secs_f64()],
    )
    .await
    .expect("seed");
    if status != "pending" {
        // The aggregates' rows the append trigger would have written: retention deletes an
        // aggregate's latest event only once it holds that row (to keep its last version), and
        // without them it deleted none of these. As the trigger writes them: last_version 0
        // (only retention moves it), so retention writes each one it keeps a version in.
        tx.execute(
            "INSERT INTO outbox_aggregates (tenant_id, aggregate_type, aggregate_id, last_version)
             SELECT 'bench', 'payment', 'p' || g || '-' || $2, 0
             FROM generate_series(1, $1::bigint) AS g",
            &[&(rows as i64), &tag],
        )
        .await
        .expect("seed the aggregates");
    }
    tx.commit().await.expect("commit the seed");
    // One statement each: several in one simple query run as one transaction block.
    for table in ["outbox", "outbox_aggregates"] {
        client
            .batch_execute(&format!("VACUUM ANALYZE {table}"))
            .await
            .expect("vacuum");
    }
    client
        .batch_execute("CHECKPOINT")
        .await
        .expect("checkpoint");
}

/// Puts `count` aggregates parked behind a dead first event (a dead head and a pending second
/// version each) and `count` heads backing off for an hour in the outbox: the rows a claim must
/// never read. Insert the rows the claim should take afterwards, so these are older.
pub async fn seed_parked_and_backing_off(client: &tokio_postgres::Client, count: usize) {
    client
        .batch_execute(&format!(
            "INSERT INTO outbox (event_id, tenant_id, aggregate_type, aggregate_id, aggregate_version,
                                 event_type, schema_version, payload, metadata)
             SELECT gen_random_uuid(), 'bench', 'payment', 'parked' || a, v, 'payment.paid', 1,
                    '{{\"note\":\"parked\"}}', '{{\"correlation_id\":\"b\",\"source\":\"payments\"}}'
             FROM generate_series(1, {count}) a, generate_series(1, 2) v ORDER BY v, a;
             UPDATE outbox SET status = 'dead' WHERE aggregate_id LIKE 'parked%' AND aggregate_version = 1;
             INSERT INTO outbox (event_id, tenant_id, aggregate_type, aggregate_id, aggregate_version,
                                 event_type, schema_version, payload, metadata, next_attempt_at)
             SELECT gen_random_uuid(), 'bench', 'payment', 'backoff' || a, 1, 'payment.paid', 1,
                    '{{\"note\":\"backoff\"}}', '{{\"correlation_id\":\"b\",\"source\":\"payments\"}}',
                    now() + interval '1 hour'
             FROM generate_series(1, {count}) a;"
        ))
        .await
        .expect("seed parked and backing-off rows");
}

/// The `p` quantile of sorted latencies, in milliseconds.
pub fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * p) as usize).min(sorted.len() - 1);
    sorted[i].as_secs_f64() * 1e3
}

/// Records every claimed row as published (the "mark" half of the SQL floor).
pub async fn mark_published(store: &PgOutboxStore, owner: &str, claimed: &[ClaimedEvent]) {
    if claimed.is_empty() {
        return;
    }
    let mut outcomes = Outcomes {
        published: claimed.iter().map(|c| c.id).collect(),
        ..Outcomes::default()
    };
    // What someone held at that moment comes back deferred (another claim's statement still
    // holding a row it examined and passed over, a successor being promoted): recorded again
    // after a pause, as the drain does, so no event is left leased.
    let started = std::time::Instant::now();
    loop {
        outcomes = store.record_outcomes(owner, &outcomes).await.expect("mark");
        if outcomes.published.is_empty() {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "still held after 30 s: {:?}",
            outcomes.published
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Sorted latencies from each event's `committed` column (a timestamptz of the outbox) to its
/// arrival at the endpoint; asserts that all `produced` events arrived.
pub async fn arrival_latencies(
    client: &tokio_postgres::Client,
    committed: &str,
    arrivals: &[(String, chrono::DateTime<chrono::Utc>)],
    produced: usize,
) -> Vec<Duration> {
    let arrivals: std::collections::HashMap<&str, chrono::DateTime<chrono::Utc>> =
        arrivals.iter().map(|(id, at)| (id.as_str(), *at)).collect();
    // The column name comes from the benchmark's code, never from input.
    let rows = client
        .query(
            &format!(
                "SELECT event_id::text, {committed} FROM outbox WHERE {committed} IS NOT NULL"
            ),
            &[],
        )
        .await
        .expect("rows");
    let mut latencies: Vec<Duration> = rows
        .iter()
        .filter_map(|r| {
            let id: String = r.get(0);
            let at: chrono::DateTime<chrono::Utc> = r.get(1);
            arrivals
                .get(id.as_str())
                .map(|arrived| (*arrived - at).to_std().unwrap_or_default())
        })
        .collect();
    assert_eq!(
        latencies.len(),
        produced,
        "every committed event was published"
    );
    latencies.sort();
    latencies
}

/// Claim latency: `claims` claims of 100 on `db` (which must hold that many pending rows), each
/// marked published before the next; returns (p50, p99) in milliseconds.
pub async fn claim_latency(db: &TestDb, claims: usize) -> (f64, f64) {
    claim_latency_of(db, claims, 100).await
}

/// Claim latency with claims of `batch` rows (see [`claim_latency`]).
pub async fn claim_latency_of(db: &TestDb, claims: usize, batch: usize) -> (f64, f64) {
    let store = PgOutboxStore::new(pg_outbox::postgres::Db::new(db.settings.clone()));
    let mut latencies = Vec::with_capacity(claims);
    for i in 0..claims {
        let owner = format!("lat-{i}");
        let t = std::time::Instant::now();
        let claimed = store
            .claim_batch(batch as i64, Duration::from_secs(60), &owner)
            .await
            .expect("claim");
        latencies.push(t.elapsed());
        assert_eq!(claimed.len(), batch);
        mark_published(&store, &owner, &claimed).await;
    }
    latencies.sort();
    (pct(&latencies, 0.5), pct(&latencies, 0.99))
}

/// CPU time spent by the local PostgreSQL server (every `postgres` process, plus the exited
/// backends its postmaster has reaped) and by this process, between `start` and `per_row`. Read
/// from `/proc`, so only meaningful with the server on this machine, as the benchmarks run it.
pub struct CpuMeter {
    postgres: Duration,
    own: Duration,
}

/// CPU microseconds per row: (PostgreSQL, this process).
#[derive(Debug, Clone, Copy)]
pub struct CpuPerRow {
    /// All PostgreSQL processes.
    pub postgres_us: f64,
    /// This benchmark process (dispatchers, their SDK clients, fake endpoints).
    pub own_us: f64,
}

impl CpuMeter {
    /// Starts measuring.
    pub fn start() -> Self {
        Self {
            postgres: postgres_cpu(),
            own: own_cpu(),
        }
    }

    /// CPU per row since `start`.
    pub fn per_row(&self, rows: usize) -> CpuPerRow {
        let micros = |d: Duration| d.as_secs_f64() * 1e6 / rows.max(1) as f64;
        CpuPerRow {
            postgres_us: micros(postgres_cpu().saturating_sub(self.postgres)),
            own_us: micros(own_cpu().saturating_sub(self.own)),
        }
    }
}

/// Linux reports process times in USER_HZ ticks, 100 a second on every architecture it runs on.
const TICKS_PER_SECOND: u64 = 100;

/// (command name, parent pid, utime + stime, cutime + cstime) of `/proc/<pid>/stat`.
fn proc_stat(pid: &str) -> Option<(String, String, u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (head, rest) = stat.rsplit_once(") ")?;
    let comm = head.split_once(" (")?.1.to_owned();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state, ppid, ..., utime (14th field of the line), stime, cutime, cstime.
    let tick = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Some((
        comm,
        fields.get(1)?.to_string(),
        tick(11) + tick(12),
        tick(13) + tick(14),
    ))
}

fn ticks(n: u64) -> Duration {
    Duration::from_millis(n * 1000 / TICKS_PER_SECOND)
}

/// The dispatchers' settings every drain benchmark uses (claims of `batch`), so their figures
/// compare across benchmark binaries.
pub fn drain_config(batch: i64) -> pg_outbox::dispatcher::DispatcherConfig {
    pg_outbox::dispatcher::DispatcherConfig {
        batch_size: batch,
        max_in_flight: 50,
        lease: Duration::from_secs(60),
        max_attempts: 10,
        backoff_base: Duration::from_millis(100),
        backoff_cap: Duration::from_secs(5),
        safety_margin: Duration::ZERO,
        // `BENCH_LANE_POLL_MS` (0 = no lane), else the default.
        lane_poll: match std::env::var("BENCH_LANE_POLL_MS")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            Some(0) => None,
            Some(ms) => Some(Duration::from_millis(ms)),
            None => pg_outbox::dispatcher::DispatcherConfig::default().lane_poll,
        },
        ..pg_outbox::dispatcher::DispatcherConfig::default()
    }
}

/// CPU time of one thread of this process (`tid` as in `/proc/self/task`).
pub fn thread_cpu(tid: &str) -> Option<Duration> {
    proc_stat(&format!("self/task/{tid}")).map(|(_, _, own, _)| ticks(own))
}

fn own_cpu() -> Duration {
    proc_stat("self").map_or(Duration::ZERO, |(_, _, own, _)| ticks(own))
}

/// (pid, command name, parent pid, own ticks, reaped children's ticks) of every process.
fn process_stats() -> Vec<(String, String, String, u64, u64)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_string_lossy().into_owned();
            pid.bytes().all(|b| b.is_ascii_digit()).then_some(pid)
        })
        .filter_map(|pid| {
            proc_stat(&pid).map(|(comm, ppid, own, reaped)| (pid, comm, ppid, own, reaped))
        })
        .collect()
}

fn postgres_cpu() -> Duration {
    let stats: Vec<_> = process_stats()
        .into_iter()
        .filter(|(_, comm, ..)| comm == "postgres")
        .collect();
    let postgres_pids: std::collections::HashSet<&str> =
        stats.iter().map(|(pid, ..)| pid.as_str()).collect();
    let total: u64 = stats
        .iter()
        .map(|(_, _, ppid, own, reaped)| {
            // The postmaster (its parent is not a postgres process) also carries its reaped
            // backends' time.
            own + if postgres_pids.contains(ppid.as_str()) {
                0
            } else {
                *reaped
            }
        })
        .sum();
    ticks(total)
}

/// Wall time and CPU of one measured phase.
pub struct Stopwatch {
    started: std::time::Instant,
    cpu: CpuMeter,
}

/// A phase's rows per second and CPU per row.
#[derive(Debug, Clone, Copy)]
pub struct Throughput {
    /// Rows per second of wall time.
    pub rate: f64,
    /// CPU per row.
    pub cpu: CpuPerRow,
}

impl Stopwatch {
    /// Starts the clock and the CPU meter.
    pub fn start() -> Self {
        Self {
            started: std::time::Instant::now(),
            cpu: CpuMeter::start(),
        }
    }

    /// Throughput of `rows` since `start`.
    pub fn stop(&self, rows: usize) -> Throughput {
        let elapsed = self.started.elapsed();
        Throughput {
            rate: rows as f64 / elapsed.as_secs_f64(),
            cpu: self.cpu.per_row(rows),
        }
    }
}

/// While alive, the local PostgreSQL server runs on the first CPU only and this process on the
/// others, as in a deployment where the database and the relay do not share a machine (the
/// relay in Lambda, the bus elsewhere). Dropping it gives every process all CPUs back.
pub struct SeparateCpus {
    all: String,
}

impl SeparateCpus {
    /// Pins the processes (`taskset`, util-linux); `None` on a one-CPU machine.
    pub fn pin() -> Option<Self> {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        if cpus < 2 {
            return None;
        }
        let split = Self {
            all: format!("0-{}", cpus - 1),
        };
        for pid in postgres_pids() {
            taskset("0", &pid);
        }
        taskset(&format!("1-{}", cpus - 1), &std::process::id().to_string());
        Some(split)
    }
}

impl Drop for SeparateCpus {
    fn drop(&mut self) {
        for pid in postgres_pids() {
            taskset(&self.all, &pid);
        }
        taskset(&self.all, &std::process::id().to_string());
    }
}

/// Sets the CPU list of every thread of `pid`; a process that is gone meanwhile is skipped.
fn taskset(cpus: &str, pid: &str) {
    let status = std::process::Command::new("taskset")
        .args(["--all-tasks", "--cpu-list", "--pid", cpus, pid])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("taskset (util-linux) runs");
    if !status.success() && std::path::Path::new(&format!("/proc/{pid}")).exists() {
        panic!("taskset {cpus} {pid} failed: {status}");
    }
}

fn postgres_pids() -> Vec<String> {
    process_stats()
        .into_iter()
        .filter(|(_, comm, ..)| comm == "postgres")
        .map(|(pid, ..)| pid)
        .collect()
}

/// V16 undone, for a benchmark to measure the outbox as V15 left it beside V16 in one run: the
/// envelope's metadata check back in V5's constraint, out of V12's trigger.
pub const AS_V15: &str = "
    DROP TRIGGER outbox_metadata_makes_an_envelope ON outbox;
    CREATE OR REPLACE FUNCTION outbox_is_a_cloudevent() RETURNS trigger
    LANGUAGE plpgsql SET search_path = public, pg_catalog AS $$
    BEGIN
        IF NEW.aggregate_version > 2147483647 THEN
            RAISE EXCEPTION 'beyond CloudEvents'' Integer range' USING ERRCODE = 'check_violation';
        END IF;
        IF NEW.metadata ->> 'source' = '' THEN
            RAISE EXCEPTION 'metadata source is empty' USING ERRCODE = 'check_violation';
        END IF;
        RETURN NEW;
    END $$;
    ALTER TABLE outbox ADD CONSTRAINT outbox_metadata_makes_an_envelope CHECK (
        jsonb_typeof(metadata) = 'object'
        AND jsonb_typeof(metadata -> 'correlation_id') = 'string'
        AND jsonb_typeof(metadata -> 'source') = 'string'
        AND coalesce(jsonb_typeof(metadata -> 'causation_id'), 'null') IN ('string', 'null')
        AND coalesce(jsonb_typeof(metadata -> 'traceparent'), 'null') IN ('string', 'null')
        AND coalesce(jsonb_typeof(metadata -> 'tracestate'), 'null') IN ('string', 'null')
        AND coalesce(jsonb_typeof(metadata -> 'xray_trace_header'), 'null') IN ('string', 'null')
    ) NOT VALID";

/// V17 undone, for a benchmark to measure the record as V16 left it beside V17 in one run:
/// V7's `outbox_mark_done` and V9's `outbox_record`, as those migrations wrote them.
pub const AS_V16: &str = "
    CREATE OR REPLACE FUNCTION outbox_mark_done(p_ids bigint[], p_status text, p_reason text,
                                     OUT done bigint[], OUT held bigint[], OUT promoted bigint[])
    LANGUAGE plpgsql SET search_path = public, pg_catalog AS $$
    DECLARE
        candidates bigint[];
        successors bigint[];
        lockable bigint[];
    BEGIN
        -- Each row with its successor (NULL when it has none yet), as two arrays in one order.
        SELECT coalesce(array_agg(p.id ORDER BY p.id), '{}'), coalesce(array_agg(s.id ORDER BY p.id), '{}')
        INTO candidates, successors
        FROM outbox p
        LEFT JOIN LATERAL (
            SELECT n.id FROM outbox n
            WHERE n.tenant_id = p.tenant_id AND n.aggregate_type = p.aggregate_type
              AND n.aggregate_id = p.aggregate_id AND n.aggregate_version > p.aggregate_version
            ORDER BY n.aggregate_version LIMIT 1) s ON true
        WHERE p.id = ANY (p_ids);
        SELECT coalesce(array_agg(id), '{}') INTO lockable FROM (
            SELECT id FROM outbox WHERE id = ANY (successors) ORDER BY id FOR UPDATE SKIP LOCKED) l;
        SELECT coalesce(array_agg(r) FILTER (WHERE s IS NULL OR s = ANY (lockable)), '{}'),
               coalesce(array_agg(r) FILTER (WHERE s IS NOT NULL AND NOT s = ANY (lockable)), '{}'),
               coalesce(array_agg(s) FILTER (WHERE s = ANY (lockable)), '{}')
        INTO done, held, promoted
        FROM unnest(candidates, successors) AS pair(r, s);
        IF cardinality(done) = 0 THEN
            RETURN;
        END IF;
        IF p_status = 'published' THEN
            INSERT INTO outbox_feed_tenants AS t (tenant_id)
            SELECT DISTINCT tenant_id FROM outbox WHERE id = ANY (done) ORDER BY 1
            ON CONFLICT (tenant_id) DO UPDATE SET last_published_at = now();
            UPDATE outbox o
            SET status = 'published', published_at = now(), is_head = false, locked_until = NULL,
                locked_by = NULL, last_error = NULL,
                feed_position = coalesce(o.feed_position, f.position)
            FROM (SELECT id, nextval('outbox_feed_position_seq') AS position
                  FROM (SELECT unnest(done) AS id ORDER BY 1) ids) f
            WHERE o.id = f.id;
        ELSE
            UPDATE outbox
            SET status = 'discarded', is_head = false, discarded_at = now(), discard_reason = p_reason,
                locked_until = NULL, locked_by = NULL
            WHERE id = ANY (done);
        END IF;
        UPDATE outbox SET is_head = true WHERE id = ANY (promoted) AND NOT is_head;
    END $$;
    CREATE OR REPLACE FUNCTION outbox_record(
        p_owner text, p_published bigint[], p_retry bigint[], p_delays float8[], p_retry_errors text[],
        p_dead bigint[], p_dead_errors text[], OUT deferred bigint[]
    ) LANGUAGE plpgsql SET lock_timeout = '2s' SET jit = off SET search_path = public, pg_catalog AS $$
    DECLARE
        ours bigint[];
        locked bigint[];
        live_locked bigint[];
        live_published bigint[];
        replays_locked bigint[];
        replays_published bigint[];
        result record;
    BEGIN
        SELECT coalesce(array_agg(id), '{}') INTO ours FROM outbox
        WHERE id = ANY (p_published || p_retry || p_dead) AND locked_by = p_owner
          AND (status = 'pending' OR replay);
        -- Locked in id order, SKIP LOCKED, each row's status read as it is once locked; the live
        -- ones published are matched against p_published as sets (hashed, never a join the planner
        -- could turn into a loop over both arrays).
        SELECT coalesce(array_agg(id), '{}'), coalesce(array_agg(id) FILTER (WHERE live), '{}'),
               coalesce(array_agg(id) FILTER (WHERE NOT live), '{}')
        INTO locked, live_locked, replays_locked
        FROM (SELECT id, status = 'pending' AS live FROM outbox
              WHERE id = ANY (ours) AND locked_by = p_owner AND (status = 'pending' OR replay)
              ORDER BY id FOR UPDATE SKIP LOCKED) l;
        live_published := ARRAY(SELECT unnest(live_locked) INTERSECT SELECT unnest(p_published)
                                ORDER BY 1);
        replays_published := ARRAY(SELECT unnest(replays_locked) INTERSECT SELECT unnest(p_published));
        deferred := ARRAY(SELECT unnest(ours) EXCEPT SELECT unnest(locked));

        SELECT * INTO result FROM outbox_mark_done(live_published, 'published', NULL);
        deferred := deferred || result.held;

        -- A locked row that is not live is a replay (status published, replay set).
        UPDATE outbox SET replay = false, locked_until = NULL, locked_by = NULL, last_error = NULL
        WHERE id = ANY (replays_published);

        UPDATE outbox o
        SET next_attempt_at = now() + make_interval(secs => r.delay_secs),
            last_error = r.error, failed_at = now(), locked_until = NULL, locked_by = NULL
        FROM unnest(p_retry, p_delays, p_retry_errors) AS r(id, delay_secs, error)
        WHERE o.id = r.id AND o.id = ANY (locked);

        UPDATE outbox o
        SET status = CASE WHEN o.replay THEN o.status ELSE 'dead' END,
            replay = false,
            last_error = CASE WHEN o.replay THEN 'replay abandoned: ' || r.error ELSE r.error END,
            failed_at = now(), locked_until = NULL, locked_by = NULL
        FROM unnest(p_dead, p_dead_errors) AS r(id, error)
        WHERE o.id = r.id AND o.id = ANY (locked);
    END $$;";

/// The PostgreSQL backend of one connected session, to read the CPU time it has used (from
/// `/proc`: the server must run on this machine, as the benchmarks run it).
pub struct Backend(i32);

impl Backend {
    /// The backend serving `client`.
    pub async fn of(client: &tokio_postgres::Client) -> Self {
        Self(
            client
                .query_one("SELECT pg_backend_pid()", &[])
                .await
                .expect("backend pid")
                .get(0),
        )
    }

    /// Its CPU time so far. Panics when `/proc` does not show it (a server elsewhere, or in a
    /// container), rather than measure nothing.
    pub fn cpu(&self) -> Duration {
        let (_, _, own, _) = proc_stat(&self.0.to_string()).unwrap_or_else(|| {
            panic!(
                "backend {} is not in this machine's /proc: is PostgreSQL running here?",
                self.0
            )
        });
        ticks(own)
    }
}

/// V18 undone, for a benchmark to measure the append as V17 left it beside V18 in one run: V13's
/// `outbox_append_order`, taken from that migration's own text (its body only: the column it
/// adds is there already).
pub fn as_v17() -> String {
    const V13: &str = include_str!("../../migrations/outbox/V13__append_by_index.sql");
    let start = V13
        .find("CREATE OR REPLACE FUNCTION outbox_append_order()")
        .expect("V13 defines outbox_append_order");
    let end = start
        + V13[start..]
            .find("END $$;")
            .expect("V13's function body ends")
        + "END $$;".len();
    format!(
        "{}\nALTER FUNCTION outbox_append_order() SET search_path = public, pg_catalog;",
        &V13[start..end]
    )
}

/// V19 undone, for a benchmark to measure the claim as V18 left it beside V19 in one run: V15's
/// `outbox_claim` and `outbox_claim_waiting`, taken from that migration's own text.
pub fn as_v18_claim() -> String {
    const V15: &str = include_str!("../../migrations/outbox/V15__a_lane_for_the_waiting.sql");
    let start = V15
        .find("CREATE FUNCTION outbox_claim_waiting(")
        .expect("V15 defines outbox_claim_waiting");
    let end = V15
        .rfind("DO $$")
        .expect("V15 sets the claims' search_path last");
    format!(
        "{}\nALTER FUNCTION outbox_claim(bigint, float8, text, text) SET search_path = public, pg_catalog;\n\
         ALTER FUNCTION outbox_claim_waiting(bigint, float8, text, text[]) SET search_path = public, pg_catalog;",
        V15[start..end].replacen("CREATE FUNCTION outbox_claim_waiting(", "CREATE OR REPLACE FUNCTION outbox_claim_waiting(", 1)
    )
}
