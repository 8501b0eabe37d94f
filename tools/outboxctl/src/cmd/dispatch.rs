//! `outboxctl dispatch`.

use std::time::{Duration, Instant};

use clap::Args;

use pg_outbox::aws::{sdk_config, BusPublisher};
use pg_outbox::dispatcher::{DispatcherConfig, OutboxDispatcher, Target};
use pg_outbox::postgres::outbox::PgOutboxStore;

/// Drain the outbox now, as the dispatcher function does, with the same settings
/// (`OUTBOX_TARGET`, `SNS_TOPIC_ARN` / `EVENT_BUS_NAME` / `NATS_*`, `DISPATCH_*`). With
/// `DISPATCH_IDLE_POLL_MS` set it keeps polling until the time is up: a long-running relay
/// next to NATS.
#[derive(Args)]
pub struct Dispatch {
    /// Stop claiming after this many seconds even if rows are still due.
    #[arg(long, default_value_t = 60)]
    for_seconds: u64,
}

impl Dispatch {
    /// Drains, and prints the drain's summary as JSON.
    pub async fn run(self) -> super::CliResult {
        let db = super::database().await?;
        let target = Target::from_env()?;
        let mut config = DispatcherConfig::from_env()?;
        config.safety_margin = Duration::ZERO;
        let publisher = BusPublisher::new(&sdk_config().await, &target).await?;
        let store = PgOutboxStore::new(db);
        let worker = format!("outboxctl-{}", std::process::id());
        let dispatcher = OutboxDispatcher::new(store, publisher, config, worker);
        let summary = dispatcher
            .drain(Instant::now() + Duration::from_secs(self.for_seconds))
            .await?;
        println!("{}", serde_json::to_string(&summary)?);
        Ok(())
    }
}
