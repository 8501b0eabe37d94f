//! A [`Publisher`] in memory: it keeps what it took, in order, and can be told to fail whole
//! calls (a bus that is down), refuse an event type for good, or take its time over each call.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::outbox::ClaimedEvent;
use crate::ports::{OutgoingMessage, PublishLimits, PublishOutcome, Publisher};

/// An in-memory bus; clones share it.
#[derive(Debug, Clone)]
pub struct MemoryPublisher {
    state: Arc<Mutex<State>>,
    limits: PublishLimits,
    delay: Duration,
}

#[derive(Debug, Default)]
struct State {
    /// Errors for the next whole calls.
    failing_calls: VecDeque<String>,
    refused_types: HashSet<String>,
    delivered: Vec<ClaimedEvent>,
    calls: usize,
}

impl Default for MemoryPublisher {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryPublisher {
    /// A bus that takes 10 entries of up to 256 KiB a call, at once.
    pub fn new() -> Self {
        Self {
            state: Arc::default(),
            limits: PublishLimits {
                max_entries: 10,
                max_entry_bytes: 256 * 1024,
                max_batch_bytes: 256 * 1024,
            },
            delay: Duration::ZERO,
        }
    }

    /// Each call takes `delay` before it answers.
    pub fn with_delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// Entries per call.
    pub fn with_max_entries(mut self, max_entries: usize) -> Self {
        self.limits.max_entries = max_entries;
        self
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The next `calls` calls fail as a whole with `error` (every entry to be retried).
    pub fn fail_next_calls(&self, calls: usize, error: &str) {
        self.state()
            .failing_calls
            .extend(std::iter::repeat_n(error.to_owned(), calls));
    }

    /// Events of `event_type` are refused for good from now on.
    pub fn refuse(&self, event_type: &str) {
        self.state().refused_types.insert(event_type.to_owned());
    }

    /// Every event the bus took, in the order it took them (a republished one twice).
    pub fn delivered(&self) -> Vec<ClaimedEvent> {
        self.state().delivered.clone()
    }

    /// Calls made.
    pub fn calls(&self) -> usize {
        self.state().calls
    }
}

impl Publisher for MemoryPublisher {
    fn limits(&self) -> PublishLimits {
        self.limits
    }

    fn entry_size(&self, message: &OutgoingMessage) -> usize {
        message.body.len()
    }

    async fn publish(&self, batch: &[OutgoingMessage]) -> Vec<PublishOutcome> {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        let mut state = self.state();
        state.calls += 1;
        if let Some(error) = state.failing_calls.pop_front() {
            return vec![PublishOutcome::Retry(error); batch.len()];
        }
        batch
            .iter()
            .map(|message| {
                if state.refused_types.contains(&message.event.event_type) {
                    PublishOutcome::Reject(format!("{} refused", message.event.event_type))
                } else {
                    state.delivered.push(message.event.clone());
                    PublishOutcome::Published
                }
            })
            .collect()
    }
}
