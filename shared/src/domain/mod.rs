//! The payment domain: validated identifiers, money, the pure rules that turn a command and the
//! current state into a decision, and the event payloads those decisions emit. No I/O here.

pub mod currency;
pub mod events;
pub mod ids;
pub mod payment;

pub use currency::Currency;
pub use ids::{IdError, IdempotencyKey, PaymentId, TenantId};
