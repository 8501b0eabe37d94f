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
    /// Event type, e.g. `order.placed`.
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
    /// Aggregate type, e.g. `order`.
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

    /// The JSON a bus carries for a claimed row: the same bytes as serializing
    /// [`EventEnvelope::from_row`]'s envelope, without copying the row's payload and metadata
    /// first (the dispatcher does this for every row it publishes).
    pub fn body_of(row: &crate::outbox::ClaimedEvent) -> Result<String, serde_json::Error> {
        // The metadata's strings are borrowed from the row, the subject is written straight into
        // the body, and the body's buffer is sized once: no copy of anything but the body.
        let metadata = MetadataOfRow::deserialize(&row.metadata)?;
        let strings = row.tenant_id.len()
            + 2 * (row.aggregate_type.len() + row.aggregate_id.len())
            + row.event_type.len();
        let mut body = Vec::with_capacity(BODY_OVERHEAD + strings + PAYLOAD_GUESS);
        serde_json::to_writer(
            &mut body,
            &EnvelopeOfRow {
                specversion: SPEC_VERSION,
                id: row.event_id,
                source: metadata.source,
                event_type: &row.event_type,
                schemaversion: row.schema_version,
                subject: Subject(&row.aggregate_type, &row.aggregate_id),
                time: row.created_at,
                datacontenttype: "application/json",
                tenantid: &row.tenant_id,
                aggregatetype: &row.aggregate_type,
                aggregateid: &row.aggregate_id,
                aggregateversion: row.aggregate_version,
                correlationid: metadata.correlation_id,
                causationid: metadata.causation_id,
                traceparent: metadata.traceparent,
                tracestate: metadata.tracestate,
                data: &row.payload,
            },
        )?;
        // serde_json writes valid UTF-8 only.
        Ok(String::from_utf8(body).expect("JSON is UTF-8"))
    }
}

/// The envelope's attribute names, fixed values and punctuation: about 330 bytes.
const BODY_OVERHEAD: usize = 384;
/// Room for the payload and the metadata's strings before the buffer has to grow (it doubles).
const PAYLOAD_GUESS: usize = 512;

/// The metadata fields an envelope carries, borrowed from the row's metadata (its other fields,
/// such as the X-Ray header, are ignored as in [`crate::outbox::EventMetadata`]).
#[derive(Deserialize)]
struct MetadataOfRow<'a> {
    correlation_id: &'a str,
    #[serde(default)]
    causation_id: Option<&'a str>,
    #[serde(default)]
    traceparent: Option<&'a str>,
    #[serde(default)]
    tracestate: Option<&'a str>,
    /// Not in the envelope, but read as `EventMetadata` reads it: a metadata `from_row` refuses
    /// is refused here too.
    #[serde(default, rename = "xray_trace_header")]
    _xray_trace_header: Option<&'a str>,
    source: &'a str,
}

/// `aggregate_type/aggregate_id`, serialized without building the string first.
struct Subject<'a>(&'a str, &'a str);

impl Serialize for Subject<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&format_args!("{}/{}", self.0, self.1))
    }
}

#[derive(Serialize)]
struct EnvelopeOfRow<'a> {
    specversion: &'a str,
    id: Uuid,
    source: &'a str,
    #[serde(rename = "type")]
    event_type: &'a str,
    schemaversion: i32,
    subject: Subject<'a>,
    time: DateTime<Utc>,
    datacontenttype: &'a str,
    tenantid: &'a str,
    aggregatetype: &'a str,
    aggregateid: &'a str,
    aggregateversion: i64,
    correlationid: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    causationid: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    traceparent: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tracestate: Option<&'a str>,
    data: &'a serde_json::Value,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::ClaimedEvent;

    fn row(metadata: serde_json::Value) -> ClaimedEvent {
        ClaimedEvent {
            id: 7,
            event_id: Uuid::new_v4(),
            tenant_id: "tenant-a".into(),
            aggregate_type: "order".into(),
            aggregate_id: "pay-\"1\"/é".into(),
            aggregate_version: 3,
            event_type: "order.placed".into(),
            schema_version: 2,
            payload: serde_json::json!({"amount": {"minor": 1250, "currency": "EUR"}, "note": "a\nb"}),
            metadata,
            attempts: 1,
            created_at: Utc::now(),
            xray_trace_header: None,
            replay: false,
            deliver_at: None,
        }
    }

    #[test]
    fn the_body_is_the_serialized_envelope_byte_for_byte() {
        let full = serde_json::json!({
            "correlation_id": "corr", "causation_id": "cause", "traceparent": "00-abc-def-01",
            "tracestate": "k=v", "xray_trace_header": "Root=1", "source": "orders",
            "extra": "kept out"
        });
        let minimal = serde_json::json!({"correlation_id": "corr", "source": "orders"});
        for metadata in [full, minimal] {
            let row = row(metadata);
            let owned = serde_json::to_string(&EventEnvelope::from_row(&row).unwrap()).unwrap();
            assert_eq!(EventEnvelope::body_of(&row).unwrap(), owned);
        }
    }

    #[test]
    fn metadata_that_is_not_the_command_sides_shape_is_an_error_both_ways() {
        // Tried: no source, a number as correlation id, a number as X-Ray header, not an
        // object at all.
        for metadata in [
            serde_json::json!({"correlation_id": "corr"}),
            serde_json::json!({"correlation_id": "corr", "source": "orders", "xray_trace_header": 5}),
            serde_json::json!({"correlation_id": 5, "source": "orders"}),
            serde_json::json!(["orders"]),
        ] {
            let row = row(metadata);
            assert!(EventEnvelope::from_row(&row).is_err());
            assert!(EventEnvelope::body_of(&row).is_err());
        }
    }
}
