//! Ports of the payment service: the commands as its store receives them, their receipts and
//! outcomes, and the store the command handler needs.

use std::future::Future;

use chrono::{DateTime, Utc};
use pg_outbox::outbox::EventMetadata;
use pg_outbox::ports::{StoreError, WakeDecision};
use serde::Serialize;
use uuid::Uuid;

use crate::domain::payment::{MarkPaid, PaymentStatus, RecordRefund};
use crate::domain::{Currency, IdempotencyKey, PaymentId, TenantId};

/// The paid command as the store receives it.
#[derive(Debug, Clone)]
pub struct MarkPaidCommand {
    /// Tenant, from the verified JWT.
    pub tenant_id: TenantId,
    /// Payment to mark paid.
    pub payment_id: PaymentId,
    /// What was paid.
    pub command: MarkPaid,
    /// Correlation and trace context for the event.
    pub metadata: EventMetadata,
}

/// The result of marking a payment paid, identical for the original command and every replay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PaidReceipt {
    /// The payment.
    pub payment_id: String,
    /// Always `paid`: the status this command produced.
    pub status: &'static str,
    /// Amount paid, minor units.
    pub amount_minor: i64,
    /// Currency.
    pub currency: Currency,
    /// When it was marked paid.
    pub paid_at: DateTime<Utc>,
    /// The `payment.paid` event written to the outbox.
    pub event_id: Uuid,
}

/// Outcome of the paid command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MarkPaidOutcome {
    /// Marked paid now; one event written.
    Paid(PaidReceipt),
    /// It was already paid with the same amount and currency; nothing written.
    Replayed(PaidReceipt),
    /// It was already paid (or preset) with a different amount or currency; nothing written.
    Conflict,
}

/// The refund command as the store receives it.
#[derive(Debug, Clone)]
pub struct RefundCommand {
    /// Tenant, from the verified JWT.
    pub tenant_id: TenantId,
    /// Payment to refund.
    pub payment_id: PaymentId,
    /// The client's `Idempotency-Key`.
    pub idempotency_key: IdempotencyKey,
    /// What to refund.
    pub command: RecordRefund,
    /// Correlation and trace context for the event.
    pub metadata: EventMetadata,
}

/// The result of a refund, identical for the original command and every replay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RefundReceipt {
    /// The refund.
    pub refund_id: Uuid,
    /// The payment.
    pub payment_id: String,
    /// Amount of this refund.
    pub amount_minor: i64,
    /// Currency.
    pub currency: Currency,
    /// Refunded total right after this refund.
    pub refunded_total_minor: i64,
    /// Refundable remainder right after this refund.
    pub remaining_minor: i64,
    /// Payment status right after this refund.
    pub payment_status: &'static str,
    /// The `payment.refunded` event written to the outbox.
    pub event_id: Uuid,
    /// When it was recorded.
    pub created_at: DateTime<Utc>,
}

/// Outcome of the refund command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefundOutcome {
    /// Recorded now; one event written.
    Refunded(RefundReceipt),
    /// The same key was used before for the same payment and amount; nothing written.
    Replayed(RefundReceipt),
    /// No such payment for this tenant.
    PaymentNotFound,
    /// The payment is not paid.
    NotRefundable {
        /// Its status.
        status: PaymentStatus,
    },
    /// More than what remains refundable.
    ExceedsRemaining {
        /// What can still be refunded.
        remaining_minor: i64,
    },
    /// The key was used before for another payment or amount.
    IdempotencyKeyReused,
}

/// What the payment command handler needs from storage: each call is one atomic transaction that
/// writes the state change and its outbox event, or nothing.
pub trait PaymentCommandStore: Send + Sync {
    /// Marks a payment paid (creating it if unknown) and appends `payment.paid`.
    fn mark_paid(
        &self,
        cmd: MarkPaidCommand,
    ) -> impl Future<Output = Result<MarkPaidOutcome, StoreError>> + Send;

    /// Records a refund of a paid payment and appends `payment.refunded`.
    fn record_refund(
        &self,
        cmd: RefundCommand,
    ) -> impl Future<Output = Result<RefundOutcome, StoreError>> + Send;

    /// After a commit: whether to wake the dispatcher, at most once per `debounce` across all
    /// callers, and never while a dispatcher says (by its heartbeat) that it is draining.
    fn request_wake(
        &self,
        debounce: std::time::Duration,
    ) -> impl Future<Output = Result<WakeDecision, StoreError>> + Send;
}
