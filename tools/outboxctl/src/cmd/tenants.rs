//! `outboxctl tenants`: tenants' weights, caps and pauses in the claim.

use clap::{Args, Subcommand};

use pg_outbox::postgres::admin::tenants::{self, LimitsChange, TenantLimits};

use crate::render;

/// Tenants' part of each claim (weight), their cap (events a second to the bus, over every
/// dispatcher) and pause. A tenant without settings has weight 1, no cap, and is not paused.
/// Operators' replays are not limited.
#[derive(Args)]
pub struct Tenants {
    #[command(subcommand)]
    command: TenantsCommand,
}

#[derive(Subcommand)]
enum TenantsCommand {
    /// The tenants with settings.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Set a tenant's weight or cap (what is not given is kept).
    Set {
        tenant: String,
        /// Its part of each claim against the others' (1 to 1000; 1 by default).
        #[arg(long, allow_negative_numbers = true)]
        weight: Option<i32>,
        /// At most this many of its events a second to the bus (at least 1).
        #[arg(long, conflicts_with = "no_cap", allow_negative_numbers = true)]
        max_per_second: Option<i32>,
        /// Remove its cap.
        #[arg(long)]
        no_cap: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Hold a tenant's events back: they stay pending, in order, until `resume` (events
    /// already claimed still go).
    Pause {
        tenant: String,
        #[arg(long)]
        json: bool,
    },
    /// Let a paused tenant's events go again, in order.
    Resume {
        tenant: String,
        #[arg(long)]
        json: bool,
    },
    /// Remove a tenant's settings: weight 1, no cap, not paused.
    Clear { tenant: String },
}

impl Tenants {
    /// Runs the subcommand and prints the tenant's settings after it.
    pub async fn run(self) -> super::CliResult {
        let (tenant, change, json) = match self.command {
            TenantsCommand::List { json } => {
                let client = super::admin_connection().await?;
                let rows = tenants::list(&client).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&rows)?);
                } else if rows.is_empty() {
                    println!("no tenant has settings: every tenant has weight 1, no cap");
                } else {
                    print!("{}", table(&rows));
                }
                return Ok(());
            }
            TenantsCommand::Clear { tenant } => {
                let client = super::admin_connection().await?;
                if tenants::clear(&client, &tenant).await? {
                    println!("{tenant}: settings removed (weight 1, no cap, not paused)");
                } else {
                    println!("{tenant}: had no settings (weight 1, no cap, not paused)");
                }
                return Ok(());
            }
            TenantsCommand::Set {
                tenant,
                weight,
                max_per_second,
                no_cap,
                json,
            } => {
                let cap = if no_cap {
                    Some(None)
                } else {
                    max_per_second.map(Some)
                };
                let change = LimitsChange {
                    weight,
                    max_per_second: cap,
                    paused: None,
                };
                (tenant, change, json)
            }
            TenantsCommand::Pause { tenant, json } => (tenant, paused(true), json),
            TenantsCommand::Resume { tenant, json } => (tenant, paused(false), json),
        };
        change.validate(&tenant)?;
        let client = super::admin_connection().await?;
        let row = tenants::set(&client, &tenant, &change).await?;
        if json {
            println!("{}", serde_json::to_string_pretty(&row)?);
        } else {
            print!("{}", table(std::slice::from_ref(&row)));
        }
        Ok(())
    }
}

fn paused(paused: bool) -> LimitsChange {
    LimitsChange {
        paused: Some(paused),
        ..LimitsChange::default()
    }
}

fn table(rows: &[TenantLimits]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.tenant_id.clone(),
                r.weight.to_string(),
                r.max_per_second
                    .map_or_else(|| "-".to_owned(), |c| c.to_string()),
                if r.paused { "paused" } else { "-" }.to_owned(),
                r.updated_at
                    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            ]
        })
        .collect();
    render::table(&["TENANT", "WEIGHT", "MAX/S", "PAUSED", "CHANGED"], &rows)
}
