//! Putting rows back in line: redriving dead rows (published for the first time) and replaying
//! published ones (delivered again), in batches of one statement each; what still holds back a
//! redriven aggregate; and the retry of rows someone holds right now, shared with the discard.

use tokio_postgres::Client;

use super::selection::{blocking_ids, describe, select_batch, Requeue, SelectedEvent, Selection};

/// Rows per statement when redriving or replaying.
pub const CHANGE_BATCH: i64 = 1_000;

/// Applies `which` to the selected rows in batches of [`CHANGE_BATCH`], oldest first, each batch
/// one statement (migration V7: `outbox_redrive` puts dead rows back in line, `outbox_replay`
/// marks published rows for delivery again); returns how many rows changed. A row that changed
/// status since it was selected (deleted by retention, redriven by someone else) is skipped; a
/// row someone holds right now (a producer committing its successor) is tried again for up to a
/// second, never waited on.
pub async fn requeue(
    client: &Client,
    which: Requeue,
    selection: &Selection,
) -> Result<u64, tokio_postgres::Error> {
    let sql = match which {
        Requeue::Dead => "SELECT changed, held FROM outbox_redrive($1)",
        Requeue::Published => "SELECT changed, held FROM outbox_replay($1)",
    };
    let mut changed = 0;
    let mut after = 0;
    loop {
        let ids = select_batch(client, which, selection, after, CHANGE_BATCH).await?;
        let Some(&last) = ids.last() else { break };
        let (done, _held, _) = until_not_held(ids, |todo| async move {
            let row = client.query_one(sql, &[&todo]).await?;
            Ok((row.try_get::<_, Vec<i64>>(0)?, row.try_get(1)?, Vec::new()))
        })
        .await?;
        changed += done.len() as u64;
        after = last;
    }
    Ok(changed)
}

/// Dead events that still hold back events of `selection` after a redrive: an aggregate's
/// events go out in version order, so a redriven event waits behind an earlier dead one.
pub async fn blocking_dead(
    client: &Client,
    selection: &Selection,
) -> Result<Vec<SelectedEvent>, tokio_postgres::Error> {
    // After the redrive the selected rows are pending.
    let ids = blocking_ids(client, selection, 100).await?;
    describe(client, &ids).await
}

/// Runs one operator statement on `ids` (it returns what it changed, what someone held right
/// now, and what it unparked), then again on the held ones, every 50 ms for up to a second: the
/// operator never waits on a lock, and a producer's commit holds a row for a moment only.
/// Returns everything changed, what was still held at the end, and everything unparked.
pub(super) async fn until_not_held<F, Fut>(
    ids: Vec<i64>,
    statement: F,
) -> Result<(Vec<i64>, Vec<i64>, Vec<i64>), tokio_postgres::Error>
where
    F: Fn(Vec<i64>) -> Fut,
    Fut:
        std::future::Future<Output = Result<(Vec<i64>, Vec<i64>, Vec<i64>), tokio_postgres::Error>>,
{
    let (mut changed, mut unparked) = (Vec::new(), Vec::new());
    let mut todo = ids;
    let mut attempts = 0;
    loop {
        let (done, held, promoted) = statement(todo).await?;
        changed.extend(done);
        unparked.extend(promoted);
        attempts += 1;
        if held.is_empty() || attempts == 20 {
            return Ok((changed, held, unparked));
        }
        todo = held;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
