//! The SNS publisher: `PublishBatch`, entry by entry.

use aws_sdk_sns::types::{MessageAttributeValue, PublishBatchRequestEntry};
use aws_sdk_sns::Client;

use super::describe;
use crate::ports::{OutgoingMessage, PublishLimits, PublishOutcome, Publisher};

/// SNS message attributes set on every message, so subscribers can filter on them. Three of the
/// ten attributes raw delivery to SQS passes through.
pub const ATTRIBUTE_EVENT_TYPE: &str = "event_type";
/// Attribute with the tenant id.
pub const ATTRIBUTE_TENANT: &str = "tenant_id";
/// Attribute with the event id.
pub const ATTRIBUTE_EVENT_ID: &str = "event_id";

/// `PublishBatch` takes at most 10 entries, and at most 256 KiB (262,144 bytes) for one message
/// and for the whole request, message attributes included.
pub const LIMITS: PublishLimits = PublishLimits {
    max_entries: 10,
    max_entry_bytes: 262_144,
    max_batch_bytes: 262_144,
};

/// Entry error codes that are about the topic's set-up or load, not the message: retried.
const RETRYABLE_ENTRY_CODES: &[&str] = &[
    "Throttled",
    "Throttling",
    "ThrottlingException",
    "InternalError",
    "InternalFailure",
    "ServiceUnavailable",
    "KMSThrottling",
    "KMSDisabled",
    "KMSAccessDenied",
    "KMSNotFound",
    "KMSOptInRequired",
    "KMSInvalidState",
    "AuthorizationError",
    "NotFound",
    "EndpointDisabled",
];

/// Publishes to one SNS topic. On a FIFO topic (name ending in `.fifo`) every message gets
/// `MessageGroupId` = its aggregate and `MessageDeduplicationId` = its event id, so SNS keeps each
/// aggregate's order and drops a re-publish within its five-minute deduplication window.
pub struct SnsPublisher {
    client: Client,
    topic_arn: String,
    fifo: bool,
}

impl SnsPublisher {
    /// A publisher for `topic_arn`.
    pub fn new(client: Client, topic_arn: String) -> Self {
        let fifo = topic_arn.ends_with(".fifo");
        Self {
            client,
            topic_arn,
            fifo,
        }
    }

    /// Whether the topic is FIFO.
    pub fn is_fifo(&self) -> bool {
        self.fifo
    }

    fn entry(
        &self,
        index: usize,
        message: &OutgoingMessage,
    ) -> Result<PublishBatchRequestEntry, String> {
        let event = &message.event;
        let attribute = |value: &str| {
            MessageAttributeValue::builder()
                .data_type("String")
                .string_value(value)
                .build()
                .map_err(|e| e.to_string())
        };
        let mut entry = PublishBatchRequestEntry::builder()
            .id(index.to_string())
            .message(&message.body)
            .message_attributes(ATTRIBUTE_EVENT_TYPE, attribute(&event.event_type)?)
            .message_attributes(ATTRIBUTE_TENANT, attribute(&event.tenant_id)?)
            .message_attributes(ATTRIBUTE_EVENT_ID, attribute(&event.event_id.to_string())?);
        if let Some(size) = message.extended_size {
            entry = entry.message_attributes(
                crate::claim_check::SIZE_ATTRIBUTE,
                MessageAttributeValue::builder()
                    .data_type("Number")
                    .string_value(size.to_string())
                    .build()
                    .map_err(|e| e.to_string())?,
            );
        }
        if self.fifo {
            entry = entry
                .message_group_id(message_group_id(&event.tenant_id, &event.aggregate_id))
                .message_deduplication_id(event.event_id.to_string());
        }
        entry.build().map_err(|e| e.to_string())
    }
}

/// The FIFO message group of an aggregate: `tenant:aggregate` when it fits the 128-character
/// limit, the aggregate id alone otherwise (a coarser group keeps order all the same).
pub fn message_group_id(tenant_id: &str, aggregate_id: &str) -> String {
    let scoped = format!("{tenant_id}:{aggregate_id}");
    if scoped.len() <= 128 {
        scoped
    } else {
        aggregate_id.chars().take(128).collect()
    }
}

impl Publisher for SnsPublisher {
    fn limits(&self) -> PublishLimits {
        LIMITS
    }

    fn entry_size(&self, message: &OutgoingMessage) -> usize {
        let event = &message.event;
        // Attribute name + type + value bytes count towards the message size.
        let attributes = [
            (ATTRIBUTE_EVENT_TYPE, event.event_type.len()),
            (ATTRIBUTE_TENANT, event.tenant_id.len()),
            (ATTRIBUTE_EVENT_ID, 36),
        ]
        .iter()
        .map(|(name, value)| name.len() + "String".len() + value)
        .sum::<usize>();
        let extended = message.extended_size.map_or(0, |size| {
            crate::claim_check::SIZE_ATTRIBUTE.len() + "Number".len() + size.to_string().len()
        });
        message.body.len() + attributes + extended
    }

    #[tracing::instrument(skip_all, fields(entries = batch.len()))]
    async fn publish(&self, batch: &[OutgoingMessage]) -> Vec<PublishOutcome> {
        let mut outcomes =
            vec![PublishOutcome::Retry("no result for this entry".into()); batch.len()];
        let mut entries = Vec::with_capacity(batch.len());
        for (i, message) in batch.iter().enumerate() {
            match self.entry(i, message) {
                Ok(entry) => entries.push(entry),
                Err(e) => outcomes[i] = PublishOutcome::Reject(format!("invalid entry: {e}")),
            }
        }
        if entries.is_empty() {
            return outcomes;
        }
        let result = self
            .client
            .publish_batch()
            .topic_arn(&self.topic_arn)
            .set_publish_batch_request_entries(Some(entries))
            .send()
            .await;
        match result {
            Ok(output) => {
                // A 200 is not all-success: every entry is in `Successful` or in `Failed`.
                for ok in output.successful() {
                    if let Some(i) = ok.id().and_then(|id| id.parse::<usize>().ok()) {
                        if i < outcomes.len() {
                            outcomes[i] = PublishOutcome::Published;
                        }
                    }
                }
                for failed in output.failed() {
                    let Some(i) = failed
                        .id()
                        .parse::<usize>()
                        .ok()
                        .filter(|i| *i < outcomes.len())
                    else {
                        continue;
                    };
                    let reason = format!(
                        "SNS refused the entry: {} ({})",
                        failed.code(),
                        failed.message().unwrap_or("no message")
                    );
                    outcomes[i] = if failed.sender_fault()
                        && !RETRYABLE_ENTRY_CODES.contains(&failed.code())
                    {
                        PublishOutcome::Reject(reason)
                    } else {
                        PublishOutcome::Retry(reason)
                    };
                }
            }
            Err(error) => {
                let reason = format!("PublishBatch failed: {}", describe(&error));
                tracing::warn!(error = %reason, "publish call failed");
                for outcome in &mut outcomes {
                    if !matches!(outcome, PublishOutcome::Reject(_)) {
                        *outcome = PublishOutcome::Retry(reason.clone());
                    }
                }
            }
        }
        outcomes
    }
}
