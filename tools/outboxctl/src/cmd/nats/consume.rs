//! `outboxctl nats consume`.

use std::time::{Duration, Instant};

use clap::Args;

use pg_outbox::nats::{ConsumeReport, NatsSettings};
use pg_outbox::postgres::projections::PgProjectionStore;

use crate::cmd::CliResult;

/// Apply the stream's events to the payment projections through the inbox, from a durable
/// pull consumer; each message is acknowledged once its effect committed.
#[derive(Args)]
pub struct Consume {
    /// The stream.
    #[arg(long, default_value = "OUTBOX")]
    stream: String,
    /// Durable consumer name on the stream (created if missing).
    #[arg(long, default_value = "projection-sink")]
    durable: String,
    /// The inbox consumer the events are applied as. Keep the SQS sink's name
    /// (`SINK_CONSUMER`, default `payment-projections`) when both feed the same projection
    /// tables: the inbox then applies each event once whichever path brings it.
    #[arg(long, default_value = payments::projection::CONSUMER)]
    inbox_consumer: String,
    /// Only these subjects (e.g. `outbox.payment.>`).
    #[arg(long)]
    filter_subject: Option<String>,
    /// Messages per fetch and per database transaction.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u16).range(1..=1000))]
    batch: u16,
    /// Deliveries of a message before JetStream gives up on it.
    #[arg(long, default_value_t = 10)]
    max_deliver: i64,
    /// Stop after this many seconds (default: run until stopped).
    #[arg(long)]
    for_seconds: Option<u64>,
    /// Stop at the first fetch that finds nothing (to catch up and exit).
    #[arg(long)]
    until_idle: bool,
}

impl Consume {
    /// Consumes until the time is up or (with `--until-idle`) nothing is left, and prints the
    /// totals as JSON.
    pub async fn run(self) -> CliResult {
        let db = crate::cmd::database().await?;
        let settings = NatsSettings::from_env()?;
        let jetstream = async_nats::jetstream::new(settings.connect("outboxctl").await?);
        let consumer = pg_outbox::nats::sink_consumer(
            &jetstream,
            &self.stream,
            &self.durable,
            self.filter_subject.as_deref(),
            self.max_deliver,
        )
        .await
        .map_err(|e| format!("the durable consumer could not be set up: {e}"))?;
        // The same registry the SQS sink applies (one list of the service's read models).
        let store = PgProjectionStore::new(db, payments::projection::projections());
        let deadline = self
            .for_seconds
            .map(|s| Instant::now() + Duration::from_secs(s));
        // Envelopes the dispatcher stored in S3 (claim check) are read back from the bucket.
        let payloads = match pg_outbox::claim_check::ClaimCheckSettings::from_env()
            .map_err(|e| e.to_string())?
        {
            Some(settings) => Some(
                pg_outbox::aws::s3::S3PayloadStore::new(&pg_outbox::aws::sdk_config().await)
                    .only(&settings),
            ),
            None => None,
        };
        let mut sums = ConsumeReport::default();
        loop {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                break;
            }
            let report = match pg_outbox::nats::consume(
                &consumer,
                &store,
                payloads
                    .as_ref()
                    .map(|p| p as &dyn pg_outbox::claim_check::PayloadStore),
                &self.inbox_consumer,
                usize::from(self.batch),
                Duration::from_secs(1),
                Duration::from_secs(1),
            )
            .await
            {
                Ok(report) => report,
                // NATS restarting or unreachable: the client reconnects; try again shortly.
                Err(e) => {
                    eprintln!("outboxctl: consuming failed, retrying in 1 s: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            sums += report;
            if self.until_idle && report.received == 0 {
                break;
            }
        }
        println!("{}", serde_json::to_string(&sums)?);
        Ok(())
    }
}
