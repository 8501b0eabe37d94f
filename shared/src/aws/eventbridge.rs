//! The EventBridge publisher: `PutEvents`, entry by entry.

use aws_sdk_eventbridge::types::PutEventsRequestEntry;
use aws_sdk_eventbridge::Client;

use super::describe;
use crate::ports::{OutgoingMessage, PublishLimits, PublishOutcome, Publisher};

/// `PutEvents` takes at most 10 entries and 256 KiB (262,144 bytes) per request, entries counted
/// as EventBridge sizes them (source, detail type, detail, trace header, 14 bytes of time).
pub const LIMITS: PublishLimits = PublishLimits {
    max_entries: 10,
    max_entry_bytes: 262_144,
    max_batch_bytes: 262_144,
};

/// Entry error codes that say the event itself is unacceptable: dead-lettered at once.
const PERMANENT_ENTRY_CODES: &[&str] =
    &["MalformedDetail", "InvalidArgument", "ValidationException"];

/// Publishes to one event bus: `Source` = the emitting service, `DetailType` = the event type,
/// `Detail` = the envelope, `TraceHeader` = the X-Ray header when the command had one.
pub struct EventBridgePublisher {
    client: Client,
    bus_name: String,
}

impl EventBridgePublisher {
    /// A publisher for the bus `bus_name` (a name or an ARN).
    pub fn new(client: Client, bus_name: String) -> Self {
        Self { client, bus_name }
    }
}

/// The entry's `Source`: the envelope's `source` as it sends it (a URI-reference), so a rule on
/// `Source` and one on `detail.source` see the same text. Only a row with a source is ever sent
/// (the envelope refuses the others).
fn source(message: &OutgoingMessage) -> std::borrow::Cow<'_, str> {
    crate::envelope::source_as_uri_reference(
        message
            .event
            .metadata
            .get("source")
            .and_then(|s| s.as_str())
            .unwrap_or_default(),
    )
}

impl Publisher for EventBridgePublisher {
    fn limits(&self) -> PublishLimits {
        LIMITS
    }

    fn entry_size(&self, message: &OutgoingMessage) -> usize {
        14 + source(message).len()
            + message.event.event_type.len()
            + message.body.len()
            + message
                .event
                .xray_trace_header
                .as_ref()
                .map_or(0, String::len)
    }

    /// `Detail` must be a JSON object: the envelope without `data`, with the CloudEvents
    /// `dataref` extension.
    fn pointer_body(
        &self,
        envelope: &str,
        pointer: &crate::claim_check::S3Pointer,
    ) -> Result<(String, Option<usize>), String> {
        Ok((crate::claim_check::dataref_body(envelope, pointer)?, None))
    }

    #[tracing::instrument(skip_all, fields(entries = batch.len()))]
    async fn publish(&self, batch: &[OutgoingMessage]) -> Vec<PublishOutcome> {
        let entries: Vec<PutEventsRequestEntry> = batch
            .iter()
            .map(|message| {
                PutEventsRequestEntry::builder()
                    .event_bus_name(&self.bus_name)
                    .source(source(message))
                    .detail_type(&message.event.event_type)
                    .detail(&message.body)
                    .set_trace_header(message.event.xray_trace_header.clone())
                    .build()
            })
            .collect();
        match self
            .client
            .put_events()
            .set_entries(Some(entries))
            .send()
            .await
        {
            // Result entries come back in request order; `FailedEntryCount` > 0 means some of a
            // 200 failed, and each failed one carries its own error code.
            Ok(output) => (0..batch.len())
                .map(|i| match output.entries().get(i) {
                    None => {
                        PublishOutcome::Retry("PutEvents returned no result for this entry".into())
                    }
                    Some(entry) => match entry.error_code() {
                        None if entry.event_id().is_some() => PublishOutcome::Published,
                        None => PublishOutcome::Retry(
                            "PutEvents returned neither an id nor an error".into(),
                        ),
                        Some(code) => {
                            let reason = format!(
                                "EventBridge refused the entry: {code} ({})",
                                entry.error_message().unwrap_or("no message")
                            );
                            if PERMANENT_ENTRY_CODES.contains(&code) {
                                PublishOutcome::Reject(reason)
                            } else {
                                PublishOutcome::Retry(reason)
                            }
                        }
                    },
                })
                .collect(),
            Err(error) => {
                let reason = format!("PutEvents failed: {}", describe(&error));
                tracing::warn!(error = %reason, "publish call failed");
                vec![PublishOutcome::Retry(reason); batch.len()]
            }
        }
    }
}
