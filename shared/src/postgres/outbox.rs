//! (Past 400 lines: the dispatcher-side SQL of the outbox, one statement per port method, with its row mapping.)
//!
//! SQL of the `outbox` table on the dispatcher's side: the claim, the record of its outcomes
//! (`outbox_record`, migration V7), heartbeats, the backlog and retention. Appending is
//! [`crate::producer::append`].

use tokio_postgres::types::Type;

/// Leases publishable rows: `outbox_claim` (migrations V8, V19) says which, and why each rule
/// holds: pending aggregate heads that are due, shared between tenants by their weights, within
/// their caps, none of a paused tenant's (`outbox_tenant_limits`; a tenant with 200,000 events
/// waiting does not hold another's back beyond one claim), then replays; `FOR UPDATE SKIP
/// LOCKED`, and a lease written in this one autocommitted statement. `$4` is the last tenant this
/// store's previous claim served: with more tenants than the batch, the next claim starts after
/// it.
/// - Why version order is commit order, with no wait on other transactions: appending locks the
///   aggregate's row in `outbox_aggregates` until the appending transaction ends, so version N+1
///   commits after version N (migration V7). A long transaction elsewhere in the cluster holds
///   back nothing.
/// - `locked_by` is fresh for every claim: it fences the claim's outcomes (`outbox_record`).
const CLAIM: &str = "
    SELECT id, event_id, tenant_id, aggregate_type, aggregate_id, aggregate_version, event_type,
           schema_version, payload, metadata, attempts, created_at, replay, deliver_at
    FROM outbox_claim($1, $2, $3, $4)";

/// The lane's claim (`outbox_claim_waiting`, migration V15): due heads of the tenants not in `$4`,
/// fresh owner, no replays.
const CLAIM_WAITING: &str = "
    SELECT id, event_id, tenant_id, aggregate_type, aggregate_id, aggregate_version, event_type,
           schema_version, payload, metadata, attempts, created_at, replay, deliver_at
    FROM outbox_claim_waiting($1, $2, $3, $4)";

/// One claim's outcomes in one statement (migration V7): fenced by the lease, rows someone holds
/// deferred (returned), successors promoted.
const RECORD: &str = "SELECT outbox_record($1, $2, $3, $4, $5, $6, $7)";

/// The backlog of one tenant ($1), or of all when $1 is NULL: what the dispatcher reports after
/// each drain and `outboxctl status` shows. Served by the two partial indexes (pending, dead):
/// the cost follows the backlog, not the rows retained. With the cluster's oldest transaction
/// holding an xid.
fn backlog_sql() -> String {
    format!(
        "SELECT p.pending, p.delayed,
                greatest(coalesce(extract(epoch FROM now() - p.oldest), 0), 0)::float8 AS oldest_age,
                (SELECT count(*) FROM outbox
                 WHERE status = 'dead' AND ($1::text IS NULL OR tenant_id = $1)) AS dead,
                {} AS oldest_xact_age
         FROM (SELECT count(*) AS pending,
                      count(*) FILTER (WHERE o.deliver_at > now()) AS delayed,
                      -- A delayed event, and its aggregate's events behind it, are pending from
                      -- its deliver_at on, not before (the latest of the aggregate's, V10).
                      min(CASE WHEN o.aggregate_version >= d.from_version
                               THEN greatest(o.created_at, d.until)
                               ELSE o.created_at END) AS oldest
               FROM outbox o
               LEFT JOIN (SELECT tenant_id, aggregate_type, aggregate_id,
                                 min(aggregate_version) AS from_version, max(deliver_at) AS until
                          FROM outbox
                          WHERE status = 'pending' AND deliver_at IS NOT NULL
                            AND ($1::text IS NULL OR tenant_id = $1)
                          GROUP BY 1, 2, 3) d
                 ON d.tenant_id = o.tenant_id AND d.aggregate_type = o.aggregate_type
                AND d.aggregate_id = o.aggregate_id
               WHERE o.status = 'pending' AND ($1::text IS NULL OR o.tenant_id = $1)) p",
        crate::outbox::OLDEST_TRANSACTION_AGE_SQL
    )
}

/// Reads the backlog of `tenant`, or of every tenant, on `client`.
pub(crate) async fn backlog_in(
    client: &tokio_postgres::Client,
    tenant: Option<&str>,
) -> Result<crate::outbox::Backlog, tokio_postgres::Error> {
    let rows = client
        .query_typed(&backlog_sql(), &[(&tenant, Type::TEXT)])
        .await?;
    let row = &rows[0];
    Ok(crate::outbox::Backlog {
        pending: row.try_get("pending")?,
        delayed: row.try_get("delayed")?,
        oldest_pending_age_seconds: row.try_get("oldest_age")?,
        dead: row.try_get("dead")?,
        oldest_transaction_age_seconds: row.try_get("oldest_xact_age")?,
    })
}

/// Renews the owner's heartbeat, and forgets those of dispatchers that died a while ago.
const HEARTBEAT: &str = "
    WITH expired AS (
        DELETE FROM outbox_dispatcher_heartbeats
        WHERE active_until < now() - interval '1 minute' AND owner <> $1)
    INSERT INTO outbox_dispatcher_heartbeats (owner, active_until)
    VALUES ($1, now() + make_interval(secs => $2))
    ON CONFLICT (owner) DO UPDATE SET active_until = excluded.active_until";

/// Only the owner's own heartbeat goes: another dispatcher still draining keeps its own.
const RELEASE: &str = "DELETE FROM outbox_dispatcher_heartbeats WHERE owner = $1";

/// The dispatcher's [`OutboxStore`](crate::ports::OutboxStore) on PostgreSQL.
pub struct PgOutboxStore {
    db: super::Db,
    /// The last tenant the previous claim served (see [`CLAIM`]).
    after: std::sync::Mutex<String>,
}

impl PgOutboxStore {
    /// A store on the instance's connection.
    pub fn new(db: super::Db) -> Self {
        Self {
            db,
            after: std::sync::Mutex::new(String::new()),
        }
    }

    /// The connection, for start-up warm-up.
    pub fn db(&self) -> &super::Db {
        &self.db
    }
}

impl PgOutboxStore {
    /// Runs a claim function (`$1` batch, `$2` lease seconds, `$3` owner, `$4` the function's
    /// own) and returns its rows in id order.
    async fn claim_with(
        &self,
        sql: &str,
        limit: i64,
        lease: std::time::Duration,
        lease_owner: &str,
        fourth: (&(dyn tokio_postgres::types::ToSql + Sync), Type),
    ) -> Result<Vec<crate::outbox::ClaimedEvent>, crate::ports::StoreError> {
        let lease_secs = lease.as_secs_f64();
        let (value, ty) = fourth;
        let ty = &ty;
        let rows = self
            .db
            .run(|client| async move {
                Ok(client
                    .query_typed(
                        sql,
                        &[
                            (&limit, Type::INT8),
                            (&lease_secs, Type::FLOAT8),
                            (&lease_owner, Type::TEXT),
                            (value, ty.clone()),
                        ],
                    )
                    .await?)
            })
            .await?;
        let mut claimed = rows
            .iter()
            .map(claimed_from_row)
            .collect::<Result<Vec<_>, tokio_postgres::Error>>()?;
        claimed.sort_by_key(|e| e.id);
        Ok(claimed)
    }

    fn after(&self) -> std::sync::MutexGuard<'_, String> {
        // A poisoned cursor is still a tenant name: the rotation goes on from it.
        self.after
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Where a claim ended its last turn (`outbox_claim`'s cut: turn by turn, within a turn the
/// tenants after `after` first, then the rest, in byte order): the next claim starts after it.
/// A tenant's rows fill its turns 1..n, so the last turn is that of the tenants with the most
/// live rows; replays come after the turns and do not count. None when no live row was taken.
/// With weights (migration V19) the cut goes round by round, a tenant of weight w taking w turns
/// in each, and the tenant found here may be one that ended an earlier round than the last: it
/// is still a tenant this claim served, after `after` in the rotation, so the next claim starts
/// at least one tenant further and every tenant is served in turn (the weights are not read
/// here, so the claim needs nothing but its own rows).
fn last_served<'a>(after: &str, live_tenants: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let mut rows: std::collections::BTreeMap<&str, usize> = std::collections::BTreeMap::new();
    for tenant in live_tenants {
        *rows.entry(tenant).or_default() += 1;
    }
    let turns = rows.values().copied().max()?;
    let last_turn = rows
        .iter()
        .filter(|(_, n)| **n == turns)
        .map(|(tenant, _)| *tenant);
    let (mut wrapped, mut ahead) = (None::<&str>, None::<&str>);
    for tenant in last_turn {
        // Ascending: the last one seen on each side is the furthest.
        if tenant <= after {
            wrapped = Some(tenant);
        } else {
            ahead = Some(tenant);
        }
    }
    wrapped.or(ahead)
}

impl crate::ports::OutboxStore for PgOutboxStore {
    #[tracing::instrument(skip_all, fields(limit = limit, lease_owner = %lease_owner))]
    async fn claim_batch(
        &self,
        limit: i64,
        lease: std::time::Duration,
        lease_owner: &str,
    ) -> Result<Vec<crate::outbox::ClaimedEvent>, crate::ports::StoreError> {
        let after = self.after().clone();
        let after = after.as_str();
        let claimed = self
            .claim_with(CLAIM, limit, lease, lease_owner, (&after, Type::TEXT))
            .await?;
        let live = claimed
            .iter()
            .filter(|e| !e.replay)
            .map(|e| e.tenant_id.as_str());
        if let Some(last) = last_served(after, live) {
            *self.after() = last.to_owned();
        }
        Ok(claimed)
    }

    #[tracing::instrument(skip_all, fields(limit = limit, lease_owner = %lease_owner, skip = skip.len()))]
    async fn claim_waiting(
        &self,
        limit: i64,
        lease: std::time::Duration,
        lease_owner: &str,
        skip: &[String],
    ) -> Result<Vec<crate::outbox::ClaimedEvent>, crate::ports::StoreError> {
        self.claim_with(
            CLAIM_WAITING,
            limit,
            lease,
            lease_owner,
            (&skip, Type::TEXT_ARRAY),
        )
        .await
    }

    #[tracing::instrument(skip_all, fields(published = outcomes.published.len(),
        retries = outcomes.retries.len(), dead = outcomes.dead.len()))]
    async fn record_outcomes(
        &self,
        lease_owner: &str,
        outcomes: &crate::outbox::Outcomes,
    ) -> Result<crate::outbox::Outcomes, crate::ports::StoreError> {
        self.db
            .run(|client| async move {
                Ok(record_outcomes_in(&client, lease_owner, outcomes).await?)
            })
            .await
    }

    async fn backlog(&self) -> Result<crate::outbox::Backlog, crate::ports::StoreError> {
        self.db
            .run(|client| async move { Ok(backlog_in(&client, None).await?) })
            .await
    }

    async fn heartbeat(
        &self,
        owner: &str,
        ttl: std::time::Duration,
    ) -> Result<(), crate::ports::StoreError> {
        let ttl = ttl.as_secs_f64();
        self.db
            .run(|client| async move {
                client
                    .execute_typed(HEARTBEAT, &[(&owner, Type::TEXT), (&ttl, Type::FLOAT8)])
                    .await?;
                Ok(())
            })
            .await
    }

    async fn release(&self, owner: &str) -> Result<(), crate::ports::StoreError> {
        self.db
            .run(|client| async move {
                client
                    .execute_typed(RELEASE, &[(&owner, Type::TEXT)])
                    .await?;
                Ok(())
            })
            .await
    }

    #[tracing::instrument(skip_all, fields(max_rows = max_rows))]
    async fn delete_published(
        &self,
        retention: std::time::Duration,
        max_rows: i32,
    ) -> Result<u64, crate::ports::StoreError> {
        self.db
            .run(|client| async move {
                Ok(super::admin::delete_published(&client, retention, max_rows).await?)
            })
            .await
    }
}

/// Records the outcomes of one claim in one statement on `client`; returns those of rows someone
/// holds right now (to record on a later call). Rows no longer leased to `lease_owner` are
/// neither changed nor returned: their outcome is late, and the row's newer state stands.
pub async fn record_outcomes_in(
    client: &tokio_postgres::Client,
    lease_owner: &str,
    outcomes: &crate::outbox::Outcomes,
) -> Result<crate::outbox::Outcomes, tokio_postgres::Error> {
    let retry_ids: Vec<i64> = outcomes.retries.iter().map(|r| r.0).collect();
    let delays: Vec<f64> = outcomes.retries.iter().map(|r| r.1.as_secs_f64()).collect();
    let retry_errors: Vec<&str> = outcomes.retries.iter().map(|r| r.2.as_str()).collect();
    let dead_ids: Vec<i64> = outcomes.dead.iter().map(|d| d.0).collect();
    let dead_errors: Vec<&str> = outcomes.dead.iter().map(|d| d.1.as_str()).collect();
    let row = client
        .query_typed(
            RECORD,
            &[
                (&lease_owner, Type::TEXT),
                (&outcomes.published, Type::INT8_ARRAY),
                (&retry_ids, Type::INT8_ARRAY),
                (&delays, Type::FLOAT8_ARRAY),
                (&retry_errors, Type::TEXT_ARRAY),
                (&dead_ids, Type::INT8_ARRAY),
                (&dead_errors, Type::TEXT_ARRAY),
            ],
        )
        .await?;
    let deferred: Vec<i64> = row[0]
        .try_get::<_, Option<Vec<i64>>>(0)?
        .unwrap_or_default();
    let deferred: std::collections::HashSet<i64> = deferred.into_iter().collect();
    Ok(outcomes.split(|id| deferred.contains(&id)).0)
}

pub(crate) fn claimed_from_row(
    row: &tokio_postgres::Row,
) -> Result<crate::outbox::ClaimedEvent, tokio_postgres::Error> {
    let metadata: serde_json::Value = row.try_get("metadata")?;
    Ok(crate::outbox::ClaimedEvent {
        id: row.try_get("id")?,
        event_id: row.try_get("event_id")?,
        tenant_id: row.try_get("tenant_id")?,
        aggregate_type: row.try_get("aggregate_type")?,
        aggregate_id: row.try_get("aggregate_id")?,
        aggregate_version: row.try_get("aggregate_version")?,
        event_type: row.try_get("event_type")?,
        schema_version: row.try_get("schema_version")?,
        payload: row.try_get("payload")?,
        xray_trace_header: metadata
            .get("xray_trace_header")
            .and_then(|v| v.as_str())
            .map(str::to_owned),
        metadata,
        attempts: row.try_get("attempts")?,
        created_at: row.try_get("created_at")?,
        replay: row.try_get("replay")?,
        deliver_at: row.try_get("deliver_at")?,
    })
}

/// The claim's query plan for a batch of `limit` (`EXPLAIN`, or `EXPLAIN ANALYZE` run inside a
/// transaction that is rolled back, so nothing is leased): the statement of `outbox_claim` as
/// the database holds it, its parameters given as values and JIT off as the function runs it. A
/// one-off plan of that statement: the function's own cached plan may differ in its estimates.
pub async fn explain_claim(
    client: &tokio_postgres::Client,
    limit: i64,
    analyze: bool,
) -> Result<String, tokio_postgres::Error> {
    let source: String = client
        .query_one(
            "SELECT prosrc FROM pg_proc WHERE oid = 'outbox_claim'::regproc",
            &[],
        )
        .await?
        .get(0);
    let statement = source
        .split_once("RETURN QUERY")
        .and_then(|(_, rest)| rest.rsplit_once(';'))
        .map_or(source.as_str(), |(statement, _)| statement);
    // EXPLAIN takes no bind parameters here: the values are numbers and fixed words.
    let sql = statement
        .replace("p_limit", &limit.to_string())
        .replace("p_lease_secs", "30")
        .replace("p_owner", "'explain'")
        .replace("p_after", "''");
    explain_rolled_back(client, &sql, analyze).await
}

/// Marking the first `limit` due heads published (`EXPLAIN (ANALYZE, BUFFERS)` of
/// `outbox_mark_done` in a transaction that is rolled back): how many pages a mark touches.
pub async fn explain_mark(
    client: &tokio_postgres::Client,
    limit: i64,
) -> Result<String, tokio_postgres::Error> {
    let ids: Vec<i64> = client
        .query(
            "SELECT id FROM outbox WHERE status = 'pending' AND is_head
             ORDER BY tenant_id, next_attempt_at, id LIMIT $1",
            &[&limit],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let list = ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",");
    // The mark as the record runs it (migration V7): the buffers of the function's statements
    // are counted to its node.
    let sql = format!("SELECT * FROM outbox_mark_done(ARRAY[{list}]::bigint[], 'published', NULL)");
    explain_rolled_back(client, &sql, true).await
}

async fn explain_rolled_back(
    client: &tokio_postgres::Client,
    sql: &str,
    analyze: bool,
) -> Result<String, tokio_postgres::Error> {
    let options = if analyze { "ANALYZE, BUFFERS, " } else { "" };
    client.batch_execute("BEGIN; SET LOCAL jit = off").await?;
    let rows = client
        .simple_query(&format!("EXPLAIN ({options}COSTS OFF) {sql}"))
        .await;
    client.batch_execute("ROLLBACK").await?;
    Ok(rows?
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join("\n"))
}

#[cfg(test)]
mod tests {
    use super::last_served;

    #[test]
    fn the_rotation_goes_on_after_the_last_tenant_served() {
        // One row each, after "c": d, e, then a, b (wrapped round): b ends the turn.
        assert_eq!(
            last_served("c", ["a", "e", "b", "d"].into_iter()),
            Some("b")
        );
        // Not wrapped round: the furthest after "c".
        assert_eq!(last_served("c", ["e", "d"].into_iter()), Some("e"));
        // The first claim starts after "" (every tenant is after it).
        assert_eq!(last_served("", ["b", "a"].into_iter()), Some("b"));
        // "c" itself comes last in its own rotation.
        assert_eq!(last_served("c", ["c", "d"].into_iter()), Some("c"));
        assert_eq!(last_served("c", std::iter::empty()), None);
        // Ten tenants and a batch of 15: every tenant's first turn, then a second turn cut after
        // five of them. The second turn ended at t4, wherever the first turn went: the next claim
        // gives the second turn to t5..t9.
        let mut rows: Vec<String> = (0..10).map(|t| format!("t{t}")).collect();
        rows.extend((0..5).map(|t| format!("t{t}")));
        assert_eq!(last_served("", rows.iter().map(String::as_str)), Some("t4"));
        // Byte order, as the claim's cut: "Z" sorts before "a".
        assert_eq!(last_served("a", ["Z", "b"].into_iter()), Some("Z"));
    }
}
