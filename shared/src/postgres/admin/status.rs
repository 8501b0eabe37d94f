//! `outboxctl status`: counts per tenant and status, the backlog, the oldest pending row,
//! aggregates parked behind a dead event, the latest publish failures, and the dispatchers'
//! heartbeats. Read only.

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::Client;
use uuid::Uuid;

use crate::outbox::Backlog;

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

/// The oldest pending row, a delayed one counted from its deliver_at (its aggregate's later
/// events are not: the backlog's age is the exact figure).
const OLDEST_PENDING: &str = "
    SELECT event_id, tenant_id, event_type, attempts, created_at
    FROM outbox
    WHERE status = 'pending' AND ($1::text IS NULL OR tenant_id = $1)
    ORDER BY greatest(created_at, deliver_at), id
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

const KICKED: &str = "SELECT kicked_at FROM outbox_dispatch_state WHERE id = 1";

/// Reads the whole status, for one tenant or all; `limit` bounds the parked and error lists.
pub async fn status(
    client: &Client,
    tenant: Option<&str>,
    limit: i64,
) -> Result<StatusReport, tokio_postgres::Error> {
    let t: &(dyn ToSql + Sync) = &tenant;
    let tenant_only = [(t, Type::TEXT)];
    let with_limit = [(t, Type::TEXT), (&limit as &(dyn ToSql + Sync), Type::INT8)];
    let tenants = client.query_typed(COUNTS, &tenant_only).await?;
    let backlog = crate::postgres::outbox::backlog_in(client, tenant).await?;
    let oldest = client.query_typed(OLDEST_PENDING, &tenant_only).await?;
    let parked = client.query_typed(PARKED, &with_limit).await?;
    let last_errors = client.query_typed(LAST_ERRORS, &with_limit).await?;
    let active = client.query(ACTIVE_DISPATCHERS, &[]).await?;
    let kicked = client.query(KICKED, &[]).await?;
    Ok(StatusReport {
        taken_at: Utc::now(),
        tenants: tenants
            .iter()
            .map(from_columns!(TenantCounts: tenant_id, pending, published, dead, discarded))
            .collect::<Result<_, _>>()?,
        backlog,
        oldest_pending: oldest
            .first()
            .map(from_columns!(FailedEventRef:
                event_id, tenant_id, event_type, attempts, created_at
            ))
            .transpose()?,
        parked: parked
            .iter()
            .map(from_columns!(ParkedAggregate:
                tenant_id, aggregate_type, aggregate_id, dead_version, dead_events, waiting
            ))
            .collect::<Result<_, _>>()?,
        last_errors: last_errors
            .iter()
            .map(from_columns!(FailedEvent:
                event_id, tenant_id, aggregate_type, aggregate_id, aggregate_version, event_type,
                status, attempts, failed_at, last_error
            ))
            .collect::<Result<_, _>>()?,
        dispatcher: DispatcherState {
            active: active
                .iter()
                .map(from_columns!(ActiveDispatcher: owner, active_until))
                .collect::<Result<_, _>>()?,
            kicked_at: match kicked.first() {
                Some(r) => r.try_get("kicked_at")?,
                None => None,
            },
        },
    })
}
