//! Giving up dead rows: each is kept with the reason for audit and never published, and its
//! aggregate's next event goes.

use serde::Serialize;
use tokio_postgres::Client;

use super::requeue::{until_not_held, CHANGE_BATCH};
use super::selection::{describe, select_batch, Requeue, SelectedEvent, Selection};

/// What a discard did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DiscardReport {
    /// Dead events now discarded (kept, never published).
    pub discarded: u64,
    /// Dead events someone held each time they were tried (run the discard again).
    pub held: u64,
    /// The events that became their aggregate's head: what the discard unparked.
    pub unparked: Vec<SelectedEvent>,
}

/// Discards the selected dead events (migration V7, `outbox_discard`): each is kept with the
/// reason for audit and never published, and its aggregate's next event goes. In batches of
/// [`CHANGE_BATCH`], each one statement; a row someone holds is tried again for up to a second.
pub async fn discard(
    client: &Client,
    selection: &Selection,
    reason: &str,
) -> Result<DiscardReport, tokio_postgres::Error> {
    let mut report = DiscardReport::default();
    let mut unparked = Vec::new();
    let mut after = 0;
    loop {
        let ids = select_batch(client, Requeue::Dead, selection, after, CHANGE_BATCH).await?;
        let Some(&last) = ids.last() else { break };
        let (done, held, promoted) = until_not_held(ids, |todo| async move {
            let row = client
                .query_one(
                    "SELECT discarded, held, unparked FROM outbox_discard($1, $2)",
                    &[&todo, &reason],
                )
                .await?;
            Ok((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?))
        })
        .await?;
        report.discarded += done.len() as u64;
        report.held += held.len() as u64;
        unparked.extend(promoted);
        after = last;
    }
    unparked.truncate(100);
    report.unparked = describe(client, &unparked).await?;
    Ok(report)
}
