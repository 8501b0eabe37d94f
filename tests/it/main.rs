//! Integration tests: one binary, each test on a database of its own on the local PostgreSQL.

mod append_all;
mod capture;
mod chaos;
mod claim_check;
mod contracts;
mod delayed;
mod dispatcher;
mod extending;
mod fairness;
mod feed;
mod function_errors;
mod inbox;
mod migrations;
mod nats;
mod operations;
mod order;
mod order_model;
mod order_operations;
mod payment_command;
mod resilience;
mod sample_events;
mod secrets;
mod sink;
mod statements;
mod tls;
mod trace;
