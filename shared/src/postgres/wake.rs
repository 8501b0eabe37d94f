//! Waking the dispatcher after a commit (migration V3's `outbox_request_kick`): of all the
//! producers that commit within the debounce, one wakes it.

use tokio_postgres::types::Type;
use tokio_postgres::Client;

use crate::ports::{StoreError, WakeDecision};

/// Asks `outbox_request_kick` whether this caller wakes the dispatcher.
pub async fn request_wake(
    client: &Client,
    debounce: std::time::Duration,
) -> Result<WakeDecision, StoreError> {
    let row = client
        .query_typed(
            "SELECT kick, wait_ms FROM outbox_request_kick(make_interval(secs => $1))",
            &[(&debounce.as_secs_f64(), Type::FLOAT8)],
        )
        .await?;
    let row = row
        .first()
        .ok_or_else(|| StoreError::Corrupt("outbox_request_kick returned no row".into()))?;
    let wait_ms: f64 = row.try_get("wait_ms")?;
    Ok(WakeDecision {
        wake: row.try_get("kick")?,
        quiet_for: std::time::Duration::from_secs_f64(wait_ms.max(0.0) / 1000.0),
    })
}
