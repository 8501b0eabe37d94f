//! `outboxctl`: the outbox's admin command line. Connects with the same settings as the functions
//! (`DATABASE_URL` or `DATABASE_SECRET_ARN`, `DATABASE_TLS`, `DATABASE_CA_FILE`).
//!
//! # Layout
//! - `main.rs`: the command line (`Cli`, one `Command` variant per subcommand) and `main`.
//! - `args.rs`: options several subcommands share (the event selection, `--yes`/`--json`) and
//!   the parsers of times, durations, aggregates and shares.
//! - `confirm.rs`: showing what a destructive command would change and asking before it does.
//! - `render.rs`: human-readable output (tables, the status page).
//! - `cmd/mod.rs`: the database connection every subcommand opens.
//! - `cmd/migrate.rs`, `cmd/dispatch.rs`, `cmd/status.rs`, `cmd/redrive.rs`, `cmd/discard.rs`,
//!   `cmd/replay.rs`, `cmd/cleanup.rs`, `cmd/capture.rs`, `cmd/tenants.rs`: one subcommand each, its options and
//!   its `run`.
//! - `cmd/requeue.rs`: what `redrive` and `replay` share (preview, confirm, requeue, report).
//! - `cmd/nats.rs`, `cmd/nats/stream.rs`, `cmd/nats/consume.rs`: `nats` and its subcommands.

mod args;
mod cmd;
mod confirm;
mod render;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "outboxctl",
    version,
    about = "Administer the transactional outbox",
    after_help = "Destructive commands (redrive, discard, replay, cleanup) show what they would change and \
                  ask for confirmation; --yes skips the question (required when not on a terminal)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Migrate(cmd::migrate::Migrate),
    Dispatch(cmd::dispatch::Dispatch),
    Status(cmd::status::Status),
    Redrive(cmd::redrive::Redrive),
    Discard(cmd::discard::Discard),
    Replay(cmd::replay::Replay),
    Cleanup(cmd::cleanup::Cleanup),
    Capture(cmd::capture::Capture),
    Tenants(cmd::tenants::Tenants),
    Nats(cmd::nats::Nats),
}

impl Command {
    async fn run(self) -> cmd::CliResult {
        match self {
            Self::Migrate(c) => c.run().await,
            Self::Dispatch(c) => c.run().await,
            Self::Status(c) => c.run().await,
            Self::Redrive(c) => c.run().await,
            Self::Discard(c) => c.run().await,
            Self::Replay(c) => c.run().await,
            Self::Cleanup(c) => c.run().await,
            Self::Capture(c) => c.run().await,
            Self::Tenants(c) => c.run().await,
            Self::Nats(c) => c.run().await,
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "outboxctl: {}",
                pg_outbox::telemetry::error_chain(e.as_ref())
            );
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_cli_definition_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
