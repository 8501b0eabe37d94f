//! The dispatcher: claim a batch, publish it in bus-sized calls (several in flight), record each
//! row's outcome, and repeat until the outbox has nothing due or the deadline is near. The three
//! steps are pipelined: while one batch is at the bus (on tasks of its own), the store records
//! the one before and, on a second connection, leases the one after, so none waits for another.
//!
//! # Layout
//! - [`settings`]: where events go ([`Target`]) and the drain's settings, from the environment.
//! - `claim`: leasing a batch and recording its outcomes, fenced by the lease owner.
//! - `publish`: envelopes in bus-sized calls, at most `max_in_flight` at the bus.
//! - [`outcome`]: the pure decision published / retry after a backoff / dead, per event.
//! - `drain`: the loop and its deadline ([`OutboxDispatcher`]), and the rules it keeps.
//! - `lane`: while a batch is on the bus, the tenants not drained in bulk go at once, so one
//!   tenant's backlog does not hold back another's events.
//! - `outage`: pausing while the store is unavailable.
//! - [`summary`]: what a drain did, and its CloudWatch metrics.
//!
//! The drain depends only on the [`OutboxStore`](crate::ports::OutboxStore) and
//! [`Publisher`](crate::ports::Publisher) ports: PostgreSQL and SNS, EventBridge or NATS in
//! production, [`crate::memory`] in unit tests.

mod claim;
mod drain;
mod lane;
mod outage;
pub mod outcome;
mod publish;
pub mod settings;
pub mod summary;

pub use drain::OutboxDispatcher;
pub use outcome::{backoff_delay, Decision, RetryPolicy};
pub use publish::ClaimCheck;
pub use settings::{
    DispatcherConfig, Target, CLEANUP_BUSY_PAUSE, CLEANUP_IDLE_PAUSE, HEARTBEAT_EVERY,
    HEARTBEAT_TTL, LANE_BATCH,
};
pub use summary::{DispatchSummary, LatencySample, StopReason, MAX_COMMIT_TO_PUBLISH_SAMPLES};

#[cfg(test)]
mod tests;
