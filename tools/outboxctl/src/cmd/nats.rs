//! `outboxctl nats`: its subcommands, one a file under `nats/`.

mod consume;
mod stream;

use clap::{Args, Subcommand};

/// NATS JetStream (`NATS_URL`, `NATS_CREDS_FILE`): create the outbox's stream, or apply the
/// payment projections from a durable consumer through the inbox.
#[derive(Args)]
pub struct Nats {
    #[command(subcommand)]
    action: NatsAction,
}

#[derive(Subcommand)]
enum NatsAction {
    Stream(stream::Stream),
    Consume(consume::Consume),
}

impl Nats {
    /// Runs the subcommand.
    pub async fn run(self) -> super::CliResult {
        match self.action {
            NatsAction::Stream(c) => c.run().await,
            NatsAction::Consume(c) => c.run().await,
        }
    }
}
