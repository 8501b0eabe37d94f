//! (Past 400 lines: every field's parsing and its error, and the property tests that throw hostile input at them.)
//!
//! Request parsing: body bytes and JSON fields to validated commands, or an error that names the
//! offending field. Pure functions, so they can be property-tested without a database.

use std::collections::HashSet;
use std::fmt;

use base64::Engine as _;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;

use payments::domain::payment::{MarkPaid, RecordRefund, VerificationMethod, MAX_AMOUNT_MINOR};
use payments::domain::Currency;

/// Default cap on the request body, in bytes: a paid or refund command is well under 1 KiB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 8 * 1024;

/// Longest `verifiedBy`, in characters.
pub const MAX_VERIFIED_BY_CHARS: usize = 128;

/// A request field that was missing or invalid: becomes a 400 with this field and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// The field (a JSON property, a path parameter, a header, or `body`).
    pub field: String,
    /// What is wrong with it, in words a client developer understands.
    pub message: String,
}

impl FieldError {
    /// An error about `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// The request body as bytes: present, within `max` bytes, decoded from base64 when API Gateway
/// encoded it.
pub fn body_bytes(body: Option<&str>, is_base64: bool, max: usize) -> Result<Vec<u8>, FieldError> {
    let raw = body.unwrap_or_default();
    if raw.trim().is_empty() {
        return Err(FieldError::new("body", "a JSON object is required"));
    }
    let too_large = || FieldError::new("body", format!("must be at most {max} bytes"));
    if !is_base64 {
        return if raw.len() > max {
            Err(too_large())
        } else {
            Ok(raw.as_bytes().to_vec())
        };
    }
    // Base64 grows the body by a third: refuse an obviously oversized one before decoding it.
    if raw.len() / 4 * 3 > max + 3 {
        return Err(too_large());
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(raw)
        .map_err(|_| FieldError::new("body", "is marked base64-encoded but is not valid base64"))?;
    if bytes.len() > max {
        return Err(too_large());
    }
    Ok(bytes)
}

/// A JSON object's members in document order, duplicates kept so they can be refused by name.
struct Members(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for Members {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct MembersVisitor;
        impl<'de> Visitor<'de> for MembersVisitor {
            type Value = Members;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Members, A::Error> {
                let mut members = Vec::new();
                while let Some(entry) = map.next_entry::<String, Value>()? {
                    members.push(entry);
                }
                Ok(Members(members))
            }
        }
        d.deserialize_map(MembersVisitor)
    }
}

/// A parsed body: a JSON object with only known, non-repeated members.
struct Object(Vec<(String, Value)>);

impl Object {
    fn parse(bytes: &[u8], known: &[&str]) -> Result<Self, FieldError> {
        let Members(members) = serde_json::from_slice(bytes).map_err(|e| {
            let message = if e.is_data() {
                "must be a JSON object".to_owned()
            } else {
                // Syntax errors carry only a position, never input text, so they are safe to echo.
                format!("is not valid JSON ({e})")
            };
            FieldError::new("body", message)
        })?;
        let mut seen = HashSet::new();
        for (name, _) in &members {
            if name.is_empty() {
                return Err(FieldError::new("body", "has a member with an empty name"));
            }
            if !known.contains(&name.as_str()) {
                return Err(FieldError::new(
                    printable(name),
                    format!("is not a known field (known: {})", known.join(", ")),
                ));
            }
            if !seen.insert(name.as_str()) {
                return Err(FieldError::new(name.clone(), "appears more than once"));
            }
        }
        Ok(Self(members))
    }

    fn get(&self, field: &str) -> Option<&Value> {
        self.0.iter().find(|(k, _)| k == field).map(|(_, v)| v)
    }

    fn required(&self, field: &str) -> Result<&Value, FieldError> {
        match self.get(field) {
            None | Some(Value::Null) => Err(FieldError::new(field, "is required")),
            Some(v) => Ok(v),
        }
    }
}

/// An unknown member's name as it may be echoed back: bounded, control characters escaped.
fn printable(name: &str) -> String {
    let escaped: String = name.chars().flat_map(char::escape_debug).collect();
    if escaped.chars().count() > 64 {
        format!("{}…", escaped.chars().take(64).collect::<String>())
    } else {
        escaped
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn amount(obj: &Object, field: &str) -> Result<i64, FieldError> {
    let range = || format!("must be an integer from 1 to {MAX_AMOUNT_MINOR} (minor units)");
    match obj.required(field)? {
        Value::Number(n) => match n.as_i64() {
            Some(a) if (1..=MAX_AMOUNT_MINOR).contains(&a) => Ok(a),
            _ => Err(FieldError::new(field, range())),
        },
        other => Err(FieldError::new(
            field,
            format!("{}, not {}", range(), kind(other)),
        )),
    }
}

fn string<'a>(obj: &'a Object, field: &str) -> Result<&'a str, FieldError> {
    match obj.required(field)? {
        Value::String(s) => Ok(s),
        other => Err(FieldError::new(
            field,
            format!("must be a string, not {}", kind(other)),
        )),
    }
}

/// Fields of `POST /payments/{paymentId}/paid`.
pub const MARK_PAID_FIELDS: &[&str] = &[
    "amountMinor",
    "currency",
    "verificationMethod",
    "verifiedBy",
];

/// The body of an acknowledgment: `{"consumer": "<name>"}`. The name's rules are checked by
/// [`pg_outbox::feed::ConsumerName`].
pub fn parse_ack(bytes: &[u8]) -> Result<String, FieldError> {
    let obj = Object::parse(bytes, &["consumer"])?;
    Ok(string(&obj, "consumer")?.to_owned())
}

/// Parses the body of `POST /payments/{paymentId}/paid`.
pub fn parse_mark_paid(bytes: &[u8]) -> Result<MarkPaid, FieldError> {
    let obj = Object::parse(bytes, MARK_PAID_FIELDS)?;
    let amount_minor = amount(&obj, "amountMinor")?;
    let currency = Currency::parse(string(&obj, "currency")?)
        .map_err(|e| FieldError::new("currency", e.to_string()))?;
    let verification_method = VerificationMethod::parse(string(&obj, "verificationMethod")?)
        .ok_or_else(|| {
            FieldError::new(
                "verificationMethod",
                format!("must be one of {}", VerificationMethod::ALLOWED),
            )
        })?;
    let verified_by = string(&obj, "verifiedBy")?.trim();
    if verified_by.is_empty() {
        return Err(FieldError::new("verifiedBy", "must not be empty"));
    }
    if verified_by.chars().count() > MAX_VERIFIED_BY_CHARS {
        return Err(FieldError::new(
            "verifiedBy",
            format!("must be at most {MAX_VERIFIED_BY_CHARS} characters"),
        ));
    }
    if verified_by.chars().any(char::is_control) {
        return Err(FieldError::new(
            "verifiedBy",
            "must not contain control characters",
        ));
    }
    Ok(MarkPaid {
        amount_minor,
        currency,
        verification_method,
        verified_by: verified_by.to_owned(),
    })
}

/// Fields of `POST /payments/{paymentId}/refunds`.
pub const REFUND_FIELDS: &[&str] = &["amountMinor"];

/// Parses the body of `POST /payments/{paymentId}/refunds`.
pub fn parse_refund(bytes: &[u8]) -> Result<RecordRefund, FieldError> {
    let obj = Object::parse(bytes, REFUND_FIELDS)?;
    Ok(RecordRefund {
        amount_minor: amount(&obj, "amountMinor")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"amountMinor":1250,"currency":"EUR","verificationMethod":"card_3ds","verifiedBy":"acs.example"}"#;

    fn field_of(body: &str) -> String {
        parse_mark_paid(body.as_bytes()).unwrap_err().field
    }

    #[test]
    fn a_valid_paid_body_parses() {
        let cmd = parse_mark_paid(GOOD.as_bytes()).unwrap();
        assert_eq!(cmd.amount_minor, 1250);
        assert_eq!(cmd.currency.as_str(), "EUR");
        assert_eq!(cmd.verification_method, VerificationMethod::Card3ds);
        assert_eq!(cmd.verified_by, "acs.example");
    }

    #[test]
    fn every_bad_paid_body_names_its_field() {
        let cases = [
            ("not json", "body"),
            ("[1,2]", "body"),
            ("\"text\"", "body"),
            ("{\"amountMinor\":", "body"),
            (
                r#"{"currency":"EUR","verificationMethod":"card_3ds","verifiedBy":"x"}"#,
                "amountMinor",
            ),
            (
                r#"{"amountMinor":null,"currency":"EUR","verificationMethod":"card_3ds","verifiedBy":"x"}"#,
                "amountMinor",
            ),
            (
                r#"{"amountMinor":"1250","currency":"EUR","verificationMethod":"card_3ds","verifiedBy":"x"}"#,
                "amountMinor",
            ),
            (
                r#"{"amountMinor":12.5,"currency":"EUR","verificationMethod":"card_3ds","verifiedBy":"x"}"#,
                "amountMinor",
            ),
            (
                r#"{"amountMinor":0,"currency":"EUR","verificationMethod":"card_3ds","verifiedBy":"x"}"#,
                "amountMinor",
            ),
            (
                r#"{"amountMinor":-5,"currency":"EUR","verificationMethod":"card_3ds","verifiedBy":"x"}"#,
                "amountMinor",
            ),
            (
                r#"{"amountMinor":1000000000000000001,"currency":"EUR","verificationMethod":"card_3ds","verifiedBy":"x"}"#,
                "amountMinor",
            ),
            (
                r#"{"amountMinor":99999999999999999999999,"currency":"EUR","verificationMethod":"card_3ds","verifiedBy":"x"}"#,
                "amountMinor",
            ),
            (
                r#"{"amountMinor":1e3,"currency":"EUR","verificationMethod":"card_3ds","verifiedBy":"x"}"#,
                "amountMinor",
            ),
            (
                r#"{"amountMinor":1,"currency":"eur","verificationMethod":"card_3ds","verifiedBy":"x"}"#,
                "currency",
            ),
            (
                r#"{"amountMinor":1,"currency":"ZZZ","verificationMethod":"card_3ds","verifiedBy":"x"}"#,
                "currency",
            ),
            (
                r#"{"amountMinor":1,"currency":978,"verificationMethod":"card_3ds","verifiedBy":"x"}"#,
                "currency",
            ),
            (
                r#"{"amountMinor":1,"currency":"EUR","verificationMethod":"telepathy","verifiedBy":"x"}"#,
                "verificationMethod",
            ),
            (
                r#"{"amountMinor":1,"currency":"EUR","verificationMethod":"card_3ds","verifiedBy":"  "}"#,
                "verifiedBy",
            ),
            (
                r#"{"amountMinor":1,"currency":"EUR","verificationMethod":"card_3ds","verifiedBy":"a\u0000b"}"#,
                "verifiedBy",
            ),
            (
                r#"{"amountMinor":1,"currency":"EUR","verificationMethod":"card_3ds","verifiedBy":{"$ne":1}}"#,
                "verifiedBy",
            ),
            (
                r#"{"amountMinor":1,"currency":"EUR","verificationMethod":"card_3ds","verifiedBy":"x","tenantId":"other"}"#,
                "tenantId",
            ),
            (
                r#"{"amountMinor":1,"amountMinor":2,"currency":"EUR","verificationMethod":"card_3ds","verifiedBy":"x"}"#,
                "amountMinor",
            ),
        ];
        for (body, field) in cases {
            assert_eq!(field_of(body), field, "body {body}");
        }
        let long = format!(
            r#"{{"amountMinor":1,"currency":"EUR","verificationMethod":"card_3ds","verifiedBy":"{}"}}"#,
            "v".repeat(MAX_VERIFIED_BY_CHARS + 1)
        );
        assert_eq!(field_of(&long), "verifiedBy");
        let nested = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert_eq!(field_of(&nested), "body");
    }

    #[test]
    fn unknown_field_names_are_echoed_safely() {
        let err = parse_refund(br#"{"amountMinor":1,"a\nb":2}"#).unwrap_err();
        assert_eq!(err.field, "a\\nb");
        let long_name = format!(r#"{{"{}":1}}"#, "k".repeat(500));
        assert!(
            parse_refund(long_name.as_bytes())
                .unwrap_err()
                .field
                .chars()
                .count()
                <= 65
        );
    }

    #[test]
    fn bodies_are_bounded_before_and_after_base64() {
        assert_eq!(body_bytes(None, false, 10).unwrap_err().field, "body");
        assert_eq!(
            body_bytes(Some("   "), false, 10).unwrap_err().field,
            "body"
        );
        assert!(body_bytes(Some("0123456789"), false, 10).is_ok());
        assert!(body_bytes(Some("0123456789x"), false, 10).is_err());
        let b64 = base64::engine::general_purpose::STANDARD.encode(GOOD);
        assert_eq!(body_bytes(Some(&b64), true, 8192).unwrap(), GOOD.as_bytes());
        assert!(body_bytes(Some(&b64), true, GOOD.len() - 1).is_err());
        assert!(body_bytes(Some("!!not base64!!"), true, 8192).is_err());
    }

    #[test]
    fn refund_body_takes_only_a_positive_amount() {
        assert_eq!(
            parse_refund(br#"{"amountMinor":300}"#)
                .unwrap()
                .amount_minor,
            300
        );
        assert_eq!(
            parse_refund(br#"{"amountMinor":0}"#).unwrap_err().field,
            "amountMinor"
        );
        assert_eq!(parse_refund(br#"{}"#).unwrap_err().field, "amountMinor");
        assert_eq!(
            parse_refund(br#"{"amount":3}"#).unwrap_err().field,
            "amount"
        );
    }
}

/// Hostile input, generated: the parsers never panic, and every rejection names a field and says
/// why. 10,000 cases per property.
#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    fn config() -> ProptestConfig {
        ProptestConfig {
            cases: 10_000,
            failure_persistence: None,
            ..ProptestConfig::default()
        }
    }

    /// JSON values of the kinds clients send by mistake or on purpose.
    fn hostile_value() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<i64>().prop_map(|n| n.to_string()),
            any::<f64>().prop_map(|f| format!("{f:?}")),
            "[0-9]{15,40}",
            "-?[0-9]{1,3}(\\.[0-9]+)?(e[+-]?[0-9]{1,4})?",
            any::<String>().prop_map(|s| serde_json::to_string(&s).unwrap()),
            Just("\"' OR '1'='1\"".to_owned()),
            Just("\"EUR\\u0000\"".to_owned()),
            Just("\"\\ud83d\\udcb3\"".to_owned()),
            Just("null".to_owned()),
            Just("true".to_owned()),
            Just("{\"$ne\":null}".to_owned()),
            (1usize..200).prop_map(|depth| format!("{}{}", "[".repeat(depth), "]".repeat(depth))),
        ]
    }

    fn field_name() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("amountMinor".to_owned()),
            Just("currency".to_owned()),
            Just("verificationMethod".to_owned()),
            Just("verifiedBy".to_owned()),
            Just("tenantId".to_owned()),
            any::<String>(),
        ]
    }

    fn hostile_object() -> impl Strategy<Value = String> {
        prop::collection::vec((field_name(), hostile_value()), 0..8).prop_map(|members| {
            let body: Vec<String> = members
                .iter()
                .map(|(k, v)| format!("{}:{v}", serde_json::to_string(k).unwrap()))
                .collect();
            format!("{{{}}}", body.join(","))
        })
    }

    fn check(result: Result<(), FieldError>) -> Result<(), TestCaseError> {
        if let Err(e) = result {
            prop_assert!(!e.field.is_empty());
            prop_assert!(!e.message.is_empty());
            prop_assert!(
                e.field.chars().count() <= 65,
                "field echoed unbounded: {}",
                e.field
            );
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            check(parse_mark_paid(&bytes).map(|_| ()))?;
            check(parse_refund(&bytes).map(|_| ()))?;
        }

        #[test]
        fn hostile_json_objects_get_a_named_field(body in hostile_object()) {
            check(parse_mark_paid(body.as_bytes()).map(|_| ()))?;
            check(parse_refund(body.as_bytes()).map(|_| ()))?;
        }

        #[test]
        fn bodies_are_bounded_whatever_the_encoding(raw in ".{0,64}", b64 in any::<bool>(), max in 0usize..32) {
            if let Ok(bytes) = body_bytes(Some(&raw), b64, max) {
                prop_assert!(bytes.len() <= max);
            }
        }
    }

    /// One member of a paid body: a valid value (and what it parses to), or a value known to be
    /// refused.
    #[derive(Debug, Clone)]
    enum Member {
        Valid(String),
        Invalid(String),
    }

    fn member(
        valid: BoxedStrategy<String>,
        invalid: BoxedStrategy<String>,
    ) -> BoxedStrategy<Member> {
        prop_oneof![
            6 => valid.prop_map(Member::Valid),
            1 => invalid.prop_map(Member::Invalid),
        ]
        .boxed()
    }

    /// Paid bodies: each of the four members valid most of the time, refused otherwise.
    fn paid_bodies() -> impl Strategy<Value = [(&'static str, Member); 4]> {
        let quoted = |s: String| serde_json::to_string(&s).unwrap();
        (
            member(
                (1..=MAX_AMOUNT_MINOR).prop_map(|n| n.to_string()).boxed(),
                prop_oneof![
                    (i64::MIN..=0).prop_map(|n| n.to_string()),
                    (MAX_AMOUNT_MINOR + 1..=i64::MAX).prop_map(|n| n.to_string()),
                    Just("\"100\"".to_owned()),
                    Just("1.5".to_owned()),
                    Just("null".to_owned()),
                ]
                .boxed(),
            ),
            member(
                prop::sample::select(vec!["EUR", "USD", "GBP", "JPY", "CHF", "SEK"])
                    .prop_map(|c| format!("\"{c}\""))
                    .boxed(),
                prop::sample::select(vec![
                    "\"eur\"", "\"XTS\"", "\"XXX\"", "\"978\"", "\"\"", "978",
                ])
                .prop_map(str::to_owned)
                .boxed(),
            ),
            member(
                prop::sample::select(vec![
                    "card_3ds",
                    "card_avs",
                    "bank_transfer",
                    "manual_review",
                ])
                .prop_map(|m| format!("\"{m}\""))
                .boxed(),
                prop::sample::select(vec!["\"card\"", "\"CARD_3DS\"", "\"cash\"", "\"\"", "3"])
                    .prop_map(str::to_owned)
                    .boxed(),
            ),
            member(
                "[a-z][a-z0-9.-]{0,127}".prop_map(quoted).boxed(),
                prop_oneof![
                    Just("\"   \"".to_owned()),
                    "[a-z]{129,160}".prop_map(quoted),
                    Just("\"acs\\u0000\"".to_owned()),
                    Just("{}".to_owned()),
                ]
                .boxed(),
            ),
        )
            .prop_map(|(a, c, m, v)| {
                [
                    ("amountMinor", a),
                    ("currency", c),
                    ("verificationMethod", m),
                    ("verifiedBy", v),
                ]
            })
    }

    /// A body with only valid members parses to exactly those values; one with an invalid member
    /// is refused naming an invalid member. The run must see plenty of both.
    #[test]
    fn paid_bodies_are_accepted_exactly_when_every_member_is_valid() {
        let mut runner = proptest::test_runner::TestRunner::new(config());
        let (accepted, refused) = (std::cell::Cell::new(0), std::cell::Cell::new(0));
        runner
            .run(&paid_bodies(), |members| {
                let body = format!(
                    "{{{}}}",
                    members
                        .iter()
                        .map(|(name, m)| match m {
                            Member::Valid(v) | Member::Invalid(v) => format!("\"{name}\":{v}"),
                        })
                        .collect::<Vec<_>>()
                        .join(",")
                );
                let invalid: Vec<&str> = members
                    .iter()
                    .filter(|(_, m)| matches!(m, Member::Invalid(_)))
                    .map(|(name, _)| *name)
                    .collect();
                match parse_mark_paid(body.as_bytes()) {
                    Ok(cmd) => {
                        prop_assert!(invalid.is_empty(), "{body} accepted: {cmd:?}");
                        let value = |i: usize| match &members[i].1 {
                            Member::Valid(v) | Member::Invalid(v) => v.clone(),
                        };
                        prop_assert_eq!(cmd.amount_minor.to_string(), value(0));
                        prop_assert_eq!(format!("\"{}\"", cmd.currency.as_str()), value(1));
                        prop_assert_eq!(
                            format!("\"{}\"", cmd.verification_method.as_str()),
                            value(2)
                        );
                        prop_assert_eq!(serde_json::to_string(&cmd.verified_by).unwrap(), value(3));
                        accepted.set(accepted.get() + 1);
                    }
                    Err(e) => {
                        prop_assert!(invalid.contains(&e.field.as_str()), "{body}: {e:?}");
                        refused.set(refused.get() + 1);
                    }
                }
                Ok(())
            })
            .unwrap();
        let (accepted, refused) = (accepted.get(), refused.get());
        assert!(
            accepted > 3_000 && refused > 3_000,
            "accepted {accepted}, refused {refused}"
        );
    }
}
