//! The outbox event: its metadata as a producer writes it, the row as a dispatcher claims it,
//! the outcomes it records, and the backlog.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Where an event came from and what it belongs to, for tracing across services.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventMetadata {
    /// Ties together everything one business flow caused (from `X-Correlation-Id`, else the
    /// API request id).
    pub correlation_id: String,
    /// The message or request that directly caused this event (the API request id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<String>,
    /// W3C trace context of the request, when it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// W3C trace state that goes with `traceparent`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracestate: Option<String>,
    /// The X-Ray trace header of the invocation (EventBridge `TraceHeader`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xray_trace_header: Option<String>,
    /// The service that emitted the event (EventBridge `Source`).
    pub source: String,
}

/// An outbox row claimed by a dispatcher: leased to it until its lease expires.
#[derive(Debug, Clone, PartialEq)]
pub struct ClaimedEvent {
    /// Row id (the outbox sequence).
    pub id: i64,
    /// Stable event id.
    pub event_id: Uuid,
    /// Owning tenant.
    pub tenant_id: String,
    /// Aggregate type.
    pub aggregate_type: String,
    /// Aggregate id.
    pub aggregate_id: String,
    /// Aggregate version.
    pub aggregate_version: i64,
    /// Event type.
    pub event_type: String,
    /// Schema version of `payload`.
    pub schema_version: i32,
    /// The payload.
    pub payload: serde_json::Value,
    /// Metadata as stored (an [`EventMetadata`] when written by this code).
    pub metadata: serde_json::Value,
    /// Attempts so far, this one included.
    pub attempts: i32,
    /// When the event was recorded.
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// The X-Ray trace header from the metadata, if any (EventBridge `TraceHeader`).
    pub xray_trace_header: Option<String>,
    /// A replay: published before, delivered again by an operator's request, outside the
    /// aggregate's order (consumers see it as a duplicate of what they applied).
    pub replay: bool,
    /// Not to be published before this time (`deliver_at` on append, migration V10).
    pub deliver_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// What became of each claimed row, written back in one transaction.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outcomes {
    /// Rows the bus accepted.
    pub published: Vec<i64>,
    /// Rows to try again: id, delay before the next attempt, the error.
    pub retries: Vec<(i64, std::time::Duration, String)>,
    /// Rows that can never be published, or ran out of attempts: id, the reason.
    pub dead: Vec<(i64, String)>,
}

impl Outcomes {
    /// Whether there is nothing to record.
    pub fn is_empty(&self) -> bool {
        self.published.is_empty() && self.retries.is_empty() && self.dead.is_empty()
    }

    /// Every row id, in no particular order.
    pub fn ids(&self) -> Vec<i64> {
        self.published
            .iter()
            .copied()
            .chain(self.retries.iter().map(|r| r.0))
            .chain(self.dead.iter().map(|d| d.0))
            .collect()
    }

    /// Splits into the outcomes of rows `now` accepts and those of the others.
    pub fn split(&self, now: impl Fn(i64) -> bool) -> (Outcomes, Outcomes) {
        let mut taken = Outcomes::default();
        let mut left = Outcomes::default();
        for &id in &self.published {
            if now(id) { &mut taken } else { &mut left }
                .published
                .push(id);
        }
        for retry in &self.retries {
            if now(retry.0) { &mut taken } else { &mut left }
                .retries
                .push(retry.clone());
        }
        for dead in &self.dead {
            if now(dead.0) { &mut taken } else { &mut left }
                .dead
                .push(dead.clone());
        }
        (taken, left)
    }
}

/// How far behind the outbox is: what the dispatcher reports as metrics after each invocation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Backlog {
    /// Rows not published yet (due, leased, backing off, or parked behind a dead event).
    pub pending: i64,
    /// Of them, events appended with a `deliver_at` still ahead (migration V10).
    pub delayed: i64,
    /// Age of the oldest pending row (a delayed one counts from its `deliver_at`), seconds (0 when none is pending).
    pub oldest_pending_age_seconds: f64,
    /// Rows that will not be published until an operator re-drives them.
    pub dead: i64,
    /// Age of the oldest transaction holding a transaction id anywhere in the cluster (any
    /// database, prepared transactions included), seconds; 0 when none. It no longer holds back
    /// publishing, but it keeps vacuum from removing the outbox's dead rows, so the claim's index
    /// bloats while it runs. Needs `pg_read_all_stats` (or `pg_monitor`) to see other roles'
    /// sessions.
    pub oldest_transaction_age_seconds: f64,
}

/// The oldest transaction holding an xid, in seconds: sessions (any database, any role the
/// caller may see) and prepared transactions.
pub const OLDEST_TRANSACTION_AGE_SQL: &str = "
    greatest(
        coalesce((SELECT max(extract(epoch FROM now() - xact_start)) FROM pg_stat_activity
                  WHERE backend_xid IS NOT NULL), 0),
        coalesce((SELECT max(extract(epoch FROM now() - prepared)) FROM pg_prepared_xacts), 0)
    )::float8";
