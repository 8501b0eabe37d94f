//! Event payloads the payment aggregate emits. Each has a type name and a schema version; a
//! change that breaks readers gets a new version, never an in-place edit.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::Currency;

/// Aggregate type of every payment event.
pub const PAYMENT_AGGREGATE: &str = "payment";

/// `payment.paid`: a payment was marked paid (emitted once per payment).
pub const PAYMENT_PAID: &str = "payment.paid";
/// `payment.refunded`: a (partial) refund was recorded against a paid payment.
pub const PAYMENT_REFUNDED: &str = "payment.refunded";

/// Payload of `payment.paid`, schema version 1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentPaidV1 {
    /// The payment.
    pub payment_id: String,
    /// Amount paid, in minor units of `currency`.
    pub amount_minor: i64,
    /// ISO 4217 currency.
    pub currency: Currency,
    /// How the payment was verified.
    pub verification_method: String,
    /// Who or what verified it.
    pub verified_by: String,
    /// When it was marked paid.
    pub paid_at: DateTime<Utc>,
}

impl PaymentPaidV1 {
    /// Schema version of this payload.
    pub const SCHEMA_VERSION: i32 = 1;
}

/// Payload of `payment.refunded`, schema version 1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentRefundedV1 {
    /// The payment.
    pub payment_id: String,
    /// The refund.
    pub refund_id: uuid::Uuid,
    /// Amount of this refund, in minor units of `currency`.
    pub amount_minor: i64,
    /// ISO 4217 currency (the payment's).
    pub currency: Currency,
    /// Total refunded on the payment including this refund.
    pub refunded_total_minor: i64,
    /// What can still be refunded.
    pub remaining_minor: i64,
    /// When the refund was recorded.
    pub refunded_at: DateTime<Utc>,
}

impl PaymentRefundedV1 {
    /// Schema version of this payload.
    pub const SCHEMA_VERSION: i32 = 1;
}
