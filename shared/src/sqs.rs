//! The SQS sink: a Lambda function that applies delivered events to a service's read models (its
//! [`Projections`]) through the inbox, exactly once in effect, and reports partial batch failures
//! (`batchItemFailures`) instead of failing or acknowledging the whole batch. A service's sink is
//! its `main` calling [`run`] with its projections (docs/extending.md).
//!
//! Out-of-order arrival: an event whose predecessor (by aggregate version) is not applied yet is
//! reported as a batch item failure, so SQS delivers it again after the visibility timeout; by
//! then the predecessor has usually arrived. The queue is the parking lot: no second store of
//! pending events to keep consistent, and a predecessor that never comes (dead in the outbox)
//! sends its successors to the queue's dead-letter queue after `maxReceiveCount`, from where they
//! are re-driven once it is. An event older than what the projection holds changes nothing.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use aws_lambda_events::sqs::BatchItemFailure;
/// The SQS event a sink's Lambda receives, and what it answers: re-exported so a service's sink
/// and its tests need no `aws_lambda_events` of their own.
pub use aws_lambda_events::sqs::{SqsBatchResponse, SqsEvent, SqsMessage};
/// The error a Lambda `main` returns.
pub use lambda_runtime::Error as LambdaError;
use lambda_runtime::LambdaEvent;
use serde::Serialize;

use crate::claim_check::{self, PayloadStore};
use crate::consumer::{InboxRetention, Projections, Route};
use crate::envelope::EventEnvelope;
use crate::failure::{or_init_failed, FunctionError};
use crate::metrics::MetricsDocument;
use crate::ports::ProjectionStore;
use crate::postgres::projections::PgProjectionStore;
use crate::sink::{parse_delivery, ApplyOutcome};

/// Runs the sink as the Lambda function of this process: the database from `DATABASE_SECRET_ARN`
/// (or `DATABASE_URL`), the inbox consumer name from `SINK_CONSUMER` (else `default_consumer`),
/// the inbox retention from `INBOX_RETENTION_DAYS` and `INBOX_CLEANUP_BATCH`, then every SQS batch applied to `projections`.
/// A service's sink binary is this one call.
pub async fn run(
    projections: Projections,
    default_consumer: &str,
) -> Result<(), lambda_runtime::Error> {
    crate::telemetry::init_tracing();
    let db = or_init_failed(SERVICE, crate::aws::secrets::database_from_env().await).await?;
    let consumer =
        crate::config::optional_env("SINK_CONSUMER").unwrap_or_else(|| default_consumer.into());
    let retention = or_init_failed(SERVICE, InboxRetention::from_env()).await?;
    let store = PgProjectionStore::new(db, projections);
    store.db().warm_up().await;
    let mut sink = ProjectionSink::new(store, consumer).with_retention(retention);
    // Envelopes the dispatcher stored in S3 (claim check) are read back from the bucket.
    if let Some(settings) =
        or_init_failed(SERVICE, crate::claim_check::ClaimCheckSettings::from_env()).await?
    {
        let sdk = crate::aws::sdk_config().await;
        sink = sink.with_claim_check(Arc::new(
            crate::aws::s3::S3PayloadStore::new(&sdk).only(&settings),
        ));
    }
    lambda_runtime::run(lambda_runtime::service_fn(|event| handle(&sink, event))).await
}

/// What one batch did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SinkReport {
    /// Events applied now.
    pub applied: usize,
    /// Events this consumer had applied already.
    pub duplicates: usize,
    /// Events at or below what the projection holds.
    pub stale: usize,
    /// Events of types without a projection (acknowledged).
    pub unknown_types: usize,
    /// Messages reported as failures (redelivered by SQS).
    pub failures: usize,
    /// Of them, messages whose envelope is stored in S3 (claim check) and could not be read.
    pub claim_check_failures: usize,
    /// Inbox entries deleted by the retention cleanup during this batch.
    pub inbox_cleaned: u64,
    /// Why the whole batch could not be applied (the database), if it could not.
    #[serde(skip)]
    pub store_failure: Option<FunctionError>,
}

/// The sink: one per Lambda instance.
pub struct ProjectionSink<S> {
    store: S,
    consumer: String,
    retention: InboxRetention,
    next_cleanup: Mutex<Instant>,
    payloads: Option<Arc<dyn PayloadStore>>,
}

impl<S: ProjectionStore> ProjectionSink<S> {
    /// A sink recording its work in the inbox under `consumer`, with the default inbox retention.
    pub fn new(store: S, consumer: impl Into<String>) -> Self {
        Self {
            store,
            consumer: consumer.into(),
            retention: InboxRetention::default(),
            next_cleanup: Mutex::new(Instant::now()),
            payloads: None,
        }
    }

    /// Reads envelopes the dispatcher's claim check stored from `payloads` (without it, a
    /// delivery carrying a pointer fails, and is redelivered).
    pub fn with_claim_check(mut self, payloads: Arc<dyn PayloadStore>) -> Self {
        self.payloads = Some(payloads);
        self
    }

    /// The same with another inbox retention.
    pub fn with_retention(mut self, retention: InboxRetention) -> Self {
        self.retention = retention;
        self
    }

    /// The store, for wiring.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Applies a batch; the response lists only the messages to redeliver.
    pub async fn apply_batch(&self, event: SqsEvent) -> (SqsBatchResponse, SinkReport) {
        let mut report = SinkReport::default();
        let mut failed: Vec<String> = Vec::new();
        let mut events: Vec<EventEnvelope> = Vec::new();
        // Per event sent to the inbox: its message id, and whether a projection handles its type.
        let mut sent: Vec<(String, bool)> = Vec::new();
        // Per event sent to the inbox: its span, a child of the producer's (one trace).
        let mut spans: Vec<tracing::Span> = Vec::new();
        let projections = self.store.projections();
        for message in event.records {
            // Without a message id a failure could not be reported for it alone.
            let id = message.message_id.clone().unwrap_or_default();
            let xray = message.attributes.get("AWSTraceHeader").cloned();
            let body = message.body.as_deref().unwrap_or_default();
            let body = match claim_check::resolve(self.payloads.as_deref(), body).await {
                Ok(body) => body,
                Err(error) => {
                    tracing::warn!(message_id = %id, %error, "stored envelope cannot be read; redelivered");
                    report.claim_check_failures += 1;
                    failed.push(id);
                    continue;
                }
            };
            let routed = parse_delivery(&body)
                .and_then(|envelope| Ok((projections.route(&envelope)?, envelope)));
            match routed {
                Ok((Route::Inbox { handled }, envelope)) => {
                    let span = tracing::info_span!(
                        "apply_event",
                        otel.name = "apply event",
                        otel.kind = "consumer",
                        event_id = %envelope.id,
                        event_type = %envelope.event_type,
                        subject = %envelope.subject,
                        aggregate_version = envelope.aggregateversion,
                        message_id = %id,
                        aws.xray.trace_header = xray.as_deref(),
                        trace_id = tracing::field::Empty,
                        span_id = tracing::field::Empty,
                        outcome = tracing::field::Empty,
                    );
                    crate::telemetry::continue_trace(
                        &span,
                        envelope.traceparent.as_deref(),
                        envelope.tracestate.as_deref(),
                    );
                    spans.push(span);
                    events.push(envelope);
                    sent.push((id, handled));
                }
                Ok((Route::Ignore, envelope)) => {
                    tracing::info!(message_id = %id, event_type = %envelope.event_type,
                        aggregate_type = %envelope.aggregatetype, "no projection follows this aggregate type; acknowledged");
                    report.unknown_types += 1;
                }
                Err(error) => {
                    tracing::warn!(message_id = %id, %error, "message cannot be applied");
                    failed.push(id);
                }
            }
        }
        let outcomes = match self.store.apply_events(&self.consumer, &events).await {
            Ok(outcomes) => outcomes,
            Err(e) => {
                let reason = crate::telemetry::error_chain(&e);
                report.store_failure = Some(FunctionError::from_store(&e));
                vec![ApplyOutcome::Failed(reason); events.len()]
            }
        };
        for (((event, (id, handled)), outcome), span) in
            events.iter().zip(sent).zip(outcomes).zip(spans)
        {
            let _in_its_span = span.enter();
            span.record("outcome", outcome.name());
            tracing::debug!(event_id = %event.id, outcome = outcome.name(), "event done");
            match outcome {
                ApplyOutcome::Applied if handled => report.applied += 1,
                ApplyOutcome::Applied => {
                    tracing::info!(message_id = %id, event_type = %event.event_type,
                        "no projection for this event type; its aggregate's position advanced");
                    report.unknown_types += 1;
                }
                ApplyOutcome::Duplicate => report.duplicates += 1,
                ApplyOutcome::Stale => report.stale += 1,
                ApplyOutcome::Gap => {
                    tracing::info!(message_id = %id, event_id = %event.id, version = event.aggregateversion,
                        "earlier event of this aggregate not applied yet; redelivering");
                    failed.push(id);
                }
                ApplyOutcome::Failed(reason) => {
                    tracing::warn!(message_id = %id, event_id = %event.id, %reason, "apply failed");
                    failed.push(id);
                }
            }
        }
        report.failures = failed.len();
        if report.store_failure.is_none() {
            report.inbox_cleaned = self.clean_up_inbox().await;
        }
        let mut response = SqsBatchResponse::default();
        response.batch_item_failures = failed
            .into_iter()
            .map(|id| {
                let mut failure = BatchItemFailure::default();
                failure.item_identifier = id;
                failure
            })
            .collect();
        tracing::info!(?report, "batch done");
        (response, report)
    }

    /// One inbox retention statement when it is due (at most one a minute per instance); never
    /// fails the batch.
    async fn clean_up_inbox(&self) -> u64 {
        let Some(keep) = self.retention.keep else {
            return 0;
        };
        {
            let mut next = self.next_cleanup.lock().unwrap_or_else(|e| e.into_inner());
            if Instant::now() < *next {
                return 0;
            }
            *next = Instant::now() + self.retention.every;
        }
        match self.store.delete_expired(keep, self.retention.batch).await {
            Ok(deleted) => deleted,
            Err(error) => {
                tracing::warn!(error = %crate::telemetry::error_chain(&error), "inbox cleanup failed");
                0
            }
        }
    }
}

/// Service name in the metrics' `Service` dimension (`METRICS_SERVICE` overrides it).
pub const SERVICE: &str = "projection-sink";

impl SinkReport {
    /// The report as CloudWatch metrics (EMF).
    pub fn metrics(&self, apply_latency: std::time::Duration) -> MetricsDocument {
        let mut doc = MetricsDocument::from_env(SERVICE);
        doc.count("Applied", self.applied)
            .count("DuplicatesSkipped", self.duplicates)
            .count("StaleSkipped", self.stale)
            .count("UnknownTypes", self.unknown_types)
            .count("Failures", self.failures)
            .count("ClaimCheckFailures", self.claim_check_failures)
            .count("InboxCleaned", self.inbox_cleaned as usize)
            .latencies("BatchLatency", &[apply_latency]);
        doc
    }
}

/// The Lambda handler: applies the batch and writes its metrics (EMF) to stdout. When the
/// database could not take the batch at all, the invocation fails with the class as `errorType`
/// (SQS delivers the whole batch again, as it would every item reported failed).
pub async fn handle<S: ProjectionStore>(
    sink: &ProjectionSink<S>,
    event: LambdaEvent<SqsEvent>,
) -> Result<SqsBatchResponse, FunctionError> {
    let started = std::time::Instant::now();
    let (response, report) = sink.apply_batch(event.payload).await;
    report.metrics(started.elapsed()).emit();
    crate::telemetry::flush_traces().await;
    if let Some(error) = report.store_failure {
        error.record(SERVICE);
        return Err(error);
    }
    Ok(response)
}
