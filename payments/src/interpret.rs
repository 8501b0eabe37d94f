//! What a delivered payment event means to the payment projections: the envelope's payload
//! read by type and schema version, and checked. Pure functions, so hostile input can be thrown
//! at them (the property tests below, through [`parse_delivery`] as the sink reads a message).

use pg_outbox::envelope::EventEnvelope;
#[cfg(test)]
use pg_outbox::sink::parse_delivery;
use pg_outbox::sink::DeliveryError;
use serde::Deserialize;
use uuid::Uuid;

use crate::domain::events::{PaymentPaidV1, PaymentRefundedV1, PAYMENT_PAID, PAYMENT_REFUNDED};

/// A payment event the projections apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentChange {
    /// Event id (the inbox key).
    pub event_id: Uuid,
    /// Event type.
    pub event_type: &'static str,
    /// Tenant.
    pub tenant_id: String,
    /// Payment.
    pub payment_id: String,
    /// Aggregate version of the event.
    pub version: i64,
    /// Amount paid or refunded, minor units.
    pub amount_minor: i64,
    /// Currency.
    pub currency: String,
    /// When it happened (the day it counts for).
    pub at: chrono::DateTime<chrono::Utc>,
}

/// What an envelope means to the sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Interpreted {
    /// A change to apply.
    Change(PaymentChange),
    /// An event type this sink has no projection for: acknowledged and counted, so new producers
    /// can add types without breaking consumers.
    UnknownType(String),
}

fn payload<T: for<'de> Deserialize<'de>>(envelope: &EventEnvelope) -> Result<T, DeliveryError> {
    serde_json::from_value(envelope.data.clone()).map_err(|e| DeliveryError::InvalidPayload {
        event_type: envelope.event_type.clone(),
        reason: e.to_string(),
    })
}

/// Reads the envelope's payload by type and schema version.
pub fn interpret(envelope: &EventEnvelope) -> Result<Interpreted, DeliveryError> {
    let unsupported = || DeliveryError::UnsupportedSchema {
        event_type: envelope.event_type.clone(),
        version: envelope.schemaversion,
    };
    let (event_type, payment_id, amount_minor, currency, at) = match envelope.event_type.as_str() {
        PAYMENT_PAID if envelope.schemaversion == PaymentPaidV1::SCHEMA_VERSION => {
            let p: PaymentPaidV1 = payload(envelope)?;
            (
                PAYMENT_PAID,
                p.payment_id,
                p.amount_minor,
                p.currency,
                p.paid_at,
            )
        }
        PAYMENT_REFUNDED if envelope.schemaversion == PaymentRefundedV1::SCHEMA_VERSION => {
            let p: PaymentRefundedV1 = payload(envelope)?;
            (
                PAYMENT_REFUNDED,
                p.payment_id,
                p.amount_minor,
                p.currency,
                p.refunded_at,
            )
        }
        PAYMENT_PAID | PAYMENT_REFUNDED => return Err(unsupported()),
        other => return Ok(Interpreted::UnknownType(other.to_owned())),
    };
    let invalid = |reason: &str| DeliveryError::InvalidPayload {
        event_type: event_type.to_owned(),
        reason: reason.to_owned(),
    };
    if payment_id != envelope.aggregateid {
        return Err(invalid("paymentId differs from the envelope's aggregateid"));
    }
    if amount_minor <= 0 || amount_minor > crate::domain::payment::MAX_AMOUNT_MINOR {
        return Err(invalid("amountMinor out of range"));
    }
    if envelope.aggregateversion < 1 {
        return Err(invalid("aggregateversion must be positive"));
    }
    crate::domain::TenantId::parse(&envelope.tenantid)
        .map_err(|e| invalid(&format!("tenantid {e}")))?;
    crate::domain::PaymentId::parse(&payment_id).map_err(|e| invalid(&format!("paymentId {e}")))?;
    Ok(Interpreted::Change(PaymentChange {
        event_id: envelope.id,
        event_type,
        tenant_id: envelope.tenantid.clone(),
        payment_id,
        version: envelope.aggregateversion,
        amount_minor,
        currency: currency.to_string(),
        at,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope_json() -> serde_json::Value {
        serde_json::json!({
            "specversion": "1.0", "id": "01a20284-d84a-71be-b86d-648203e3519b", "source": "payments",
            "type": "payment.paid", "schemaversion": 1, "subject": "payment/pay_1",
            "time": "2026-11-22T10:00:00Z", "datacontenttype": "application/json", "tenantid": "acme",
            "aggregatetype": "payment", "aggregateid": "pay_1", "aggregateversion": 1,
            "correlationid": "c-1",
            "data": {"paymentId": "pay_1", "amountMinor": 1250, "currency": "EUR",
                     "verificationMethod": "card_3ds", "verifiedBy": "acs", "paidAt": "2026-11-22T10:00:00Z"}
        })
    }

    #[test]
    fn all_three_delivery_shapes_give_the_same_envelope() {
        let raw = envelope_json().to_string();
        let wrapped = serde_json::json!({"Type": "Notification", "MessageId": "m", "Message": raw})
            .to_string();
        let bridged =
            serde_json::json!({"version": "0", "detail-type": "payment.paid", "source": "payments",
            "detail": envelope_json()})
            .to_string();
        let expected = parse_delivery(&raw).unwrap();
        assert_eq!(parse_delivery(&wrapped).unwrap(), expected);
        assert_eq!(parse_delivery(&bridged).unwrap(), expected);
        match interpret(&expected).unwrap() {
            Interpreted::Change(c) => {
                assert_eq!(
                    (c.amount_minor, c.version, c.currency.as_str()),
                    (1250, 1, "EUR")
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn garbage_is_refused_with_a_reason() {
        assert!(matches!(
            parse_delivery("not json"),
            Err(DeliveryError::NotJson(_))
        ));
        assert_eq!(parse_delivery("{}"), Err(DeliveryError::UnknownShape));
        assert_eq!(parse_delivery("[1]"), Err(DeliveryError::UnknownShape));
        assert!(matches!(
            parse_delivery(r#"{"Type":"Notification","Message":"nope"}"#),
            Err(DeliveryError::BadNotification(_))
        ));
        let mut e = envelope_json();
        e["specversion"] = "0.3".into();
        assert!(matches!(
            parse_delivery(&e.to_string()),
            Err(DeliveryError::UnsupportedSpec(_))
        ));
        let mut e = envelope_json();
        e["id"] = "not-a-uuid".into();
        assert!(matches!(
            parse_delivery(&e.to_string()),
            Err(DeliveryError::InvalidEnvelope(_))
        ));
    }

    #[test]
    fn unknown_types_are_acknowledged_but_unknown_schema_versions_are_not() {
        let mut e = envelope_json();
        e["type"] = "payment.disputed".into();
        let envelope = parse_delivery(&e.to_string()).unwrap();
        assert_eq!(
            interpret(&envelope).unwrap(),
            Interpreted::UnknownType("payment.disputed".into())
        );
        let mut e = envelope_json();
        e["schemaversion"] = 2.into();
        let envelope = parse_delivery(&e.to_string()).unwrap();
        assert!(matches!(
            interpret(&envelope),
            Err(DeliveryError::UnsupportedSchema { version: 2, .. })
        ));
        let mut e = envelope_json();
        e["data"]["amountMinor"] = (-5).into();
        let envelope = parse_delivery(&e.to_string()).unwrap();
        assert!(matches!(
            interpret(&envelope),
            Err(DeliveryError::InvalidPayload { .. })
        ));
        let mut e = envelope_json();
        e["aggregateid"] = "pay_2".into();
        let envelope = parse_delivery(&e.to_string()).unwrap();
        assert!(matches!(
            interpret(&envelope),
            Err(DeliveryError::InvalidPayload { .. })
        ));
    }
}

/// Hostile queue messages, generated: parsing never panics, and whatever is accepted is valid.
/// 10,000 cases per property.
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

    fn json_leaf() -> impl Strategy<Value = serde_json::Value> {
        prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<f64>().prop_map(|f| serde_json::json!(f)),
            any::<String>().prop_map(serde_json::Value::from),
            Just(serde_json::Value::from("1.0")),
            Just(serde_json::Value::from("payment.paid")),
            Just(serde_json::Value::from(
                "01a20284-d84a-71be-b86d-648203e3519b"
            )),
        ]
    }

    /// Envelope-like objects: the real field names with random values, plus random members.
    fn envelope_like() -> impl Strategy<Value = String> {
        let names = prop_oneof![
            Just("specversion"),
            Just("id"),
            Just("type"),
            Just("schemaversion"),
            Just("tenantid"),
            Just("aggregateid"),
            Just("aggregateversion"),
            Just("data"),
            Just("time"),
            Just("Type"),
            Just("Message"),
            Just("detail"),
            Just("detail-type"),
        ];
        prop::collection::vec((names, json_leaf()), 0..14).prop_map(|members| {
            let map: serde_json::Map<String, serde_json::Value> = members
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect();
            serde_json::Value::Object(map).to_string()
        })
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn arbitrary_text_never_panics(body in ".{0,400}") {
            if let Ok(envelope) = parse_delivery(&body) {
                let _ = interpret(&envelope);
            }
        }

        #[test]
        fn envelope_like_objects_never_panic(body in envelope_like()) {
            if let Ok(envelope) = parse_delivery(&body) {
                prop_assert_eq!(envelope.specversion.as_str(), "1.0");
                let _ = interpret(&envelope);
            }
        }
    }

    /// A flaw that makes a paid envelope unacceptable, or none.
    #[derive(Debug, Clone, Copy)]
    enum Flaw {
        None,
        SpecVersion,
        Id,
        MissingId,
        Version,
        Amount,
        OtherPayment,
        SchemaVersion,
        Time,
    }

    /// A valid paid envelope with random values, spoiled by one flaw about half of the time:
    /// (tenant, payment, version, amount, currency, the flaw, the JSON).
    fn paid_envelope() -> impl Strategy<Value = (String, String, i64, i64, String, Flaw, String)> {
        let flaw = prop_oneof![
            8 => Just(Flaw::None),
            1 => Just(Flaw::SpecVersion),
            1 => Just(Flaw::Id),
            1 => Just(Flaw::MissingId),
            1 => Just(Flaw::Version),
            1 => Just(Flaw::Amount),
            1 => Just(Flaw::OtherPayment),
            1 => Just(Flaw::SchemaVersion),
            1 => Just(Flaw::Time),
        ];
        (
            "[a-z]{1,12}",
            "pay_[a-z0-9]{1,12}",
            1i64..1_000_000,
            1i64..1_000_000_000,
            prop::sample::select(vec!["EUR", "USD", "GBP", "JPY", "CHF"]),
            flaw,
            -1_000i64..=0,
        )
            .prop_map(|(tenant, payment, version, amount, currency, flaw, bad)| {
                let mut e = serde_json::json!({
                    "specversion": "1.0", "id": uuid::Uuid::new_v4(), "source": "payments",
                    "type": "payment.paid", "schemaversion": 1, "subject": format!("payment/{payment}"),
                    "time": "2026-11-22T10:00:00Z", "datacontenttype": "application/json",
                    "tenantid": tenant, "aggregatetype": "payment", "aggregateid": payment,
                    "aggregateversion": version, "correlationid": "c-1",
                    "data": {"paymentId": payment, "amountMinor": amount, "currency": currency,
                             "verificationMethod": "card_3ds", "verifiedBy": "acs",
                             "paidAt": "2026-11-22T10:00:00Z"}
                });
                match flaw {
                    Flaw::None => {}
                    Flaw::SpecVersion => e["specversion"] = "0.3".into(),
                    Flaw::Id => e["id"] = "not-a-uuid".into(),
                    Flaw::MissingId => {
                        e.as_object_mut().map(|o| o.remove("id"));
                    }
                    Flaw::Version => e["aggregateversion"] = bad.into(),
                    Flaw::Amount => e["data"]["amountMinor"] = bad.into(),
                    Flaw::OtherPayment => e["data"]["paymentId"] = "pay_someone_else".into(),
                    Flaw::SchemaVersion => e["schemaversion"] = 99.into(),
                    Flaw::Time => e["time"] = "yesterday".into(),
                }
                (tenant, payment, version, amount, currency.to_owned(), flaw, e.to_string())
            })
    }

    /// Valid envelopes are accepted with exactly their values, spoiled ones refused; the run
    /// must see plenty of both.
    #[test]
    fn paid_envelopes_are_accepted_exactly_when_valid() {
        let mut runner = proptest::test_runner::TestRunner::new(config());
        let (accepted, refused) = (std::cell::Cell::new(0), std::cell::Cell::new(0));
        runner
            .run(
                &paid_envelope(),
                |(tenant, payment, version, amount, currency, flaw, body)| {
                    let result = parse_delivery(&body).and_then(|e| interpret(&e));
                    match (flaw, result) {
                        (Flaw::None, Ok(Interpreted::Change(c))) => {
                            prop_assert_eq!(
                                (c.tenant_id.as_str(), c.payment_id.as_str(), c.version),
                                (tenant.as_str(), payment.as_str(), version)
                            );
                            prop_assert_eq!(
                                (c.amount_minor, c.currency.as_str()),
                                (amount, currency.as_str())
                            );
                            accepted.set(accepted.get() + 1);
                        }
                        (Flaw::None, other) => {
                            prop_assert!(false, "valid envelope refused: {other:?}")
                        }
                        (_, Ok(Interpreted::Change(c))) => {
                            prop_assert!(false, "{flaw:?} accepted: {c:?}")
                        }
                        (_, _) => refused.set(refused.get() + 1),
                    }
                    Ok(())
                },
            )
            .unwrap();
        let (accepted, refused) = (accepted.get(), refused.get());
        assert!(
            accepted > 3_000 && refused > 3_000,
            "accepted {accepted}, refused {refused}"
        );
    }
}
