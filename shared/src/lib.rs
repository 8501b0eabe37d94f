//! Shared library of the outbox functions: the pure domain, the ports the functions depend on, and
//! the PostgreSQL adapters that implement them.
//!
//! Layout:
//! - [`domain`]: payment rules and event payloads, no I/O.
//! - [`outbox`]: the outbox event as written by a command (envelope fields and metadata).
//! - [`ports`]: the narrow traits each Lambda asks for.
//! - [`postgres`]: connection handling, migrations and the SQL behind the ports.
//! - [`aws`]: SDK configuration and the SNS / EventBridge publishers.
//! - [`nats`]: the NATS JetStream publisher, and a JetStream consumer for the inbox.
//! - [`dispatcher`]: the claim → publish → record loop, in named parts.
//! - [`memory`]: the outbox store and the bus in memory, for the dispatcher's unit tests.
//! - [`envelope`]: the message format every bus carries.
//! - [`feed`]: the events feed clients pull, with per-consumer acknowledgments.
//! - [`producer`]: appending a service's own typed events in its own transaction.
//! - [`consumer`]: projections plugged into the inbox, registered by the sink.
//! - [`sink`]: reading delivered messages back into envelopes and payment changes.
//! - [`metrics`]: CloudWatch metrics as Embedded Metric Format log lines.
//! - [`failure`]: the classes of function failures an operator sees (`errorType`).
//! - [`config`], [`telemetry`]: read once at cold start.

pub mod aws;
pub mod config;
pub mod consumer;
pub mod dispatcher;
pub mod domain;
pub mod envelope;
pub mod failure;
pub mod feed;
pub mod memory;
pub mod metrics;
pub mod nats;
pub mod outbox;
pub mod ports;
pub mod postgres;
pub mod producer;
pub mod sink;
pub mod telemetry;
