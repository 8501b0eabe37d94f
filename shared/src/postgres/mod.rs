//! PostgreSQL adapters: connection settings and the one connection a Lambda instance keeps,
//! migrations, and the SQL behind each port (one module per table).

pub mod admin;
mod connection;
pub mod feed;
pub mod migrate;
pub mod outbox;
pub mod projections;
pub mod wake;

pub use connection::{
    Connection, ConnectionLimits, CredentialSource, DatabaseSettings, Db, DbError, TlsMode,
};
