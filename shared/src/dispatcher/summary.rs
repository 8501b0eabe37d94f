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
    /// Claims of the lane (each poll one, empty ones too); those that took rows count in
    /// `claims` too.
    pub lane_claims: usize,
    /// Rows the lane took (part of `claimed`): events of tenants other than the bulk's, claimed
    /// while a batch was on the bus.
    pub lane_claimed: usize,
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
    /// Invalid W3C `traceparent`s left out of the envelopes (the events went out without one).
    pub trace_contexts_dropped: usize,
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
    /// From append to the bus's answer, for live events published (a uniform sample).
    #[serde(skip)]
    pub commit_to_publish: LatencySample,
}

/// Commit-to-publish samples kept per invocation: a drain of 100,000 events writes ten metric
/// lines of them, not a thousand, and its percentiles come from a uniform sample.
pub const MAX_COMMIT_TO_PUBLISH_SAMPLES: usize = 1_000;

/// Durations offered one by one, of which every one is kept up to
/// [`MAX_COMMIT_TO_PUBLISH_SAMPLES`]; then every other one kept is dropped and one in two of
/// those offered next is kept, and so on: an even thinning, whatever the count. The longest one
/// offered is always reported with them, so the metric's maximum is the invocation's.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LatencySample {
    kept: Vec<Duration>,
    /// One in 2^thinning of those offered is kept.
    thinning: u32,
    offered: u64,
    longest: Option<Duration>,
}

impl LatencySample {
    /// Every one of `values`, unthinned (one batch's, to be offered to an invocation's sample).
    pub fn all(values: Vec<Duration>) -> Self {
        Self {
            offered: values.len() as u64,
            longest: values.iter().max().copied(),
            kept: values,
            thinning: 0,
        }
    }

    /// Offers each of `samples`.
    pub fn offer(&mut self, samples: &[Duration]) {
        for sample in samples {
            if self.offered % (1u64 << self.thinning.min(63)) == 0 {
                self.kept.push(*sample);
            }
            self.offered += 1;
            self.longest = self.longest.max(Some(*sample));
            if self.kept.len() > MAX_COMMIT_TO_PUBLISH_SAMPLES {
                let mut index = 0;
                self.kept.retain(|_| {
                    index += 1;
                    index % 2 == 1
                });
                self.thinning += 1;
            }
        }
    }

    /// Offers everything `other` was offered: all of it when it was never thinned (a batch's),
    /// else what it kept.
    pub fn absorb(&mut self, other: &LatencySample) {
        self.offer(&other.kept);
        // What `other` dropped still counts, and its longest stays the longest.
        self.offered += other.offered - other.kept.len() as u64;
        self.longest = self.longest.max(other.longest);
    }

    /// The samples kept, and the longest one offered when thinning dropped it: what the metric
    /// reports.
    pub fn reported(&self) -> Vec<Duration> {
        let mut values = self.kept.clone();
        if let Some(longest) = self.longest {
            if !values.contains(&longest) {
                values.push(longest);
            }
        }
        values
    }

    /// The samples kept.
    pub fn kept(&self) -> &[Duration] {
        &self.kept
    }

    /// How many were offered.
    pub fn offered(&self) -> u64 {
        self.offered
    }
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
        self.trace_contexts_dropped += batch.trace_contexts_dropped;
        self.claim_latencies.extend(batch.claim_latencies);
        self.publish_latencies.extend(batch.publish_latencies);
        self.commit_to_publish.absorb(&batch.commit_to_publish);
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
            .count("TraceContextsDropped", self.trace_contexts_dropped)
            .count("LaneClaims", self.lane_claims)
            .count("LaneClaimed", self.lane_claimed)
            .latencies("ClaimLatency", &self.claim_latencies)
            .latencies("PublishLatency", &self.publish_latencies)
            .latencies("CommitToPublishLatency", &self.commit_to_publish.reported());
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every gap between consecutive samples kept is the same.
    fn assert_evenly_spaced(kept: &[Duration]) {
        let gaps: std::collections::BTreeSet<u128> = kept
            .windows(2)
            .map(|w| w[1].as_millis() - w[0].as_millis())
            .collect();
        assert_eq!(gaps.len(), 1, "uneven gaps: {gaps:?}");
    }

    #[test]
    fn the_commit_to_publish_sample_is_bounded_and_even() {
        // Tried: fewer than the bound (all kept), exactly the bound, and 100,000 offered in
        // batches of 500 (a long drain).
        let mut small = LatencySample::default();
        small.offer(&[Duration::from_millis(3), Duration::from_millis(5)]);
        assert_eq!(
            small.kept(),
            [Duration::from_millis(3), Duration::from_millis(5)]
        );

        let mut full = LatencySample::default();
        let exact: Vec<Duration> = (0..MAX_COMMIT_TO_PUBLISH_SAMPLES as u64)
            .map(Duration::from_millis)
            .collect();
        full.offer(&exact);
        assert_eq!(full.kept(), exact.as_slice());

        let mut long = LatencySample::default();
        for batch in 0..200u64 {
            let samples: Vec<Duration> = (0..500)
                .map(|i| Duration::from_millis(batch * 500 + i))
                .collect();
            long.offer(&samples);
        }
        assert_eq!(long.offered(), 100_000);
        let kept = long.kept();
        assert!(
            (MAX_COMMIT_TO_PUBLISH_SAMPLES / 2..=MAX_COMMIT_TO_PUBLISH_SAMPLES)
                .contains(&kept.len()),
            "{} kept",
            kept.len()
        );
        // Evenly spaced over the whole drain, the last batches included; the longest reported.
        assert_eq!(
            long.reported().iter().max(),
            Some(&Duration::from_millis(99_999))
        );
        assert_evenly_spaced(kept);
        assert!(
            kept.last().unwrap().as_millis() >= 99_000,
            "{:?}",
            kept.last()
        );
    }

    #[test]
    fn batches_added_to_a_drain_are_sampled_once_and_evenly() {
        // Batches larger than the bound (up to DISPATCH_BATCH_SIZE's 5,000) go through
        // `DispatchSummary::add`: each event counts once, whatever its batch's size.
        let mut drain = DispatchSummary::default();
        let mut next = 0u64;
        for size in [5_000u64, 10, 3_000, 10, 2_000] {
            let values: Vec<Duration> = (next..next + size).map(Duration::from_millis).collect();
            next += size;
            drain.add(DispatchSummary {
                commit_to_publish: LatencySample::all(values),
                ..DispatchSummary::default()
            });
        }
        assert_eq!(drain.commit_to_publish.offered(), next);
        let kept = drain.commit_to_publish.kept();
        assert!(
            kept.len() <= MAX_COMMIT_TO_PUBLISH_SAMPLES,
            "{}",
            kept.len()
        );
        assert_evenly_spaced(kept);
        assert_eq!(
            drain.commit_to_publish.reported().iter().max(),
            Some(&Duration::from_millis(next - 1))
        );
    }

    #[test]
    fn commit_to_publish_latency_is_a_metric_when_events_were_published() {
        let mut summary = DispatchSummary::default();
        let none = summary
            .metrics("outbox-dispatcher")
            .render(std::time::SystemTime::now());
        assert!(
            !none.iter().any(|l| l.contains("CommitToPublishLatency")),
            "{none:?}"
        );
        summary
            .commit_to_publish
            .offer(&[Duration::from_millis(42)]);
        let lines = summary
            .metrics("outbox-dispatcher")
            .render(std::time::SystemTime::now());
        let doc: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
        assert_eq!(doc["CommitToPublishLatency"], 42.0, "{doc}");
    }
}
