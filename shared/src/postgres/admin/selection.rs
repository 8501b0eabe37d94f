//! Which rows a redrive, replay or discard takes: the [`Selection`] an operator names, the one
//! SQL predicate every selecting query shares, walking the selected rows in batches, and the
//! preview shown before anything changes.

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_postgres::types::Type;
use tokio_postgres::Client;
use uuid::Uuid;

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

/// Dead rows that hold back pending rows of `selection` (at most `limit`).
pub(super) async fn blocking_ids(
    client: &Client,
    selection: &Selection,
    limit: i64,
) -> Result<Vec<i64>, tokio_postgres::Error> {
    selected_ids(client, &blocking_sql(), "pending", selection, 0, limit).await
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

pub(super) async fn select_batch(
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

pub(super) async fn describe(
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
        .map(from_columns!(SelectedEvent:
            event_id, tenant_id, aggregate_type, aggregate_id, aggregate_version, event_type,
            created_at, last_error
        ))
        .collect()
}
