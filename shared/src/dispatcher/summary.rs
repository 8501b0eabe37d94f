//! What a drain did: the summary an invocation returns and logs, and its CloudWatch metrics.

use std::time::Duration;

use serde::Serialize;

/// Why a drain stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// A claim found nothing due.
    Empty,
    /// The deadline minus the safety margin was reached.
    Deadline,
}

/// What one invocation did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DispatchSummary {
    /// Rows claimed.
    pub claimed: usize,
    /// Rows published.
    pub published: usize,
    /// Rows scheduled for another attempt.
    pub retried: usize,
    /// Rows dead-lettered.
    pub dead: usize,
    /// Claims made (the last one may have been empty).
    pub claims: usize,
    /// Publish calls made.
    pub publish_calls: usize,
    /// Publish calls that failed as a whole (every entry to be retried): the bus, or the route
    /// to it, was down.
    pub failed_publish_calls: usize,
    /// Published rows deleted by the retention cleanup.
    pub cleaned: u64,
    /// Store operations that failed because the database was unavailable (restarting, failing
    /// over, refusing credentials, not answering); the drain paused and carried on after each.
    pub store_errors: usize,
    /// Wall time, milliseconds.
    pub duration_ms: u64,
    /// Why it stopped.
    pub stopped: Option<StopReason>,
    /// The outbox after the drain, when measured (the Lambda handler does, for its metrics).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backlog: Option<crate::outbox::Backlog>,
    /// How long each claim statement took.
    #[serde(skip)]
    pub claim_latencies: Vec<Duration>,
    /// How long each publish call to the bus took.
    #[serde(skip)]
    pub publish_latencies: Vec<Duration>,
}

impl DispatchSummary {
    /// Events whose outcome was recorded.
    pub(super) fn recorded(&self) -> usize {
        self.published + self.retried + self.dead
    }

    pub(super) fn add(&mut self, batch: DispatchSummary) {
        self.claims += batch.claim_latencies.len();
        self.claimed += batch.claimed;
        self.published += batch.published;
        self.retried += batch.retried;
        self.dead += batch.dead;
        self.publish_calls += batch.publish_calls;
        self.failed_publish_calls += batch.failed_publish_calls;
        self.claim_latencies.extend(batch.claim_latencies);
        self.publish_latencies.extend(batch.publish_latencies);
    }

    /// The summary as CloudWatch metrics (EMF), with the backlog when it was measured.
    pub fn metrics(&self, service: &str) -> crate::metrics::MetricsDocument {
        use crate::metrics::{MetricsDocument, Unit};
        let mut doc = MetricsDocument::from_env(service);
        doc.count("Published", self.published)
            .count("Retried", self.retried)
            .count("DeadLettered", self.dead)
            .count("Claimed", self.claimed)
            .count("Cleaned", self.cleaned as usize)
            .count("StoreErrors", self.store_errors)
            .latencies("ClaimLatency", &self.claim_latencies)
            .latencies("PublishLatency", &self.publish_latencies);
        if let Some(backlog) = self.backlog {
            doc.count("PendingRows", backlog.pending.max(0) as usize)
                .value(
                    "OldestPendingAge",
                    Unit::Seconds,
                    backlog.oldest_pending_age_seconds,
                )
                .count("DeadRows", backlog.dead.max(0) as usize)
                .value(
                    "OldestTransactionAge",
                    Unit::Seconds,
                    backlog.oldest_transaction_age_seconds,
                );
        }
        doc.property("claims", self.claims)
            .property("publishCalls", self.publish_calls)
            .property("durationMs", self.duration_ms)
            .property(
                "stopped",
                serde_json::to_value(self.stopped).unwrap_or_default(),
            );
        doc
    }
}
