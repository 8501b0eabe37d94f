//! The outbox dispatcher function: fired by a schedule rule (or a direct invoke), it drains the
//! outbox to SNS or EventBridge until nothing is due or its deadline is near, and returns a summary.

use std::time::{Instant, SystemTime};

use aws_lambda_events::eventbridge::EventBridgeEvent;
use lambda_runtime::{Context, LambdaEvent};
use outbox_shared::dispatcher::{DispatchSummary, OutboxDispatcher};
use outbox_shared::ports::{OutboxStore, Publisher};

/// The schedule rule's event. Its content does not matter: every invocation drains.
pub type ScheduledEvent = EventBridgeEvent<serde_json::Value>;

/// When the invocation must have returned, as an `Instant`.
pub fn deadline_of(context: &Context) -> Instant {
    let remaining = context
        .deadline()
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    Instant::now() + remaining
}

/// Handles one invocation: drains until empty or the deadline minus the safety margin.
pub async fn handle<S: OutboxStore, P: Publisher>(
    dispatcher: &OutboxDispatcher<S, P>,
    event: LambdaEvent<ScheduledEvent>,
) -> Result<DispatchSummary, lambda_runtime::Error> {
    let deadline = deadline_of(&event.context);
    tracing::info!(trigger = %event.payload.detail_type, "dispatch started");
    Ok(dispatcher.drain(deadline).await?)
}
