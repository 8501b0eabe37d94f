//! The outbox dispatcher function: fired by a schedule rule (or a direct invoke), it drains the
//! outbox to SNS or EventBridge until nothing is due or its deadline is near, and returns a summary.

use std::time::{Duration, Instant, SystemTime};

use aws_lambda_events::eventbridge::EventBridgeEvent;
use lambda_runtime::{Context, LambdaEvent};
use pg_outbox::dispatcher::{DispatchSummary, OutboxDispatcher};
use pg_outbox::failure::{FailureClass, FunctionError};
use pg_outbox::ports::{OutboxStore, Publisher};

/// The schedule rule's event. Its content does not matter: every invocation drains.
pub type ScheduledEvent = EventBridgeEvent<serde_json::Value>;

/// Deadlines below this (1 January 2001, in epoch milliseconds) are not epoch times.
const EPOCH_2001_MS: u64 = 978_307_200_000;

/// When the invocation must have returned, as an `Instant`. Lambda sends an absolute deadline in
/// epoch milliseconds; the `cargo lambda watch` emulator sends its timeout as a duration instead
/// (e.g. `600000`), which is read as time from now.
pub fn deadline_of(context: &Context) -> Instant {
    if context.deadline < EPOCH_2001_MS {
        return Instant::now() + Duration::from_millis(context.deadline);
    }
    let remaining = context
        .deadline()
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    Instant::now() + remaining
}

/// Service name in the metrics' `Service` dimension.
pub const SERVICE: &str = "outbox-dispatcher";

/// Handles one invocation: drains until empty or the deadline minus the safety margin, then
/// measures the backlog and writes the invocation's metrics (EMF) to stdout.
///
/// Fails the invocation, with the class as `errorType`, when the database failed for the whole
/// drain (or for good), and when every publish call failed (`BusUnavailable`: the rows back off
/// and are retried, but the bus being down is worth an alarm).
pub async fn handle<S: OutboxStore, P: Publisher + 'static>(
    dispatcher: &OutboxDispatcher<S, P>,
    event: LambdaEvent<ScheduledEvent>,
) -> Result<DispatchSummary, FunctionError> {
    let deadline = deadline_of(&event.context);
    let remaining_ms = deadline
        .saturating_duration_since(Instant::now())
        .as_millis() as u64;
    tracing::info!(trigger = %event.payload.detail_type, remaining_ms, "dispatch started");
    let mut summary = match dispatcher.drain(deadline).await {
        Ok(summary) => summary,
        Err(e) => {
            let error = FunctionError::from_store(&e);
            error.record(SERVICE);
            return Err(error);
        }
    };
    // Measured after the drain: what is left is what the alarms are about. Never past the
    // deadline (less a second for the runtime to send the answer): a silent database costs the
    // measurement, not the invocation.
    let left = deadline
        .saturating_duration_since(Instant::now())
        .saturating_sub(Duration::from_secs(1));
    match tokio::time::timeout(left, dispatcher.store().backlog()).await {
        Ok(Ok(backlog)) => summary.backlog = Some(backlog),
        Ok(Err(e)) => {
            tracing::warn!(error = %pg_outbox::telemetry::error_chain(&e), "backlog not measured")
        }
        Err(_) => tracing::warn!("backlog not measured: no time left before the deadline"),
    }
    summary.metrics(SERVICE).emit();
    pg_outbox::telemetry::flush_traces().await;
    if summary.publish_calls > 0
        && summary.failed_publish_calls == summary.publish_calls
        && summary.published == 0
    {
        let error = FunctionError::with_detail(
            FailureClass::BusUnavailable,
            format_args!(
                "{} of {} publish calls failed, {} rows will be retried",
                summary.failed_publish_calls, summary.publish_calls, summary.retried
            ),
        );
        error.record(SERVICE);
        return Err(error);
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context(deadline: u64) -> Context {
        let mut context = Context::default();
        context.deadline = deadline;
        context
    }

    #[test]
    fn an_epoch_deadline_is_the_time_left_until_it() {
        let in_30s = SystemTime::now() + Duration::from_secs(30);
        let ms = in_30s
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let left = deadline_of(&context(ms)).saturating_duration_since(Instant::now());
        assert!(
            left > Duration::from_secs(28) && left <= Duration::from_secs(30),
            "{left:?}"
        );
        // A deadline already passed leaves no time.
        let past = deadline_of(&context(ms - 60_000)).saturating_duration_since(Instant::now());
        assert_eq!(past, Duration::ZERO);
    }

    #[test]
    fn an_emulators_duration_is_time_from_now() {
        let left = deadline_of(&context(600_000)).saturating_duration_since(Instant::now());
        assert!(
            left > Duration::from_secs(599) && left <= Duration::from_secs(600),
            "{left:?}"
        );
    }
}
