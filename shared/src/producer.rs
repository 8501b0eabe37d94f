//! The producer API: any service appends its own typed events to the outbox in its own
//! transaction, next to the state change they describe.
//!
//! ```no_run
//! use pg_outbox::outbox::EventMetadata;
//! use pg_outbox::producer::{append, OutboxEvent};
//!
//! #[derive(serde::Serialize)]
//! #[serde(rename_all = "camelCase")]
//! struct CustomerRenamed { tenant: String, customer_id: String, name: String }
//!
//! impl OutboxEvent for CustomerRenamed {
//!     const EVENT_TYPE: &'static str = "customer.renamed";
//!     const SCHEMA_VERSION: i32 = 1;
//!     const AGGREGATE_TYPE: &'static str = "customer";
//!     fn tenant_id(&self) -> &str { &self.tenant }
//!     fn aggregate_id(&self) -> &str { &self.customer_id }
//! }
//!
//! # async fn demo(client: &mut tokio_postgres::Client) -> Result<(), Box<dyn std::error::Error>> {
//! let tx = client.transaction().await?;
//! // ... the service's own writes in `tx` ...
//! let event = CustomerRenamed { tenant: "acme".into(), customer_id: "c-1".into(), name: "Ada".into() };
//! let appended = append(&tx, &event, &EventMetadata::new("crm", "request-42")).await?;
//! tx.commit().await?; // the event exists if and only if the writes do
//! println!("{} is version {}", appended.event_id, appended.aggregate_version);
//! # Ok(()) }
//! ```
//!
//! [`append_all`] appends many events of one type in one statement, at a fraction of the
//! database's cost per event of a statement each.
//!
//! The aggregate's next version is assigned by the outbox itself (the append trigger, under a lock
//! on the aggregate held until the transaction ends), so concurrent producers of one aggregate
//! never collide and its events are published in the order their transactions commit.

use serde::Serialize;
use tokio_postgres::types::Type;
use tokio_postgres::Transaction;
use uuid::Uuid;

use crate::outbox::EventMetadata;

/// An event a service appends: its type, schema version and aggregate are part of its Rust type;
/// its payload is its `Serialize` form (camelCase JSON is the convention of the examples).
pub trait OutboxEvent: Serialize + Sync {
    /// Event type, e.g. `customer.renamed`: the SNS `event_type` attribute, the EventBridge
    /// `DetailType`, and what consumers register projections for.
    const EVENT_TYPE: &'static str;
    /// Version of the payload's schema; bump it on an incompatible change.
    const SCHEMA_VERSION: i32;
    /// The kind of aggregate the event belongs to, e.g. `customer`.
    const AGGREGATE_TYPE: &'static str;
    /// Owning tenant.
    fn tenant_id(&self) -> &str;
    /// The aggregate's id: events of one aggregate are published in order, one at a time.
    fn aggregate_id(&self) -> &str;
    /// A key unique per tenant, when the producer wants a second append of the same fact refused
    /// (e.g. a request id); `None` by default.
    fn idempotency_key(&self) -> Option<&str> {
        None
    }
    /// Not before this time: the dispatcher does not claim the event earlier, and the
    /// aggregate's later events wait behind it, in order (migration V10). None (the default):
    /// as soon as it commits.
    fn deliver_at(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        None
    }
}

/// Why an append failed. The caller's transaction is unusable afterwards: roll it back.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// The payload did not serialize.
    #[error("{event_type}: payload does not serialize: {source}")]
    Payload {
        /// The event type.
        event_type: &'static str,
        /// The serializer's error.
        source: serde_json::Error,
    },
    /// The event is empty where the outbox needs a value.
    #[error("{event_type}: {field} must not be empty")]
    Empty {
        /// The event type.
        event_type: &'static str,
        /// The empty field.
        field: &'static str,
    },
    /// The database refused it (a duplicate idempotency key, a lost connection, ...).
    #[error("{event_type}: the outbox refused it: {source}")]
    Database {
        /// The event type.
        event_type: &'static str,
        /// The driver's error (SQLSTATE 23505 for a duplicate idempotency key).
        source: tokio_postgres::Error,
    },
    /// [`append_all`]: one idempotency key given to two events of the slice (of one tenant).
    /// Nothing was sent to the database.
    #[error("{event_type}: idempotency key {key:?} is given to two events of the batch")]
    RepeatedKey {
        /// The event type.
        event_type: &'static str,
        /// The key.
        key: String,
    },
    /// [`append_all`]: the outbox took the statement but did not insert this event (a trigger
    /// of the service's own on the outbox skipped it). The batch's other events are inserted in
    /// the transaction: roll it back.
    #[error(
        "{event_type}: event {event_id} was not appended (a trigger on the outbox skipped it)"
    )]
    Skipped {
        /// The event type.
        event_type: &'static str,
        /// The id the event was given.
        event_id: Uuid,
    },
}

impl AppendError {
    /// Whether it was a second append with the same idempotency key. For [`append_all`]: one of
    /// the batch's keys was appended before, and none of the batch's events was appended now.
    pub fn is_duplicate(&self) -> bool {
        matches!(self, Self::Database { source, .. }
            if source.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION))
    }
}

/// What the outbox assigned to an appended event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// The event id (a time-ordered UUID v7): consumers dedupe on it.
    pub event_id: Uuid,
    /// The aggregate's version after this event (1 for its first).
    pub aggregate_version: i64,
}

impl EventMetadata {
    /// Metadata with a source service and a correlation id, nothing else.
    pub fn new(source: impl Into<String>, correlation_id: impl Into<String>) -> Self {
        Self {
            source: source.into(),
            correlation_id: correlation_id.into(),
            ..Self::default()
        }
    }
}

const APPEND: &str = "
    INSERT INTO outbox (event_id, tenant_id, aggregate_type, aggregate_id, event_type,
                        schema_version, payload, metadata, idempotency_key, deliver_at)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
    RETURNING aggregate_version";

/// Appends `event` to the outbox in `tx`: published once `tx` commits, gone if it rolls back.
/// The outbox assigns the aggregate version. Empty metadata fields get the outbox's defaults (a
/// correlation id equal to the event id, `source` = the session's `outbox.source` setting, else
/// `database`).
pub async fn append<E: OutboxEvent>(
    tx: &Transaction<'_>,
    event: &E,
    metadata: &EventMetadata,
) -> Result<Appended, AppendError> {
    append_with_id(tx, Uuid::now_v7(), event, metadata).await
}

/// [`append`] under an event id the caller chose, for a service that writes the id beside its
/// own state in the same transaction (one that keeps the id of the event a command emitted, so a
/// replayed command answers with the same event). Use a time-ordered UUID v7 (`Uuid::now_v7()`).
#[tracing::instrument(skip_all, fields(event_type = E::EVENT_TYPE, tenant_id = event.tenant_id(),
    aggregate_id = event.aggregate_id()))]
pub async fn append_with_id<E: OutboxEvent>(
    tx: &Transaction<'_>,
    event_id: Uuid,
    event: &E,
    metadata: &EventMetadata,
) -> Result<Appended, AppendError> {
    let event_type = E::EVENT_TYPE;
    not_empty(event)?;
    let payload = serde_json::to_value(event)
        .map_err(|source| AppendError::Payload { event_type, source })?;
    let metadata = metadata_value::<E>(metadata)?;
    let row = tx
        .query_typed_one(
            APPEND,
            &[
                (&event_id, Type::UUID),
                (&event.tenant_id(), Type::TEXT),
                (&E::AGGREGATE_TYPE, Type::TEXT),
                (&event.aggregate_id(), Type::TEXT),
                (&E::EVENT_TYPE, Type::TEXT),
                (&E::SCHEMA_VERSION, Type::INT4),
                (&payload, Type::JSONB),
                (&metadata, Type::JSONB),
                (&event.idempotency_key(), Type::TEXT),
                (&event.deliver_at(), Type::TIMESTAMPTZ),
            ],
        )
        .await
        .map_err(|source| AppendError::Database { event_type, source })?;
    let aggregate_version = row
        .try_get(0)
        .map_err(|source| AppendError::Database { event_type, source })?;
    Ok(Appended {
        event_id,
        aggregate_version,
    })
}

/// The fields the outbox needs a value in, checked before the database sees the event.
fn not_empty<E: OutboxEvent>(event: &E) -> Result<(), AppendError> {
    for (field, value) in [
        ("tenant id", event.tenant_id()),
        ("aggregate id", event.aggregate_id()),
        ("event type", E::EVENT_TYPE),
        ("aggregate type", E::AGGREGATE_TYPE),
    ] {
        if value.trim().is_empty() {
            return Err(AppendError::Empty {
                event_type: E::EVENT_TYPE,
                field,
            });
        }
    }
    Ok(())
}

/// The metadata as the outbox stores it; empty strings are "not given" (the outbox's defaults
/// apply).
fn metadata_value<E: OutboxEvent>(
    metadata: &EventMetadata,
) -> Result<serde_json::Value, AppendError> {
    let mut value = serde_json::to_value(metadata).map_err(|source| AppendError::Payload {
        event_type: E::EVENT_TYPE,
        source,
    })?;
    if let Some(fields) = value.as_object_mut() {
        fields.retain(|_, v| v.as_str() != Some(""));
    }
    Ok(value)
}

/// One statement for many events: PostgreSQL builds a statement on the outbox (its triggers,
/// keys, partial indexes, defaults) once, whatever the number of rows, and that is most of a
/// one-row append's cost. Rows go in by aggregate, each aggregate's in the caller's order, so
/// two batches over the same aggregates lock them in one order (no deadlock between them on the
/// aggregates; crossed idempotency keys still can, see [`append_all`]).
const APPEND_ALL: &str = "
    INSERT INTO outbox (event_id, tenant_id, aggregate_type, aggregate_id, event_type,
                        schema_version, payload, metadata, idempotency_key, deliver_at)
    SELECT e.event_id, e.tenant_id, $3, e.aggregate_id, $4, $5, e.payload, $6,
           e.idempotency_key, e.deliver_at
    FROM unnest($1::uuid[], $2::text[], $7::text[], $8::jsonb[], $9::text[], $10::timestamptz[])
         WITH ORDINALITY AS e(event_id, tenant_id, aggregate_id, payload, idempotency_key,
                              deliver_at, n)
    ORDER BY e.tenant_id COLLATE \"C\", e.aggregate_id COLLATE \"C\", e.n
    RETURNING event_id, aggregate_version";

/// Appends `events` in one statement in `tx`: each as [`append`] appends it, under one
/// `metadata`, at the database cost of a bulk insert instead of a statement per event. Each
/// aggregate's events get consecutive versions in the slice's order; the answer is in the slice's
/// order. Rows go in by aggregate id (so their row ids, which order the claim across aggregates,
/// follow the aggregate ids, not the slice). No events, no statement.
///
/// Errors: an empty field or an idempotency key given twice in the slice is refused before the
/// database ([`AppendError::Empty`], [`AppendError::RepeatedKey`]; `tx` stays usable). A key
/// already in the outbox fails the statement ([`AppendError::is_duplicate`]): none of the events
/// was appended, the others included, so a batch with keys is not "already done" because one was.
/// Any database error leaves `tx` unusable, as [`append`]'s do. [`AppendError::Skipped`] (a
/// trigger of the service's own skipped an event) leaves the others inserted in `tx`: roll it
/// back.
///
/// Locks: the batch takes its aggregates in id order, so two batches over the same aggregates do
/// not deadlock each other on them. A transaction that appends in several statements (two
/// batches, or single appends) in different orders can, as any two transactions can, and so can
/// two batches whose idempotency keys cross (each waits on the other's uncommitted key): the
/// loser gets a deadlock error (SQLSTATE 40P01); retry its transaction.
pub async fn append_all<E: OutboxEvent>(
    tx: &Transaction<'_>,
    events: &[E],
    metadata: &EventMetadata,
) -> Result<Vec<Appended>, AppendError> {
    let event_type = E::EVENT_TYPE;
    if events.is_empty() {
        return Ok(Vec::new());
    }
    let mut ids = Vec::with_capacity(events.len());
    let mut tenants = Vec::with_capacity(events.len());
    let mut aggregates = Vec::with_capacity(events.len());
    let mut payloads = Vec::with_capacity(events.len());
    let mut keys = Vec::with_capacity(events.len());
    let mut deliver_at = Vec::with_capacity(events.len());
    let mut given_keys = std::collections::HashSet::new();
    for event in events {
        not_empty(event)?;
        if let Some(key) = event.idempotency_key() {
            if !given_keys.insert((event.tenant_id(), key)) {
                return Err(AppendError::RepeatedKey {
                    event_type,
                    key: key.to_owned(),
                });
            }
        }
        ids.push(Uuid::now_v7());
        tenants.push(event.tenant_id());
        aggregates.push(event.aggregate_id());
        payloads.push(
            serde_json::to_value(event)
                .map_err(|source| AppendError::Payload { event_type, source })?,
        );
        keys.push(event.idempotency_key());
        deliver_at.push(event.deliver_at());
    }
    let metadata = metadata_value::<E>(metadata)?;
    let rows = tx
        .query_typed(
            APPEND_ALL,
            &[
                (&ids, Type::UUID_ARRAY),
                (&tenants, Type::TEXT_ARRAY),
                (&E::AGGREGATE_TYPE, Type::TEXT),
                (&E::EVENT_TYPE, Type::TEXT),
                (&E::SCHEMA_VERSION, Type::INT4),
                (&metadata, Type::JSONB),
                (&aggregates, Type::TEXT_ARRAY),
                (&payloads, Type::JSONB_ARRAY),
                (&keys, Type::TEXT_ARRAY),
                (&deliver_at, Type::TIMESTAMPTZ_ARRAY),
            ],
        )
        .await
        .map_err(|source| AppendError::Database { event_type, source })?;
    let mut versions = std::collections::HashMap::with_capacity(rows.len());
    for row in &rows {
        let id: Uuid = row
            .try_get(0)
            .map_err(|source| AppendError::Database { event_type, source })?;
        let version: i64 = row
            .try_get(1)
            .map_err(|source| AppendError::Database { event_type, source })?;
        versions.insert(id, version);
    }
    ids.into_iter()
        .map(|event_id| match versions.get(&event_id) {
            Some(&aggregate_version) => Ok(Appended {
                event_id,
                aggregate_version,
            }),
            // Every row inserted is returned: one missing was skipped by a trigger of the
            // caller's own (RETURN NULL).
            None => Err(AppendError::Skipped {
                event_type,
                event_id,
            }),
        })
        .collect()
}
