//! The payment domain: validated identifiers, money, the pure rules that turn a command and the
//! current state into a decision, and the event payloads those decisions emit. No I/O here.

pub mod currency;
pub mod events;
pub mod payment;

pub use currency::Currency;
pub use pg_outbox::ids::{IdError, IdempotencyKey, TenantId};

pg_outbox::slug_id!(
    /// A payment's identifier, unique within its tenant.
    PaymentId,
    64
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payment_ids_are_slugs() {
        assert_eq!(
            PaymentId::parse("pay_01H-x.9").unwrap().as_str(),
            "pay_01H-x.9"
        );
        assert_eq!(PaymentId::parse(""), Err(IdError::Empty));
        for bad in [
            "a b",
            "x'; DROP TABLE payments;--",
            "a/b",
            "é",
            "💳",
            &"p".repeat(65),
        ] {
            assert!(PaymentId::parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
