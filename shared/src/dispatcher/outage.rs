//! Outage: how a drain paces itself while the store is unavailable (100 ms, doubling to 2 s,
//! never past the stop), and which failures end it instead.

use std::time::{Duration, Instant};

use super::summary::DispatchSummary;
use crate::ports::StoreError;

/// Pacing while the database is unavailable.
#[derive(Default)]
pub(super) struct Outage {
    pause: Duration,
    /// The last failure, returned when not one claim went through.
    pub(super) last_error: Option<StoreError>,
}

/// First pause after a store failure; doubled after each further one.
const OUTAGE_FIRST_PAUSE: Duration = Duration::from_millis(100);
/// Longest pause between attempts while the database is unavailable.
const OUTAGE_MAX_PAUSE: Duration = Duration::from_secs(2);

impl Outage {
    /// After a failed store operation: a transient failure pauses (never past `stop_at`) and
    /// counts; any other failure ends the drain.
    pub(super) async fn pause(
        &mut self,
        error: StoreError,
        summary: &mut DispatchSummary,
        stop_at: Instant,
    ) -> Result<(), StoreError> {
        if !error.is_transient() {
            return Err(error);
        }
        summary.store_errors += 1;
        self.pause = if self.pause.is_zero() {
            OUTAGE_FIRST_PAUSE
        } else {
            (self.pause * 2).min(OUTAGE_MAX_PAUSE)
        };
        tracing::warn!(error = %crate::telemetry::error_chain(&error),
            pause_ms = self.pause.as_millis() as u64, "database unavailable; the drain waits and carries on");
        self.last_error = Some(error);
        tokio::time::sleep(
            self.pause
                .min(stop_at.saturating_duration_since(Instant::now())),
        )
        .await;
        Ok(())
    }

    /// A store operation went through: the next failure starts pacing afresh.
    pub(super) fn over(&mut self) {
        self.pause = Duration::ZERO;
    }
}
