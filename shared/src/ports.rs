//! Ports: the narrow interfaces the dispatcher, the sink and the feed depend on. Adapters live
//! in [`crate::postgres`], [`crate::aws`], [`crate::nats`] and [`crate::memory`].

use std::future::Future;

use uuid::Uuid;

use crate::ids::TenantId;

/// The error a store's driver reported, kept as the source of a [`StoreError`].
pub type StoreSource = Box<dyn std::error::Error + Send + Sync>;

/// Why no connection could be opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectFailure {
    /// The server could not be reached, refused the connection, or is starting or stopping:
    /// transient.
    Unreachable,
    /// The server refused the credentials, also after they were re-read (or they could not be
    /// re-read).
    Authentication,
    /// The connection cannot be set up as configured (TLS).
    Configuration,
}

/// A failure of the store itself (not a business rule): the command may be retried as is. The
/// adapters map their driver's errors to it ([`crate::postgres`] maps `tokio_postgres`'s).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No connection could be opened (the server is down or refused the credentials).
    #[error("no database connection")]
    Connect {
        /// Why.
        failure: ConnectFailure,
        /// The driver's error.
        #[source]
        source: StoreSource,
    },
    /// The connection broke while the command ran.
    #[error("database connection lost")]
    Unavailable(#[source] StoreSource),
    /// The operation did not finish within its bound (`DATABASE_OPERATION_TIMEOUT_MS`): the
    /// server or the network stopped answering, or the statement waited too long for a lock.
    #[error("database did not answer within {} ms", .0.as_millis())]
    Timeout(std::time::Duration),
    /// A statement failed (a constraint the rules should have prevented, a trigger): the
    /// transaction was rolled back and nothing was written.
    #[error("database statement failed")]
    Statement(#[source] StoreSource),
    /// The statement lost a lock conflict: a deadlock (40P01), a lock it gave up waiting for
    /// (55P03, `lock_timeout`), a server statement timeout (57014) or a serialization failure
    /// (40001). Nothing was written; the same statement may succeed at once: transient.
    #[error("database lock conflict")]
    Conflict(#[source] StoreSource),
    /// A stored row holds a value the code does not understand.
    #[error("stored data is invalid: {0}")]
    Corrupt(String),
}

impl StoreError {
    /// The connection broke under the operation: a new connection may succeed at once.
    pub fn is_connection_lost(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }

    /// A failure of the database's availability (down, restarting, refusing credentials, not
    /// answering) rather than of the statement: worth retrying later as it is.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            StoreError::Connect { .. }
                | StoreError::Unavailable(_)
                | StoreError::Timeout(_)
                | StoreError::Conflict(_)
        )
    }

    /// The server refused the credentials, also after they were re-read.
    pub fn is_authentication(&self) -> bool {
        matches!(
            self,
            StoreError::Connect {
                failure: ConnectFailure::Authentication,
                ..
            }
        )
    }
}

/// Whether a command that just committed an event should wake the dispatcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WakeDecision {
    /// This caller is the one to wake it (no dispatcher active, no wake-up in the debounce window).
    pub wake: bool,
    /// How long the answer stays "no need" (the dispatcher's heartbeat or the debounce window).
    pub quiet_for: std::time::Duration,
}

/// Starts a dispatcher run now, without waiting for it (an asynchronous Lambda invoke).
pub trait WakeDispatcher: Send + Sync {
    /// Asks for a run; an error says why it could not be asked (the schedule still runs it).
    fn wake(&self) -> impl Future<Output = Result<(), String>> + Send;
}

/// What the dispatcher needs from the outbox table.
pub trait OutboxStore: Send + Sync {
    /// Leases up to `limit` publishable rows to `lease_owner` for `lease`: due, not leased, every
    /// earlier event of their aggregate published, inserted by a transaction older than every
    /// transaction still running. Counts the attempt.
    fn claim_batch(
        &self,
        limit: i64,
        lease: std::time::Duration,
        lease_owner: &str,
    ) -> impl Future<Output = Result<Vec<crate::outbox::ClaimedEvent>, StoreError>> + Send;

    /// The drain's lane ([`crate::dispatcher`]): leases up to `limit` due aggregate heads of every
    /// tenant but those in `skip` (the ones being drained in bulk), shared between them, no
    /// replays, under the same rules as [`OutboxStore::claim_batch`]. Does not move the main
    /// claim's rotation between tenants.
    fn claim_waiting(
        &self,
        limit: i64,
        lease: std::time::Duration,
        lease_owner: &str,
        skip: &[String],
    ) -> impl Future<Output = Result<Vec<crate::outbox::ClaimedEvent>, StoreError>> + Send;

    /// Records what became of rows claimed by `lease_owner`, in one transaction, and makes the
    /// successor of each published row its aggregate's head. A retry or a dead-lettering only
    /// applies while the row is still leased to `lease_owner`. Returns the outcomes not recorded
    /// yet: rows held right now by a transaction appending their successor, to record again later
    /// (never waited for).
    fn record_outcomes(
        &self,
        lease_owner: &str,
        outcomes: &crate::outbox::Outcomes,
    ) -> impl Future<Output = Result<crate::outbox::Outcomes, StoreError>> + Send;

    /// Pending and dead counts and the oldest pending row's age.
    fn backlog(&self) -> impl Future<Output = Result<crate::outbox::Backlog, StoreError>> + Send;

    /// Says that `owner` is draining and will see new rows within `ttl`: commands do not wake
    /// the dispatcher meanwhile. Renewed while the drain polls.
    fn heartbeat(
        &self,
        owner: &str,
        ttl: std::time::Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Withdraws `owner`'s heartbeat: from now on commands wake a dispatcher again.
    fn release(&self, owner: &str) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Deletes up to `max_rows` rows published more than `retention` ago, in one short
    /// transaction; returns how many.
    fn delete_published(
        &self,
        retention: std::time::Duration,
        max_rows: i32,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;
}

/// A claimed row with its serialized envelope, ready for a bus.
#[derive(Debug, Clone)]
pub struct OutgoingMessage {
    /// The claimed row.
    pub event: crate::outbox::ClaimedEvent,
    /// The envelope as JSON: the SNS `Message` or the EventBridge `Detail` (or, for an envelope
    /// stored by the claim check, the pointer to it).
    pub body: String,
    /// For a stored envelope sent as an extended-client pointer: the envelope's size, sent as
    /// the `ExtendedPayloadSize` attribute (NATS: header).
    pub extended_size: Option<usize>,
}

impl OutgoingMessage {
    /// A message carrying its envelope.
    pub fn new(event: crate::outbox::ClaimedEvent, body: String) -> Self {
        Self {
            event,
            body,
            extended_size: None,
        }
    }
}

/// What a bus said about one entry of a publish call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublishOutcome {
    /// Accepted.
    Published,
    /// Not accepted this time (throttling, 5xx, network, timeout): try again later.
    Retry(String),
    /// Refused for good (malformed, too large): dead-letter it now.
    Reject(String),
}

/// Size limits of a bus's publish call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishLimits {
    /// Entries per call.
    pub max_entries: usize,
    /// Bytes of one entry.
    pub max_entry_bytes: usize,
    /// Bytes of all entries of one call.
    pub max_batch_bytes: usize,
}

/// A message bus the dispatcher publishes to (SNS, EventBridge).
pub trait Publisher: Send + Sync {
    /// The bus's limits.
    fn limits(&self) -> PublishLimits;

    /// Bytes `message` counts for against the limits.
    fn entry_size(&self, message: &OutgoingMessage) -> usize;

    /// The message for an envelope the claim check stored at `pointer`: the body and the size
    /// attribute to send. By default AWS's extended-client pointer with `ExtendedPayloadSize`.
    fn pointer_body(
        &self,
        envelope: &str,
        pointer: &crate::claim_check::S3Pointer,
    ) -> Result<(String, Option<usize>), String> {
        let _ = self;
        Ok((pointer.body(), Some(envelope.len())))
    }

    /// Publishes up to `limits().max_entries` messages in one call. Returns one outcome per
    /// message, in order: a call that fails as a whole is a `Retry` for each of them.
    fn publish(
        &self,
        batch: &[OutgoingMessage],
    ) -> impl Future<Output = Vec<PublishOutcome>> + Send;
}

/// What the sink needs from the read side: the inbox and the projections behind it.
pub trait ProjectionStore: Send + Sync {
    /// The projections it applies (the sink routes deliveries with them).
    fn projections(&self) -> &crate::consumer::Projections;

    /// Applies `events` in order, each at most once per `consumer`, in one transaction with the
    /// projections' writes; returns one outcome per event. An event whose projection fails
    /// leaves the others applied. An error means the database could not run or commit the
    /// transaction (unavailable, refusing the credentials, a statement of the inbox failed):
    /// nothing of the batch was applied.
    fn apply_events(
        &self,
        consumer: &str,
        events: &[crate::envelope::EventEnvelope],
    ) -> impl Future<Output = Result<Vec<crate::sink::ApplyOutcome>, StoreError>> + Send;

    /// Deletes up to `max_rows` inbox entries older than `retention`; returns how many.
    fn delete_expired(
        &self,
        retention: std::time::Duration,
        max_rows: i32,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;
}

/// What the events feed needs from storage.
pub trait EventFeedStore: Send + Sync {
    /// One page of `query.tenant`'s feed.
    fn feed_page(
        &self,
        query: &crate::feed::FeedQuery,
    ) -> impl Future<Output = Result<crate::feed::FeedPage, StoreError>> + Send;

    /// Records that `consumer` has `tenant`'s event `event_id`; a second time keeps the first
    /// acknowledgment's time.
    fn acknowledge(
        &self,
        tenant: &TenantId,
        event_id: Uuid,
        consumer: &crate::feed::ConsumerName,
    ) -> impl Future<Output = Result<crate::feed::AckOutcome, StoreError>> + Send;
}
