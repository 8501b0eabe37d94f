//! (Past 400 lines: the feed's query parameters, cursor and their property tests, read together.)
//!
//! The events feed: a tenant's published events, oldest first, read page by page with an opaque
//! cursor, and acknowledged per consumer. For partners that cannot receive a push: they pull, as
//! from Stripe's `GET /v1/events`.
//!
//! Order and completeness: every published event has a feed position, drawn when it is first
//! marked published, and one tenant's positions commit in increasing order (migration V6). A
//! cursor is the last position a reader has seen, so "everything after the cursor" misses
//! nothing committed later, and rows deleted by retention do not move it.
//!
//! This module parses and validates; the SQL is in [`crate::postgres::feed`].

use base64::Engine as _;
use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::envelope::EventEnvelope;
use crate::ids::TenantId;

/// Page size when `limit` is not given.
pub const DEFAULT_LIMIT: i64 = 50;
/// Largest page.
pub const MAX_LIMIT: i64 = 100;
/// Longest event type or type prefix, in characters.
pub const MAX_EVENT_TYPE_LEN: usize = 128;
/// Longest aggregate id accepted as a filter, in bytes.
pub const MAX_AGGREGATE_ID_LEN: usize = 256;

/// A query parameter that was refused: a 400 naming it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{parameter} {message}")]
pub struct ParameterError {
    /// The parameter, as the client spelled it in the query string or path.
    pub parameter: &'static str,
    /// What is wrong, safe to echo (never the value itself).
    pub message: String,
}

impl ParameterError {
    fn new(parameter: &'static str, message: impl Into<String>) -> Self {
        Self {
            parameter,
            message: message.into(),
        }
    }
}

/// Which event types a page holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TypeFilter {
    /// Exactly this type, e.g. `order.placed`.
    Exact(String),
    /// Every type under this prefix: `order.*` is given as `order.`.
    Prefix(String),
}

/// A consumer's name: what its acknowledgments are filed under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerName(String);

impl ConsumerName {
    /// Letters, digits, `.`, `_` and `-`, starting with a letter or digit, at most 64 characters
    /// (the same rule as the table's CHECK).
    pub fn parse(parameter: &'static str, raw: &str) -> Result<Self, ParameterError> {
        let ok = !raw.is_empty()
            && raw.len() <= 64
            && raw.as_bytes()[0].is_ascii_alphanumeric()
            && raw
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if ok {
            Ok(Self(raw.to_owned()))
        } else {
            Err(ParameterError::new(
                parameter,
                "must be 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit",
            ))
        }
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The position a page starts after. Opaque to clients: base64url of the version, the tenant and
/// the position, so a cursor of another tenant (or a made-up one) is refused, not misread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeedCursor {
    /// The last feed position the reader has seen (0: before the first event).
    pub position: i64,
}

const CURSOR_VERSION: &str = "f1";

impl FeedCursor {
    /// Before every event.
    pub const START: Self = Self { position: 0 };

    /// The cursor as the client sees it.
    pub fn encode(&self, tenant: &TenantId) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!(
            "{CURSOR_VERSION}:{}:{}",
            self.position,
            tenant.as_str()
        ))
    }

    /// Reads a cursor this API handed to `tenant`.
    pub fn decode(raw: &str, tenant: &TenantId) -> Result<Self, ParameterError> {
        let malformed = || ParameterError::new("after", "is not a cursor this API returned");
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(raw)
            .map_err(|_| malformed())?;
        let text = String::from_utf8(bytes).map_err(|_| malformed())?;
        let mut parts = text.splitn(3, ':');
        let (Some(CURSOR_VERSION), Some(position), Some(owner)) =
            (parts.next(), parts.next(), parts.next())
        else {
            return Err(malformed());
        };
        let position = match position.parse::<i64>() {
            // Only the canonical spelling this API writes: no sign, no leading zeros.
            Ok(p) if p >= 0 && p.to_string() == position => p,
            _ => return Err(malformed()),
        };
        if owner != tenant.as_str() {
            return Err(ParameterError::new(
                "after",
                "belongs to another tenant's feed",
            ));
        }
        Ok(Self { position })
    }
}

/// One page request, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedQuery {
    /// Whose feed: from the verified token only.
    pub tenant: TenantId,
    /// Where the page starts (after this position).
    pub after: FeedCursor,
    /// Events per page, 1..=100.
    pub limit: i64,
    /// Only these event types.
    pub event_type: Option<TypeFilter>,
    /// Only this aggregate's events.
    pub aggregate_id: Option<String>,
    /// Only events recorded at or after this time.
    pub created_from: Option<DateTime<Utc>>,
    /// Only events recorded before this time.
    pub created_to: Option<DateTime<Utc>>,
    /// Whose acknowledgments `exclude_acknowledged` looks at.
    pub consumer: Option<ConsumerName>,
    /// Leave out the events `consumer` has acknowledged.
    pub exclude_acknowledged: bool,
}

/// The query string parameters the feed knows.
pub const PARAMETERS: &[&str] = &[
    "after",
    "limit",
    "type",
    "aggregateId",
    "createdFrom",
    "createdTo",
    "consumer",
    "excludeAcknowledged",
];

impl FeedQuery {
    /// Validates the query string parameters (`name → value`, each given once) of a page
    /// request of `tenant`. Every refusal names its parameter.
    pub fn parse<'a>(
        tenant: TenantId,
        parameters: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, ParameterError> {
        let mut query = Self {
            after: FeedCursor::START,
            limit: DEFAULT_LIMIT,
            event_type: None,
            aggregate_id: None,
            created_from: None,
            created_to: None,
            consumer: None,
            exclude_acknowledged: false,
            tenant,
        };
        let mut seen: Vec<&str> = Vec::new();
        for (name, value) in parameters {
            let Some(&parameter) = PARAMETERS.iter().find(|p| **p == name) else {
                return Err(ParameterError::new(
                    "query",
                    format!(
                        "has an unknown parameter (known: {})",
                        PARAMETERS.join(", ")
                    ),
                ));
            };
            if seen.contains(&parameter) {
                return Err(ParameterError::new(parameter, "is given more than once"));
            }
            seen.push(parameter);
            match parameter {
                "after" => query.after = FeedCursor::decode(value, &query.tenant)?,
                "limit" => query.limit = parse_limit(value)?,
                "type" => query.event_type = Some(parse_type(value)?),
                "aggregateId" => query.aggregate_id = Some(parse_aggregate_id(value)?),
                "createdFrom" => query.created_from = Some(parse_time("createdFrom", value)?),
                "createdTo" => query.created_to = Some(parse_time("createdTo", value)?),
                "consumer" => query.consumer = Some(ConsumerName::parse("consumer", value)?),
                "excludeAcknowledged" => {
                    query.exclude_acknowledged = match value {
                        "true" => true,
                        "false" => false,
                        _ => {
                            return Err(ParameterError::new(
                                "excludeAcknowledged",
                                "must be true or false",
                            ))
                        }
                    }
                }
                _ => unreachable!("every known parameter is handled"),
            }
        }
        if let (Some(from), Some(to)) = (query.created_from, query.created_to) {
            if to <= from {
                return Err(ParameterError::new(
                    "createdTo",
                    "must be after createdFrom",
                ));
            }
        }
        if query.exclude_acknowledged && query.consumer.is_none() {
            return Err(ParameterError::new(
                "consumer",
                "is required with excludeAcknowledged=true",
            ));
        }
        Ok(query)
    }
}

fn parse_limit(raw: &str) -> Result<i64, ParameterError> {
    match raw.parse::<i64>() {
        Ok(n) if (1..=MAX_LIMIT).contains(&n) && n.to_string() == raw => Ok(n),
        _ => Err(ParameterError::new(
            "limit",
            format!("must be a whole number from 1 to {MAX_LIMIT}"),
        )),
    }
}

/// `order.placed`, or `order.*` for every type under `order.`: segments of letters, digits,
/// `_` and `-`, separated by dots.
fn parse_type(raw: &str) -> Result<TypeFilter, ParameterError> {
    let (body, prefix) = match raw.strip_suffix(".*") {
        Some(body) => (body, true),
        None => (raw, false),
    };
    let segment_ok = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
    };
    if raw.len() > MAX_EVENT_TYPE_LEN || !body.split('.').all(segment_ok) {
        return Err(ParameterError::new(
            "type",
            format!(
                "must be an event type such as order.placed, or a prefix such as order.* \
                 (dot-separated letters, digits, '_' and '-', at most {MAX_EVENT_TYPE_LEN} characters)"
            ),
        ));
    }
    Ok(if prefix {
        TypeFilter::Prefix(format!("{body}."))
    } else {
        TypeFilter::Exact(body.to_owned())
    })
}

fn parse_aggregate_id(raw: &str) -> Result<String, ParameterError> {
    if raw.is_empty() || raw.len() > MAX_AGGREGATE_ID_LEN || raw.chars().any(char::is_control) {
        return Err(ParameterError::new(
            "aggregateId",
            format!("must be 1 to {MAX_AGGREGATE_ID_LEN} bytes without control characters"),
        ));
    }
    Ok(raw.to_owned())
}

fn parse_time(parameter: &'static str, raw: &str) -> Result<DateTime<Utc>, ParameterError> {
    DateTime::parse_from_rfc3339(raw)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| {
            ParameterError::new(
                parameter,
                "must be an RFC 3339 time such as 2026-11-23T10:00:00Z",
            )
        })
}

/// One page of the feed.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FeedPage {
    /// The events, oldest first, as the buses carry them.
    pub events: Vec<EventEnvelope>,
    /// Where the next page starts: pass it as `after`. On an empty page it is the cursor given,
    /// so a client polls with it until new events arrive.
    pub next_cursor: String,
    /// Whether more events matching the filters were there already when this page was read.
    pub has_more: bool,
}

/// An acknowledgment as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Acknowledgment {
    /// The event.
    pub event_id: Uuid,
    /// Who acknowledged it.
    pub consumer: String,
    /// When it was first acknowledged (a repeated acknowledgment keeps this time).
    pub acknowledged_at: DateTime<Utc>,
}

/// What acknowledging an event did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AckOutcome {
    /// Recorded now.
    Recorded(Acknowledgment),
    /// This consumer had acknowledged it already.
    AlreadyAcknowledged(Acknowledgment),
    /// No such event in this tenant's feed (unknown, another tenant's, or not published yet).
    NotFound,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(t: &str) -> TenantId {
        TenantId::parse(t).unwrap()
    }

    fn parse(params: &[(&str, &str)]) -> Result<FeedQuery, ParameterError> {
        FeedQuery::parse(tenant("acme"), params.iter().copied())
    }

    #[test]
    fn cursors_round_trip_and_stay_with_their_tenant() {
        let c = FeedCursor { position: 12_345 };
        let raw = c.encode(&tenant("acme"));
        assert_eq!(FeedCursor::decode(&raw, &tenant("acme")).unwrap(), c);
        let err = FeedCursor::decode(&raw, &tenant("globex")).unwrap_err();
        assert_eq!(err.parameter, "after");
        assert!(err.message.contains("another tenant"), "{err}");
        // A tenant whose id is a prefix of another's does not match it.
        assert!(FeedCursor::decode(&raw, &tenant("acm")).is_err());
    }

    #[test]
    fn malformed_cursors_are_refused() {
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        for raw in [
            "".to_owned(),
            "not base64!".to_owned(),
            b64("f1:12"),
            b64("f2:12:acme"),
            b64("f1:-1:acme"),
            b64("f1:+5:acme"),
            b64("f1:007:acme"),
            b64("f1:x:acme"),
            b64("f1:99999999999999999999:acme"),
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode([0xff, 0xfe]),
        ] {
            let err = FeedCursor::decode(&raw, &tenant("acme")).unwrap_err();
            assert_eq!(err.parameter, "after", "{raw}");
        }
    }

    #[test]
    fn every_bad_parameter_is_named() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("limit", "0")], "limit"),
            (&[("limit", "101")], "limit"),
            (&[("limit", "ten")], "limit"),
            (&[("limit", "05")], "limit"),
            (&[("limit", "")], "limit"),
            (&[("type", "Order Placed")], "type"),
            (&[("type", "order..placed")], "type"),
            (&[("type", ".paid")], "type"),
            (&[("type", "order.*.paid")], "type"),
            (&[("type", "*")], "type"),
            (&[("type", "")], "type"),
            (&[("aggregateId", "")], "aggregateId"),
            (&[("aggregateId", "a\nb")], "aggregateId"),
            (&[("createdFrom", "yesterday")], "createdFrom"),
            (&[("createdTo", "2026-13-01T00:00:00Z")], "createdTo"),
            (&[("createdFrom", "2026-11-23")], "createdFrom"),
            (
                &[
                    ("createdFrom", "2026-11-23T10:00:00Z"),
                    ("createdTo", "2026-11-23T09:00:00Z"),
                ],
                "createdTo",
            ),
            (&[("consumer", "")], "consumer"),
            (&[("consumer", "-lead")], "consumer"),
            (&[("consumer", "has space")], "consumer"),
            (&[("excludeAcknowledged", "yes")], "excludeAcknowledged"),
            (&[("excludeAcknowledged", "true")], "consumer"),
            (&[("after", "zzz")], "after"),
            (&[("limit", "5"), ("limit", "6")], "limit"),
            (&[("status", "published")], "query"),
        ];
        for (params, named) in cases {
            let err = parse(params).expect_err(&format!("{params:?} must be refused"));
            assert_eq!(err.parameter, *named, "{params:?}: {err}");
        }
    }

    #[test]
    fn good_parameters_are_read() {
        let q = parse(&[
            ("limit", "100"),
            ("type", "order.*"),
            ("aggregateId", "o-1"),
            ("createdFrom", "2026-11-23T10:00:00+01:00"),
            ("createdTo", "2026-11-23T10:00:00Z"),
            ("consumer", "ledger-sync.v2"),
            ("excludeAcknowledged", "true"),
        ])
        .unwrap();
        assert_eq!(q.limit, 100);
        assert_eq!(q.event_type, Some(TypeFilter::Prefix("order.".into())));
        assert_eq!(q.aggregate_id.as_deref(), Some("o-1"));
        assert_eq!(
            q.created_from.unwrap().to_rfc3339(),
            "2026-11-23T09:00:00+00:00"
        );
        assert!(q.exclude_acknowledged);
        assert_eq!(q.consumer.unwrap().as_str(), "ledger-sync.v2");
        let q = parse(&[("type", "order.placed"), ("limit", "1")]).unwrap();
        assert_eq!(q.event_type, Some(TypeFilter::Exact("order.placed".into())));
        let q = parse(&[]).unwrap();
        assert_eq!((q.limit, q.after), (DEFAULT_LIMIT, FeedCursor::START));
    }
}
