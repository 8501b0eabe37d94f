//! Outcome: what becomes of a claimed event after the bus answered. A pure function of the
//! event (its attempts so far), the bus's answer and the retry policy: published, retried after a
//! backoff, or dead-lettered with the reason.

use std::time::Duration;

use crate::outbox::{ClaimedEvent, Outcomes};
use crate::ports::PublishOutcome;

/// When a failed publish is tried again, and when it is given up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts before an event is dead.
    pub max_attempts: i32,
    /// First retry delay cap.
    pub backoff_base: Duration,
    /// Largest retry delay.
    pub backoff_cap: Duration,
}

/// What is recorded for one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The bus took it.
    Published,
    /// Try again after `delay`; `error` is kept as its last error.
    Retry {
        /// Pause before the next attempt.
        delay: Duration,
        /// What went wrong this time.
        error: String,
    },
    /// Never published: the bus refused it for good, or it ran out of attempts.
    Dead(String),
}

/// The decision for `event` (whose `attempts` count the one that just ended) given the bus's
/// answer.
pub fn decide(event: &ClaimedEvent, outcome: PublishOutcome, policy: &RetryPolicy) -> Decision {
    match outcome {
        PublishOutcome::Published => Decision::Published,
        PublishOutcome::Reject(reason) => Decision::Dead(reason),
        PublishOutcome::Retry(reason) if event.attempts >= policy.max_attempts => Decision::Dead(
            format!("gave up after {} attempts: {reason}", event.attempts),
        ),
        PublishOutcome::Retry(error) => Decision::Retry {
            delay: backoff_delay(event.attempts, policy.backoff_base, policy.backoff_cap),
            error,
        },
    }
}

/// Adds the decision for `event` to the outcomes to record, logging each dead letter.
pub fn note(outcomes: &mut Outcomes, event: &ClaimedEvent, decision: Decision) {
    match decision {
        Decision::Published => outcomes.published.push(event.id),
        Decision::Retry { delay, error } => outcomes.retries.push((event.id, delay, error)),
        Decision::Dead(reason) => {
            tracing::warn!(event_id = %event.event_id, tenant_id = %event.tenant_id, %reason, "event dead-lettered");
            outcomes.dead.push((event.id, reason));
        }
    }
}

/// Delay before attempt `attempts + 1`: exponential backoff with full jitter, a uniformly random
/// delay between zero and `min(cap, base · 2^(attempts−1))`, so rows that failed together do not
/// retry together.
pub fn backoff_delay(attempts: i32, base: Duration, cap: Duration) -> Duration {
    let exponent = attempts.saturating_sub(1).clamp(0, 30) as u32;
    let ceiling = base.saturating_mul(1u32 << exponent).min(cap);
    ceiling.mul_f64(fastrand::f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(attempts: i32) -> ClaimedEvent {
        ClaimedEvent {
            id: 7,
            event_id: uuid::Uuid::nil(),
            tenant_id: "acme".into(),
            aggregate_type: "order".into(),
            aggregate_id: "o-1".into(),
            aggregate_version: 1,
            event_type: "order.placed".into(),
            schema_version: 1,
            payload: serde_json::json!({}),
            metadata: serde_json::json!({}),
            attempts,
            created_at: chrono::Utc::now(),
            xray_trace_header: None,
            replay: false,
            deliver_at: None,
        }
    }

    const POLICY: RetryPolicy = RetryPolicy {
        max_attempts: 3,
        backoff_base: Duration::from_millis(100),
        backoff_cap: Duration::from_secs(1),
    };

    #[test]
    fn published_is_published_and_a_refusal_is_dead_at_once() {
        assert_eq!(
            decide(&event(1), PublishOutcome::Published, &POLICY),
            Decision::Published
        );
        assert_eq!(
            decide(
                &event(1),
                PublishOutcome::Reject("too large".into()),
                &POLICY
            ),
            Decision::Dead("too large".into())
        );
    }

    #[test]
    fn a_failure_is_retried_under_the_backoff_until_the_last_attempt() {
        for attempts in 1..POLICY.max_attempts {
            match decide(
                &event(attempts),
                PublishOutcome::Retry("503".into()),
                &POLICY,
            ) {
                Decision::Retry { delay, error } => {
                    assert_eq!(error, "503");
                    assert!(delay <= POLICY.backoff_base * 2u32.pow(attempts as u32 - 1));
                }
                other => panic!("attempt {attempts}: {other:?}"),
            }
        }
        assert_eq!(
            decide(&event(3), PublishOutcome::Retry("503".into()), &POLICY),
            Decision::Dead("gave up after 3 attempts: 503".into())
        );
    }

    #[test]
    fn backoff_is_full_jitter_under_an_exponential_ceiling() {
        let base = Duration::from_millis(100);
        let cap = Duration::from_secs(10);
        for attempts in 1..=12 {
            let ceiling = (base * 2u32.pow(attempts as u32 - 1)).min(cap);
            let delays: Vec<Duration> = (0..200)
                .map(|_| backoff_delay(attempts, base, cap))
                .collect();
            assert!(delays.iter().all(|d| *d <= ceiling), "attempt {attempts}");
            // Full jitter spreads over the whole range, not a band near the ceiling.
            assert!(
                delays.iter().any(|d| *d < ceiling / 4),
                "attempt {attempts}"
            );
            assert!(
                delays.iter().any(|d| *d > ceiling / 2),
                "attempt {attempts}"
            );
        }
        assert!(backoff_delay(1_000, base, cap) <= cap);
        assert!(backoff_delay(0, base, cap) <= base);
    }
}
