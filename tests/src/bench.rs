//! Helpers shared by the benchmarks: seeding the outbox in bulk, percentiles, settings from the
//! environment.

use std::time::Duration;

use outbox_shared::outbox::{ClaimedEvent, Outcomes};
use outbox_shared::ports::OutboxStore;
use outbox_shared::postgres::outbox::PgOutboxStore;

use crate::TestDb;

/// A benchmark setting from the environment, or `default`.
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Inserts `rows` events with `status`, each of its own aggregate (so every claim is full),
/// ~300 B payloads; published ones were published `published_ago` ago. Vacuums, analyzes and
/// checkpoints, so the writes of seeding a large table are not still being flushed while the
/// measurement runs.
pub async fn seed(db: &TestDb, rows: usize, status: &str, published_ago: Duration) {
    seed_with_ids(db, rows, status, published_ago, EventIds::Random).await
}

/// How seeded event ids are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventIds {
    /// Random (UUID v4): inserts land anywhere in the event_id index.
    Random,
    /// Time-ordered (UUID v7, as the producers write them): inserts at the index's right edge.
    TimeOrdered,
}

/// [`seed`] with a choice of event ids.
pub async fn seed_with_ids(
    db: &TestDb,
    rows: usize,
    status: &str,
    published_ago: Duration,
    ids: EventIds,
) {
    let client = db.client().await;
    let id_function = match ids {
        EventIds::Random => "gen_random_uuid()",
        EventIds::TimeOrdered => "outbox_uuid_v7()",
    };
    let tag = uuid::Uuid::new_v4().simple().to_string();
    // The id function is one of two fixed names above, never input.
    let sql = format!(
        "INSERT INTO outbox (event_id, tenant_id, aggregate_type, aggregate_id, aggregate_version,
                                 event_type, schema_version, payload, metadata, status, published_at,
                                 created_at, feed_position)
             SELECT {id_function}, 'bench', 'payment', 'p' || g || '-' || $3, 1, 'payment.paid', 1,
                    jsonb_build_object('paymentId', 'p' || g, 'amountMinor', 1250, 'currency', 'EUR',
                        'verificationMethod', 'card_3ds', 'verifiedBy', 'acs.examplebank.com',
                        'paidAt', now(), 'note', repeat('x', 120)),
                    '{{\"correlation_id\":\"bench\",\"causation_id\":\"bench\",\"source\":\"payments\"}}',
                    $2, CASE WHEN $2 = 'published' THEN now() - make_interval(secs => $4) END,
                    CASE WHEN $2 = 'published' THEN now() - make_interval(secs => $4) ELSE now() END,
                    CASE WHEN $2 = 'published' THEN nextval('outbox_feed_position_seq') END
             FROM generate_series(1, $1::bigint) AS g"
    );
    client
        .execute(
            &sql,
            &[&(rows as i64), &status, &tag, &published_ago.as_secs_f64()],
        )
        .await
        .expect("seed");
    client
        .batch_execute("VACUUM ANALYZE outbox")
        .await
        .expect("vacuum");
    client
        .batch_execute("CHECKPOINT")
        .await
        .expect("checkpoint");
}

/// Puts `count` aggregates parked behind a dead first event (a dead head and a pending second
/// version each) and `count` heads backing off for an hour in the outbox: the rows a claim must
/// never read. Insert the rows the claim should take afterwards, so these are older.
pub async fn seed_parked_and_backing_off(client: &tokio_postgres::Client, count: usize) {
    client
        .batch_execute(&format!(
            "INSERT INTO outbox (event_id, tenant_id, aggregate_type, aggregate_id, aggregate_version,
                                 event_type, schema_version, payload, metadata)
             SELECT gen_random_uuid(), 'bench', 'payment', 'parked' || a, v, 'payment.paid', 1,
                    '{{\"note\":\"parked\"}}', '{{\"correlation_id\":\"b\",\"source\":\"payments\"}}'
             FROM generate_series(1, {count}) a, generate_series(1, 2) v ORDER BY v, a;
             UPDATE outbox SET status = 'dead' WHERE aggregate_id LIKE 'parked%' AND aggregate_version = 1;
             INSERT INTO outbox (event_id, tenant_id, aggregate_type, aggregate_id, aggregate_version,
                                 event_type, schema_version, payload, metadata, next_attempt_at)
             SELECT gen_random_uuid(), 'bench', 'payment', 'backoff' || a, 1, 'payment.paid', 1,
                    '{{\"note\":\"backoff\"}}', '{{\"correlation_id\":\"b\",\"source\":\"payments\"}}',
                    now() + interval '1 hour'
             FROM generate_series(1, {count}) a;"
        ))
        .await
        .expect("seed parked and backing-off rows");
}

/// The `p` quantile of sorted latencies, in milliseconds.
pub fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * p) as usize).min(sorted.len() - 1);
    sorted[i].as_secs_f64() * 1e3
}

/// Records every claimed row as published (the "mark" half of the SQL floor).
pub async fn mark_published(store: &PgOutboxStore, owner: &str, claimed: &[ClaimedEvent]) {
    let outcomes = Outcomes {
        published: claimed.iter().map(|c| c.id).collect(),
        ..Outcomes::default()
    };
    store.record_outcomes(owner, &outcomes).await.expect("mark");
}

/// Sorted latencies from each event's `committed` column (a timestamptz of the outbox) to its
/// arrival at the endpoint; asserts that all `produced` events arrived.
pub async fn arrival_latencies(
    client: &tokio_postgres::Client,
    committed: &str,
    arrivals: &[(String, chrono::DateTime<chrono::Utc>)],
    produced: usize,
) -> Vec<Duration> {
    let arrivals: std::collections::HashMap<&str, chrono::DateTime<chrono::Utc>> =
        arrivals.iter().map(|(id, at)| (id.as_str(), *at)).collect();
    // The column name comes from the benchmark's code, never from input.
    let rows = client
        .query(
            &format!("SELECT event_id::text, {committed} FROM outbox"),
            &[],
        )
        .await
        .expect("rows");
    let mut latencies: Vec<Duration> = rows
        .iter()
        .filter_map(|r| {
            let id: String = r.get(0);
            let at: chrono::DateTime<chrono::Utc> = r.get(1);
            arrivals
                .get(id.as_str())
                .map(|arrived| (*arrived - at).to_std().unwrap_or_default())
        })
        .collect();
    assert_eq!(
        latencies.len(),
        produced,
        "every committed event was published"
    );
    latencies.sort();
    latencies
}

/// Claim latency: `claims` claims of 100 on `db` (which must hold that many pending rows), each
/// marked published before the next; returns (p50, p99) in milliseconds.
pub async fn claim_latency(db: &TestDb, claims: usize) -> (f64, f64) {
    claim_latency_of(db, claims, 100).await
}

/// Claim latency with claims of `batch` rows (see [`claim_latency`]).
pub async fn claim_latency_of(db: &TestDb, claims: usize, batch: usize) -> (f64, f64) {
    let store = PgOutboxStore::new(outbox_shared::postgres::Db::new(db.settings.clone()));
    let mut latencies = Vec::with_capacity(claims);
    for i in 0..claims {
        let owner = format!("lat-{i}");
        let t = std::time::Instant::now();
        let claimed = store
            .claim_batch(batch as i64, Duration::from_secs(60), &owner)
            .await
            .expect("claim");
        latencies.push(t.elapsed());
        assert_eq!(claimed.len(), batch);
        mark_published(&store, &owner, &claimed).await;
    }
    latencies.sort();
    (pct(&latencies, 0.5), pct(&latencies, 0.99))
}
