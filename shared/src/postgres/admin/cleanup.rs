//! Retention: deleting published outbox rows and consumers' inbox entries older than a
//! retention, one short statement at a time (the dispatcher's and the sink's retention run the
//! same statements), and the paced run of `outboxctl cleanup`.

use serde::Serialize;
use tokio_postgres::types::Type;
use tokio_postgres::Client;

/// What a cleanup deletes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiring {
    /// Published outbox rows.
    Outbox,
    /// Inbox entries (`processed_events`) of every consumer. Aggregate positions stay, so an
    /// older redelivery is still recognised as applied.
    Inbox,
}

/// Rows a cleanup with this retention would delete now.
pub async fn count_expired(
    client: &Client,
    what: Expiring,
    retention: std::time::Duration,
) -> Result<i64, tokio_postgres::Error> {
    let sql = match what {
        Expiring::Outbox => {
            "SELECT count(*) FROM outbox
             WHERE id < (SELECT outbox_first_id_at(now() - make_interval(secs => $1)))
               AND status = 'published' AND published_at < now() - make_interval(secs => $1)"
        }
        Expiring::Inbox => {
            "SELECT count(*) FROM processed_events
             WHERE processed_at < now() - make_interval(secs => $1)"
        }
    };
    let row = client
        .query_typed(sql, &[(&retention.as_secs_f64(), Type::FLOAT8)])
        .await?;
    row[0].try_get(0)
}

/// Deletes one batch of inbox entries older than the retention; served by
/// `processed_events_processed_at_idx`.
pub async fn delete_inbox_entries(
    client: &Client,
    retention: std::time::Duration,
    max_rows: i32,
) -> Result<u64, tokio_postgres::Error> {
    client
        .execute_typed(
            "DELETE FROM processed_events
             WHERE ctid = ANY (ARRAY(
                 SELECT ctid FROM processed_events
                 WHERE processed_at < now() - make_interval(secs => $1)
                 LIMIT $2))",
            &[
                (&retention.as_secs_f64(), Type::FLOAT8),
                (&(max_rows as i64), Type::INT8),
            ],
        )
        .await
}

/// One cleanup statement: deletes up to `max_rows` expired published rows, returns how many.
pub async fn delete_published(
    client: &Client,
    retention: std::time::Duration,
    max_rows: i32,
) -> Result<u64, tokio_postgres::Error> {
    let row = client
        .query_typed(
            "SELECT outbox_delete_published(make_interval(secs => $1), $2)",
            &[
                (&retention.as_secs_f64(), Type::FLOAT8),
                (&max_rows, Type::INT4),
            ],
        )
        .await?;
    let deleted: i32 = row[0].try_get(0)?;
    Ok(deleted as u64)
}

/// How a cleanup run paces its statements.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pace {
    /// Spend at most this share of the time (0 < share <= 1) in delete statements: after a
    /// statement that took `t`, wait `t · (1 − share) / share`. 1.0 runs them back to back.
    Duty(f64),
    /// One statement per interval, as the dispatcher does between its claims.
    Every(std::time::Duration),
}

/// What a cleanup run did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CleanupRun {
    /// Rows deleted.
    pub deleted: u64,
    /// Delete statements run.
    pub statements: u64,
    /// Wall time.
    pub seconds: f64,
}

/// How a cleanup run deletes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Batches {
    /// Rows per statement (one short transaction each).
    pub size: i32,
    /// Pacing between statements.
    pub pace: Pace,
    /// Stop after this many statements.
    pub max_statements: Option<u64>,
}

/// Deletes expired rows statement after statement, paced by `batches.pace`, until a statement
/// deletes less than a full batch, `max_statements` ran, or `stop` is set. `progress` is called
/// after each statement with the totals so far.
pub async fn run_cleanup(
    client: &Client,
    what: Expiring,
    retention: std::time::Duration,
    batches: Batches,
    stop: &std::sync::atomic::AtomicBool,
    mut progress: impl FnMut(&CleanupRun),
) -> Result<CleanupRun, tokio_postgres::Error> {
    let Batches {
        size: batch,
        pace,
        max_statements,
    } = batches;
    let started = std::time::Instant::now();
    let mut run = CleanupRun::default();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let statement = std::time::Instant::now();
        let deleted = match what {
            Expiring::Outbox => delete_published(client, retention, batch).await?,
            Expiring::Inbox => delete_inbox_entries(client, retention, batch).await?,
        };
        let took = statement.elapsed();
        run.deleted += deleted;
        run.statements += 1;
        run.seconds = started.elapsed().as_secs_f64();
        progress(&run);
        if deleted < batch as u64 || max_statements.is_some_and(|max| run.statements >= max) {
            break;
        }
        let wait = match pace {
            Pace::Duty(share) => {
                took.mul_f64((1.0 - share.clamp(0.01, 1.0)) / share.clamp(0.01, 1.0))
            }
            Pace::Every(interval) => interval.saturating_sub(took),
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
    run.seconds = started.elapsed().as_secs_f64();
    Ok(run)
}
