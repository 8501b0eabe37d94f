//! An [`OutboxStore`] in memory, with the outbox's rules: per-aggregate order (an event is due
//! only once every earlier version is published; a dead one parks the rest), claims shared
//! between tenants (round robin, as `outbox_claim` with no tenant limits: weights, caps and
//! pauses, migration V19, are the database's alone), leases, attempts, backoff, outcomes fenced
//! by the lease owner. And the faults a test needs: a store that fails
//! the next calls, and rows whose outcomes an appender holds for a while.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::outbox::{Backlog, ClaimedEvent, EventMetadata, Outcomes};
use crate::ports::{OutboxStore, StoreError};

/// Where an event is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryStatus {
    /// Waiting: due, leased or backing off.
    Pending,
    /// On the bus.
    Published,
    /// Given up; its aggregate's later events wait behind it.
    Dead,
}

/// One event as the store holds it.
#[derive(Debug, Clone)]
pub struct MemoryRow {
    /// The event as a claim returns it (`attempts` kept current).
    pub event: ClaimedEvent,
    /// Where it is in its life.
    pub status: MemoryStatus,
    /// The last error recorded for it.
    pub last_error: Option<String>,
    /// Who holds its lease, and until when.
    pub lease: Option<(String, Instant)>,
    /// Not claimable before this.
    pub next_attempt_at: Instant,
    /// How many times an outcome for it was recorded as published (1 for a published event).
    pub times_published: usize,
}

/// The store operations a fault can hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StoreCall {
    /// [`OutboxStore::claim_batch`].
    Claim,
    /// [`OutboxStore::claim_waiting`] (the drain's lane).
    ClaimWaiting,
    /// [`OutboxStore::record_outcomes`].
    Record,
    /// [`OutboxStore::heartbeat`] and [`OutboxStore::release`].
    Heartbeat,
}

/// An in-memory outbox; clones share it.
#[derive(Debug, Clone, Default)]
pub struct MemoryStore {
    state: Arc<Mutex<State>>,
}

#[derive(Debug, Default)]
struct State {
    rows: Vec<MemoryRow>,
    versions: HashMap<(String, String, String), i64>,
    /// Per call: the faults to return next (`true` = transient).
    faults: HashMap<StoreCall, VecDeque<bool>>,
    /// Row id → how many more record calls hand its outcome back as held.
    held: HashMap<i64, usize>,
    calls: HashMap<StoreCall, usize>,
    /// The last tenant a claim served: the next claim's rotation starts after it.
    after: String,
}

impl MemoryStore {
    /// An empty outbox.
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends an event at its aggregate's next version; returns its row id.
    pub fn append(
        &self,
        tenant_id: &str,
        aggregate_type: &str,
        aggregate_id: &str,
        event_type: &str,
        payload: serde_json::Value,
    ) -> i64 {
        let mut state = self.state();
        let version = state
            .versions
            .entry((tenant_id.into(), aggregate_type.into(), aggregate_id.into()))
            .or_insert(0);
        *version += 1;
        let aggregate_version = *version;
        let id = state.rows.len() as i64 + 1;
        state.rows.push(MemoryRow {
            event: ClaimedEvent {
                id,
                event_id: uuid::Uuid::new_v4(),
                tenant_id: tenant_id.into(),
                aggregate_type: aggregate_type.into(),
                aggregate_id: aggregate_id.into(),
                aggregate_version,
                event_type: event_type.into(),
                schema_version: 1,
                payload,
                metadata: serde_json::to_value(EventMetadata {
                    correlation_id: format!("memory-{id}"),
                    source: "memory".into(),
                    ..EventMetadata::default()
                })
                .unwrap_or_default(),
                attempts: 0,
                created_at: chrono::Utc::now(),
                xray_trace_header: None,
                replay: false,
                deliver_at: None,
            },
            status: MemoryStatus::Pending,
            last_error: None,
            lease: None,
            next_attempt_at: Instant::now(),
            times_published: 0,
        });
        id
    }

    /// Every row, in append order.
    pub fn rows(&self) -> Vec<MemoryRow> {
        self.state().rows.clone()
    }

    /// The next `times` calls of `call` fail: transient ones as a database that does not answer
    /// (the drain pauses and carries on), others as a statement error (the drain ends).
    pub fn fail_next(&self, call: StoreCall, times: usize, transient: bool) {
        self.state()
            .faults
            .entry(call)
            .or_default()
            .extend(std::iter::repeat_n(transient, times));
    }

    /// The next `records` record calls hand row `id`'s outcome back unrecorded, as PostgreSQL
    /// does while an appender holds the row's successor.
    pub fn hold(&self, id: i64, records: usize) {
        self.state().held.insert(id, records);
    }

    /// How many times `call` was made (failed calls included).
    pub fn calls(&self, call: StoreCall) -> usize {
        self.state().calls.get(&call).copied().unwrap_or(0)
    }

    /// Counts the call; its fault, if one is due.
    fn enter(&self, call: StoreCall) -> Result<MutexGuard<'_, State>, StoreError> {
        let mut state = self.state();
        *state.calls.entry(call).or_insert(0) += 1;
        match state.faults.get_mut(&call).and_then(VecDeque::pop_front) {
            Some(true) => Err(StoreError::Timeout(Duration::from_millis(5))),
            Some(false) => Err(StoreError::Corrupt(format!("{call:?} failed"))),
            None => Ok(state),
        }
    }
}

impl State {
    /// The claimable rows of every tenant but those in `skip`, in due order as the database's
    /// claim takes them: when due, then the row id.
    fn due(&self, now: Instant, skip: &[String]) -> Vec<usize> {
        let mut due: Vec<usize> = (0..self.rows.len())
            .filter(|&i| {
                let row = &self.rows[i];
                row.status == MemoryStatus::Pending
                    && !skip.contains(&row.event.tenant_id)
                    && row.next_attempt_at <= now
                    && row.lease.as_ref().is_none_or(|(_, until)| *until <= now)
                    && self.is_head(row)
            })
            .collect();
        due.sort_by_key(|&i| (self.rows[i].next_attempt_at, self.rows[i].event.id));
        due
    }

    /// Leases the rows `taken` to `owner` until `until`, counting the attempt.
    fn lease(&mut self, taken: Vec<usize>, owner: &str, until: Instant) -> Vec<ClaimedEvent> {
        taken
            .into_iter()
            .map(|i| {
                let row = &mut self.rows[i];
                row.event.attempts += 1;
                row.lease = Some((owner.to_owned(), until));
                row.event.clone()
            })
            .collect()
    }

    /// Whether every earlier version of `row`'s aggregate is published.
    fn is_head(&self, row: &MemoryRow) -> bool {
        let e = &row.event;
        self.rows.iter().all(|r| {
            r.event.tenant_id != e.tenant_id
                || r.event.aggregate_type != e.aggregate_type
                || r.event.aggregate_id != e.aggregate_id
                || r.event.aggregate_version >= e.aggregate_version
                || r.status == MemoryStatus::Published
        })
    }
}

/// The claim's share between tenants, as `outbox_claim` (migration V8) means it: round robin,
/// one row of each tenant per turn, each tenant's rows in the order given, tenants after `after`
/// first in every turn (byte order); at most `limit`. Exact where the database's two rounds
/// approximate (it may come back short of the batch, see V8). Returns indexes into `rows`, in
/// the order taken: the last one ends the last turn.
fn fair_share(rows: &[MemoryRow], due: Vec<usize>, limit: usize, after: &str) -> Vec<usize> {
    let mut tenants: std::collections::BTreeMap<&str, VecDeque<usize>> = Default::default();
    for i in due {
        tenants
            .entry(rows[i].event.tenant_id.as_str())
            .or_default()
            .push_back(i);
    }
    let (wrapped, ahead): (Vec<_>, Vec<_>) = tenants
        .into_iter()
        .partition(|(tenant, _)| *tenant <= after);
    let mut queues: Vec<VecDeque<usize>> = ahead
        .into_iter()
        .chain(wrapped)
        .map(|(_, rows)| rows)
        .collect();
    let mut taken = Vec::new();
    while taken.len() < limit && queues.iter().any(|q| !q.is_empty()) {
        for queue in &mut queues {
            if taken.len() == limit {
                break;
            }
            if let Some(i) = queue.pop_front() {
                taken.push(i);
            }
        }
    }
    taken
}

impl OutboxStore for MemoryStore {
    async fn claim_batch(
        &self,
        limit: i64,
        lease: Duration,
        lease_owner: &str,
    ) -> Result<Vec<ClaimedEvent>, StoreError> {
        let mut state = self.enter(StoreCall::Claim)?;
        let now = Instant::now();
        let due = state.due(now, &[]);
        let due = fair_share(&state.rows, due, limit.max(0) as usize, &state.after);
        if let Some(&last) = due.last() {
            state.after = state.rows[last].event.tenant_id.clone();
        }
        Ok(state.lease(due, lease_owner, now + lease))
    }

    async fn claim_waiting(
        &self,
        limit: i64,
        lease: Duration,
        lease_owner: &str,
        skip: &[String],
    ) -> Result<Vec<ClaimedEvent>, StoreError> {
        let mut state = self.enter(StoreCall::ClaimWaiting)?;
        let now = Instant::now();
        let due = state.due(now, skip);
        // As outbox_claim_waiting: each tenant with pending heads (due or not) that is not
        // skipped gets up to ceil(limit / those tenants), with no second round; the main
        // claim's rotation stays where it was.
        let tenants: std::collections::HashSet<&str> = state
            .rows
            .iter()
            .filter(|r| r.status == MemoryStatus::Pending && !skip.contains(&r.event.tenant_id))
            .filter(|r| state.is_head(r))
            .map(|r| r.event.tenant_id.as_str())
            .collect();
        let share = (limit.max(0) as usize).div_ceil(tenants.len().max(1));
        let mut taken: HashMap<String, usize> = HashMap::new();
        let due: Vec<usize> = fair_share(&state.rows, due, limit.max(0) as usize, "")
            .into_iter()
            .filter(|&i| {
                let n = taken
                    .entry(state.rows[i].event.tenant_id.clone())
                    .or_default();
                *n += 1;
                *n <= share
            })
            .collect();
        Ok(state.lease(due, lease_owner, now + lease))
    }

    async fn record_outcomes(
        &self,
        lease_owner: &str,
        outcomes: &Outcomes,
    ) -> Result<Outcomes, StoreError> {
        let mut state = self.enter(StoreCall::Record)?;
        let state = &mut *state;
        // Only rows still leased to the caller are recorded or held, as in `outbox_record`.
        let owned = |rows: &Vec<MemoryRow>, id: i64| {
            rows.iter().any(|r| {
                r.event.id == id
                    && r.status == MemoryStatus::Pending
                    && r.lease.as_ref().is_some_and(|(o, _)| o == lease_owner)
            })
        };
        let held: Vec<i64> = outcomes
            .ids()
            .into_iter()
            .filter(|&id| owned(&state.rows, id))
            .filter(|id| match state.held.get_mut(id) {
                Some(left) if *left > 0 => {
                    *left -= 1;
                    true
                }
                _ => false,
            })
            .collect();
        let (later, now) = outcomes.split(|id| held.contains(&id));
        let ours = |rows: &mut Vec<MemoryRow>, id: i64| -> Option<usize> {
            let i = rows.iter().position(|r| r.event.id == id)?;
            let leased_to_us = rows[i]
                .lease
                .as_ref()
                .is_some_and(|(o, _)| o == lease_owner);
            (leased_to_us && rows[i].status == MemoryStatus::Pending).then_some(i)
        };
        for id in now.published {
            if let Some(i) = ours(&mut state.rows, id) {
                let row = &mut state.rows[i];
                (row.status, row.lease, row.last_error) = (MemoryStatus::Published, None, None);
                row.times_published += 1;
            }
        }
        for (id, delay, error) in now.retries {
            if let Some(i) = ours(&mut state.rows, id) {
                let row = &mut state.rows[i];
                (row.lease, row.last_error) = (None, Some(error));
                row.next_attempt_at = Instant::now() + delay;
            }
        }
        for (id, error) in now.dead {
            if let Some(i) = ours(&mut state.rows, id) {
                let row = &mut state.rows[i];
                (row.status, row.lease, row.last_error) = (MemoryStatus::Dead, None, Some(error));
            }
        }
        Ok(later)
    }

    async fn backlog(&self) -> Result<Backlog, StoreError> {
        let state = self.state();
        let count = |status| state.rows.iter().filter(|r| r.status == status).count() as i64;
        Ok(Backlog {
            pending: count(MemoryStatus::Pending),
            dead: count(MemoryStatus::Dead),
            ..Backlog::default()
        })
    }

    async fn heartbeat(&self, _owner: &str, _ttl: Duration) -> Result<(), StoreError> {
        self.enter(StoreCall::Heartbeat).map(drop)
    }

    async fn release(&self, _owner: &str) -> Result<(), StoreError> {
        self.enter(StoreCall::Heartbeat).map(drop)
    }

    async fn delete_published(
        &self,
        _retention: Duration,
        _max_rows: i32,
    ) -> Result<u64, StoreError> {
        Ok(0)
    }
}
