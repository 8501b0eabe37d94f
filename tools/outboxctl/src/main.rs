//! `outboxctl`: the outbox's admin command line. Connects with the same settings as the functions
//! (`DATABASE_URL`, `DATABASE_TLS`, `DATABASE_CA_FILE`).

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use std::time::{Duration, Instant};

use outbox_shared::aws::secrets::database_settings_from_env;
use outbox_shared::aws::{sdk_config, BusPublisher};
use outbox_shared::dispatcher::{DispatcherConfig, OutboxDispatcher, Target};
use outbox_shared::postgres::migrate::run_migrations;
use outbox_shared::postgres::outbox::PgOutboxStore;
use outbox_shared::postgres::Db;

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
    /// Drain the outbox now, as the dispatcher function does, with the same settings
    /// (`OUTBOX_TARGET`, `SNS_TOPIC_ARN` / `EVENT_BUS_NAME`, `DISPATCH_*`).
    Dispatch {
        /// Stop claiming after this many seconds even if rows are still due.
        #[arg(long, default_value_t = 60)]
        for_seconds: u64,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "outboxctl: {}",
                outbox_shared::telemetry::error_chain(e.as_ref())
            );
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    let settings = database_settings_from_env().await?;
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
        Command::Dispatch { for_seconds } => {
            let target = Target::from_env()?;
            let mut config = DispatcherConfig::from_env()?;
            config.safety_margin = Duration::ZERO;
            let publisher = BusPublisher::new(&sdk_config().await, &target);
            let store = PgOutboxStore::new(Db::new(settings));
            let worker = format!("outboxctl-{}", std::process::id());
            let dispatcher = OutboxDispatcher::new(store, publisher, config, worker);
            let summary = dispatcher
                .drain(Instant::now() + Duration::from_secs(for_seconds))
                .await?;
            println!("{}", serde_json::to_string(&summary)?);
        }
    }
    Ok(())
}
