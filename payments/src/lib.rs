//! The payment service: the outbox toolkit's first user, built only on its public API
//! ([`pg_outbox`]). A payment is marked paid, then refunded in parts; each command changes the
//! payment and appends its event in one transaction, idempotently; the sink keeps two read models.
//!
//! # Layout
//! - [`domain`]: identifiers, money, the pure rules deciding each command, the events they emit
//!   ([`domain::events`], each a [`pg_outbox::producer::OutboxEvent`]).
//! - [`ports`]: the commands as the store receives them, their receipts, the store's trait.
//! - [`store`]: [`store::PgPaymentStore`], one transaction per command through
//!   [`pg_outbox::producer::append_with_id`].
//! - [`migrate`]: its migrations (`migrations/payments/`), after the toolkit's.
//! - [`interpret`]: what a delivered payment event means to the projections.
//! - [`projection`]: the read models and [`projection::projections`], the one registry the SQS
//!   sink and `outboxctl nats consume` apply.

pub mod domain;
pub mod interpret;
pub mod migrate;
pub mod ports;
pub mod projection;
pub mod store;
