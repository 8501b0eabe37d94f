//! (Past 400 lines: the JetStream publisher and consumer share the subject scheme and its tests.)
//!
//! NATS JetStream: the third target (`OUTBOX_TARGET=nats`), and a consumer that applies a
//! stream's messages through the inbox like the SQS sink.
//!
//! On the wire: one subject per entity, `<prefix>.<aggregate type>.<aggregate id>.<event type>`,
//! so a stream (and any consumer filtering on `<prefix>.order.o-1.>`) keeps each entity's
//! order; `Nats-Msg-Id` = the event id, so JetStream drops a re-publish within the stream's
//! duplicate window; the CloudEvents envelope as the body; event type, tenant and aggregate
//! version as headers (`Outbox-Event-Type`, `Outbox-Tenant-Id`, `Outbox-Aggregate-Version`).
//! Every publish acknowledgment is awaited and read on its own: a missing one (timeout,
//! connection lost) or an error (stream full, no stream for the subject) is a retry for that row
//! only, dead-lettered after `DISPATCH_MAX_ATTEMPTS` like any other.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream, AckKind};
use futures_util::StreamExt;

use crate::config::{optional_env, ranged_env, required_env, ConfigError};
use crate::ports::{OutgoingMessage, PublishLimits, PublishOutcome, Publisher};

/// Header with the event type.
pub const HEADER_EVENT_TYPE: &str = "Outbox-Event-Type";
/// Header with the tenant id.
pub const HEADER_TENANT: &str = "Outbox-Tenant-Id";
/// Header with the aggregate version (the order within the entity's subject).
pub const HEADER_AGGREGATE_VERSION: &str = "Outbox-Aggregate-Version";

/// Where and how to publish on NATS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsSettings {
    /// Server URL(s), comma-separated (`NATS_URL`, e.g. `tls://nats.internal:4222`).
    pub url: String,
    /// First subject token(s) (`NATS_SUBJECT_PREFIX`, default `outbox`).
    pub subject_prefix: String,
    /// How long a publish acknowledgment is waited for (`NATS_ACK_TIMEOUT_MS`, 100..=60000,
    /// default 5000). Past it, the row is retried.
    pub ack_timeout: Duration,
    /// A `.creds` file (JWT + nkey seed) for an account with JetStream (`NATS_CREDS_FILE`).
    pub credentials_file: Option<String>,
}

impl NatsSettings {
    /// Reads `NATS_URL`, `NATS_SUBJECT_PREFIX`, `NATS_ACK_TIMEOUT_MS` and `NATS_CREDS_FILE`.
    pub fn from_env() -> Result<Self, ConfigError> {
        let subject_prefix = optional_env("NATS_SUBJECT_PREFIX").unwrap_or_else(|| "outbox".into());
        if !is_subject_prefix(&subject_prefix) {
            return Err(ConfigError::Invalid {
                name: "NATS_SUBJECT_PREFIX",
                reason: "must be dot-separated tokens without spaces, '*' or '>'".into(),
            });
        }
        Ok(Self {
            url: required_env("NATS_URL")?,
            subject_prefix,
            ack_timeout: Duration::from_millis(ranged_env(
                "NATS_ACK_TIMEOUT_MS",
                5_000u64,
                100,
                60_000,
            )?),
            credentials_file: optional_env("NATS_CREDS_FILE"),
        })
    }

    /// Connects. The client keeps reconnecting in the background (also when the server is not
    /// up yet at start): publishes meanwhile time out and are retried, nothing fails the start.
    pub async fn connect(&self, name: &str) -> Result<async_nats::Client, ConfigError> {
        let mut options = async_nats::ConnectOptions::new()
            .name(name)
            .connection_timeout(Duration::from_secs(3))
            .retry_on_initial_connect();
        if let Some(path) = &self.credentials_file {
            options = options
                .credentials_file(path)
                .await
                .map_err(|e| ConfigError::Invalid {
                    name: "NATS_CREDS_FILE",
                    reason: e.to_string(),
                })?;
        }
        options
            .connect(self.url.as_str())
            .await
            .map_err(|e| ConfigError::Invalid {
                name: "NATS_URL",
                reason: e.to_string(),
            })
    }
}

fn is_subject_prefix(prefix: &str) -> bool {
    !prefix.is_empty()
        && prefix.split('.').all(|token| {
            !token.is_empty()
                && token
                    .chars()
                    .all(|c| !c.is_whitespace() && !c.is_control() && c != '*' && c != '>')
        })
}

/// One subject token from any text: ASCII letters, digits, `-` and `_` are kept, every other
/// byte (`.`, `*`, `>`, spaces, `~`, non-ASCII) becomes `~XX` (its hex value). Injective, so two
/// different aggregate ids never share a subject, and readable for the usual ids.
pub fn subject_token(raw: &str) -> String {
    let mut token = String::with_capacity(raw.len());
    for byte in raw.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_' {
            token.push(byte as char);
        } else {
            token.push_str(&format!("~{byte:02X}"));
        }
    }
    if token.is_empty() {
        token.push('~');
    }
    token
}

/// `<prefix>.<aggregate type>.<aggregate id>.<event type>`, each part escaped with
/// [`subject_token`] except the event type's dots, which stay token separators
/// (`order.placed` → `….order.placed`), so `<prefix>.order.*.order.>` matches by type.
pub fn subject(prefix: &str, aggregate_type: &str, aggregate_id: &str, event_type: &str) -> String {
    let event: Vec<String> = event_type.split('.').map(subject_token).collect();
    format!(
        "{prefix}.{}.{}.{}",
        subject_token(aggregate_type),
        subject_token(aggregate_id),
        event.join(".")
    )
}

/// Publishes to JetStream. Rows go out concurrently within a call (each is the head of its own
/// aggregate: one aggregate never has two rows in flight), and every acknowledgment is read.
pub struct NatsPublisher {
    jetstream: jetstream::Context,
    prefix: String,
    max_payload: usize,
}

/// Messages per publish call: 100 acknowledgments awaited together. With
/// `DISPATCH_MAX_IN_FLIGHT` calls in flight, up to that many times 100 messages are unacknowledged.
pub const MAX_ENTRIES: usize = 100;

/// NATS servers accept 1 MiB per message by default (`max_payload`); headers count.
pub const DEFAULT_MAX_PAYLOAD: usize = 1_048_576;

impl NatsPublisher {
    /// A publisher on `client`.
    pub fn new(client: async_nats::Client, settings: &NatsSettings) -> Self {
        let max_payload = match client.server_info().max_payload {
            0 => DEFAULT_MAX_PAYLOAD,
            n => n,
        };
        let jetstream = jetstream::ContextBuilder::new()
            .timeout(settings.ack_timeout)
            .max_ack_inflight(128 * MAX_ENTRIES)
            .backpressure_on_inflight(true)
            .build(client);
        Self {
            jetstream,
            prefix: settings.subject_prefix.clone(),
            max_payload,
        }
    }

    /// Connects with `settings` and builds the publisher.
    pub async fn connect(settings: &NatsSettings) -> Result<Self, ConfigError> {
        let client = settings.connect("outbox-dispatcher").await?;
        Ok(Self::new(client, settings))
    }

    /// The JetStream context, to create streams and consumers.
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.jetstream
    }

    fn headers(message: &OutgoingMessage) -> async_nats::HeaderMap {
        let event = &message.event;
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            async_nats::header::NATS_MESSAGE_ID,
            event.event_id.to_string().as_str(),
        );
        headers.insert(HEADER_EVENT_TYPE, event.event_type.as_str());
        headers.insert(HEADER_TENANT, event.tenant_id.as_str());
        headers.insert(
            HEADER_AGGREGATE_VERSION,
            event.aggregate_version.to_string().as_str(),
        );
        if let Some(size) = message.extended_size {
            headers.insert(
                crate::claim_check::SIZE_ATTRIBUTE,
                size.to_string().as_str(),
            );
        }
        headers
    }
}

impl Publisher for NatsPublisher {
    fn limits(&self) -> PublishLimits {
        PublishLimits {
            max_entries: MAX_ENTRIES,
            max_entry_bytes: self.max_payload,
            max_batch_bytes: usize::MAX,
        }
    }

    fn entry_size(&self, message: &OutgoingMessage) -> usize {
        let event = &message.event;
        // Header block: names, values and separators, with room for the version line.
        let headers = 64
            + "Nats-Msg-Id".len()
            + 36
            + HEADER_EVENT_TYPE.len()
            + event.event_type.len()
            + HEADER_TENANT.len()
            + event.tenant_id.len()
            + HEADER_AGGREGATE_VERSION.len()
            + 20
            + message
                .extended_size
                .map_or(0, |_| crate::claim_check::SIZE_ATTRIBUTE.len() + 24);
        message.body.len() + headers
    }

    #[tracing::instrument(skip_all, fields(entries = batch.len()))]
    async fn publish(&self, batch: &[OutgoingMessage]) -> Vec<PublishOutcome> {
        // Send every message first, then read the acknowledgments: one round trip per call.
        let mut pending = Vec::with_capacity(batch.len());
        for message in batch {
            let event = &message.event;
            let subject = subject(
                &self.prefix,
                &event.aggregate_type,
                &event.aggregate_id,
                &event.event_type,
            );
            let publish = jetstream::message::PublishMessage::build()
                .payload(bytes::Bytes::from(message.body.clone()))
                .headers(Self::headers(message));
            pending.push(self.jetstream.send_publish(subject, publish).await);
        }
        let acks = pending.into_iter().map(|sent| async move {
            match sent {
                Ok(ack) => match ack.await {
                    Ok(_) => PublishOutcome::Published,
                    Err(e) => PublishOutcome::Retry(format!("JetStream did not accept it: {e}")),
                },
                Err(e) => PublishOutcome::Retry(format!("NATS publish failed: {e}")),
            }
        });
        let outcomes = futures_util::future::join_all(acks).await;
        let retried = outcomes
            .iter()
            .filter(|o| matches!(o, PublishOutcome::Retry(_)))
            .count();
        if retried > 0 {
            tracing::warn!(
                retried,
                of = batch.len(),
                "JetStream refused or did not acknowledge messages"
            );
        }
        outcomes
    }
}

/// A stream for the outbox's subjects: file storage, a duplicate window (a re-publish of an event
/// within it is dropped), and, when `max_messages` is set, new messages refused when full (so the
/// dispatcher retries them instead of JetStream dropping old ones).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamSpec {
    /// Stream name (no dots or spaces).
    pub name: String,
    /// Subjects, e.g. `outbox.>`.
    pub subjects: Vec<String>,
    /// Duplicate window.
    pub duplicate_window: Duration,
    /// Most messages kept (`None`: unlimited).
    pub max_messages: Option<i64>,
    /// Oldest message kept (`None`: unlimited).
    pub max_age: Option<Duration>,
}

/// Creates the stream, or updates its configuration to `spec` when it exists.
pub async fn ensure_stream(
    jetstream: &jetstream::Context,
    spec: &StreamSpec,
) -> Result<stream::Info, async_nats::Error> {
    let config = stream::Config {
        name: spec.name.clone(),
        subjects: spec.subjects.clone(),
        storage: stream::StorageType::File,
        duplicate_window: spec.duplicate_window,
        max_messages: spec.max_messages.unwrap_or(-1),
        max_age: spec.max_age.unwrap_or_default(),
        discard: if spec.max_messages.is_some() {
            stream::DiscardPolicy::New
        } else {
            stream::DiscardPolicy::Old
        },
        ..Default::default()
    };
    match jetstream.get_stream(&spec.name).await {
        Ok(_) => Ok(jetstream.update_stream(config).await?),
        Err(_) => Ok(jetstream.create_stream(config).await?.cached_info().clone()),
    }
}

/// What one [`consume`] pass (or several, added up) did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ConsumeReport {
    /// Messages fetched.
    pub received: usize,
    /// Applied, duplicates and stale ones: acknowledged.
    pub acknowledged: usize,
    /// Not applied this time (a gap, a failing projection, the database down): negatively
    /// acknowledged, redelivered after a delay.
    pub redelivered: usize,
    /// Not an envelope: terminated (JetStream stops redelivering; the advisory reports it).
    pub terminated: usize,
}

impl std::ops::AddAssign for ConsumeReport {
    fn add_assign(&mut self, other: Self) {
        self.received += other.received;
        self.acknowledged += other.acknowledged;
        self.redelivered += other.redelivered;
        self.terminated += other.terminated;
    }
}

/// A durable pull consumer on `stream` for the sink, created if missing: explicit acks, 30 s to
/// ack, at most `max_deliver` deliveries of a message.
pub async fn sink_consumer(
    jetstream: &jetstream::Context,
    stream: &str,
    durable: &str,
    filter_subject: Option<&str>,
    max_deliver: i64,
) -> Result<consumer::Consumer<consumer::pull::Config>, async_nats::Error> {
    let stream = jetstream.get_stream(stream).await?;
    Ok(stream
        .get_or_create_consumer(
            durable,
            consumer::pull::Config {
                durable_name: Some(durable.to_owned()),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: Duration::from_secs(30),
                max_deliver,
                filter_subject: filter_subject.unwrap_or_default().to_owned(),
                ..Default::default()
            },
        )
        .await?)
}

/// Fetches up to `batch` messages (waiting at most `wait` for the first) and applies them through
/// `store`'s inbox as consumer `inbox_consumer`, in stream order, in one transaction; then acks
/// each message whose outcome is final and naks the rest with `redeliver_after`. A message is
/// acknowledged only after its effect committed, so a crash in between redelivers it and the
/// inbox makes the second delivery a no-op. A message carrying a claim check pointer is applied
/// with the envelope read from `payloads`; one that cannot be read (S3 unavailable, no store) is
/// redelivered after `redeliver_after`.
#[allow(clippy::too_many_arguments)]
pub async fn consume<S: crate::ports::ProjectionStore>(
    consumer: &consumer::Consumer<consumer::pull::Config>,
    store: &S,
    payloads: Option<&dyn crate::claim_check::PayloadStore>,
    inbox_consumer: &str,
    batch: usize,
    wait: Duration,
    redeliver_after: Duration,
) -> Result<ConsumeReport, async_nats::Error> {
    let mut messages = consumer
        .fetch()
        .max_messages(batch)
        .expires(wait)
        .messages()
        .await?;
    let mut received = Vec::new();
    while let Some(message) = messages.next().await {
        received.push(message?);
    }
    let mut report = ConsumeReport {
        received: received.len(),
        ..ConsumeReport::default()
    };
    let mut envelopes = Vec::with_capacity(received.len());
    let mut applied_messages = Vec::with_capacity(received.len());
    for message in &received {
        let Ok(payload) = std::str::from_utf8(&message.payload) else {
            tracing::error!(subject = %message.subject, "not UTF-8, so not an event envelope; terminated");
            message.ack_with(AckKind::Term).await?;
            report.terminated += 1;
            continue;
        };
        let payload = match crate::claim_check::resolve(payloads, payload).await {
            Ok(payload) => payload,
            Err(error) => {
                tracing::warn!(subject = %message.subject, %error, "stored envelope cannot be read; redelivered");
                message
                    .ack_with(AckKind::Nak(Some(redeliver_after)))
                    .await?;
                report.redelivered += 1;
                continue;
            }
        };
        match serde_json::from_str::<crate::envelope::EventEnvelope>(&payload) {
            Ok(envelope) => {
                envelopes.push(envelope);
                applied_messages.push(message);
            }
            Err(e) => {
                tracing::error!(subject = %message.subject, error = %e, "not an event envelope; terminated");
                message.ack_with(AckKind::Term).await?;
                report.terminated += 1;
            }
        }
    }
    if envelopes.is_empty() {
        return Ok(report);
    }
    let outcomes = match store.apply_events(inbox_consumer, &envelopes).await {
        Ok(outcomes) => outcomes,
        Err(e) => {
            let reason = crate::telemetry::error_chain(&e);
            tracing::warn!(error = %reason, "applying the batch failed; redelivering it");
            vec![crate::sink::ApplyOutcome::Failed(reason); envelopes.len()]
        }
    };
    for (message, outcome) in applied_messages.into_iter().zip(outcomes) {
        if outcome.is_done() {
            message.ack().await?;
            report.acknowledged += 1;
        } else {
            message
                .ack_with(AckKind::Nak(Some(redeliver_after)))
                .await?;
            report.redelivered += 1;
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_keep_tokens_and_escape_everything_else() {
        assert_eq!(
            subject("outbox", "order", "o-1", "order.placed"),
            "outbox.order.o-1.order.placed"
        );
        assert_eq!(
            subject("acme.outbox", "order", "a.b*c>d e~", "x"),
            "acme.outbox.order.a~2Eb~2Ac~3Ed~20e~7E.x"
        );
        assert_eq!(subject_token("é"), "~C3~A9");
        assert_eq!(subject_token(""), "~");
        // Distinct ids, distinct tokens: the escape character escapes itself.
        assert_ne!(subject_token("a.b"), subject_token("a~2Eb"));
        let escaped = subject("p", "t", "id with spaces.and*wild>cards", "x.y");
        assert_eq!(escaped.split('.').count(), 5, "{escaped}");
        assert!(!escaped.contains(' ') && !escaped.contains('*') && !escaped.contains('>'));
    }

    #[test]
    fn the_prefix_is_checked() {
        assert!(is_subject_prefix("outbox"));
        assert!(is_subject_prefix("acme.orders.outbox"));
        for bad in ["", "a..b", ".a", "a.", "a b", "a.*", "a.>"] {
            assert!(!is_subject_prefix(bad), "{bad:?}");
        }
    }
}
