//! SQL of the events feed (migration V6): pages read from `outbox_feed_idx`, acknowledgments in
//! `outbox_feed_acks`.

use tokio_postgres::types::Type;
use uuid::Uuid;

use crate::envelope::EventEnvelope;
use crate::feed::{
    AckOutcome, Acknowledgment, ConsumerName, FeedCursor, FeedPage, FeedQuery, TypeFilter,
};
use crate::ids::TenantId;
use crate::ports::StoreError;

/// One page: a range scan of `outbox_feed_idx` from the cursor, filters applied to the rows it
/// reads, one row more than the page to tell whether more follow. Every filter is a parameter
/// that is NULL when unused; the statement is planned with its values (unnamed statement), so an
/// unused filter costs nothing.
const PAGE: &str = "
    SELECT o.id, o.event_id, o.tenant_id, o.aggregate_type, o.aggregate_id, o.aggregate_version,
           o.event_type, o.schema_version, o.payload, o.metadata, o.attempts, o.created_at,
           o.replay, o.feed_position, o.deliver_at
    FROM outbox o
    WHERE o.tenant_id = $1
      AND o.feed_position IS NOT NULL
      AND o.feed_position > $2
      AND ($3::text IS NULL OR o.event_type = $3)
      AND ($4::text IS NULL OR starts_with(o.event_type, $4))
      AND ($5::text IS NULL OR o.aggregate_id = $5)
      AND ($6::timestamptz IS NULL OR o.created_at >= $6)
      AND ($7::timestamptz IS NULL OR o.created_at < $7)
      AND ($8::text IS NULL OR NOT $9 OR NOT EXISTS (
            SELECT 1 FROM outbox_feed_acks a WHERE a.event_id = o.event_id AND a.consumer = $8))
    ORDER BY o.feed_position
    LIMIT $10";

/// Records the acknowledgment if the event is in the tenant's feed, and reads the one recorded
/// before if there was one (same statement, same snapshot).
const ACKNOWLEDGE: &str = "
    WITH event AS (
        SELECT event_id, tenant_id FROM outbox
        WHERE event_id = $1 AND tenant_id = $2 AND feed_position IS NOT NULL),
    recorded AS (
        INSERT INTO outbox_feed_acks (event_id, consumer, tenant_id)
        SELECT event_id, $3, tenant_id FROM event
        ON CONFLICT (event_id, consumer) DO NOTHING
        RETURNING acknowledged_at)
    SELECT EXISTS (SELECT 1 FROM event) AS found,
           (SELECT acknowledged_at FROM recorded) AS recorded_at,
           (SELECT acknowledged_at FROM outbox_feed_acks
            WHERE event_id = $1 AND consumer = $3 AND tenant_id = $2) AS earlier_at";

/// The page statement's parameters for `query`, in `$1..$10` order.
struct PageParameters<'a> {
    exact: Option<&'a str>,
    prefix: Option<&'a str>,
    consumer: Option<&'a str>,
    fetch: i64,
}

impl<'a> PageParameters<'a> {
    fn of(query: &'a FeedQuery) -> Self {
        let (exact, prefix) = match &query.event_type {
            Some(TypeFilter::Exact(t)) => (Some(t.as_str()), None),
            Some(TypeFilter::Prefix(p)) => (None, Some(p.as_str())),
            None => (None, None),
        };
        Self {
            exact,
            prefix,
            consumer: query.consumer.as_ref().map(ConsumerName::as_str),
            // One row more than the page, to tell whether more follow.
            fetch: query.limit + 1,
        }
    }

    async fn query(
        &self,
        client: &tokio_postgres::Client,
        sql: &str,
        query: &FeedQuery,
    ) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
        client
            .query_typed(
                sql,
                &[
                    (&query.tenant.as_str(), Type::TEXT),
                    (&query.after.position, Type::INT8),
                    (&self.exact, Type::TEXT),
                    (&self.prefix, Type::TEXT),
                    (&query.aggregate_id, Type::TEXT),
                    (&query.created_from, Type::TIMESTAMPTZ),
                    (&query.created_to, Type::TIMESTAMPTZ),
                    (&self.consumer, Type::TEXT),
                    (&query.exclude_acknowledged, Type::BOOL),
                    (&self.fetch, Type::INT8),
                ],
            )
            .await
    }
}

/// Reads one page of the feed.
pub async fn page(
    client: &tokio_postgres::Client,
    query: &FeedQuery,
) -> Result<FeedPage, StoreError> {
    let rows = PageParameters::of(query).query(client, PAGE, query).await?;
    let has_more = rows.len() as i64 > query.limit;
    let mut events = Vec::with_capacity(rows.len().min(query.limit as usize));
    let mut last = query.after;
    for row in rows.iter().take(query.limit as usize) {
        let event = super::outbox::claimed_from_row(row)?;
        let envelope = EventEnvelope::from_row(&event).map_err(|e| {
            StoreError::Corrupt(format!("event {} has no envelope: {e}", event.event_id))
        })?;
        events.push(envelope);
        last = FeedCursor {
            position: row.try_get("feed_position")?,
        };
    }
    Ok(FeedPage {
        events,
        next_cursor: last.encode(&query.tenant),
        has_more,
    })
}

/// Acknowledges `event_id` for `consumer`. Two first acknowledgments racing each other: the
/// loser sees neither its own insert nor (in its snapshot) the winner's, and asks again.
pub async fn acknowledge(
    client: &tokio_postgres::Client,
    tenant: &TenantId,
    event_id: Uuid,
    consumer: &ConsumerName,
) -> Result<AckOutcome, StoreError> {
    for _ in 0..3 {
        let row = client
            .query_one(
                ACKNOWLEDGE,
                &[&event_id, &tenant.as_str(), &consumer.as_str()],
            )
            .await?;
        if !row.try_get::<_, bool>("found")? {
            return Ok(AckOutcome::NotFound);
        }
        let ack = |at| Acknowledgment {
            event_id,
            consumer: consumer.as_str().to_owned(),
            acknowledged_at: at,
        };
        if let Some(at) = row.try_get("recorded_at")? {
            return Ok(AckOutcome::Recorded(ack(at)));
        }
        if let Some(at) = row.try_get("earlier_at")? {
            return Ok(AckOutcome::AlreadyAcknowledged(ack(at)));
        }
    }
    Err(StoreError::Corrupt(format!(
        "acknowledgment of {event_id} by {} neither recorded nor found",
        consumer.as_str()
    )))
}

/// The feed on the instance's connection: a service's API serves it from the [`super::Db`] its
/// commands use.
impl crate::ports::EventFeedStore for super::Db {
    async fn feed_page(&self, query: &FeedQuery) -> Result<FeedPage, StoreError> {
        self.run(|client| async move { page(&client, query).await })
            .await
    }

    async fn acknowledge(
        &self,
        tenant: &TenantId,
        event_id: Uuid,
        consumer: &ConsumerName,
    ) -> Result<AckOutcome, StoreError> {
        self.run(|client| async move { acknowledge(&client, tenant, event_id, consumer).await })
            .await
    }
}

/// The plan of `query`'s page (`EXPLAIN`, for tests and the benchmark).
pub async fn explain_page(
    client: &tokio_postgres::Client,
    query: &FeedQuery,
) -> Result<String, tokio_postgres::Error> {
    let rows = PageParameters::of(query)
        .query(client, &format!("EXPLAIN (COSTS OFF) {PAGE}"), query)
        .await?;
    Ok(rows
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect::<Vec<_>>()
        .join("\n"))
}
