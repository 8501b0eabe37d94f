//! The payment command function: `POST /payments/{paymentId}/paid` and
//! `POST /payments/{paymentId}/refunds` behind an HTTP API with a JWT authorizer. Each command
//! changes the payment and appends its event to the outbox in one transaction.

pub mod handler;
pub mod request;

pub use handler::{HandlerConfig, NoWake, PaymentCommandHandler};

/// Service name in the metrics' `Service` dimension.
pub const SERVICE: &str = "payment-command";
