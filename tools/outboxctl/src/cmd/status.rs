//! `outboxctl status`.

use clap::Args;

use pg_outbox::postgres::admin;

use crate::render;

/// Counts by status and tenant, the oldest pending event, parked aggregates, last errors.
#[derive(Args)]
pub struct Status {
    /// Only this tenant.
    #[arg(long)]
    tenant: Option<String>,
    /// Rows in the parked and last-error lists.
    #[arg(long, default_value_t = 10)]
    limit: i64,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
}

impl Status {
    /// Reads the status and prints it.
    pub async fn run(self) -> super::CliResult {
        let client = super::admin_connection().await?;
        let limit = self.limit.clamp(1, 1_000);
        let report = admin::status(&client, self.tenant.as_deref(), limit).await?;
        if self.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            print!("{}", render::status(&report));
        }
        Ok(())
    }
}
