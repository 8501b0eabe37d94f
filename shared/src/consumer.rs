//! The consumer API: projections plugged into one inbox.
//!
//! A [`Projection`] keeps a read model of one aggregate type. The sink registers its projections
//! in a [`Projections`] list (the service's one registry, e.g. `projections()`); the inbox
//! ([`PgProjectionStore`](crate::postgres::projections::PgProjectionStore)) then applies each
//! delivered event at most once per consumer, in aggregate-version order, in one transaction with
//! the projections' writes:
//! - an event this consumer applied before is acknowledged and changes nothing (its inbox row, or
//!   a version at or below the aggregate's position once the inbox row has expired);
//! - an event whose predecessor has not been applied yet is reported as a gap: not applied, the
//!   queue delivers it again later;
//! - otherwise every projection that handles its type applies it, in the same transaction as the
//!   inbox row and the new position.
//!
//! Events of aggregate types no projection follows are acknowledged without touching the
//! database; events of a followed aggregate type that no projection handles only advance the
//! aggregate's position (so a new event type from a producer never blocks the next known one).

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;

use crate::config::{ranged_env, ConfigError};
use crate::envelope::EventEnvelope;
use crate::sink::DeliveryError;

/// An error a projection returns from [`Projection::apply`]: usually the driver's.
pub type ProjectionError = Box<dyn std::error::Error + Send + Sync>;

/// A read model kept from one aggregate type's events.
///
/// `apply` gets the events of one batch that are new and next in line, in delivery order (which
/// is version order within each aggregate), and writes them in `tx`; it must not commit or roll
/// back. If it fails, the inbox rolls the batch back and applies its events one per transaction,
/// so only the event that fails is redelivered.
pub trait Projection: Send + Sync {
    /// A name for logs and errors, e.g. `order_projection`.
    fn name(&self) -> &str;
    /// The aggregate type it follows, e.g. `order`.
    fn aggregate_type(&self) -> &str;
    /// Whether it applies events of this type (other types of its aggregate only advance the
    /// aggregate's position).
    fn handles(&self, event_type: &str) -> bool;
    /// Checks an event before anything is written (schema version, payload shape): a refused
    /// event is redelivered and ends in the queue's dead-letter queue, and never reaches `apply`.
    fn check(&self, event: &EventEnvelope) -> Result<(), DeliveryError> {
        let _ = event;
        Ok(())
    }
    /// Whether `event` may be the first this consumer sees of its aggregate (default: version 1).
    /// Anything else with no position yet is a gap and waits for its predecessors.
    fn starts_aggregate(&self, event: &EventEnvelope) -> bool {
        event.aggregateversion == 1
    }
    /// Applies `events` in `tx`.
    fn apply<'a>(
        &'a self,
        tx: &'a tokio_postgres::Transaction<'_>,
        events: &'a [&'a EventEnvelope],
    ) -> BoxFuture<'a, Result<(), ProjectionError>>;
}

/// What the registered projections make of a delivered event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Its aggregate type is followed: it goes through the inbox. `handled` says whether any
    /// projection applies its type.
    Inbox {
        /// Some projection applies this event type.
        handled: bool,
    },
    /// No projection follows its aggregate type: acknowledged, nothing written.
    Ignore,
}

/// The projections a sink applies, in registration order.
#[derive(Clone, Default)]
pub struct Projections {
    list: Arc<Vec<Arc<dyn Projection>>>,
}

impl std::fmt::Debug for Projections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.list.iter().map(|p| p.name()))
            .finish()
    }
}

impl Projections {
    /// No projections yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a projection.
    pub fn with(self, projection: impl Projection + 'static) -> Self {
        let mut list: Vec<Arc<dyn Projection>> = self.list.iter().cloned().collect();
        list.push(Arc::new(projection));
        Self {
            list: Arc::new(list),
        }
    }

    /// The projections, in registration order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<dyn Projection>> {
        self.list.iter()
    }

    /// Where `event` goes, after every projection that handles it has checked it.
    pub fn route(&self, event: &EventEnvelope) -> Result<Route, DeliveryError> {
        let mut followed = false;
        let mut handled = false;
        for p in self.list.iter() {
            if p.aggregate_type() != event.aggregatetype {
                continue;
            }
            followed = true;
            if p.handles(&event.event_type) {
                p.check(event)?;
                handled = true;
            }
        }
        if !followed {
            return Ok(Route::Ignore);
        }
        if event.aggregateversion < 1 {
            return Err(DeliveryError::InvalidEnvelope(
                "aggregateversion must be positive".into(),
            ));
        }
        Ok(Route::Inbox { handled })
    }

    /// Whether `event` may start its aggregate for this consumer: any projection handling it
    /// says so, or (none handling it) it is version 1.
    pub fn starts_aggregate(&self, event: &EventEnvelope) -> bool {
        let mut handlers = self
            .list
            .iter()
            .filter(|p| p.aggregate_type() == event.aggregatetype && p.handles(&event.event_type));
        let first = handlers.next();
        match first {
            None => event.aggregateversion == 1,
            Some(p) => p.starts_aggregate(event) || handlers.any(|p| p.starts_aggregate(event)),
        }
    }
}

/// How long inbox entries are kept, and how they are deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InboxRetention {
    /// Entries older than this are deleted (`INBOX_RETENTION_DAYS`, 1..=3650, default 14; 0 keeps
    /// them). Longer than the outbox's own retention (7 days), so any replay or redelivery the
    /// outbox can still make finds its entry; an older one is still recognised as applied by
    /// its aggregate's position.
    pub keep: Option<Duration>,
    /// Entries per delete statement (`INBOX_CLEANUP_BATCH`, 100..=50000, default 5000).
    pub batch: i32,
    /// Least time between two cleanup statements of one instance (1 minute).
    pub every: Duration,
}

impl Default for InboxRetention {
    fn default() -> Self {
        Self {
            keep: Some(Duration::from_secs(14 * 86_400)),
            batch: 5_000,
            every: Duration::from_secs(60),
        }
    }
}

impl InboxRetention {
    /// Reads `INBOX_RETENTION_DAYS` and `INBOX_CLEANUP_BATCH`.
    pub fn from_env() -> Result<Self, ConfigError> {
        let d = Self::default();
        Ok(Self {
            keep: match ranged_env("INBOX_RETENTION_DAYS", 14u64, 0, 3_650)? {
                0 => None,
                days => Some(Duration::from_secs(days * 86_400)),
            },
            batch: ranged_env("INBOX_CLEANUP_BATCH", d.batch, 100, 50_000)?,
            ..d
        })
    }
}
