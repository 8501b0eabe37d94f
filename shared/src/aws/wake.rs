//! Waking the dispatcher right after a command commits: an asynchronous Lambda invoke of the
//! dispatcher function, so an event is published within a fraction of a second instead of at the
//! next tick of the one-minute schedule. Best effort: the schedule remains the safety net.

use aws_sdk_lambda::primitives::Blob;
use aws_sdk_lambda::types::InvocationType;

/// Invokes the dispatcher function with `InvocationType=Event` (Lambda queues the run and
/// answers 202 at once).
pub struct LambdaWake {
    client: aws_sdk_lambda::Client,
    function_name: String,
    source: String,
}

impl LambdaWake {
    /// A waker for `function_name` (name or ARN); `source` names the caller in the event.
    pub fn new(
        client: aws_sdk_lambda::Client,
        function_name: impl Into<String>,
        source: impl Into<String>,
    ) -> Self {
        Self {
            client,
            function_name: function_name.into(),
            source: source.into(),
        }
    }

    /// The invocation's payload: an EventBridge-shaped event, the dispatcher's input type, with
    /// `detail-type` telling it apart from the schedule in the dispatcher's logs.
    pub fn kick_event(source: &str) -> serde_json::Value {
        serde_json::json!({
            "version": "0",
            "id": uuid::Uuid::new_v4().to_string(),
            "detail-type": "Outbox Kick",
            "source": source,
            "time": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            "resources": [],
            "detail": {"reason": "an event was committed"},
        })
    }
}

impl crate::ports::WakeDispatcher for LambdaWake {
    async fn wake(&self) -> Result<(), String> {
        let payload = Self::kick_event(&self.source).to_string();
        let output = self
            .client
            .invoke()
            .function_name(&self.function_name)
            .invocation_type(InvocationType::Event)
            .payload(Blob::new(payload))
            .send()
            .await
            .map_err(|e| super::describe(&e))?;
        match output.status_code() {
            202 => Ok(()),
            status => Err(format!("invoke answered {status}, expected 202")),
        }
    }
}
