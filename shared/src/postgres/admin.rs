//! SQL of the `outbox` table for operators (`outboxctl`): what is stuck and why, putting dead
//! events back in line, re-publishing published ones, and deleting old published rows. Every
//! change runs in bounded batches of short transactions, so it never holds locks a dispatcher
//! or a command waits on for long.
//!
//! Past 400 lines: status, selection, requeue, discard and cleanup still share this file; one
//! file per job is the next step of the layout work.

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::Client;
use uuid::Uuid;

use crate::outbox::Backlog;

/// Rows per statement when redriving or replaying.
pub const CHANGE_BATCH: i64 = 1_000;

/// Row counts of one tenant.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TenantCounts {
    /// Tenant.
    pub tenant_id: String,
    /// Not published yet.
    pub pending: i64,
    /// Published and still retained.
    pub published: i64,
    /// Dead.
    pub dead: i64,
    /// Discarded (dead, given up by an operator, kept for audit).
    pub discarded: i64,
}

/// An aggregate held back by a dead event: its later events wait until it is redriven.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ParkedAggregate {
    /// Tenant.
    pub tenant_id: String,
    /// Aggregate type.
    pub aggregate_type: String,
    /// Aggregate id.
    pub aggregate_id: String,
    /// Version of its first dead event.
    pub dead_version: i64,
    /// Dead events of the aggregate.
    pub dead_events: i64,
    /// Pending events waiting behind them.
    pub waiting: i64,
}

/// A row whose last publish attempt failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FailedEvent {
    /// Event id.
    pub event_id: Uuid,
    /// Tenant.
    pub tenant_id: String,
    /// Aggregate type.
    pub aggregate_type: String,
    /// Aggregate id.
    pub aggregate_id: String,
    /// Aggregate version.
    pub aggregate_version: i64,
    /// Event type.
    pub event_type: String,
    /// `pending` (will be retried) or `dead`.
    pub status: String,
    /// Attempts so far.
    pub attempts: i32,
    /// When it last failed.
    pub failed_at: Option<DateTime<Utc>>,
    /// The error.
    pub last_error: String,
}

/// A dispatcher draining now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ActiveDispatcher {
    /// Its lease-owner name (the Lambda log stream and a run id).
    pub owner: String,
    /// Its heartbeat holds until then.
    pub active_until: DateTime<Utc>,
}

/// Which dispatchers are draining, and when one was last woken.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DispatcherState {
    /// Dispatchers whose heartbeat holds.
    pub active: Vec<ActiveDispatcher>,
    /// Last wake-up by a command.
    pub kicked_at: Option<DateTime<Utc>>,
}

/// Everything `outboxctl status` shows.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusReport {
    /// When it was taken.
    pub taken_at: DateTime<Utc>,
    /// Counts per tenant.
    pub tenants: Vec<TenantCounts>,
    /// Totals (and the oldest pending row's age).
    pub backlog: Backlog,
    /// The oldest pending row.
    pub oldest_pending: Option<FailedEventRef>,
    /// Aggregates held back by a dead event, most blocked first.
    pub parked: Vec<ParkedAggregate>,
    /// The latest publish failures, newest first.
    pub last_errors: Vec<FailedEvent>,
    /// The dispatcher's heartbeat.
    pub dispatcher: DispatcherState,
}

/// A pointer to one row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FailedEventRef {
    /// Event id.
    pub event_id: Uuid,
    /// Tenant.
    pub tenant_id: String,
    /// Event type.
    pub event_type: String,
    /// Attempts so far.
    pub attempts: i32,
    /// When it was recorded.
    pub created_at: DateTime<Utc>,
}

const COUNTS: &str = "
    SELECT tenant_id,
           count(*) FILTER (WHERE status = 'pending')   AS pending,
           count(*) FILTER (WHERE status = 'published') AS published,
           count(*) FILTER (WHERE status = 'dead')      AS dead,
           count(*) FILTER (WHERE status = 'discarded') AS discarded
    FROM outbox
    WHERE $1::text IS NULL OR tenant_id = $1
    GROUP BY tenant_id
    ORDER BY tenant_id";

fn backlog_sql() -> String {
    format!(
        "SELECT (SELECT count(*) FROM outbox
                 WHERE status = 'pending' AND ($1::text IS NULL OR tenant_id = $1)) AS pending,
                (SELECT count(*) FROM outbox
                 WHERE status = 'dead' AND ($1::text IS NULL OR tenant_id = $1)) AS dead,
                {} AS oldest_xact_age",
        crate::outbox::OLDEST_TRANSACTION_AGE_SQL
    )
}

/// The oldest by id among pending rows (ids follow insertion order).
const OLDEST_PENDING: &str = "
    SELECT event_id, tenant_id, event_type, attempts, created_at,
           extract(epoch FROM now() - created_at)::float8 AS age
    FROM outbox
    WHERE status = 'pending' AND ($1::text IS NULL OR tenant_id = $1)
    ORDER BY created_at, id
    LIMIT 1";

const PARKED: &str = "
    SELECT d.tenant_id, d.aggregate_type, d.aggregate_id,
           min(d.aggregate_version) AS dead_version, count(*) AS dead_events,
           (SELECT count(*) FROM outbox p
            WHERE p.tenant_id = d.tenant_id AND p.aggregate_type = d.aggregate_type
              AND p.aggregate_id = d.aggregate_id AND p.status = 'pending') AS waiting
    FROM outbox d
    WHERE d.status = 'dead' AND ($1::text IS NULL OR d.tenant_id = $1)
    GROUP BY d.tenant_id, d.aggregate_type, d.aggregate_id
    ORDER BY waiting DESC, dead_events DESC, d.tenant_id, d.aggregate_id
    LIMIT $2";

/// Two branches so each is served by its partial index (pending, dead).
const LAST_ERRORS: &str = "
    SELECT * FROM (
        SELECT event_id, tenant_id, aggregate_type, aggregate_id, aggregate_version, event_type,
               status, attempts, failed_at, last_error
        FROM outbox
        WHERE status = 'pending' AND last_error IS NOT NULL
          AND ($1::text IS NULL OR tenant_id = $1)
        UNION ALL
        SELECT event_id, tenant_id, aggregate_type, aggregate_id, aggregate_version, event_type,
               status, attempts, failed_at, last_error
        FROM outbox
        WHERE status = 'dead' AND ($1::text IS NULL OR tenant_id = $1)
    ) failed
    ORDER BY failed_at DESC NULLS LAST
    LIMIT $2";

const ACTIVE_DISPATCHERS: &str = "
    SELECT owner, active_until FROM outbox_dispatcher_heartbeats
    WHERE active_until > now() ORDER BY active_until DESC";

/// Reads the whole status, for one tenant or all; `limit` bounds the parked and error lists.
pub async fn status(
    client: &Client,
    tenant: Option<&str>,
    limit: i64,
) -> Result<StatusReport, tokio_postgres::Error> {
    let t: &(dyn ToSql + Sync) = &tenant;
    let tenants = client
        .query_typed(COUNTS, &[(t, Type::TEXT)])
        .await?
        .iter()
        .map(|r| {
            Ok(TenantCounts {
                tenant_id: r.try_get("tenant_id")?,
                pending: r.try_get("pending")?,
                published: r.try_get("published")?,
                dead: r.try_get("dead")?,
                discarded: r.try_get("discarded")?,
            })
        })
        .collect::<Result<Vec<_>, tokio_postgres::Error>>()?;
    let totals = client
        .query_typed(&backlog_sql(), &[(t, Type::TEXT)])
        .await?;
    let oldest = client
        .query_typed(OLDEST_PENDING, &[(t, Type::TEXT)])
        .await?;
    let oldest_pending = oldest
        .first()
        .map(|r| {
            Ok::<_, tokio_postgres::Error>(FailedEventRef {
                event_id: r.try_get("event_id")?,
                tenant_id: r.try_get("tenant_id")?,
                event_type: r.try_get("event_type")?,
                attempts: r.try_get("attempts")?,
                created_at: r.try_get("created_at")?,
            })
        })
        .transpose()?;
    let backlog = Backlog {
        pending: totals[0].try_get("pending")?,
        dead: totals[0].try_get("dead")?,
        oldest_pending_age_seconds: match oldest.first() {
            Some(r) => r.try_get("age")?,
            None => 0.0,
        },
        oldest_transaction_age_seconds: totals[0].try_get("oldest_xact_age")?,
    };
    let parked = client
        .query_typed(PARKED, &[(t, Type::TEXT), (&limit, Type::INT8)])
        .await?
        .iter()
        .map(|r| {
            Ok(ParkedAggregate {
                tenant_id: r.try_get("tenant_id")?,
                aggregate_type: r.try_get("aggregate_type")?,
                aggregate_id: r.try_get("aggregate_id")?,
                dead_version: r.try_get("dead_version")?,
                dead_events: r.try_get("dead_events")?,
                waiting: r.try_get("waiting")?,
            })
        })
        .collect::<Result<Vec<_>, tokio_postgres::Error>>()?;
    let last_errors = client
        .query_typed(LAST_ERRORS, &[(t, Type::TEXT), (&limit, Type::INT8)])
        .await?
        .iter()
        .map(|r| {
            Ok(FailedEvent {
                event_id: r.try_get("event_id")?,
                tenant_id: r.try_get("tenant_id")?,
                aggregate_type: r.try_get("aggregate_type")?,
                aggregate_id: r.try_get("aggregate_id")?,
                aggregate_version: r.try_get("aggregate_version")?,
                event_type: r.try_get("event_type")?,
                status: r.try_get("status")?,
                attempts: r.try_get("attempts")?,
                failed_at: r.try_get("failed_at")?,
                last_error: r.try_get("last_error")?,
            })
        })
        .collect::<Result<Vec<_>, tokio_postgres::Error>>()?;
    let active = client
        .query(ACTIVE_DISPATCHERS, &[])
        .await?
        .iter()
        .map(|r| {
            Ok(ActiveDispatcher {
                owner: r.try_get("owner")?,
                active_until: r.try_get("active_until")?,
            })
        })
        .collect::<Result<Vec<_>, tokio_postgres::Error>>()?;
    let kicked = client
        .query(
            "SELECT kicked_at FROM outbox_dispatch_state WHERE id = 1",
            &[],
        )
        .await?;
    let dispatcher = DispatcherState {
        active,
        kicked_at: match kicked.first() {
            Some(r) => r.try_get("kicked_at")?,
            None => None,
        },
    };
    Ok(StatusReport {
        taken_at: Utc::now(),
        tenants,
        backlog,
        oldest_pending,
        parked,
        last_errors,
        dispatcher,
    })
}

/// Which rows a redrive or replay takes. Empty fields match everything; at least one must be
/// set (checked by [`Selection::validate`]) unless `all` is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    /// These events.
    pub event_ids: Vec<Uuid>,
    /// Of this tenant.
    pub tenant_id: Option<String>,
    /// Of this aggregate type.
    pub aggregate_type: Option<String>,
    /// Of this aggregate id.
    pub aggregate_id: Option<String>,
    /// Of this event type.
    pub event_type: Option<String>,
    /// Created at or after.
    pub from: Option<DateTime<Utc>>,
    /// Created before.
    pub to: Option<DateTime<Utc>>,
    /// Everything (the other fields still narrow it).
    pub all: bool,
}

impl Selection {
    /// Refuses a selection that names nothing (so `redrive` alone never means "everything").
    pub fn validate(&self) -> Result<(), String> {
        let narrowed = !self.event_ids.is_empty()
            || self.aggregate_id.is_some()
            || self.aggregate_type.is_some()
            || self.event_type.is_some()
            || self.tenant_id.is_some()
            || self.from.is_some()
            || self.to.is_some();
        if !narrowed && !self.all {
            return Err(
                "select events with --event-id, --aggregate, --event-type, --tenant, \
                        --from/--to, or pass --all"
                    .into(),
            );
        }
        if let (Some(from), Some(to)) = (self.from, self.to) {
            if from >= to {
                return Err(format!("--from {from} is not before --to {to}"));
            }
        }
        Ok(())
    }
}

/// The one predicate of a [`Selection`] over `outbox o`, for every query that selects "the rows
/// of a redrive or replay" ($3 event ids, $4 tenant, $5 aggregate type, $6 aggregate id, $7 event
/// type, $8 from, $9 to): a new filter cannot be forgotten in one of them.
const SELECTION: &str = "
      (cardinality($3::uuid[]) = 0 OR o.event_id = ANY ($3))
      AND ($4::text IS NULL OR o.tenant_id = $4)
      AND ($5::text IS NULL OR o.aggregate_type = $5)
      AND ($6::text IS NULL OR o.aggregate_id = $6)
      AND ($7::text IS NULL OR o.event_type = $7)
      AND ($8::timestamptz IS NULL OR o.created_at >= $8)
      AND ($9::timestamptz IS NULL OR o.created_at < $9)";

/// Rows of a selection with status $1, in id order, one batch of $10 at a time after id $2. Dead
/// rows come from their partial index, an aggregate's rows from its unique index; a time range
/// walks the primary key (an operator's occasional command: exact, whatever order rows were
/// created in).
fn select_batch_sql() -> String {
    format!("SELECT id FROM outbox o WHERE o.status = $1 AND o.id > $2 AND {SELECTION} ORDER BY o.id LIMIT $10")
}

/// Dead rows after id $2 that hold back rows of the selection with status $1 (an earlier version
/// of the same aggregate), at most $10.
fn blocking_sql() -> String {
    format!(
        "SELECT d.id FROM outbox d
         WHERE d.status = 'dead' AND d.id > $2
           AND EXISTS (SELECT 1 FROM outbox o
                       WHERE o.status = $1 AND {SELECTION}
                         AND o.tenant_id = d.tenant_id
                         AND o.aggregate_type = d.aggregate_type
                         AND o.aggregate_id = d.aggregate_id
                         AND o.aggregate_version > d.aggregate_version)
         ORDER BY d.id LIMIT $10"
    )
}

/// Runs one of the selection queries ($1 status, $2 after id, the selection, $10 limit).
async fn selected_ids(
    client: &Client,
    sql: &str,
    status: &str,
    selection: &Selection,
    after: i64,
    limit: i64,
) -> Result<Vec<i64>, tokio_postgres::Error> {
    let rows = client
        .query_typed(
            sql,
            &[
                (&status, Type::TEXT),
                (&after, Type::INT8),
                (&selection.event_ids, Type::UUID_ARRAY),
                (&selection.tenant_id, Type::TEXT),
                (&selection.aggregate_type, Type::TEXT),
                (&selection.aggregate_id, Type::TEXT),
                (&selection.event_type, Type::TEXT),
                (&selection.from, Type::TIMESTAMPTZ),
                (&selection.to, Type::TIMESTAMPTZ),
                (&limit, Type::INT8),
            ],
        )
        .await?;
    rows.iter().map(|r| r.try_get(0)).collect()
}

/// What a redrive or replay would take or took.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SelectedEvent {
    /// Event id.
    pub event_id: Uuid,
    /// Tenant.
    pub tenant_id: String,
    /// Aggregate type.
    pub aggregate_type: String,
    /// Aggregate id.
    pub aggregate_id: String,
    /// Aggregate version.
    pub aggregate_version: i64,
    /// Event type.
    pub event_type: String,
    /// When it was recorded.
    pub created_at: DateTime<Utc>,
    /// The last error, for dead rows.
    pub last_error: Option<String>,
}

/// Which rows: dead ones (redrive) or published ones (replay).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requeue {
    /// Dead rows, to be published for the first time.
    Dead,
    /// Published rows, to be published again.
    Published,
}

impl Requeue {
    fn status(self) -> &'static str {
        match self {
            Self::Dead => "dead",
            Self::Published => "published",
        }
    }
}

async fn select_batch(
    client: &Client,
    which: Requeue,
    selection: &Selection,
    after: i64,
    limit: i64,
) -> Result<Vec<i64>, tokio_postgres::Error> {
    selected_ids(
        client,
        &select_batch_sql(),
        which.status(),
        selection,
        after,
        limit,
    )
    .await
}

/// How many rows the selection takes, and the first `sample` of them, for the confirmation.
pub async fn preview(
    client: &Client,
    which: Requeue,
    selection: &Selection,
    sample: usize,
) -> Result<(u64, Vec<SelectedEvent>), tokio_postgres::Error> {
    let mut count = 0u64;
    let mut first = Vec::new();
    let mut after = 0;
    loop {
        let ids = select_batch(client, which, selection, after, 10_000).await?;
        let Some(&last) = ids.last() else { break };
        count += ids.len() as u64;
        if first.len() < sample {
            let take: Vec<i64> = ids.iter().take(sample - first.len()).copied().collect();
            first.extend(describe(client, &take).await?);
        }
        after = last;
    }
    Ok((count, first))
}

async fn describe(
    client: &Client,
    ids: &[i64],
) -> Result<Vec<SelectedEvent>, tokio_postgres::Error> {
    let rows = client
        .query_typed(
            "SELECT event_id, tenant_id, aggregate_type, aggregate_id, aggregate_version,
                    event_type, created_at, last_error
             FROM outbox WHERE id = ANY ($1) ORDER BY id",
            &[(&ids, Type::INT8_ARRAY)],
        )
        .await?;
    rows.iter()
        .map(|r| {
            Ok(SelectedEvent {
                event_id: r.try_get("event_id")?,
                tenant_id: r.try_get("tenant_id")?,
                aggregate_type: r.try_get("aggregate_type")?,
                aggregate_id: r.try_get("aggregate_id")?,
                aggregate_version: r.try_get("aggregate_version")?,
                event_type: r.try_get("event_type")?,
                created_at: r.try_get("created_at")?,
                last_error: r.try_get("last_error")?,
            })
        })
        .collect()
}

/// Applies `which` to the selected rows in batches of [`CHANGE_BATCH`], oldest first, each batch
/// one statement (migration V7: `outbox_redrive` puts dead rows back in line, `outbox_replay`
/// marks published rows for delivery again); returns how many rows changed. A row that changed
/// status since it was selected (deleted by retention, redriven by someone else) is skipped; a
/// row someone holds right now (a producer committing its successor) is tried again for up to a
/// second, never waited on.
pub async fn requeue(
    client: &Client,
    which: Requeue,
    selection: &Selection,
) -> Result<u64, tokio_postgres::Error> {
    let sql = match which {
        Requeue::Dead => "SELECT changed, held FROM outbox_redrive($1)",
        Requeue::Published => "SELECT changed, held FROM outbox_replay($1)",
    };
    let mut changed = 0;
    let mut after = 0;
    loop {
        let ids = select_batch(client, which, selection, after, CHANGE_BATCH).await?;
        let Some(&last) = ids.last() else { break };
        let (done, _held, _) = until_not_held(ids, |todo| async move {
            let row = client.query_one(sql, &[&todo]).await?;
            Ok((row.try_get::<_, Vec<i64>>(0)?, row.try_get(1)?, Vec::new()))
        })
        .await?;
        changed += done.len() as u64;
        after = last;
    }
    Ok(changed)
}

/// Runs one operator statement on `ids` (it returns what it changed, what someone held right
/// now, and what it unparked), then again on the held ones, every 50 ms for up to a second: the
/// operator never waits on a lock, and a producer's commit holds a row for a moment only.
/// Returns everything changed, what was still held at the end, and everything unparked.
async fn until_not_held<F, Fut>(
    ids: Vec<i64>,
    statement: F,
) -> Result<(Vec<i64>, Vec<i64>, Vec<i64>), tokio_postgres::Error>
where
    F: Fn(Vec<i64>) -> Fut,
    Fut:
        std::future::Future<Output = Result<(Vec<i64>, Vec<i64>, Vec<i64>), tokio_postgres::Error>>,
{
    let (mut changed, mut unparked) = (Vec::new(), Vec::new());
    let mut todo = ids;
    let mut attempts = 0;
    loop {
        let (done, held, promoted) = statement(todo).await?;
        changed.extend(done);
        unparked.extend(promoted);
        attempts += 1;
        if held.is_empty() || attempts == 20 {
            return Ok((changed, held, unparked));
        }
        todo = held;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// What a discard did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DiscardReport {
    /// Dead events now discarded (kept, never published).
    pub discarded: u64,
    /// Dead events someone held each time they were tried (run the discard again).
    pub held: u64,
    /// The events that became their aggregate's head: what the discard unparked.
    pub unparked: Vec<SelectedEvent>,
}

/// Discards the selected dead events (migration V7, `outbox_discard`): each is kept with the
/// reason for audit and never published, and its aggregate's next event goes. In batches of
/// [`CHANGE_BATCH`], each one statement; a row someone holds is tried again for up to a second.
pub async fn discard(
    client: &Client,
    selection: &Selection,
    reason: &str,
) -> Result<DiscardReport, tokio_postgres::Error> {
    let mut report = DiscardReport::default();
    let mut unparked = Vec::new();
    let mut after = 0;
    loop {
        let ids = select_batch(client, Requeue::Dead, selection, after, CHANGE_BATCH).await?;
        let Some(&last) = ids.last() else { break };
        let (done, held, promoted) = until_not_held(ids, |todo| async move {
            let row = client
                .query_one(
                    "SELECT discarded, held, unparked FROM outbox_discard($1, $2)",
                    &[&todo, &reason],
                )
                .await?;
            Ok((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?))
        })
        .await?;
        report.discarded += done.len() as u64;
        report.held += held.len() as u64;
        unparked.extend(promoted);
        after = last;
    }
    unparked.truncate(100);
    report.unparked = describe(client, &unparked).await?;
    Ok(report)
}

/// Dead events that still hold back events of `selection` after a redrive: an aggregate's
/// events go out in version order, so a redriven event waits behind an earlier dead one.
pub async fn blocking_dead(
    client: &Client,
    selection: &Selection,
) -> Result<Vec<SelectedEvent>, tokio_postgres::Error> {
    // After the redrive the selected rows are pending.
    let ids = selected_ids(client, &blocking_sql(), "pending", selection, 0, 100).await?;
    describe(client, &ids).await
}

/// What a cleanup deletes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiring {
    /// Published outbox rows.
    Outbox,
    /// Inbox entries (`processed_events`) of every consumer. Aggregate positions stay, so an
    /// older redelivery is still recognised as applied.
    Inbox,
}

/// Rows a cleanup with this retention would delete now.
pub async fn count_expired(
    client: &Client,
    what: Expiring,
    retention: std::time::Duration,
) -> Result<i64, tokio_postgres::Error> {
    let sql = match what {
        Expiring::Outbox => {
            "SELECT count(*) FROM outbox
             WHERE id < (SELECT outbox_first_id_at(now() - make_interval(secs => $1)))
               AND status = 'published' AND published_at < now() - make_interval(secs => $1)"
        }
        Expiring::Inbox => {
            "SELECT count(*) FROM processed_events
             WHERE processed_at < now() - make_interval(secs => $1)"
        }
    };
    let row = client
        .query_typed(sql, &[(&retention.as_secs_f64(), Type::FLOAT8)])
        .await?;
    row[0].try_get(0)
}

/// Deletes one batch of inbox entries older than the retention; served by
/// `processed_events_processed_at_idx`.
pub async fn delete_inbox_entries(
    client: &Client,
    retention: std::time::Duration,
    max_rows: i32,
) -> Result<u64, tokio_postgres::Error> {
    client
        .execute_typed(
            "DELETE FROM processed_events
             WHERE ctid = ANY (ARRAY(
                 SELECT ctid FROM processed_events
                 WHERE processed_at < now() - make_interval(secs => $1)
                 LIMIT $2))",
            &[
                (&retention.as_secs_f64(), Type::FLOAT8),
                (&(max_rows as i64), Type::INT8),
            ],
        )
        .await
}

/// One cleanup statement: deletes up to `max_rows` expired published rows, returns how many.
pub async fn delete_published(
    client: &Client,
    retention: std::time::Duration,
    max_rows: i32,
) -> Result<u64, tokio_postgres::Error> {
    let row = client
        .query_typed(
            "SELECT outbox_delete_published(make_interval(secs => $1), $2)",
            &[
                (&retention.as_secs_f64(), Type::FLOAT8),
                (&max_rows, Type::INT4),
            ],
        )
        .await?;
    let deleted: i32 = row[0].try_get(0)?;
    Ok(deleted as u64)
}

/// How a cleanup run paces its statements.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pace {
    /// Spend at most this share of the time (0 < share <= 1) in delete statements: after a
    /// statement that took `t`, wait `t · (1 − share) / share`. 1.0 runs them back to back.
    Duty(f64),
    /// One statement per interval, as the dispatcher does between its claims.
    Every(std::time::Duration),
}

/// What a cleanup run did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CleanupRun {
    /// Rows deleted.
    pub deleted: u64,
    /// Delete statements run.
    pub statements: u64,
    /// Wall time.
    pub seconds: f64,
}

/// How a cleanup run deletes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Batches {
    /// Rows per statement (one short transaction each).
    pub size: i32,
    /// Pacing between statements.
    pub pace: Pace,
    /// Stop after this many statements.
    pub max_statements: Option<u64>,
}

/// Deletes expired rows statement after statement, paced by `batches.pace`, until a statement
/// deletes less than a full batch, `max_statements` ran, or `stop` is set. `progress` is called
/// after each statement with the totals so far.
pub async fn run_cleanup(
    client: &Client,
    what: Expiring,
    retention: std::time::Duration,
    batches: Batches,
    stop: &std::sync::atomic::AtomicBool,
    mut progress: impl FnMut(&CleanupRun),
) -> Result<CleanupRun, tokio_postgres::Error> {
    let Batches {
        size: batch,
        pace,
        max_statements,
    } = batches;
    let started = std::time::Instant::now();
    let mut run = CleanupRun::default();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let statement = std::time::Instant::now();
        let deleted = match what {
            Expiring::Outbox => delete_published(client, retention, batch).await?,
            Expiring::Inbox => delete_inbox_entries(client, retention, batch).await?,
        };
        let took = statement.elapsed();
        run.deleted += deleted;
        run.statements += 1;
        run.seconds = started.elapsed().as_secs_f64();
        progress(&run);
        if deleted < batch as u64 || max_statements.is_some_and(|max| run.statements >= max) {
            break;
        }
        let wait = match pace {
            Pace::Duty(share) => {
                took.mul_f64((1.0 - share.clamp(0.01, 1.0)) / share.clamp(0.01, 1.0))
            }
            Pace::Every(interval) => interval.saturating_sub(took),
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
    run.seconds = started.elapsed().as_secs_f64();
    Ok(run)
}
