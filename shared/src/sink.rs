//! The sink side: what a queue message may hold (the envelope from SNS raw delivery, an SNS
//! notification wrapping it, or an EventBridge event carrying it as `detail`), read back into the
//! envelope; and what applying an event did. Pure functions, so hostile input can be thrown at
//! them (a service's property tests do, through its own reading of the payloads).

use serde::de::DeserializeOwned;

use crate::envelope::{EventEnvelope, SPEC_VERSION};
use crate::producer::OutboxEvent;

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

impl EventEnvelope {
    /// The payload as `E`, the event type a producer appended: refused when the envelope is of
    /// another type, or of another schema version than `E`'s (a projection that reads version 1
    /// must not misread version 2), or when the payload does not fit `E`.
    pub fn decode<E: OutboxEvent + DeserializeOwned>(&self) -> Result<E, DeliveryError> {
        if self.event_type != E::EVENT_TYPE {
            return Err(DeliveryError::InvalidEnvelope(format!(
                "{} is not {}",
                self.event_type,
                E::EVENT_TYPE
            )));
        }
        if self.schemaversion != E::SCHEMA_VERSION {
            return Err(DeliveryError::UnsupportedSchema {
                event_type: self.event_type.clone(),
                version: self.schemaversion,
            });
        }
        serde_json::from_value(self.data.clone()).map_err(|e| DeliveryError::InvalidPayload {
            event_type: self.event_type.clone(),
            reason: e.to_string(),
        })
    }
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
    /// Its name in logs and spans.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Applied => "applied",
            Self::Duplicate => "duplicate",
            Self::Stale => "stale",
            Self::Gap => "gap",
            Self::Failed(_) => "failed",
        }
    }

    /// Whether the message may be deleted from the queue.
    pub fn is_done(&self) -> bool {
        matches!(self, Self::Applied | Self::Duplicate | Self::Stale)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct OrderPlaced {
        order_id: String,
        total_minor: i64,
    }

    impl OutboxEvent for OrderPlaced {
        const EVENT_TYPE: &'static str = "order.placed";
        const SCHEMA_VERSION: i32 = 2;
        const AGGREGATE_TYPE: &'static str = "order";
        fn tenant_id(&self) -> &str {
            "acme"
        }
        fn aggregate_id(&self) -> &str {
            &self.order_id
        }
    }

    fn envelope(event_type: &str, version: i32, data: serde_json::Value) -> EventEnvelope {
        let body = serde_json::json!({
            "specversion": "1.0", "id": "0190c9a8-7e7a-7cc0-8000-000000000001",
            "source": "orders", "type": event_type, "schemaversion": version,
            "subject": "order/o-1", "time": "2026-12-01T10:00:00Z",
            "datacontenttype": "application/json", "tenantid": "acme",
            "aggregatetype": "order", "aggregateid": "o-1", "aggregateversion": 1,
            "correlationid": "c-1", "data": data,
        });
        parse_delivery(&body.to_string()).expect("a valid envelope")
    }

    #[test]
    fn decode_reads_its_own_type_and_schema_version_only() {
        let good = serde_json::json!({"orderId": "o-1", "totalMinor": 990});
        assert_eq!(
            envelope("order.placed", 2, good.clone()).decode::<OrderPlaced>(),
            Ok(OrderPlaced {
                order_id: "o-1".into(),
                total_minor: 990
            })
        );
        // Inputs refused: another type, another schema version, a payload of another shape.
        assert!(matches!(
            envelope("order.shipped", 2, good.clone()).decode::<OrderPlaced>(),
            Err(DeliveryError::InvalidEnvelope(_))
        ));
        assert!(matches!(
            envelope("order.placed", 1, good).decode::<OrderPlaced>(),
            Err(DeliveryError::UnsupportedSchema { version: 1, .. })
        ));
        assert!(matches!(
            envelope("order.placed", 2, serde_json::json!({"orderId": 5})).decode::<OrderPlaced>(),
            Err(DeliveryError::InvalidPayload { .. })
        ));
    }

    #[test]
    fn garbage_is_refused_with_a_reason() {
        for body in ["", "not json", "[]", "{}", r#"{"specversion":"0.3"}"#] {
            assert!(parse_delivery(body).is_err(), "{body:?} accepted");
        }
    }
}
