//! Payment rules as pure functions: `decide_*(state, command) -> decision`. The PostgreSQL
//! adapter loads the state under a row lock, asks these, and writes what they decide.

use std::fmt;
use std::str::FromStr;

use super::Currency;

/// Largest amount accepted, in minor units: keeps every sum the projections make far from `i64`
/// overflow (10^15 minor units is ten trillion in a two-decimal currency).
pub const MAX_AMOUNT_MINOR: i64 = 1_000_000_000_000_000;

/// Lifecycle of a payment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaymentStatus {
    /// Created, not paid yet.
    Pending,
    /// Paid, nothing refunded.
    Paid,
    /// Paid, part of the amount refunded.
    PartiallyRefunded,
    /// Paid, the whole amount refunded.
    Refunded,
}

impl PaymentStatus {
    /// The status as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Paid => "paid",
            Self::PartiallyRefunded => "partially_refunded",
            Self::Refunded => "refunded",
        }
    }

    /// Whether the payment has been paid (whatever was refunded since).
    pub fn is_paid(self) -> bool {
        !matches!(self, Self::Pending)
    }
}

impl fmt::Display for PaymentStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A stored status the code does not know.
#[derive(Debug, thiserror::Error)]
#[error("unknown payment status {0:?}")]
pub struct UnknownStatus(pub String);

impl FromStr for PaymentStatus {
    type Err = UnknownStatus;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "pending" => Ok(Self::Pending),
            "paid" => Ok(Self::Paid),
            "partially_refunded" => Ok(Self::PartiallyRefunded),
            "refunded" => Ok(Self::Refunded),
            other => Err(UnknownStatus(other.to_owned())),
        }
    }
}

/// How a payment was verified before it was marked paid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerificationMethod {
    /// Card payment authenticated with 3-D Secure.
    Card3ds,
    /// Card payment checked with the address verification service.
    CardAvs,
    /// Bank transfer matched on the statement.
    BankTransfer,
    /// Checked by a person.
    ManualReview,
}

impl VerificationMethod {
    /// Every accepted value, as written in requests (for error messages).
    pub const ALLOWED: &'static str = "card_3ds, card_avs, bank_transfer, manual_review";

    /// The method as written in requests and events.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Card3ds => "card_3ds",
            Self::CardAvs => "card_avs",
            Self::BankTransfer => "bank_transfer",
            Self::ManualReview => "manual_review",
        }
    }

    /// Parses a request value; `None` for anything else.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "card_3ds" => Some(Self::Card3ds),
            "card_avs" => Some(Self::CardAvs),
            "bank_transfer" => Some(Self::BankTransfer),
            "manual_review" => Some(Self::ManualReview),
            _ => None,
        }
    }
}

/// The state of one payment the rules need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentState {
    /// Current status.
    pub status: PaymentStatus,
    /// Amount, once known (set when paid; may be preset on a pending payment).
    pub amount_minor: Option<i64>,
    /// Currency, once known.
    pub currency: Option<Currency>,
    /// Total refunded so far.
    pub refunded_minor: i64,
    /// Aggregate version: number of events emitted so far.
    pub version: i64,
}

/// Command: mark the payment paid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MarkPaid {
    /// Amount paid, minor units, in `1..=MAX_AMOUNT_MINOR`.
    pub amount_minor: i64,
    /// Currency paid in.
    pub currency: Currency,
    /// How it was verified.
    pub verification_method: VerificationMethod,
    /// Who verified it.
    pub verified_by: String,
}

/// What marking a payment paid should do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MarkPaidDecision {
    /// Mark it paid and emit `payment.paid` at this aggregate version.
    Pay {
        /// Version of the payment after the event.
        new_version: i64,
    },
    /// Already paid with the same amount and currency: a replay, return the original result.
    AlreadyPaid,
    /// Already paid (or preset) with another amount or currency.
    Conflict,
}

/// The version of a payment created by the paid command (a payment that did not exist is always
/// paid).
pub const fn first_version() -> i64 {
    1
}

/// Decides the paid command. `None` is a payment that does not exist yet.
pub fn decide_mark_paid(state: Option<&PaymentState>, cmd: &MarkPaid) -> MarkPaidDecision {
    let Some(state) = state else {
        return MarkPaidDecision::Pay {
            new_version: first_version(),
        };
    };
    let same_amount = state.amount_minor.is_none_or(|a| a == cmd.amount_minor)
        && state.currency.is_none_or(|c| c == cmd.currency);
    match (state.status.is_paid(), same_amount) {
        (_, false) => MarkPaidDecision::Conflict,
        (true, true) => MarkPaidDecision::AlreadyPaid,
        (false, true) => MarkPaidDecision::Pay {
            new_version: state.version + 1,
        },
    }
}

/// Command: refund part or all of a paid payment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordRefund {
    /// Amount to refund, minor units, in `1..=MAX_AMOUNT_MINOR`.
    pub amount_minor: i64,
}

/// What a refund should do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefundDecision {
    /// Record it and emit `payment.refunded`.
    Refund {
        /// Version of the payment after the event.
        new_version: i64,
        /// Refunded total after this refund.
        refunded_total_minor: i64,
        /// What can still be refunded after this refund.
        remaining_minor: i64,
        /// Status after this refund.
        new_status: PaymentStatus,
        /// The payment's currency.
        currency: Currency,
    },
    /// The payment is not paid: nothing to refund.
    NotPaid,
    /// The refund is larger than what remains refundable.
    ExceedsRemaining {
        /// What can still be refunded.
        remaining_minor: i64,
    },
}

/// Decides the refund command against the payment's current state.
pub fn decide_refund(state: &PaymentState, cmd: &RecordRefund) -> RefundDecision {
    let (Some(amount), Some(currency), true) =
        (state.amount_minor, state.currency, state.status.is_paid())
    else {
        return RefundDecision::NotPaid;
    };
    let remaining = amount - state.refunded_minor;
    if cmd.amount_minor > remaining {
        return RefundDecision::ExceedsRemaining {
            remaining_minor: remaining,
        };
    }
    let refunded_total = state.refunded_minor + cmd.amount_minor;
    RefundDecision::Refund {
        new_version: state.version + 1,
        refunded_total_minor: refunded_total,
        remaining_minor: amount - refunded_total,
        new_status: if refunded_total == amount {
            PaymentStatus::Refunded
        } else {
            PaymentStatus::PartiallyRefunded
        },
        currency,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eur() -> Currency {
        Currency::parse("EUR").unwrap()
    }

    fn pay(amount: i64) -> MarkPaid {
        MarkPaid {
            amount_minor: amount,
            currency: eur(),
            verification_method: VerificationMethod::Card3ds,
            verified_by: "acs".into(),
        }
    }

    fn paid(amount: i64, refunded: i64, version: i64) -> PaymentState {
        PaymentState {
            status: if refunded == 0 {
                PaymentStatus::Paid
            } else {
                PaymentStatus::PartiallyRefunded
            },
            amount_minor: Some(amount),
            currency: Some(eur()),
            refunded_minor: refunded,
            version,
        }
    }

    #[test]
    fn a_new_payment_is_paid_at_version_one() {
        assert_eq!(
            decide_mark_paid(None, &pay(100)),
            MarkPaidDecision::Pay { new_version: 1 }
        );
    }

    #[test]
    fn a_pending_payment_is_paid_at_the_next_version() {
        let pending = PaymentState {
            status: PaymentStatus::Pending,
            amount_minor: None,
            currency: None,
            refunded_minor: 0,
            version: 2,
        };
        assert_eq!(
            decide_mark_paid(Some(&pending), &pay(100)),
            MarkPaidDecision::Pay { new_version: 3 }
        );
        let preset = PaymentState {
            amount_minor: Some(50),
            ..pending
        };
        assert_eq!(
            decide_mark_paid(Some(&preset), &pay(100)),
            MarkPaidDecision::Conflict
        );
    }

    #[test]
    fn paying_again_is_a_replay_only_with_the_same_amount_and_currency() {
        let state = paid(100, 0, 1);
        assert_eq!(
            decide_mark_paid(Some(&state), &pay(100)),
            MarkPaidDecision::AlreadyPaid
        );
        assert_eq!(
            decide_mark_paid(Some(&state), &pay(101)),
            MarkPaidDecision::Conflict
        );
        let usd = MarkPaid {
            currency: Currency::parse("USD").unwrap(),
            ..pay(100)
        };
        assert_eq!(
            decide_mark_paid(Some(&state), &usd),
            MarkPaidDecision::Conflict
        );
        // A refunded payment paid again with the same figures is still a replay, not a new event.
        assert_eq!(
            decide_mark_paid(Some(&paid(100, 40, 2)), &pay(100)),
            MarkPaidDecision::AlreadyPaid
        );
    }

    #[test]
    fn refunds_never_exceed_the_paid_amount() {
        let state = paid(100, 60, 2);
        assert_eq!(
            decide_refund(&state, &RecordRefund { amount_minor: 41 }),
            RefundDecision::ExceedsRemaining {
                remaining_minor: 40
            }
        );
        assert_eq!(
            decide_refund(&state, &RecordRefund { amount_minor: 40 }),
            RefundDecision::Refund {
                new_version: 3,
                refunded_total_minor: 100,
                remaining_minor: 0,
                new_status: PaymentStatus::Refunded,
                currency: eur(),
            }
        );
        assert_eq!(
            decide_refund(&paid(100, 0, 1), &RecordRefund { amount_minor: 1 }),
            RefundDecision::Refund {
                new_version: 2,
                refunded_total_minor: 1,
                remaining_minor: 99,
                new_status: PaymentStatus::PartiallyRefunded,
                currency: eur(),
            }
        );
    }

    #[test]
    fn an_unpaid_payment_cannot_be_refunded() {
        let pending = PaymentState {
            status: PaymentStatus::Pending,
            amount_minor: Some(100),
            currency: Some(eur()),
            refunded_minor: 0,
            version: 0,
        };
        assert_eq!(
            decide_refund(&pending, &RecordRefund { amount_minor: 1 }),
            RefundDecision::NotPaid
        );
    }

    #[test]
    fn status_round_trips_through_its_stored_form() {
        for s in [
            PaymentStatus::Pending,
            PaymentStatus::Paid,
            PaymentStatus::PartiallyRefunded,
            PaymentStatus::Refunded,
        ] {
            assert_eq!(s.as_str().parse::<PaymentStatus>().unwrap(), s);
        }
        assert!("PAID".parse::<PaymentStatus>().is_err());
    }
}
