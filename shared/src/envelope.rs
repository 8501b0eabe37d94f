//! The message every bus carries: one versioned envelope for SNS and EventBridge, laid out as a
//! CloudEvents 1.0 JSON event (extension attribute names are lower-case alphanumerics, as the spec
//! requires).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// CloudEvents spec version the envelope follows.
pub const SPEC_VERSION: &str = "1.0";

/// A published event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventEnvelope {
    /// Always `1.0`.
    pub specversion: String,
    /// The event id: stable across re-publishes, the key consumers dedupe on.
    pub id: Uuid,
    /// The emitting service.
    pub source: String,
    /// Event type, e.g. `payment.paid`.
    #[serde(rename = "type")]
    pub event_type: String,
    /// Schema version of `data`.
    pub schemaversion: i32,
    /// `aggregate_type/aggregate_id`.
    pub subject: String,
    /// When the event was recorded (the outbox row's creation time).
    pub time: DateTime<Utc>,
    /// Always `application/json`.
    pub datacontenttype: String,
    /// Owning tenant.
    pub tenantid: String,
    /// Aggregate type, e.g. `payment`.
    pub aggregatetype: String,
    /// Aggregate id.
    pub aggregateid: String,
    /// Aggregate version after this event: orders one aggregate's events.
    pub aggregateversion: i64,
    /// Correlation id of the business flow.
    pub correlationid: String,
    /// What caused this event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causationid: Option<String>,
    /// W3C trace context (CloudEvents distributed tracing extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// W3C trace state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracestate: Option<String>,
    /// The payload.
    pub data: serde_json::Value,
}

impl EventEnvelope {
    /// The envelope of a claimed outbox row. Fails only when the row's metadata is not the shape
    /// the command side writes (then the row can never be published and goes dead).
    pub fn from_row(row: &crate::outbox::ClaimedEvent) -> Result<Self, serde_json::Error> {
        let metadata: crate::outbox::EventMetadata = serde_json::from_value(row.metadata.clone())?;
        Ok(Self {
            specversion: SPEC_VERSION.to_owned(),
            id: row.event_id,
            source: metadata.source,
            event_type: row.event_type.clone(),
            schemaversion: row.schema_version,
            subject: format!("{}/{}", row.aggregate_type, row.aggregate_id),
            time: row.created_at,
            datacontenttype: "application/json".to_owned(),
            tenantid: row.tenant_id.clone(),
            aggregatetype: row.aggregate_type.clone(),
            aggregateid: row.aggregate_id.clone(),
            aggregateversion: row.aggregate_version,
            correlationid: metadata.correlation_id,
            causationid: metadata.causation_id,
            traceparent: metadata.traceparent,
            tracestate: metadata.tracestate,
            data: row.payload.clone(),
        })
    }
}
