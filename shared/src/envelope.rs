//! (Past 400 lines: the envelope, its two builders, the CloudEvents rules they share and their tests read best together.)
//!
//! The message every bus carries: one versioned envelope for SNS and EventBridge, laid out as a
//! CloudEvents 1.0 JSON event (extension attribute names are lower-case alphanumerics, as the spec
//! requires).
//!
//! Conformance to the spec's rules is kept here, for every channel and the feed alike:
//! - `source` is a URI-reference: a source with characters a URI cannot hold (a captured table
//!   `capture:Sales.Order Lines`, any text a SQL producer wrote) is sent percent-encoded
//!   (`capture:Sales.Order%20Lines`); an empty one is refused (the event goes dead, clearly);
//! - `aggregateversion` and `schemaversion` are CloudEvents Integers (signed 32-bit): a version
//!   beyond that is refused (migration V12 refuses it at append);
//! - a `traceparent` the W3C Trace Context calls invalid (version `ff`, an all-zero trace or
//!   parent id, not lower-case hex, the wrong length) is dropped with its `tracestate`, never
//!   forwarded ([`is_valid_traceparent`]); the dispatcher counts them (`TraceContextsDropped`).
//!
//! The JSON Schema of the envelope ([`crate::contract`]) is generated from [`EventEnvelope`].

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// CloudEvents spec version the envelope follows.
pub const SPEC_VERSION: &str = "1.0";

/// The largest CloudEvents Integer: versions beyond it cannot be sent.
pub const MAX_INTEGER: i64 = i32::MAX as i64;

/// A W3C `traceparent` as the envelope schema states it, in a pattern any validator compiles
/// (no lookahead, for RE2-based ones): version `ff` and the all-zero ids are invalid too, which
/// [`is_valid_traceparent`] checks and the schema's description says.
pub const TRACEPARENT_PATTERN: &str = "^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}(-.*)?$";

/// A published event: a CloudEvents 1.0 event in the structured JSON format.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(
    title = "Outbox event envelope (CloudEvents 1.0, structured JSON)",
    extend("additionalProperties" = false)
)]
pub struct EventEnvelope {
    /// Always `1.0`.
    #[schemars(extend("const" = "1.0"))]
    pub specversion: String,
    /// The event id: stable across re-publishes, the key consumers dedupe on.
    pub id: Uuid,
    /// The emitting service, a URI-reference.
    #[schemars(length(min = 1), extend("format" = "uri-reference"))]
    pub source: String,
    /// Event type, e.g. `order.placed`.
    #[serde(rename = "type")]
    #[schemars(length(min = 1))]
    pub event_type: String,
    /// Schema version of `data`.
    #[schemars(range(min = 1))]
    pub schemaversion: i32,
    /// `aggregate_type/aggregate_id`.
    #[schemars(length(min = 1))]
    pub subject: String,
    /// When the event was recorded (the outbox row's creation time).
    pub time: DateTime<Utc>,
    /// Always `application/json`.
    #[schemars(extend("const" = "application/json"))]
    pub datacontenttype: String,
    /// Owning tenant.
    #[schemars(length(min = 1))]
    pub tenantid: String,
    /// Aggregate type, e.g. `order`.
    #[schemars(length(min = 1))]
    pub aggregatetype: String,
    /// Aggregate id.
    #[schemars(length(min = 1))]
    pub aggregateid: String,
    /// Aggregate version after this event: orders one aggregate's events (1, 2, 3, ...; a
    /// CloudEvents Integer).
    #[schemars(range(min = 1, max = 2147483647))]
    pub aggregateversion: i64,
    /// Correlation id of the business flow.
    pub correlationid: String,
    /// What caused this event (the HTTP API's request id for a command).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(transform = not_null)]
    pub causationid: Option<String>,
    /// W3C trace context (CloudEvents distributed tracing extension); only a valid one is sent
    /// (never version `ff`, never an all-zero trace or parent id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(transform = not_null, regex(pattern = TRACEPARENT_PATTERN))]
    pub traceparent: Option<String>,
    /// W3C trace state, only with a `traceparent`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(transform = not_null)]
    pub tracestate: Option<String>,
    /// The payload: its schema is the event type's, at `schemaversion`.
    pub data: serde_json::Value,
}

/// An optional attribute is left out when it has no value, never sent as `null`.
fn not_null(schema: &mut schemars::Schema) {
    if let Some(types) = schema.get_mut("type") {
        *types = serde_json::Value::from("string");
    }
}

/// Why a row cannot be sent as a CloudEvent.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    /// The metadata is not the shape the command side writes (or the JSON could not be written).
    #[error("{0}")]
    Json(#[from] serde_json::Error),
    /// The metadata's `source` is empty.
    #[error("its source is empty (CloudEvents requires a non-empty URI-reference)")]
    EmptySource,
    /// The aggregate version is beyond a CloudEvents Integer.
    #[error("aggregate version {0} is beyond CloudEvents' Integer range (at most {MAX_INTEGER})")]
    VersionOutOfRange(i64),
}

/// Whether `value` is a `traceparent` the W3C Trace Context accepts: `version-traceid-parentid-
/// flags` in lower-case hex, version not `ff` (version `00` exactly 55 characters; a later
/// version may carry more after a `-`), neither id all zeros.
pub fn is_valid_traceparent(value: &str) -> bool {
    let b = value.as_bytes();
    let hex =
        |r: std::ops::Range<usize>| b[r].iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
    let zero = |r: std::ops::Range<usize>| b[r].iter().all(|&c| c == b'0');
    if b.len() < 55 || b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
        return false;
    }
    if !hex(0..2) || !hex(3..35) || !hex(36..52) || !hex(53..55) || &b[0..2] == b"ff" {
        return false;
    }
    if zero(3..35) || zero(36..52) {
        return false;
    }
    if &b[0..2] == b"00" {
        b.len() == 55
    } else {
        b.len() == 55 || b[55] == b'-'
    }
}

/// `source` as a URI-reference: unchanged when it is one, else with every byte a URI-reference
/// cannot hold percent-encoded (`%` itself only when it does not start an escape).
pub fn source_as_uri_reference(source: &str) -> Cow<'_, str> {
    let b = source.as_bytes();
    let allowed = |i: usize| -> bool {
        let c = b[i];
        c.is_ascii_alphanumeric()
            || b"-._~!$&'()*+,;=:@/?#".contains(&c)
            || (c == b'%'
                && i + 2 < b.len()
                && b[i + 1].is_ascii_hexdigit()
                && b[i + 2].is_ascii_hexdigit())
    };
    // Only one '#': a second one cannot be part of a fragment.
    let first_hash = source.find('#');
    let ok_at = |i: usize| allowed(i) && !(b[i] == b'#' && Some(i) != first_hash);
    if (0..b.len()).all(ok_at) {
        return Cow::Borrowed(source);
    }
    let mut out = String::with_capacity(source.len() + 8);
    for (i, &c) in b.iter().enumerate() {
        if ok_at(i) {
            out.push(c as char);
        } else {
            out.push_str(&format!("%{c:02X}"));
        }
    }
    Cow::Owned(out)
}

/// The attributes the spec constrains, as sent.
struct Conformant<'a> {
    source: Cow<'a, str>,
    traceparent: Option<&'a str>,
    tracestate: Option<&'a str>,
}

/// The attributes the spec constrains, checked and made conformant once for both builders.
fn conformant<'a>(
    row: &crate::outbox::ClaimedEvent,
    source: &'a str,
    traceparent: Option<&'a str>,
    tracestate: Option<&'a str>,
) -> Result<Conformant<'a>, EnvelopeError> {
    if source.is_empty() {
        return Err(EnvelopeError::EmptySource);
    }
    if row.aggregate_version > MAX_INTEGER {
        return Err(EnvelopeError::VersionOutOfRange(row.aggregate_version));
    }
    let traceparent = traceparent.filter(|t| is_valid_traceparent(t));
    let tracestate = tracestate.filter(|_| traceparent.is_some());
    Ok(Conformant {
        source: source_as_uri_reference(source),
        traceparent,
        tracestate,
    })
}

impl EventEnvelope {
    /// The envelope of a claimed outbox row. Fails only when the row's metadata is not the shape
    /// the command side writes (then the row can never be published and goes dead).
    pub fn from_row(row: &crate::outbox::ClaimedEvent) -> Result<Self, EnvelopeError> {
        let metadata: crate::outbox::EventMetadata = serde_json::from_value(row.metadata.clone())?;
        let Conformant {
            source,
            traceparent,
            tracestate,
        } = conformant(
            row,
            &metadata.source,
            metadata.traceparent.as_deref(),
            metadata.tracestate.as_deref(),
        )?;
        Ok(Self {
            specversion: SPEC_VERSION.to_owned(),
            id: row.event_id,
            source: source.into_owned(),
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
            traceparent: traceparent.map(str::to_owned),
            tracestate: tracestate.map(str::to_owned),
            data: row.payload.clone(),
        })
    }

    /// Whether the row's metadata carries a `traceparent` its envelope leaves out as invalid.
    pub fn drops_traceparent(row: &crate::outbox::ClaimedEvent) -> bool {
        row.metadata
            .get("traceparent")
            .and_then(serde_json::Value::as_str)
            .is_some_and(|t| !is_valid_traceparent(t))
    }

    /// The JSON a bus carries for a claimed row: the same bytes as serializing
    /// [`EventEnvelope::from_row`]'s envelope, without copying the row's payload and metadata
    /// first (the dispatcher does this for every row it publishes).
    pub fn body_of(row: &crate::outbox::ClaimedEvent) -> Result<String, EnvelopeError> {
        // The metadata's strings are borrowed from the row, the subject is written straight into
        // the body, and the body's buffer is sized once: no copy of anything but the body.
        let metadata = MetadataOfRow::deserialize(&row.metadata)?;
        let Conformant {
            source,
            traceparent,
            tracestate,
        } = conformant(
            row,
            metadata.source,
            metadata.traceparent,
            metadata.tracestate,
        )?;
        let strings = row.tenant_id.len()
            + 2 * (row.aggregate_type.len() + row.aggregate_id.len())
            + row.event_type.len();
        let mut body = Vec::with_capacity(BODY_OVERHEAD + strings + PAYLOAD_GUESS);
        serde_json::to_writer(
            &mut body,
            &EnvelopeOfRow {
                specversion: SPEC_VERSION,
                id: row.event_id,
                source: &source,
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
                traceparent,
                tracestate,
                data: &row.payload,
            },
        )
        .map_err(EnvelopeError::Json)?;
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

    #[test]
    fn only_a_valid_w3c_traceparent_is_valid() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert!(is_valid_traceparent(good));
        // A later version may carry more fields after a dash.
        assert!(is_valid_traceparent(&format!("01{}-extra", &good[2..])));
        // Tried: upper case, version ff, all-zero trace id, all-zero parent id, version 00 with
        // more, no flags, a non-hex flag, garbage, empty.
        for bad in [
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
            "garbage",
            "",
        ] {
            assert!(!is_valid_traceparent(bad), "{bad}");
        }
    }

    #[test]
    fn the_envelope_makes_the_source_a_uri_reference_and_drops_an_invalid_traceparent() {
        let row = row(serde_json::json!({
            "correlation_id": "c", "source": "capture:Sales.Order Lines#a#b%zz%41",
            "traceparent": "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "tracestate": "k=v"
        }));
        let envelope = EventEnvelope::from_row(&row).unwrap();
        assert_eq!(envelope.source, "capture:Sales.Order%20Lines#a%23b%25zz%41");
        assert_eq!((envelope.traceparent, envelope.tracestate), (None, None));
        assert!(EventEnvelope::drops_traceparent(&row));
        let body: serde_json::Value =
            serde_json::from_str(&EventEnvelope::body_of(&row).unwrap()).unwrap();
        assert_eq!(body["source"], "capture:Sales.Order%20Lines#a%23b%25zz%41");
        assert!(body.get("traceparent").is_none() && body.get("tracestate").is_none());
        assert_eq!(source_as_uri_reference("orders"), "orders");
        assert_eq!(
            source_as_uri_reference("urn:svc:payments/eu-1?x=1"),
            "urn:svc:payments/eu-1?x=1"
        );
    }

    #[test]
    fn what_cannot_be_a_cloudevent_is_refused_by_both_builders() {
        let mut big = row(serde_json::json!({"correlation_id": "c", "source": "orders"}));
        big.aggregate_version = MAX_INTEGER + 1;
        let empty = row(serde_json::json!({"correlation_id": "c", "source": ""}));
        for row in [big, empty] {
            assert!(EventEnvelope::from_row(&row).is_err());
            assert!(EventEnvelope::body_of(&row).is_err());
        }
        let mut last = row(serde_json::json!({"correlation_id": "c", "source": "orders"}));
        last.aggregate_version = MAX_INTEGER;
        assert!(EventEnvelope::body_of(&last).is_ok());
    }
}
