//! AWS adapters: SDK configuration shared by every client, and the publishers behind
//! [`crate::ports::Publisher`].

pub mod eventbridge;
pub mod s3;
pub mod secrets;
pub mod sns;
pub mod wake;

use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, SdkConfig};
use aws_smithy_http_client::tls::{rustls_provider::CryptoMode, Provider};

/// Loads the SDK configuration once per cold start: region and credentials from the environment
/// (the Lambda role on AWS), `AWS_ENDPOINT_URL` honoured (moto locally), HTTPS through rustls with
/// ring. Timeouts are bounded so a call never outlives the dispatcher's lease; the SDK retries a
/// call twice at most, the dispatcher's own backoff does the rest.
pub async fn sdk_config() -> SdkConfig {
    sdk_config_loader().load().await
}

/// The loader behind [`sdk_config`], for callers that override a setting (an explicit
/// `endpoint_url` set here wins over `AWS_ENDPOINT_URL`).
pub fn sdk_config_loader() -> aws_config::ConfigLoader {
    let http_client = aws_smithy_http_client::Builder::new()
        .pool_max_idle_per_host(64)
        .tls_provider(Provider::Rustls(CryptoMode::Ring))
        .build_https();
    aws_config::defaults(BehaviorVersion::latest())
        .http_client(http_client)
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(3))
                .operation_attempt_timeout(Duration::from_secs(5))
                .operation_timeout(Duration::from_secs(12))
                .build(),
        )
        .retry_config(RetryConfig::standard().with_max_attempts(2))
}

/// An SDK error with its whole cause chain, bounded so it fits `last_error`.
pub(crate) fn describe<E: std::error::Error>(error: &E) -> String {
    let mut text = crate::telemetry::error_chain(error);
    if text.len() > 1_000 {
        let mut cut = 1_000;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push('…');
    }
    text
}

/// The publisher chosen by configuration.
pub enum BusPublisher {
    /// SNS `PublishBatch`.
    Sns(sns::SnsPublisher),
    /// EventBridge `PutEvents`.
    EventBridge(eventbridge::EventBridgePublisher),
    /// NATS JetStream (boxed: its context is much larger than the SDK clients).
    Nats(Box<crate::nats::NatsPublisher>),
}

impl BusPublisher {
    /// Builds the publisher for `target`: an SDK client on `config` for SNS and EventBridge, a
    /// NATS connection (kept re-established in the background) for NATS.
    pub async fn new(
        config: &SdkConfig,
        target: &crate::dispatcher::Target,
    ) -> Result<Self, crate::config::ConfigError> {
        Ok(match target {
            crate::dispatcher::Target::Sns { topic_arn } => Self::Sns(sns::SnsPublisher::new(
                aws_sdk_sns::Client::new(config),
                topic_arn.clone(),
            )),
            crate::dispatcher::Target::EventBridge { bus_name } => {
                Self::EventBridge(eventbridge::EventBridgePublisher::new(
                    aws_sdk_eventbridge::Client::new(config),
                    bus_name.clone(),
                ))
            }
            crate::dispatcher::Target::Nats(settings) => Self::Nats(Box::new(
                crate::nats::NatsPublisher::connect(settings).await?,
            )),
        })
    }
}

impl crate::ports::Publisher for BusPublisher {
    fn limits(&self) -> crate::ports::PublishLimits {
        match self {
            Self::Sns(p) => p.limits(),
            Self::EventBridge(p) => p.limits(),
            Self::Nats(p) => p.limits(),
        }
    }

    fn entry_size(&self, message: &crate::ports::OutgoingMessage) -> usize {
        match self {
            Self::Sns(p) => p.entry_size(message),
            Self::EventBridge(p) => p.entry_size(message),
            Self::Nats(p) => p.entry_size(message),
        }
    }

    fn pointer_body(
        &self,
        envelope: &str,
        pointer: &crate::claim_check::S3Pointer,
    ) -> Result<(String, Option<usize>), String> {
        match self {
            Self::Sns(p) => p.pointer_body(envelope, pointer),
            Self::EventBridge(p) => p.pointer_body(envelope, pointer),
            Self::Nats(p) => p.pointer_body(envelope, pointer),
        }
    }

    async fn publish(
        &self,
        batch: &[crate::ports::OutgoingMessage],
    ) -> Vec<crate::ports::PublishOutcome> {
        match self {
            Self::Sns(p) => p.publish(batch).await,
            Self::EventBridge(p) => p.publish(batch).await,
            Self::Nats(p) => p.publish(batch).await,
        }
    }
}
