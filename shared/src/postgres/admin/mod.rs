//! SQL of the `outbox` table for operators (`outboxctl`): what is stuck and why, putting dead
//! events back in line, re-publishing published ones, giving up dead ones, and deleting old
//! published rows and inbox entries. Every change runs in bounded batches of short transactions,
//! so it never holds locks a dispatcher or a command waits on for long.
//!
//! # Layout
//! - `status.rs`: the status report (counts, backlog, parked aggregates, last errors, dispatchers).
//! - `selection.rs`: which rows a redrive, replay or discard takes, its SQL, preview and describe.
//! - `requeue.rs`: redriving dead rows and replaying published ones; retrying rows held right now.
//! - `discard.rs`: giving up dead rows, and what they unpark.
//! - `cleanup.rs`: deleting expired published rows and inbox entries, and the paced cleanup run.
//! - `tenants.rs`: tenants' weights, caps and pauses in the claim.

/// `from_columns!(Type: field, ..)`: a closure reading a `Type` from a row, each field from the
/// column of the same name.
macro_rules! from_columns {
    ($ty:ident: $($field:ident),* $(,)?) => {
        |row: &tokio_postgres::Row| -> Result<$ty, tokio_postgres::Error> {
            Ok($ty { $($field: row.try_get(stringify!($field))?),* })
        }
    };
}

mod cleanup;
mod discard;
mod requeue;
mod selection;
mod status;
pub mod tenants;

pub use cleanup::{
    count_expired, delete_inbox_entries, delete_published, run_cleanup, Batches, CleanupRun,
    Expiring, Pace,
};
pub use discard::{discard, DiscardReport};
pub use requeue::{blocking_dead, requeue, CHANGE_BATCH};
pub use selection::{preview, Requeue, SelectedEvent, Selection};
pub use status::{
    status, ActiveDispatcher, DispatcherState, FailedEvent, FailedEventRef, ParkedAggregate,
    StatusReport, TenantCounts,
};
