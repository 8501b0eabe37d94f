//! `outboxctl nats stream`.

use std::time::Duration;

use clap::Args;
use serde_json::json;

use pg_outbox::nats::{ensure_stream, NatsSettings, StreamSpec};

use crate::args::parse_duration;
use crate::cmd::CliResult;

/// Create the stream, or update it to these settings (prints its state as JSON).
#[derive(Args)]
pub struct Stream {
    /// Stream name.
    #[arg(long, default_value = "OUTBOX")]
    name: String,
    /// Subjects it stores (repeatable). Default: `<NATS_SUBJECT_PREFIX or outbox>.>`.
    #[arg(long = "subject")]
    subjects: Vec<String>,
    /// JetStream drops a message whose `Nats-Msg-Id` (the event id) it stored within this
    /// window: a re-publish after a dispatcher died between publish and mark.
    #[arg(long, default_value = "2m", value_parser = parse_duration)]
    duplicate_window: Duration,
    /// Keep at most this many messages, refusing new ones when full (the dispatcher retries
    /// them). Default: unlimited.
    #[arg(long)]
    max_messages: Option<i64>,
    /// Drop messages older than this (e.g. 7d). Default: kept.
    #[arg(long, value_parser = parse_duration)]
    max_age: Option<Duration>,
}

impl Stream {
    /// Creates or updates the stream (no database needed).
    pub async fn run(self) -> CliResult {
        let settings = NatsSettings::from_env()?;
        let client = settings.connect("outboxctl").await?;
        let jetstream = async_nats::jetstream::new(client);
        let subjects = if self.subjects.is_empty() {
            vec![format!("{}.>", settings.subject_prefix)]
        } else {
            self.subjects
        };
        let spec = StreamSpec {
            name: self.name,
            subjects,
            duplicate_window: self.duplicate_window,
            max_messages: self.max_messages,
            max_age: self.max_age,
        };
        let info = tokio::time::timeout(Duration::from_secs(10), ensure_stream(&jetstream, &spec))
            .await
            .map_err(|_| "NATS did not answer within 10 s")?
            .map_err(|e| format!("creating the stream failed: {e}"))?;
        println!(
            "{}",
            json!({"stream": info.config.name, "subjects": info.config.subjects,
                   "messages": info.state.messages,
                   "duplicateWindowSeconds": info.config.duplicate_window.as_secs()})
        );
        Ok(())
    }
}
