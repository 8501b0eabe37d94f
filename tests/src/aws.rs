//! moto fixtures: topics, buses, rules and queues created per test (unique names, so tests run in
//! parallel), and a receiver that drains a queue.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::SdkConfig;
use aws_sdk_sqs::types::{MessageSystemAttributeName, QueueAttributeName};

/// moto's URL, from `AWS_ENDPOINT_URL` (written to `.local/env` by `scripts/dev-env up`).
pub fn moto_endpoint() -> String {
    std::env::var("AWS_ENDPOINT_URL").unwrap_or_else(|_| {
        panic!(
            "AWS_ENDPOINT_URL is not set: these tests need moto. Run them with `make test` \
             (or `scripts/dev-env up && . .local/env` first)."
        )
    })
}

/// The SDK configuration the functions use, pointed at `endpoint`, with the SDK's own retries off
/// (so every injected fault reaches the dispatcher) and a bounded attempt timeout.
pub async fn sdk_config_for(endpoint: &str) -> SdkConfig {
    pg_outbox::aws::sdk_config_loader()
        .endpoint_url(endpoint)
        .retry_config(RetryConfig::disabled())
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(2))
                // Long enough for moto on a loaded 2-core machine; the proxy's injected timeout
                // holds a call for 30 s, well past it.
                .operation_attempt_timeout(Duration::from_secs(4))
                .operation_timeout(Duration::from_secs(8))
                .build(),
        )
        .load()
        .await
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// A bucket in moto's S3 (the claim check's).
pub async fn create_bucket(config: &SdkConfig) -> String {
    let bucket = unique("claims");
    let s3 = aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(config)
            .force_path_style(true)
            .build(),
    );
    s3.create_bucket()
        .bucket(&bucket)
        .send()
        .await
        .expect("create bucket");
    bucket
}

/// A queue of moto's SQS.
#[derive(Debug, Clone)]
pub struct Queue {
    /// Queue URL.
    pub url: String,
    /// Queue ARN.
    pub arn: String,
}

/// Creates a queue (FIFO when asked).
pub async fn create_queue(config: &SdkConfig, fifo: bool) -> Queue {
    let sqs = aws_sdk_sqs::Client::new(config);
    let mut request = sqs.create_queue().queue_name(if fifo {
        format!("{}.fifo", unique("q"))
    } else {
        unique("q")
    });
    if fifo {
        request = request
            .attributes(QueueAttributeName::FifoQueue, "true")
            .attributes(QueueAttributeName::ContentBasedDeduplication, "false");
    }
    let url = request
        .send()
        .await
        .expect("create queue")
        .queue_url
        .expect("queue url");
    let attributes = sqs
        .get_queue_attributes()
        .queue_url(&url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .expect("queue attributes");
    let arn = attributes
        .attributes()
        .and_then(|a| a.get(&QueueAttributeName::QueueArn))
        .cloned()
        .expect("queue arn");
    Queue { url, arn }
}

/// Creates a topic (FIFO when asked) with no subscriber.
pub async fn create_topic(config: &SdkConfig, fifo: bool) -> String {
    let sns = aws_sdk_sns::Client::new(config);
    let mut request = sns.create_topic().name(if fifo {
        format!("{}.fifo", unique("t"))
    } else {
        unique("t")
    });
    if fifo {
        request = request
            .attributes("FifoTopic", "true")
            .attributes("ContentBasedDeduplication", "false");
    }
    request
        .send()
        .await
        .expect("create topic")
        .topic_arn
        .expect("topic arn")
}

/// A topic with a queue subscribed to it.
pub async fn topic_with_queue(config: &SdkConfig, fifo: bool, raw: bool) -> (String, Queue) {
    let topic = create_topic(config, fifo).await;
    let queue = create_queue(config, fifo).await;
    aws_sdk_sns::Client::new(config)
        .subscribe()
        .topic_arn(&topic)
        .protocol("sqs")
        .endpoint(&queue.arn)
        .attributes("RawMessageDelivery", if raw { "true" } else { "false" })
        .send()
        .await
        .expect("subscribe queue");
    (topic, queue)
}

/// An event bus with a rule sending every outbox envelope to a queue, whatever service it came
/// from: the pattern of `template.yaml`'s `SinkRule` with its default `SinkEventSourcePrefix`.
pub async fn bus_with_queue(config: &SdkConfig) -> (String, Queue) {
    let events = aws_sdk_eventbridge::Client::new(config);
    let bus = unique("bus");
    events
        .create_event_bus()
        .name(&bus)
        .send()
        .await
        .expect("create bus");
    let queue = create_queue(config, false).await;
    let rule = unique("rule");
    events
        .put_rule()
        .name(&rule)
        .event_bus_name(&bus)
        .event_pattern(r#"{"source":[{"prefix":""}],"detail":{"specversion":[{"exists":true}]}}"#)
        .send()
        .await
        .expect("put rule");
    events
        .put_targets()
        .rule(&rule)
        .event_bus_name(&bus)
        .targets(
            aws_sdk_eventbridge::types::Target::builder()
                .id("sink-queue")
                .arn(&queue.arn)
                .build()
                .expect("target"),
        )
        .send()
        .await
        .expect("put targets");
    (bus, queue)
}

/// A message taken off a queue.
#[derive(Debug, Clone)]
pub struct Received {
    /// The body.
    pub body: String,
    /// Message attributes (string values).
    pub attributes: HashMap<String, String>,
    /// FIFO message group, if any.
    pub group_id: Option<String>,
    /// FIFO deduplication id, if any.
    pub deduplication_id: Option<String>,
}

/// Receives (and deletes) messages until `expected` have arrived, then keeps listening for
/// `quiet` more in case extra ones come; panics if fewer than `expected` arrive within `timeout`.
pub async fn receive(
    config: &SdkConfig,
    queue: &Queue,
    expected: usize,
    timeout: Duration,
    quiet: Duration,
) -> Vec<Received> {
    let sqs = aws_sdk_sqs::Client::new(config);
    let started = Instant::now();
    let mut quiet_since: Option<Instant> = None;
    let mut received = Vec::new();
    loop {
        if received.len() >= expected {
            let since = *quiet_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= quiet {
                break;
            }
        }
        assert!(
            started.elapsed() < timeout,
            "only {} of {expected} messages arrived within {timeout:?}",
            received.len()
        );
        let output = sqs
            .receive_message()
            .queue_url(&queue.url)
            .max_number_of_messages(10)
            .wait_time_seconds(0)
            .message_attribute_names("All")
            .message_system_attribute_names(MessageSystemAttributeName::All)
            .send()
            .await
            .expect("receive");
        let messages = output.messages();
        if messages.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        for m in messages {
            let system = m.attributes();
            received.push(Received {
                body: m.body().unwrap_or_default().to_owned(),
                attributes: m
                    .message_attributes()
                    .map(|a| {
                        a.iter()
                            .map(|(k, v)| {
                                (k.clone(), v.string_value().unwrap_or_default().to_owned())
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
                group_id: system
                    .and_then(|s| s.get(&MessageSystemAttributeName::MessageGroupId))
                    .cloned(),
                deduplication_id: system
                    .and_then(|s| s.get(&MessageSystemAttributeName::MessageDeduplicationId))
                    .cloned(),
            });
            if let Some(handle) = m.receipt_handle() {
                sqs.delete_message()
                    .queue_url(&queue.url)
                    .receipt_handle(handle)
                    .send()
                    .await
                    .expect("delete");
            }
        }
        quiet_since = None;
    }
    received
}
