//! Publish: a leased batch goes to the bus as envelopes in bus-sized calls, at most
//! `max_in_flight` at once, each call a task of its own; every event's outcome is noted (recorded
//! later, by the drain). No database work happens here.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures_util::stream::{self, StreamExt};

use super::claim::{Claim, ClaimedBatch};
use super::outcome::{self, RetryPolicy};
use crate::claim_check::{ClaimCheckSettings, PayloadStore, S3Pointer};
use crate::envelope::EventEnvelope;
use crate::outbox::{ClaimedEvent, Outcomes};
use crate::ports::{OutgoingMessage, PublishOutcome, Publisher};

/// The publisher and what publishing needs of the settings, shared with the tasks that publish.
pub(super) struct Bus<P> {
    pub(super) publisher: P,
    pub(super) max_in_flight: usize,
    /// `max_in_flight` permits, one per call at the bus or upload to the claim check: the
    /// drain's batch and the lane's share them.
    pub(super) calls: tokio::sync::Semaphore,
    pub(super) retry: RetryPolicy,
    /// Where envelopes over the threshold go, when configured.
    pub(super) claim_check: Option<ClaimCheck>,
}

/// The claim check's settings and its store.
pub struct ClaimCheck {
    /// Bucket, threshold, key prefix.
    pub settings: ClaimCheckSettings,
    /// The store (S3: `pg_outbox::aws::s3::S3PayloadStore`).
    pub store: Arc<dyn PayloadStore>,
}

/// Why a message is not ready to go as it is.
enum NotReady {
    /// It can never go (unreadable metadata, too large with no claim check): dead.
    Rejected(ClaimedEvent, String),
    /// Over the threshold: its envelope goes to the claim check first.
    ToStore(OutgoingMessage),
}

impl<P: Publisher + 'static> Bus<P> {
    /// Publishes a leased batch in bus-sized calls, at most `max_in_flight` at once, and notes
    /// each row's outcome (not recorded yet).
    #[tracing::instrument(skip_all, fields(lease_owner = %claim.lease_owner, rows = claim.events.len()))]
    pub(super) async fn publish(self: Arc<Self>, claim: Claim) -> ClaimedBatch {
        let mut batch = ClaimedBatch {
            lease_owner: claim.lease_owner,
            claimed: claim.events.len(),
            outcomes: Outcomes::default(),
            publish_calls: 0,
            failed_publish_calls: 0,
            claim_latency: claim.latency,
            publish_latencies: Vec::new(),
            commit_to_publish: Vec::new(),
            trace_contexts_dropped: 0,
        };
        batch.trace_contexts_dropped = claim
            .events
            .iter()
            // Once per event: on its first attempt, not on each retry.
            .filter(|event| event.attempts <= 1 && EventEnvelope::drops_traceparent(event))
            .inspect(|event| {
                tracing::warn!(event_id = %event.event_id, "invalid traceparent left out of the envelope")
            })
            .count();
        let (mut messages, not_ready) = self.prepare(claim.events);
        let mut to_store = Vec::new();
        for item in not_ready {
            match item {
                NotReady::Rejected(event, reason) => {
                    self.note(&mut batch.outcomes, &event, PublishOutcome::Reject(reason))
                }
                NotReady::ToStore(message) => to_store.push(message),
            }
        }
        // Large envelopes go to the claim check first, as many at once as publish calls may be.
        let stored: Vec<_> = stream::iter(to_store)
            .map(|message| self.store(message))
            .buffer_unordered(self.max_in_flight.max(1))
            .collect()
            .await;
        for result in stored {
            match result {
                Ok(message) => messages.push(message),
                Err((event, outcome)) => self.note(&mut batch.outcomes, &event, outcome),
            }
        }
        let calls = plan_calls(&self.publisher, messages);
        batch.publish_calls = calls.len();
        let answers: Vec<Answer> = stream::iter(calls)
            .map(|call| {
                // Each call is a task of its own, so the SDK's serializing, signing and
                // parsing spread over the runtime's threads.
                let bus = Arc::clone(&self);
                let task = AbortOnDrop::spawn(async move {
                    // Never closed: the bus owns it.
                    let _permit = bus.calls.acquire().await.ok();
                    let started = Instant::now();
                    let outcomes = bus.publisher.publish(&call).await;
                    Answer {
                        call,
                        outcomes,
                        took: started.elapsed(),
                        at: Utc::now(),
                    }
                });
                task.join()
            })
            .buffer_unordered(self.max_in_flight)
            .collect()
            .await;
        batch.publish_latencies = answers.iter().map(|a| a.took).collect();
        for answer in answers {
            if answer
                .outcomes
                .iter()
                .all(|r| matches!(r, PublishOutcome::Retry(_)))
            {
                batch.failed_publish_calls += 1;
            }
            for (message, outcome) in answer.call.iter().zip(answer.outcomes) {
                // From the append (or the time it was delayed to) to the bus's answer, for the
                // events that are live (a replay's append was long ago).
                if matches!(outcome, PublishOutcome::Published) && !message.event.replay {
                    let due = message
                        .event
                        .deliver_at
                        .map_or(message.event.created_at, |at| {
                            at.max(message.event.created_at)
                        });
                    let waited = (answer.at - due).to_std();
                    batch.commit_to_publish.push(waited.unwrap_or_default());
                }
                self.note(&mut batch.outcomes, &message.event, outcome);
            }
        }
        batch
    }

    /// Serializes each row's envelope. Rows that cannot be published at all (unreadable
    /// metadata, larger than the bus takes with no claim check) come back rejected with the
    /// reason; rows over the claim check's threshold come back to be stored first.
    fn prepare(&self, claimed: Vec<ClaimedEvent>) -> (Vec<OutgoingMessage>, Vec<NotReady>) {
        let limit = self.publisher.limits().max_entry_bytes;
        let threshold = self
            .claim_check
            .as_ref()
            .map(|c| c.settings.threshold.unwrap_or(limit).min(limit));
        let mut ready = Vec::with_capacity(claimed.len());
        let mut not_ready = Vec::new();
        for event in claimed {
            let body = match EventEnvelope::body_of(&event) {
                Ok(body) => body,
                Err(e) => {
                    not_ready.push(NotReady::Rejected(
                        event,
                        format!("malformed event, cannot build its envelope: {e}"),
                    ));
                    continue;
                }
            };
            let message = OutgoingMessage::new(event, body);
            let size = self.publisher.entry_size(&message);
            match threshold {
                Some(threshold) if size > threshold => not_ready.push(NotReady::ToStore(message)),
                None if size > limit => not_ready.push(NotReady::Rejected(
                    message.event,
                    format!("message too large: {size} bytes, the bus takes at most {limit} (set CLAIM_CHECK_BUCKET to send larger ones through S3)"),
                )),
                _ => ready.push(message),
            }
        }
        (ready, not_ready)
    }

    /// Stores a message's envelope in the claim check and makes the message its pointer. S3 not
    /// answering is a retry of that row (nothing was sent); a pointer the bus would still
    /// refuse is dead.
    async fn store(
        &self,
        mut message: OutgoingMessage,
    ) -> Result<OutgoingMessage, (ClaimedEvent, PublishOutcome)> {
        // An upload counts against max_in_flight as a publish call does.
        let _permit = self.calls.acquire().await.ok();
        let Some(claim_check) = &self.claim_check else {
            return Err((
                message.event,
                PublishOutcome::Reject("no claim check".into()),
            ));
        };
        let pointer = S3Pointer {
            bucket: claim_check.settings.bucket.clone(),
            key: claim_check
                .settings
                .key(&message.event.tenant_id, message.event.event_id),
        };
        if let Err(e) = claim_check.store.put(&pointer, &message.body).await {
            tracing::warn!(event_id = %message.event.event_id, error = %e, "claim check unavailable");
            return Err((message.event, PublishOutcome::Retry(e)));
        }
        match self.publisher.pointer_body(&message.body, &pointer) {
            Ok((body, extended_size)) => {
                message.body = body;
                message.extended_size = extended_size;
            }
            Err(e) => return Err((message.event, PublishOutcome::Reject(e))),
        }
        let (size, limit) = (
            self.publisher.entry_size(&message),
            self.publisher.limits().max_entry_bytes,
        );
        if size > limit {
            return Err((
                message.event,
                PublishOutcome::Reject(format!(
                    "message too large even as a claim check pointer: {size} bytes, the bus takes at most {limit}"
                )),
            ));
        }
        Ok(message)
    }

    fn note(&self, outcomes: &mut Outcomes, event: &ClaimedEvent, answer: PublishOutcome) {
        outcome::note(outcomes, event, outcome::decide(event, answer, &self.retry));
    }
}

/// One publish call's answer: its messages, their outcomes, how long the call took and when it
/// was answered.
struct Answer {
    call: Vec<OutgoingMessage>,
    outcomes: Vec<PublishOutcome>,
    took: Duration,
    at: DateTime<Utc>,
}

/// Groups messages into publish calls within the bus's entry count and byte limits, in order.
pub(super) fn plan_calls<P: Publisher>(
    publisher: &P,
    messages: Vec<OutgoingMessage>,
) -> Vec<Vec<OutgoingMessage>> {
    let limits = publisher.limits();
    let mut calls = Vec::new();
    let mut current: Vec<OutgoingMessage> = Vec::with_capacity(limits.max_entries);
    let mut bytes = 0;
    for message in messages {
        let size = publisher.entry_size(&message);
        if !current.is_empty()
            && (current.len() == limits.max_entries || bytes + size > limits.max_batch_bytes)
        {
            calls.push(std::mem::take(&mut current));
            bytes = 0;
        }
        bytes += size;
        current.push(message);
    }
    if !current.is_empty() {
        calls.push(current);
    }
    calls
}

/// A spawned part of a drain that ends with it: a drain dropped mid-publish (the invocation
/// timed out) leaves no publish running behind it.
pub(super) struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T: Send + 'static> AbortOnDrop<T> {
    /// Spawns `future` in the current span.
    pub(super) fn spawn(future: impl std::future::Future<Output = T> + Send + 'static) -> Self {
        Self(tokio::spawn(tracing::Instrument::in_current_span(future)))
    }

    /// Its output; a panic in it goes on in the caller.
    pub(super) async fn join(mut self) -> T {
        match (&mut self.0).await {
            Ok(output) => output,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
