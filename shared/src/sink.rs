//! The sink side: what a queue message may hold (the envelope from SNS raw delivery, an SNS
//! notification wrapping it, or an EventBridge event carrying it as `detail`), read back into the
//! envelope; and what applying an event did. Pure functions, so hostile input can be thrown at
//! them (a service's property tests do, through its own reading of the payloads).

use crate::envelope::{EventEnvelope, SPEC_VERSION};

/// Why a message cannot be applied. Reported as that message's batch item failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeliveryError {
    /// The body is not JSON.
    #[error("body is not JSON: {0}")]
    NotJson(String),
    /// JSON, but none of the shapes the sink reads.
    #[error("not an event envelope, an SNS notification or an EventBridge event")]
    UnknownShape,
    /// An SNS notification whose `Message` is not an envelope.
    #[error("SNS notification does not carry an envelope: {0}")]
    BadNotification(String),
    /// The envelope does not have the fields the sink uses, with the types it expects.
    #[error("invalid envelope: {0}")]
    InvalidEnvelope(String),
    /// A CloudEvents spec version other than 1.0.
    #[error("unsupported specversion {0:?}")]
    UnsupportedSpec(String),
    /// A known event type in a schema version this sink does not read.
    #[error("unsupported schema version {version} of {event_type}")]
    UnsupportedSchema {
        /// The event type.
        event_type: String,
        /// Its schema version.
        version: i32,
    },
    /// A known event type whose payload does not match its schema.
    #[error("invalid {event_type} payload: {reason}")]
    InvalidPayload {
        /// The event type.
        event_type: String,
        /// What is wrong.
        reason: String,
    },
}

/// Finds the envelope in a queue message body, whichever way it was delivered.
pub fn parse_delivery(body: &str) -> Result<EventEnvelope, DeliveryError> {
    let value: serde_json::Value =
        serde_json::from_str(body).map_err(|e| DeliveryError::NotJson(e.to_string()))?;
    let envelope = if value.get("specversion").is_some() {
        value
    } else if value.get("Type").and_then(|t| t.as_str()) == Some("Notification") {
        let message = value
            .get("Message")
            .and_then(|m| m.as_str())
            .ok_or_else(|| DeliveryError::BadNotification("no Message string".into()))?;
        serde_json::from_str(message).map_err(|e| DeliveryError::BadNotification(e.to_string()))?
    } else if let (Some(_), Some(detail)) = (value.get("detail-type"), value.get("detail")) {
        // Emulators may leave out fields such as `account`: only `detail` is read.
        detail.clone()
    } else {
        return Err(DeliveryError::UnknownShape);
    };
    let envelope: EventEnvelope = serde_json::from_value(envelope)
        .map_err(|e| DeliveryError::InvalidEnvelope(e.to_string()))?;
    if envelope.specversion != SPEC_VERSION {
        return Err(DeliveryError::UnsupportedSpec(envelope.specversion));
    }
    Ok(envelope)
}

/// What applying one change did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApplyOutcome {
    /// Applied now.
    Applied,
    /// Already applied by this consumer: acknowledged, nothing changed.
    Duplicate,
    /// Older than what the projection holds: acknowledged, nothing changed.
    Stale,
    /// An earlier event of the same aggregate is missing: not applied, to be redelivered.
    Gap,
    /// Applying failed: not applied, to be redelivered.
    Failed(String),
}

impl ApplyOutcome {
    /// Whether the message may be deleted from the queue.
    pub fn is_done(&self) -> bool {
        matches!(self, Self::Applied | Self::Duplicate | Self::Stale)
    }
}
