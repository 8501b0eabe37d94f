//! The subcommands, one a file, each with its options and its `run`; and the database
//! connection they open.

pub mod capture;
pub mod cleanup;
pub mod discard;
pub mod dispatch;
pub mod migrate;
pub mod nats;
pub mod redrive;
pub mod replay;
mod requeue;
pub mod status;
pub mod tenants;

use pg_outbox::aws::secrets::database_from_env;
use pg_outbox::postgres::{Connection, ConnectionLimits, Db};

/// What a subcommand's `run` returns: its error is printed, and the exit code is 1.
pub type CliResult = Result<(), Box<dyn std::error::Error>>;

/// The database, with the functions' settings; credentials are re-read when the database refuses
/// them, as in the functions.
async fn database() -> Result<Db, Box<dyn std::error::Error>> {
    Ok(database_from_env().await?)
}

/// A connection for administrative statements (a migration, a long cleanup), which may run for
/// long: no server-side statement timeout for them.
async fn admin_connection() -> Result<Connection, Box<dyn std::error::Error>> {
    let db = database().await?;
    let limits = ConnectionLimits {
        statement_timeout: None,
        ..db.limits()
    };
    Ok(db.with_limits(limits).client().await?)
}
