//! Event payloads the payment aggregate emits. Each has a type name and a schema version; a
//! change that breaks readers gets a new version, never an in-place edit.

use chrono::{DateTime, Utc};
use pg_outbox::contract::{Contract, JsonSchema};
use serde::{Deserialize, Serialize};

use super::Currency;

/// Aggregate type of every payment event.
pub const PAYMENT_AGGREGATE: &str = "payment";

/// `payment.paid`: a payment was marked paid (emitted once per payment).
pub const PAYMENT_PAID: &str = "payment.paid";
/// `payment.refunded`: a (partial) refund was recorded against a paid payment.
pub const PAYMENT_REFUNDED: &str = "payment.refunded";

/// A payment id as events carry it: the path's `paymentId`, a slug.
const PAYMENT_ID_PATTERN: &str = "^[A-Za-z0-9._-]{1,64}$";

/// The schemas of every payment event's `data` (`schemas/`, checked by the tests).
pub fn contracts() -> Vec<Contract> {
    vec![
        Contract::of::<PaymentPaidV1>(PAYMENT_PAID, PaymentPaidV1::SCHEMA_VERSION),
        Contract::of::<PaymentRefundedV1>(PAYMENT_REFUNDED, PaymentRefundedV1::SCHEMA_VERSION),
    ]
}

/// Payload of `payment.paid`, schema version 1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("additionalProperties" = false))]
pub struct PaymentPaidV1 {
    /// The payment (the event's aggregate id).
    #[schemars(regex(pattern = PAYMENT_ID_PATTERN))]
    pub payment_id: String,
    /// Amount paid, in minor units of `currency`.
    #[schemars(range(min = 1, max = super::payment::MAX_AMOUNT_MINOR))]
    pub amount_minor: i64,
    /// ISO 4217 currency.
    pub currency: Currency,
    /// How the payment was verified.
    #[schemars(extend("enum" = ["card_3ds", "card_avs", "bank_transfer", "manual_review"]))]
    pub verification_method: String,
    /// Who or what verified it.
    #[schemars(length(min = 1, max = 128))]
    pub verified_by: String,
    /// When it was marked paid.
    pub paid_at: DateTime<Utc>,
}

impl PaymentPaidV1 {
    /// Schema version of this payload.
    pub const SCHEMA_VERSION: i32 = 1;
}

/// Payload of `payment.refunded`, schema version 1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("additionalProperties" = false))]
pub struct PaymentRefundedV1 {
    /// The payment (the event's aggregate id).
    #[schemars(regex(pattern = PAYMENT_ID_PATTERN))]
    pub payment_id: String,
    /// The refund.
    pub refund_id: uuid::Uuid,
    /// Amount of this refund, in minor units of `currency`.
    #[schemars(range(min = 1, max = super::payment::MAX_AMOUNT_MINOR))]
    pub amount_minor: i64,
    /// ISO 4217 currency (the payment's).
    pub currency: Currency,
    /// Total refunded on the payment including this refund.
    #[schemars(range(min = 1, max = super::payment::MAX_AMOUNT_MINOR))]
    pub refunded_total_minor: i64,
    /// What can still be refunded.
    #[schemars(range(min = 0, max = super::payment::MAX_AMOUNT_MINOR))]
    pub remaining_minor: i64,
    /// When the refund was recorded.
    pub refunded_at: DateTime<Utc>,
}

impl PaymentRefundedV1 {
    /// Schema version of this payload.
    pub const SCHEMA_VERSION: i32 = 1;
}

/// A payment event as the outbox stores it: its payload, the tenant it belongs to, and the key
/// that refuses a second append of the same fact. Serializes as the payload alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentEvent<P> {
    /// Owning tenant.
    pub tenant_id: String,
    /// Unique per tenant: `payment-paid-<payment>` or `payment-refunded-<Idempotency-Key>`.
    pub idempotency_key: String,
    /// The payload.
    pub payload: P,
}

impl<P: Serialize> Serialize for PaymentEvent<P> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.payload.serialize(serializer)
    }
}

/// What a payment event payload says of itself.
pub trait PaymentPayload: Serialize + Sync {
    /// Its event type.
    const EVENT_TYPE: &'static str;
    /// Its schema version.
    const SCHEMA_VERSION: i32;
    /// The payment it is about.
    fn payment_id(&self) -> &str;
}

impl PaymentPayload for PaymentPaidV1 {
    const EVENT_TYPE: &'static str = PAYMENT_PAID;
    const SCHEMA_VERSION: i32 = PaymentPaidV1::SCHEMA_VERSION;
    fn payment_id(&self) -> &str {
        &self.payment_id
    }
}

impl PaymentPayload for PaymentRefundedV1 {
    const EVENT_TYPE: &'static str = PAYMENT_REFUNDED;
    const SCHEMA_VERSION: i32 = PaymentRefundedV1::SCHEMA_VERSION;
    fn payment_id(&self) -> &str {
        &self.payment_id
    }
}

impl<P: PaymentPayload> pg_outbox::producer::OutboxEvent for PaymentEvent<P> {
    const EVENT_TYPE: &'static str = P::EVENT_TYPE;
    const SCHEMA_VERSION: i32 = P::SCHEMA_VERSION;
    const AGGREGATE_TYPE: &'static str = PAYMENT_AGGREGATE;
    fn tenant_id(&self) -> &str {
        &self.tenant_id
    }
    fn aggregate_id(&self) -> &str {
        self.payload.payment_id()
    }
    fn idempotency_key(&self) -> Option<&str> {
        Some(&self.idempotency_key)
    }
}

impl PaymentPaidV1 {
    /// The `payment.paid` event of `payment`, paid by `cmd` at `paid_at`: one per payment.
    pub fn event(
        tenant: &super::TenantId,
        payment: &super::PaymentId,
        cmd: &super::payment::MarkPaid,
        paid_at: DateTime<Utc>,
    ) -> PaymentEvent<Self> {
        PaymentEvent {
            tenant_id: tenant.as_str().to_owned(),
            idempotency_key: format!("payment-paid-{payment}"),
            payload: Self {
                payment_id: payment.as_str().to_owned(),
                amount_minor: cmd.amount_minor,
                currency: cmd.currency,
                verification_method: cmd.verification_method.as_str().to_owned(),
                verified_by: cmd.verified_by.clone(),
                paid_at,
            },
        }
    }
}

impl PaymentRefundedV1 {
    /// The `payment.refunded` event of a refund recorded under the client's `key`.
    pub fn event(
        tenant: &super::TenantId,
        key: &super::IdempotencyKey,
        payload: Self,
    ) -> PaymentEvent<Self> {
        PaymentEvent {
            tenant_id: tenant.as_str().to_owned(),
            idempotency_key: format!("payment-refunded-{}", key.as_str()),
            payload,
        }
    }
}
