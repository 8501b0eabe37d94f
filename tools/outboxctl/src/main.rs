//! `outboxctl`: the outbox's admin command line. Connects with the same settings as the functions
//! (`DATABASE_URL`, `DATABASE_TLS`, `DATABASE_CA_FILE`).

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use outbox_shared::postgres::migrate::run_migrations;
use outbox_shared::postgres::DatabaseSettings;

#[derive(Parser)]
#[command(
    name = "outboxctl",
    version,
    about = "Administer the transactional outbox"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply the schema migrations that have not been applied yet (safe to run again).
    Migrate,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprint!("outboxctl: {e}");
            let mut source = e.source();
            while let Some(s) = source {
                eprint!(": {s}");
                source = s.source();
            }
            eprintln!();
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    let settings = DatabaseSettings::from_env()?;
    match cli.command {
        Command::Migrate => {
            let mut client = settings.connect().await?;
            let applied = run_migrations(&mut client).await?;
            if applied.is_empty() {
                println!("schema is up to date");
            } else {
                for name in applied {
                    println!("applied {name}");
                }
            }
        }
    }
    Ok(())
}
