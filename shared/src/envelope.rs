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
