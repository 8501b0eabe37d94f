//! (Past 400 lines: the model, its operations and its checks share one state and read best together.)
//!
//! Claims fair between tenants (`outbox_claim`, migration V8), on the real PostgreSQL.
//!
//! A named scenario (one tenant's backlog of 2,000 older events does not keep another tenant's
//! event out of the next claim), and a seeded model: random schedules of appends into several
//! tenants (bursts into one), claims of random sizes on two dispatchers' stores (each with its
//! own rotation), outcomes recorded (published, retried now or later, dead), rows coming due,
//! the operator's redrives, discards and replays, and a third session holding rows while a claim
//! runs. Before each claim the model says which rows are available (pending heads, due, not
//! leased, not held; replays due whose aggregate has no earlier replay and none in flight); after it, the claim is
//! checked:
//! - *sound*: only available rows are taken, at most the batch;
//! - *in order*: what a tenant gets is the first of its available rows in due order;
//! - *fair share*: a tenant gets at least min(its available rows, floor(batch / tenants with
//!   pending heads)), and at least one row while there are no more such tenants than the batch;
//! - *whole batch for one*: a tenant alone gets min(batch, its available rows);
//! - *rotation*: with more tenants than the batch, a tenant with rows available is served within
//!   as many claims of one store as there are tenants, plus one;
//! - *replays fill the rest*: only available replays, and as many as the batch has room for
//!   after the live rows (the live checks above are on the live rows alone).
//!
//! `FAIRNESS_SCHEDULES` (default 150) sets how many schedules run, `FAIRNESS_SEED` the first
//! seed (a failure prints its schedule's seed: rerun with it and `FAIRNESS_SCHEDULES=1`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use outbox_tests::TestDb;
use pg_outbox::outbox::Outcomes;
use pg_outbox::ports::OutboxStore;
use pg_outbox::postgres::admin::tenants::{self, LimitsChange};
use pg_outbox::postgres::outbox::PgOutboxStore;
use pg_outbox::postgres::Db;
use tokio_postgres::Client;
use uuid::Uuid;

/// Names that sort in several ways (a prefix of another, upper case first).
const TENANTS: [&str; 7] = ["A", "a", "acme", "b", "globex", "z", "zz"];
const STEPS: usize = 40;
const LEASE: Duration = Duration::from_secs(600);

async fn append_many(client: &Client, tenant: &str, aggregates: &[String]) -> Vec<(i64, i64)> {
    client
        .query(
            "INSERT INTO outbox (event_id, tenant_id, aggregate_type, aggregate_id, event_type,
                                 schema_version, payload, metadata)
             SELECT gen_random_uuid(), $1, 'account', a, 'account.changed', 1, '{}',
                    '{\"correlation_id\":\"fairness\",\"source\":\"fairness\"}'
             FROM unnest($2::text[]) WITH ORDINALITY AS x(a, n) ORDER BY n
             RETURNING id, aggregate_version",
            &[&tenant, &aggregates],
        )
        .await
        .expect("append")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

#[tokio::test]
async fn a_quiet_tenant_is_served_in_the_first_claim_behind_another_tenants_backlog() {
    let db = TestDb::create().await;
    let client = db.client().await;
    let backlog: Vec<String> = (0..2_000).map(|n| format!("busy-{n}")).collect();
    append_many(&client, "busy", &backlog).await;
    // The quiet tenant's one event comes after all of them.
    let quiet = append_many(&client, "quiet", &["q-1".to_string()]).await[0].0;
    let store = PgOutboxStore::new(Db::new(db.settings.clone()));
    let claimed = store.claim_batch(100, LEASE, "d1").await.unwrap();
    assert_eq!(claimed.len(), 100, "the batch is full");
    assert!(
        claimed.iter().any(|e| e.id == quiet),
        "the quiet tenant's event waits behind another tenant's 2,000"
    );
    assert_eq!(
        claimed.iter().filter(|e| e.tenant_id == "busy").count(),
        99,
        "the busy tenant gets the rest of the batch"
    );
    // Alone, the busy tenant gets whole batches again, oldest first.
    let next = store.claim_batch(100, LEASE, "d1").await.unwrap();
    assert_eq!(next.len(), 100);
    assert!(next.iter().all(|e| e.tenant_id == "busy"));
    let versions: BTreeSet<&str> = next.iter().map(|e| e.aggregate_id.as_str()).collect();
    assert!(
        versions.contains("busy-99") && versions.contains("busy-198"),
        "{versions:?}"
    );
}

/// Heap rows the outbox's index scans fetched so far in this transaction.
async fn rows_fetched(client: &Client) -> i64 {
    client
        .query_one(
            "SELECT idx_tup_fetch FROM pg_stat_xact_user_tables WHERE relname = 'outbox'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn a_claim_reads_only_the_rows_it_takes_under_either_plan() {
    // Inside the claim function a statement may run with a generic plan, which cannot tell one
    // tenant from another. Under it, the claims before V15 read a quiet tenant's share from the
    // pending index of every tenant, fetching each of the busy tenant's 20,000 rows to filter
    // it out: 20,000 rows fetched for a claim of 100 (and 40 ms for a claim of 500 beside
    // 60,000). Counted inside one transaction (pg_stat_xact_user_tables), rolled back.
    let db = TestDb::create().await;
    let client = db.client().await;
    let backlog: Vec<String> = (0..20_000).map(|n| format!("busy-{n}")).collect();
    append_many(&client, "busy", &backlog).await;
    // The statistics know one tenant, as when a tenant starts beside another's backlog.
    client.batch_execute("VACUUM ANALYZE outbox").await.unwrap();
    let quiet = append_many(&client, "quiet", &["q-1".to_string()]).await[0].0;
    // Each claim and the rows it takes, without limits and with them (the lane's shares of 50:
    // 25 each, then 30 for weight 3 against 2; the quiet tenant has one).
    let claims = [
        ("SELECT id FROM outbox_claim(100, 600, 'd1', '')", 100, 100),
        (
            "SELECT id FROM outbox_claim_waiting(50, 600, 'd1', '{}')",
            26,
            31,
        ),
        (
            "SELECT id FROM outbox_claim_waiting(50, 600, 'd1', '{busy}')",
            1,
            1,
        ),
    ];
    // Without tenant limits, then with (V19: a weight and a cap each; the cap above the batch).
    for (limits, mode) in [
        (false, "force_generic_plan"),
        (false, "force_custom_plan"),
        (true, "force_generic_plan"),
        (true, "force_custom_plan"),
    ] {
        if limits {
            client
                .batch_execute(
                    "INSERT INTO outbox_tenant_limits (tenant_id, weight, max_per_second)
                     VALUES ('busy', 3, 1000), ('quiet', 2, 1000) ON CONFLICT DO NOTHING",
                )
                .await
                .unwrap();
        }
        client
            .batch_execute(&format!("SET plan_cache_mode = {mode}"))
            .await
            .unwrap();
        for (claim, without, with) in claims {
            let rows = if limits { with } else { without };
            // Twice: the second run uses the plan the first one cached.
            for _ in 0..2 {
                client.batch_execute("BEGIN").await.unwrap();
                let before = rows_fetched(&client).await;
                let taken: Vec<i64> = client
                    .query(claim, &[])
                    .await
                    .unwrap()
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                let fetched = rows_fetched(&client).await - before;
                client.batch_execute("ROLLBACK").await.unwrap();
                assert_eq!(taken.len(), rows, "{mode}, limits {limits}: {claim}");
                assert!(taken.contains(&quiet), "{mode}, limits {limits}: {claim}");
                // The rows taken, fetched by the share scans and again by the update, and a few
                // more: not the busy tenant's backlog.
                assert!(
                    fetched <= 3 * rows as i64 + 10,
                    "{mode}, limits {limits}: {claim} fetched {fetched} rows to take {rows}"
                );
            }
        }
    }
}

/// Tenants `<prefix>0` to `<prefix>9`, ten due events each (one per aggregate).
async fn ten_tenants(client: &Client, prefix: &str) {
    for t in 0..10 {
        let aggregates: Vec<String> = (0..10).map(|n| format!("t{t}-{n}")).collect();
        append_many(client, &format!("{prefix}{t}"), &aggregates).await;
    }
}

#[tokio::test]
async fn tenants_beyond_the_batch_are_served_in_rotation() {
    let db = TestDb::create().await;
    let client = db.client().await;
    // Ten tenants with ten events each, claims of three: each claim serves three tenants, the
    // next claim the three after them.
    ten_tenants(&client, "tenant-").await;
    let store = PgOutboxStore::new(Db::new(db.settings.clone()));
    let mut served = Vec::new();
    for _ in 0..4 {
        let claimed = store.claim_batch(3, LEASE, "d1").await.unwrap();
        let tenants: BTreeSet<String> = claimed.into_iter().map(|e| e.tenant_id).collect();
        assert_eq!(tenants.len(), 3, "{tenants:?}");
        served.push(tenants);
    }
    let names =
        |ts: &[usize]| -> BTreeSet<String> { ts.iter().map(|t| format!("tenant-{t}")).collect() };
    assert_eq!(served[0], names(&[0, 1, 2]));
    assert_eq!(served[1], names(&[3, 4, 5]));
    assert_eq!(served[2], names(&[6, 7, 8]));
    // Round again: the last tenant, then the first ones.
    assert_eq!(served[3], names(&[9, 0, 1]));
}

#[tokio::test]
async fn a_turn_cut_short_goes_on_where_it_ended() {
    // Ten tenants with plenty each and claims of 15: a share of 2, so one whole turn and half of
    // the second. The next claim gives the second turn to the other half: over two claims each
    // tenant gets 3. (Starting the next claim after the furthest tenant of the first turn instead
    // gave the same five tenants 2 rows every claim, the other five 1.)
    let db = TestDb::create().await;
    let client = db.client().await;
    ten_tenants(&client, "t").await;
    let store = PgOutboxStore::new(Db::new(db.settings.clone()));
    let mut got: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..2 {
        let claimed = store.claim_batch(15, LEASE, "d1").await.unwrap();
        assert_eq!(claimed.len(), 15);
        for e in claimed {
            *got.entry(e.tenant_id).or_default() += 1;
        }
    }
    assert!(got.values().all(|n| *n == 3), "{got:?}");
}

/// One outbox row as the model knows it.
#[derive(Debug, Clone)]
struct ModelRow {
    id: i64,
    tenant: &'static str,
    aggregate: String,
    version: i64,
    state: State,
    leased: bool,
    /// A published row being delivered again: `Some(due)`.
    replay: Option<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    Pending { due: bool },
    Published,
    Dead,
    Discarded,
}

struct Schedule {
    rng: fastrand::Rng,
    rows: Vec<ModelRow>,
    client: Client,
    locker: Client,
    stores: [PgOutboxStore; 2],
    /// Claims not recorded yet: the store that made them, its lease owner, the rows.
    batches: Vec<(usize, String, Vec<i64>)>,
    /// Per store, per tenant: claims in a row in which the tenant had rows available and got none.
    streaks: [HashMap<&'static str, usize>; 2],
    /// The tenants' rows of `outbox_tenant_limits` (V19), as the model set them.
    limits: HashMap<&'static str, Limit>,
    counts: Counts,
}

/// A tenant's weight, cap and pause. The model pins each capped tenant's bucket (its
/// `refilled_at` a day ahead, set again after every claim), so a claim's allowance is exactly the
/// tokens the model counts: the bucket changes only by what claims spend and what the model
/// refills.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Limit {
    weight: i32,
    cap: Option<i32>,
    tokens: f64,
    paused: bool,
}

impl Limit {
    /// What a claim may take of the tenant: `None` for no cap; 0 when paused.
    fn allowance(&self) -> Option<i64> {
        if self.paused {
            Some(0)
        } else {
            self.cap.map(|_| self.tokens.floor() as i64)
        }
    }
}

#[derive(Debug, Default)]
struct Counts {
    claims: u64,
    rows: u64,
    shared: u64,
    rotating: u64,
    held: u64,
    alone: u64,
    replays_claimed: u64,
    lane: u64,
    redriven: u64,
    discarded: u64,
    /// Limits the model set or cleared.
    limits_changed: u64,
    /// Claims in which tenants of different weights both had rows available.
    weighted: u64,
    /// Claims in which a tenant's share by weight was above an even share.
    weight_decides: u64,
    /// Claims in which a capped tenant had more rows available than its allowance (at least 1).
    capped: u64,
    /// Claims in which a tenant with rows due was paused or out of tokens.
    held_back: u64,
}

impl Schedule {
    fn heads(&self) -> Vec<&ModelRow> {
        let mut done: HashMap<(&str, &str), i64> = HashMap::new();
        let mut sorted: Vec<&ModelRow> = self.rows.iter().collect();
        sorted.sort_by_key(|r| (r.tenant, r.aggregate.clone(), r.version));
        let mut heads = Vec::new();
        for row in sorted {
            let key = (row.tenant, row.aggregate.as_str());
            let published_before = *done.get(&key).unwrap_or(&0);
            if row.version == published_before + 1 {
                if matches!(row.state, State::Published | State::Discarded) {
                    done.insert(key, row.version);
                } else if matches!(row.state, State::Pending { .. }) {
                    heads.push(row);
                }
            }
        }
        heads
    }

    async fn step(&mut self, step: usize) -> Result<(), String> {
        match self.rng.u32(0..100) {
            0..=16 => self.append().await,
            17..=21 => self.change_limits().await?,
            22..=59 => self.claim(step).await?,
            60..=84 => self.record().await?,
            85..=89 => self.come_due().await,
            90..=93 => self.redrive().await?,
            94..=96 => self.discard().await?,
            _ => self.replay().await?,
        }
        Ok(())
    }

    /// An operator changes a tenant's weight, cap or pause, clears its row, or (the model's
    /// stand-in for time passing) refills its bucket; through the admin API, as `outboxctl
    /// tenants` does.
    async fn change_limits(&mut self) -> Result<(), String> {
        // The tenant with bursts one time in three: its caps bind.
        let tenant = if self.rng.u32(0..3) == 0 {
            TENANTS[0]
        } else {
            TENANTS[self.rng.usize(0..TENANTS.len())]
        };
        let mut limit = self.limits.get(tenant).copied().unwrap_or(Limit {
            weight: 1,
            cap: None,
            tokens: 0.0,
            paused: false,
        });
        let mut change = LimitsChange::default();
        match self.rng.u32(0..10) {
            0..=3 => {
                limit.weight = self.rng.i32(1..7);
                change.weight = Some(limit.weight);
            }
            4 | 5 => {
                let cap = self.rng.i32(1..5);
                // A new cap fills the bucket; the same cap again keeps it.
                if limit.cap != Some(cap) {
                    limit.tokens = f64::from(cap);
                }
                limit.cap = Some(cap);
                change.max_per_second = Some(Some(cap));
            }
            6 => {
                limit.paused = !limit.paused;
                change.paused = Some(limit.paused);
            }
            7 => {
                tenants::clear(&self.client, tenant)
                    .await
                    .map_err(|e| format!("clear {tenant}: {e}"))?;
                self.limits.remove(tenant);
                self.counts.limits_changed += 1;
                return Ok(());
            }
            _ => {
                let Some(cap) = limit.cap else { return Ok(()) };
                self.client
                    .execute(
                        "UPDATE outbox_tenant_limits SET tokens = NULL WHERE tenant_id = $1",
                        &[&tenant],
                    )
                    .await
                    .map_err(|e| format!("refill {tenant}: {e}"))?;
                limit.tokens = f64::from(cap);
                self.limits.insert(tenant, limit);
                return self.pin_buckets().await;
            }
        }
        let row = tenants::set(&self.client, tenant, &change)
            .await
            .map_err(|e| format!("set {tenant} {change:?}: {e}"))?;
        if (row.weight, row.max_per_second, row.paused) != (limit.weight, limit.cap, limit.paused) {
            return Err(format!(
                "set {tenant} {change:?}: the row is {row:?}, the model {limit:?}"
            ));
        }
        self.limits.insert(tenant, limit);
        self.counts.limits_changed += 1;
        self.pin_buckets().await
    }

    /// Keeps every capped tenant's bucket from refilling with time (see [`Limit`]).
    async fn pin_buckets(&self) -> Result<(), String> {
        self.client
            .execute(
                "UPDATE outbox_tenant_limits SET refilled_at = now() + interval '1 day'
                 WHERE max_per_second IS NOT NULL",
                &[],
            )
            .await
            .map_err(|e| format!("pin the buckets: {e}"))?;
        Ok(())
    }

    /// The buckets as the database has them, against the model's.
    async fn check_buckets(&self, what: &str) -> Result<(), String> {
        let rows = self
            .client
            .query(
                "SELECT tenant_id, coalesce(tokens, max_per_second) FROM outbox_tenant_limits
                 WHERE max_per_second IS NOT NULL",
                &[],
            )
            .await
            .map_err(|e| format!("read the buckets: {e}"))?;
        let capped = self.limits.values().filter(|l| l.cap.is_some()).count();
        if rows.len() != capped {
            return Err(format!(
                "{} capped tenants in the database, {capped} in the model: {what}",
                rows.len()
            ));
        }
        for row in rows {
            let tenant: String = row.get(0);
            let tokens: f64 = row.get(1);
            let model = self
                .limits
                .get(tenant.as_str())
                .map(|l| l.tokens)
                .ok_or_else(|| format!("{tenant} has a cap the model did not set"))?;
            if (tokens - model).abs() > 1e-6 {
                return Err(format!(
                    "{tenant}'s bucket holds {tokens} tokens, the model {model}: {what}"
                ));
            }
        }
        Ok(())
    }

    fn weight(&self, tenant: &str) -> i64 {
        self.limits.get(tenant).map_or(1, |l| i64::from(l.weight))
    }

    fn allowance(&self, tenant: &str) -> Option<i64> {
        self.limits.get(tenant).and_then(Limit::allowance)
    }

    /// Up to three of `rows`' ids, at random.
    fn some(&mut self, rows: Vec<i64>) -> Vec<i64> {
        let mut picked = BTreeSet::new();
        if !rows.is_empty() {
            for _ in 0..self.rng.usize(1..4) {
                picked.insert(rows[self.rng.usize(0..rows.len())]);
            }
        }
        picked.into_iter().collect()
    }

    /// An operator's operation on `ids`: every one of them changed, none held (nothing else
    /// holds them).
    async fn operate(&self, sql: &str, ids: &[i64]) -> Result<(), String> {
        let row = self
            .client
            .query_one(sql, &[&ids])
            .await
            .map_err(|e| format!("{sql}: {e}"))?;
        let changed: Vec<i64> = row.get(0);
        let held: Vec<i64> = row.get(1);
        let mut changed_sorted = changed.clone();
        changed_sorted.sort();
        if changed_sorted != ids || !held.is_empty() {
            return Err(format!(
                "{sql} on {ids:?}: changed {changed:?}, held {held:?}"
            ));
        }
        Ok(())
    }

    /// Up to three dead rows, at random: what an operator redrives or discards.
    fn some_dead(&mut self) -> Vec<i64> {
        let dead = self
            .rows
            .iter()
            .filter(|r| r.state == State::Dead)
            .map(|r| r.id)
            .collect();
        self.some(dead)
    }

    async fn redrive(&mut self) -> Result<(), String> {
        let ids = self.some_dead();
        if ids.is_empty() {
            return Ok(());
        }
        self.operate("SELECT changed, held FROM outbox_redrive($1)", &ids)
            .await?;
        for row in self.rows.iter_mut().filter(|r| ids.contains(&r.id)) {
            row.state = State::Pending { due: true };
        }
        self.counts.redriven += ids.len() as u64;
        Ok(())
    }

    async fn discard(&mut self) -> Result<(), String> {
        let ids = self.some_dead();
        if ids.is_empty() {
            return Ok(());
        }
        self.operate(
            "SELECT discarded, held FROM outbox_discard($1, 'model: given up')",
            &ids,
        )
        .await?;
        for row in self.rows.iter_mut().filter(|r| ids.contains(&r.id)) {
            row.state = State::Discarded;
        }
        self.counts.discarded += ids.len() as u64;
        Ok(())
    }

    async fn replay(&mut self) -> Result<(), String> {
        let published = self
            .rows
            .iter()
            .filter(|r| r.state == State::Published && r.replay.is_none())
            .map(|r| r.id)
            .collect();
        let ids = self.some(published);
        if ids.is_empty() {
            return Ok(());
        }
        self.operate("SELECT changed, held FROM outbox_replay($1)", &ids)
            .await?;
        for row in self.rows.iter_mut().filter(|r| ids.contains(&r.id)) {
            row.replay = Some(true);
        }
        Ok(())
    }

    /// Replays a claim may take: due, not leased, no earlier replay of their aggregate and none
    /// of it in flight (V11).
    fn available_replays(&self) -> BTreeSet<i64> {
        self.rows
            .iter()
            .filter(|r| r.replay == Some(true) && !r.leased)
            .filter(|r| {
                !self.rows.iter().any(|e| {
                    e.replay.is_some()
                        && e.tenant == r.tenant
                        && e.aggregate == r.aggregate
                        && (e.version < r.version || (e.leased && e.id != r.id))
                })
            })
            .map(|r| r.id)
            .collect()
    }

    async fn append(&mut self) {
        // Bursts mostly into the first tenant; one in three into any (several tenants with rows
        // enough for their weights to decide their shares).
        let burst = self.rng.u32(0..4) == 0;
        let tenant = if burst && self.rng.u32(0..3) > 0 {
            TENANTS[0]
        } else {
            TENANTS[self.rng.usize(0..TENANTS.len())]
        };
        let n = if burst {
            self.rng.usize(15..40)
        } else {
            self.rng.usize(1..5)
        };
        let aggregates: Vec<String> = (0..n)
            .map(|_| format!("{tenant}-{}", self.rng.u32(0..6)))
            .collect();
        let appended = append_many(&self.client, tenant, &aggregates).await;
        for ((id, version), aggregate) in appended.into_iter().zip(aggregates) {
            self.rows.push(ModelRow {
                id,
                tenant,
                aggregate,
                version,
                state: State::Pending { due: true },
                leased: false,
                replay: None,
            });
        }
    }

    async fn claim(&mut self, step: usize) -> Result<(), String> {
        let d = self.rng.usize(0..2);
        let mut limit = if self.rng.bool() {
            self.rng.i64(1..4)
        } else {
            self.rng.i64(1..25)
        };
        // One claim in three is the drain's lane (V15): every tenant but those it skips, no
        // replays, no rotation.
        let lane: Option<Vec<String>> = (self.rng.u32(0..3) == 0).then(|| {
            TENANTS
                .iter()
                .filter(|_| self.rng.u32(0..10) < 3)
                .map(|t| t.to_string())
                .collect()
        });
        let skipped = |tenant: &str| {
            lane.as_ref()
                .is_some_and(|skip| skip.iter().any(|t| t == tenant))
        };
        let heads: Vec<ModelRow> = self.heads().into_iter().cloned().collect();
        let pending_tenants: BTreeSet<&str> = heads
            .iter()
            .map(|r| r.tenant)
            .filter(|t| !skipped(t))
            .collect();
        let mut available: Vec<&ModelRow> = heads
            .iter()
            .filter(|r| r.state == (State::Pending { due: true }) && !r.leased)
            .filter(|r| !skipped(r.tenant))
            .collect();
        // A paused tenant's rows, and those of a tenant out of tokens, are not available (V19);
        // nor does such a tenant count in the weights' sum.
        let before = available.len();
        available.retain(|r| self.allowance(r.tenant) != Some(0));
        if available.len() < before {
            self.counts.held_back += 1;
        }
        let active: BTreeSet<&str> = pending_tenants
            .iter()
            .copied()
            .filter(|t| self.allowance(t) != Some(0))
            .collect();
        let weights: i64 = active.iter().map(|t| self.weight(t)).sum();
        // With a tenant weighted, two claims in three take one or two whole rounds.
        if active.iter().any(|t| self.weight(t) > 1) && self.rng.u32(0..3) > 0 {
            limit = weights * self.rng.i64(1..3);
        }
        // A third session holds some available rows while the claim runs.
        let mut held = BTreeSet::new();
        if !available.is_empty() && self.rng.u32(0..4) == 0 {
            for _ in 0..self.rng.usize(1..4) {
                held.insert(available[self.rng.usize(0..available.len())].id);
            }
            let ids: Vec<i64> = held.iter().copied().collect();
            self.locker.batch_execute("BEGIN").await.unwrap();
            self.locker
                .execute(
                    "SELECT 1 FROM outbox WHERE id = ANY ($1) FOR UPDATE",
                    &[&ids],
                )
                .await
                .unwrap();
            available.retain(|r| !held.contains(&r.id));
            self.counts.held += 1;
        }
        // Due order within a tenant, as the database has it.
        let ids: Vec<i64> = available.iter().map(|r| r.id).collect();
        let due_at: HashMap<i64, std::time::SystemTime> = self
            .client
            .query(
                "SELECT id, next_attempt_at FROM outbox WHERE id = ANY ($1)",
                &[&ids],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let mut by_tenant: BTreeMap<&str, Vec<(std::time::SystemTime, i64)>> = BTreeMap::new();
        for row in &available {
            by_tenant
                .entry(row.tenant)
                .or_default()
                .push((due_at[&row.id], row.id));
        }
        for rows in by_tenant.values_mut() {
            rows.sort();
        }

        let owner = format!("d{d}/{}", Uuid::new_v4().simple());
        let claimed = match &lane {
            Some(skip) => {
                self.stores[d]
                    .claim_waiting(limit, LEASE, &owner, skip)
                    .await
            }
            None => self.stores[d].claim_batch(limit, LEASE, &owner).await,
        };
        if !held.is_empty() {
            self.locker.batch_execute("COMMIT").await.unwrap();
        }
        let claimed = claimed.map_err(|e| format!("the claim failed: {e:?}"))?;
        // The lane takes no replays.
        let replays_available = match lane {
            Some(_) => BTreeSet::new(),
            None => self.available_replays(),
        };
        let (replays, claimed): (Vec<_>, Vec<_>) = claimed.into_iter().partition(|e| e.replay);
        let what = format!(
            "step {step}: dispatcher {d} claims {limit} (lane skipping {lane:?}) with {} tenants pending, available {:?}, held {held:?}; got {:?}",
            pending_tenants.len(),
            by_tenant
                .iter()
                .map(|(t, rows)| (*t, rows.iter().map(|r| r.1).collect::<Vec<_>>()))
                .collect::<Vec<_>>(),
            claimed.iter().map(|e| (e.tenant_id.as_str(), e.id)).collect::<Vec<_>>()
        );
        let what = format!(
            "{what}; replays available {replays_available:?}, got {:?}",
            replays.iter().map(|e| e.id).collect::<Vec<_>>()
        );
        // Replays: only available ones, filling what the live rows left of the batch.
        if let Some(e) = replays.iter().find(|e| !replays_available.contains(&e.id)) {
            return Err(format!("replay {} was not available: {what}", e.id));
        }
        let room = (limit as usize).saturating_sub(claimed.len());
        if replays.len() != replays_available.len().min(room) {
            return Err(format!(
                "{} replays taken, room for {room} after the live rows: {what}",
                replays.len()
            ));
        }
        self.counts.replays_claimed += replays.len() as u64;

        // Sound, and no more than the batch.
        if (claimed.len() + replays.len()) as i64 > limit {
            return Err(format!("more than the batch: {what}"));
        }
        let available_ids: BTreeSet<i64> = available.iter().map(|r| r.id).collect();
        if let Some(e) = claimed.iter().find(|e| !available_ids.contains(&e.id)) {
            return Err(format!("row {} was not available: {what}", e.id));
        }
        let mut got: BTreeMap<&str, Vec<i64>> = BTreeMap::new();
        for e in &claimed {
            let tenant = TENANTS.iter().find(|t| **t == e.tenant_id).unwrap();
            got.entry(tenant).or_default().push(e.id);
        }
        // In order: each tenant's first available rows.
        for (tenant, ids) in &got {
            let first: BTreeSet<i64> = by_tenant[tenant]
                .iter()
                .take(ids.len())
                .map(|r| r.1)
                .collect();
            let ids: BTreeSet<i64> = ids.iter().copied().collect();
            if first != ids {
                return Err(format!("{tenant} did not get its first rows: {what}"));
            }
        }
        // Fair share by weight, within the allowance: at least min(its available rows, weight *
        // floor(batch / the weights' sum), its allowance), and never beyond the allowance. With
        // every weight 1 and no more tenants than the batch, at least one row each.
        let what = format!("{what}; limits {:?}", self.limits);
        let rounds = if weights == 0 { 0 } else { limit / weights };
        for (tenant, rows) in &by_tenant {
            let has = rows.len() as i64;
            let taken = got.get(tenant).map_or(0, |ids| ids.len() as i64);
            let allowance = self.allowance(tenant).unwrap_or(i64::MAX);
            let bound = has.min(self.weight(tenant) * rounds).min(allowance);
            if taken < bound {
                return Err(format!(
                    "{tenant} got {taken}, less than its share {bound}: {what}"
                ));
            }
            if taken > allowance {
                return Err(format!(
                    "{tenant} got {taken}, more than its allowance {allowance}: {what}"
                ));
            }
            if has > allowance {
                self.counts.capped += 1;
            }
        }
        let weights_seen: BTreeSet<i64> = by_tenant.keys().map(|t| self.weight(t)).collect();
        if weights_seen.len() > 1 {
            self.counts.weighted += 1;
        }
        // Claims where a weight decides: some tenant's bound by weight is above what an even
        // share would give it.
        let even = limit / (active.len() as i64).max(1);
        if by_tenant.iter().any(|(tenant, rows)| {
            let has = rows.len() as i64;
            let allowance = self.allowance(tenant).unwrap_or(i64::MAX);
            has.min(self.weight(tenant) * rounds).min(allowance) > has.min(even).min(allowance)
        }) {
            self.counts.weight_decides += 1;
        }
        // The main claim gives one tenant with rows available the whole batch (within its
        // allowance); the lane, which has no second round, when it is the only one not skipped
        // with pending heads that may take rows.
        if by_tenant.len() == 1 && (lane.is_none() || active.len() == 1) {
            let (tenant, rows) = by_tenant.iter().next().unwrap();
            let has = rows.len() as i64;
            let allowance = self.allowance(tenant).unwrap_or(i64::MAX);
            if claimed.len() as i64 != has.min(limit).min(allowance) {
                return Err(format!(
                    "a tenant alone did not get the whole batch: {what}"
                ));
            }
            self.counts.alone += 1;
        }
        if by_tenant.len() > 1 {
            self.counts.shared += 1;
        }
        if lane.is_some() {
            self.counts.lane += 1;
        }
        // Rotation (the main claim's).
        if pending_tenants.len() as i64 > limit && lane.is_none() {
            self.counts.rotating += 1;
        }
        // The lane does not move the rotation, and is not what serves a tenant in turn.
        if lane.is_none() {
            let streaks = &mut self.streaks[d];
            streaks.retain(|t, _| by_tenant.contains_key(t));
            for tenant in by_tenant.keys() {
                let streak = streaks.entry(tenant).or_default();
                if got.contains_key(tenant) {
                    *streak = 0;
                } else {
                    *streak += 1;
                    if *streak > TENANTS.len() + 1 {
                        return Err(format!(
                            "{tenant} had rows available for {streak} claims of dispatcher {d} and got none: {what}"
                        ));
                    }
                }
            }
        }

        // The capped tenants' buckets lose what the claim took of theirs.
        let mut spent = false;
        for (tenant, ids) in &got {
            if let Some(limit) = self.limits.get_mut(tenant) {
                if limit.cap.is_some() {
                    limit.tokens = (limit.tokens - ids.len() as f64).max(0.0);
                    spent = true;
                }
            }
        }
        if spent {
            self.pin_buckets().await?;
        }
        self.check_buckets(&what).await?;

        self.counts.claims += 1;
        self.counts.rows += claimed.len() as u64;
        let ids: Vec<i64> = claimed.iter().chain(&replays).map(|e| e.id).collect();
        for row in self.rows.iter_mut().filter(|r| ids.contains(&r.id)) {
            row.leased = true;
        }
        if !ids.is_empty() {
            self.batches.push((d, owner, ids));
        }
        Ok(())
    }

    async fn record(&mut self) -> Result<(), String> {
        if self.batches.is_empty() {
            return Ok(());
        }
        let (d, owner, ids) = self
            .batches
            .swap_remove(self.rng.usize(0..self.batches.len()));
        let mut outcomes = Outcomes::default();
        let mut states = HashMap::new();
        for id in ids {
            let state = match self.rng.u32(0..100) {
                0..=59 => {
                    outcomes.published.push(id);
                    State::Published
                }
                60..=74 => {
                    outcomes
                        .retries
                        .push((id, Duration::ZERO, "model: try again".into()));
                    State::Pending { due: true }
                }
                75..=84 => {
                    outcomes
                        .retries
                        .push((id, Duration::from_secs(3600), "model: later".into()));
                    State::Pending { due: false }
                }
                _ => {
                    outcomes.dead.push((id, "model: rejected".into()));
                    State::Dead
                }
            };
            states.insert(id, state);
        }
        let deferred = self.stores[d]
            .record_outcomes(&owner, &outcomes)
            .await
            .map_err(|e| format!("record failed: {e:?}"))?;
        if !deferred.is_empty() {
            return Err(format!("nothing held the rows, yet {deferred:?} came back"));
        }
        for row in self.rows.iter_mut() {
            if let Some(state) = states.get(&row.id) {
                row.leased = false;
                if row.replay.is_some() {
                    // A replay stays published: delivered, retried, or abandoned (dead).
                    row.replay = match state {
                        State::Pending { due } => Some(*due),
                        _ => None,
                    };
                } else {
                    row.state = *state;
                }
            }
        }
        Ok(())
    }

    async fn come_due(&mut self) {
        let ids: Vec<i64> = self
            .rows
            .iter()
            .filter(|r| r.state == (State::Pending { due: false }) || r.replay == Some(false))
            .map(|r| r.id)
            .collect();
        if ids.is_empty() {
            return;
        }
        self.client
            .execute(
                "UPDATE outbox SET next_attempt_at = now() WHERE id = ANY ($1)",
                &[&ids],
            )
            .await
            .unwrap();
        for row in self.rows.iter_mut().filter(|r| ids.contains(&r.id)) {
            if row.replay.is_some() {
                row.replay = Some(true);
            } else {
                row.state = State::Pending { due: true };
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_are_fair_between_tenants_in_seeded_schedules() {
    let schedules: u64 = std::env::var("FAIRNESS_SCHEDULES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(150);
    let first_seed: u64 = std::env::var("FAIRNESS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(23);
    let db = TestDb::create().await;
    let mut totals = Counts::default();
    for n in 0..schedules {
        let seed = first_seed + n;
        let client = db.client().await;
        client
            .batch_execute(
                "TRUNCATE outbox, outbox_aggregates, outbox_feed_tenants, outbox_feed_acks,
                          outbox_tenant_limits",
            )
            .await
            .unwrap();
        let mut schedule = Schedule {
            rng: fastrand::Rng::with_seed(seed),
            rows: Vec::new(),
            client,
            locker: db.client().await,
            stores: [
                PgOutboxStore::new(Db::new(db.settings.clone())),
                PgOutboxStore::new(Db::new(db.settings.clone())),
            ],
            batches: Vec::new(),
            streaks: [HashMap::new(), HashMap::new()],
            limits: HashMap::new(),
            counts: Counts::default(),
        };
        // Three schedules in four start with a few tenants' limits set.
        if schedule.rng.u32(0..4) > 0 {
            for _ in 0..schedule.rng.usize(1..5) {
                if let Err(failure) = schedule.change_limits().await {
                    panic!("schedule {n} (FAIRNESS_SEED={seed} FAIRNESS_SCHEDULES=1): {failure}");
                }
            }
        }
        for step in 0..STEPS {
            if let Err(failure) = schedule.step(step).await {
                panic!("schedule {n} (FAIRNESS_SEED={seed} FAIRNESS_SCHEDULES=1): {failure}");
            }
        }
        let c = schedule.counts;
        totals.claims += c.claims;
        totals.rows += c.rows;
        totals.shared += c.shared;
        totals.rotating += c.rotating;
        totals.held += c.held;
        totals.alone += c.alone;
        totals.replays_claimed += c.replays_claimed;
        totals.lane += c.lane;
        totals.redriven += c.redriven;
        totals.discarded += c.discarded;
        totals.limits_changed += c.limits_changed;
        totals.weighted += c.weighted;
        totals.weight_decides += c.weight_decides;
        totals.capped += c.capped;
        totals.held_back += c.held_back;
    }
    println!("{schedules} schedules: {totals:?}");
    // Every situation the checks are about came up, many times over.
    assert!(totals.claims >= schedules * 5, "{totals:?}");
    assert!(totals.shared >= schedules, "{totals:?}");
    assert!(totals.rotating >= schedules / 2, "{totals:?}");
    assert!(totals.held >= schedules, "{totals:?}");
    assert!(totals.alone >= schedules / 10, "{totals:?}");
    assert!(totals.replays_claimed >= schedules / 2, "{totals:?}");
    assert!(totals.lane >= schedules * 2, "{totals:?}");
    assert!(totals.redriven >= schedules / 4, "{totals:?}");
    assert!(totals.discarded >= schedules / 4, "{totals:?}");
    assert!(totals.limits_changed >= schedules, "{totals:?}");
    assert!(totals.weighted >= schedules / 2, "{totals:?}");
    assert!(totals.weight_decides >= schedules / 6, "{totals:?}");
    assert!(totals.capped >= schedules / 6, "{totals:?}");
    assert!(totals.held_back >= schedules / 4, "{totals:?}");
}
