//! `outboxctl migrate`.

use clap::Args;

use payments::migrate::run_migrations;

/// Apply the schema migrations that have not been applied yet (safe to run again).
#[derive(Args)]
pub struct Migrate {}

impl Migrate {
    /// Applies them, and prints each one applied.
    pub async fn run(self) -> super::CliResult {
        let mut client = super::admin_connection().await?;
        let applied = run_migrations(&mut client).await?;
        if applied.is_empty() {
            println!("schema is up to date");
        } else {
            for name in applied {
                println!("applied {name}");
            }
        }
        Ok(())
    }
}
