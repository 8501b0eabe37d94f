//! The payment service's projection sink: the library's SQS sink ([`pg_outbox::sqs`]) applying
//! the payment projections ([`payments::projection::projections`]).

pub use pg_outbox::sqs::{handle, ProjectionSink, SinkReport, SERVICE};

/// Consumer name recorded in the inbox (`SINK_CONSUMER`, default `payment-projections`).
pub const DEFAULT_CONSUMER: &str = payments::projection::CONSUMER;
