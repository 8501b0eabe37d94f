//! The projection sink: an SQS-triggered function that applies payment events to the read
//! projections exactly once in effect, and reports partial batch failures
//! (`batchItemFailures`) instead of failing or acknowledging the whole batch.
//!
//! Out-of-order arrival: an event whose predecessor (by aggregate version) is not applied yet is
//! reported as a batch item failure, so SQS delivers it again after the visibility timeout; by
//! then the predecessor has usually arrived. The queue is the parking lot: no second store of
//! pending events to keep consistent, and a predecessor that never comes (dead in the outbox)
//! sends its successors to the queue's dead-letter queue after `maxReceiveCount`, from where they
//! are re-driven once it is. An event older than what the projection holds changes nothing.

use aws_lambda_events::sqs::{BatchItemFailure, SqsBatchResponse, SqsEvent};
use lambda_runtime::LambdaEvent;
use serde::Serialize;

use outbox_shared::failure::FunctionError;
use outbox_shared::metrics::MetricsDocument;
use outbox_shared::ports::ProjectionStore;
use outbox_shared::sink::{interpret, parse_delivery, ApplyOutcome, Interpreted, PaymentChange};

/// Consumer name recorded in the inbox (`SINK_CONSUMER`, default `payment-projections`).
pub const DEFAULT_CONSUMER: &str = "payment-projections";

/// What one batch did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SinkReport {
    /// Changes applied now.
    pub applied: usize,
    /// Events this consumer had applied already.
    pub duplicates: usize,
    /// Events older than the projection.
    pub stale: usize,
    /// Events of types without a projection (acknowledged).
    pub unknown_types: usize,
    /// Messages reported as failures (redelivered by SQS).
    pub failures: usize,
    /// Why the whole batch could not be applied (the database), if it could not.
    #[serde(skip)]
    pub store_failure: Option<FunctionError>,
}

/// The sink: one per Lambda instance.
pub struct ProjectionSink<S> {
    store: S,
    consumer: String,
}

impl<S: ProjectionStore> ProjectionSink<S> {
    /// A sink recording its work in the inbox under `consumer`.
    pub fn new(store: S, consumer: impl Into<String>) -> Self {
        Self {
            store,
            consumer: consumer.into(),
        }
    }

    /// The store, for wiring.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Applies a batch; the response lists only the messages to redeliver.
    pub async fn apply_batch(&self, event: SqsEvent) -> (SqsBatchResponse, SinkReport) {
        let mut report = SinkReport::default();
        let mut failed: Vec<String> = Vec::new();
        let mut changes: Vec<PaymentChange> = Vec::new();
        let mut change_ids: Vec<String> = Vec::new();
        for message in event.records {
            // Without a message id a failure could not be reported for it alone.
            let id = message.message_id.clone().unwrap_or_default();
            let parsed = parse_delivery(message.body.as_deref().unwrap_or_default())
                .and_then(|envelope| interpret(&envelope));
            match parsed {
                Ok(Interpreted::Change(change)) => {
                    changes.push(change);
                    change_ids.push(id);
                }
                Ok(Interpreted::UnknownType(event_type)) => {
                    tracing::info!(message_id = %id, %event_type, "no projection for this event type; acknowledged");
                    report.unknown_types += 1;
                }
                Err(error) => {
                    tracing::warn!(message_id = %id, %error, "message cannot be applied");
                    failed.push(id);
                }
            }
        }
        let outcomes = match self.store.apply_changes(&self.consumer, &changes).await {
            Ok(outcomes) => outcomes,
            Err(e) => {
                let reason = outbox_shared::telemetry::error_chain(&e);
                report.store_failure = Some(FunctionError::from_store(&e));
                vec![ApplyOutcome::Failed(reason); changes.len()]
            }
        };
        for ((change, id), outcome) in changes.iter().zip(change_ids).zip(outcomes) {
            match outcome {
                ApplyOutcome::Applied => report.applied += 1,
                ApplyOutcome::Duplicate => report.duplicates += 1,
                ApplyOutcome::Stale => report.stale += 1,
                ApplyOutcome::Gap => {
                    tracing::info!(message_id = %id, event_id = %change.event_id, version = change.version,
                        "earlier event of this payment not applied yet; redelivering");
                    failed.push(id);
                }
                ApplyOutcome::Failed(reason) => {
                    tracing::warn!(message_id = %id, event_id = %change.event_id, %reason, "apply failed");
                    failed.push(id);
                }
            }
        }
        report.failures = failed.len();
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
}

/// Service name in the metrics' `Service` dimension.
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
    if let Some(error) = report.store_failure {
        error.record(SERVICE);
        return Err(error);
    }
    Ok(response)
}
