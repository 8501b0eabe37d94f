-- A claim fair between tenants: outbox_claim below (its caller: shared/src/postgres/outbox.rs).
--
-- Before: the claim read one index in due order over every tenant's pending heads, so a tenant
-- that appended 200,000 events put every other tenant's events behind its backlog.
-- Now: the same pending heads, per tenant in due order. The claim walks the tenants that have
-- pending heads (one index descent each), takes each one's share of the batch, and gives what
-- is left to those that had more. The old index is dropped: no query reads it any more, and an
-- index fewer is an index entry fewer for every append and every head that changes.
--
-- On a live outbox: CREATE INDEX reads the whole table (retained history included) and blocks
-- writes to it while it builds (appends, claims, records); DROP INDEX then takes the table's
-- exclusive lock for a moment, behind any reader already running. To keep writes going, build the
-- index by hand first, outside a transaction (docs/operations.md, "Upgrading to V8"):
--   CREATE INDEX CONCURRENTLY IF NOT EXISTS outbox_tenant_claim_idx
--       ON outbox (tenant_id, next_attempt_at, id) WHERE status = 'pending' AND is_head;
-- and this migration finds it. Deploy it before the code that calls outbox_claim: meanwhile the
-- previous code's claim still works, on the pending index (outbox_claim_idx), and reads the
-- parked rows too.
CREATE INDEX IF NOT EXISTS outbox_tenant_claim_idx ON outbox (tenant_id, next_attempt_at, id)
    WHERE status = 'pending' AND is_head;

DROP INDEX IF EXISTS outbox_head_claim_idx;

-- The claim: leases up to p_limit publishable rows for p_lease_secs to p_owner (a fresh owner for
-- every claim: it fences the claim's outcomes, outbox_record). Publishable: pending aggregate
-- heads that are due, and replays.
--   * Heads only (migration V7): an aggregate's events go out one by one in version order, and a
--     failing event (backing off or dead) holds back its own aggregate only. Dead heads and the
--     rows parked behind them are not in the index; heads backing off end each tenant's range.
--   * Fair between tenants: the tenants with pending heads share the batch. Each gets up to
--     ceil(p_limit / tenants) of its due heads (its first round); what that leaves of the batch
--     is split evenly, in a second round, between the tenants that had a whole share (they may
--     have more). The batch is then cut turn by turn, so a tenant with due heads gets at least
--     min(its due heads no one holds, floor(p_limit / tenants)) rows, one at least while there
--     are no more tenants than p_limit. With more, the tenants after p_after (where the caller's
--     previous claim ended its last turn) go first in each turn: every tenant is served in
--     rotation. One tenant alone gets the whole batch. Within a tenant, rows go in due order.
--     A claim can come back short of the batch while rows wait: a tenant that had exactly its
--     share leaves its part of the second round unused (there is no third). The drain claims
--     again at once after any claim that returned rows.
--   * Replays: published events delivered again, outside the aggregate's order (they are done
--     already), in version order among the aggregate's replays. They fill what live events leave
--     of the batch.
--   * FOR UPDATE SKIP LOCKED in each tenant's scan: concurrent dispatchers take disjoint rows
--     without waiting, and a row someone holds right now is taken by a later claim. The lease is
--     written in this one statement (autocommitted by the caller): no lock is held across the
--     publish, and a dispatcher that dies leaves rows claimable once its lease ends.
--   * Cost: one index descent per tenant with pending heads, plus the rows each round reads and
--     locks; the million published rows of a tenant's history are not in the index. The first
--     round locks at least one row of every tenant with due heads: with more such tenants than
--     p_limit, a claim locks (and then leaves) one row of each of the others too.
-- A PL/pgSQL function so that its plan is cached per connection (the statement is long to plan).
-- Without JIT: the planner cannot know each tenant's share, so it estimates the statement far
-- above what it reads (a cost of 340,000 for a claim that reads 1,700 pages in 3 ms), over
-- PostgreSQL's jit_above_cost; with jit on, its default, every claim compiled itself first, for
-- 50-100 ms of the server's CPU.
CREATE FUNCTION outbox_claim(p_limit bigint, p_lease_secs float8, p_owner text, p_after text)
RETURNS SETOF outbox LANGUAGE plpgsql SET jit = off AS $$
BEGIN
    IF p_limit IS NULL OR p_limit < 1 OR p_lease_secs IS NULL OR p_lease_secs <= 0
       OR p_owner IS NULL OR p_after IS NULL THEN
        RAISE EXCEPTION 'outbox_claim(%, %, %, %): a batch of at least 1, a positive lease, an owner and a tenant to start after (empty for none) are required',
            p_limit, p_lease_secs, p_owner, p_after USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN QUERY
    -- Tenants with pending heads: one descent of the index each.
    WITH RECURSIVE tenants AS (
        (SELECT o.tenant_id FROM outbox o
         WHERE o.status = 'pending' AND o.is_head
         ORDER BY o.tenant_id LIMIT 1)
        UNION ALL
        SELECT (SELECT o.tenant_id FROM outbox o
                WHERE o.status = 'pending' AND o.is_head AND o.tenant_id > t.tenant_id
                ORDER BY o.tenant_id LIMIT 1)
        FROM tenants t WHERE t.tenant_id IS NOT NULL
    ), active AS MATERIALIZED (
        SELECT tenant_id FROM tenants WHERE tenant_id IS NOT NULL
    ), share AS (
        SELECT ceil(p_limit::float8 / greatest(count(*), 1))::int8 AS n FROM active
    ), first_round AS MATERIALIZED (
        -- Each tenant's first share of due heads, numbered in due order (its turns).
        SELECT h.id, h.tenant_id, h.next_attempt_at,
               row_number() OVER (PARTITION BY h.tenant_id
                                  ORDER BY h.next_attempt_at, h.id) AS turn
        FROM active a CROSS JOIN share s CROSS JOIN LATERAL (
            SELECT o.id, o.tenant_id, o.next_attempt_at
            FROM outbox o
            WHERE o.tenant_id = a.tenant_id AND o.status = 'pending' AND o.is_head
              AND o.next_attempt_at <= now()
              AND (o.locked_until IS NULL OR o.locked_until <= now())
            ORDER BY o.next_attempt_at, o.id
            LIMIT s.n
            FOR UPDATE OF o SKIP LOCKED) h
    ), filled AS (
        -- Tenants that had a whole share, and where the share ended.
        SELECT f.tenant_id, max(f.turn) AS turns, max(f.next_attempt_at) AS last_at,
               max(f.id) FILTER (WHERE f.turn = s.n) AS last_id
        FROM first_round f CROSS JOIN share s
        GROUP BY f.tenant_id, s.n
        HAVING max(f.turn) = s.n
    ), rest AS (
        -- What the first round left of the batch, split between them.
        SELECT ceil((p_limit - (SELECT count(*) FROM first_round))::float8
                    / greatest((SELECT count(*) FROM filled), 1))::int8 AS n
    ), second_round AS (
        SELECT h.id, h.tenant_id, h.next_attempt_at,
               f.turns + row_number() OVER (PARTITION BY h.tenant_id
                                            ORDER BY h.next_attempt_at, h.id) AS turn
        FROM filled f CROSS JOIN rest r CROSS JOIN LATERAL (
            SELECT o.id, o.tenant_id, o.next_attempt_at
            FROM outbox o
            WHERE o.tenant_id = f.tenant_id AND o.status = 'pending' AND o.is_head
              AND o.next_attempt_at <= now()
              AND (o.next_attempt_at, o.id) > (f.last_at, f.last_id)
              AND (o.locked_until IS NULL OR o.locked_until <= now())
            ORDER BY o.next_attempt_at, o.id
            LIMIT greatest(r.n, 0)
            FOR UPDATE OF o SKIP LOCKED) h
    ), live AS (
        -- Turn by turn; within a turn, tenants after p_after first, in byte order (the caller's).
        SELECT id, next_attempt_at FROM (
            SELECT * FROM first_round UNION ALL SELECT * FROM second_round) p
        ORDER BY turn, tenant_id COLLATE "C" <= p_after COLLATE "C", tenant_id COLLATE "C"
        LIMIT p_limit
    ), replays AS (
        SELECT o.id, o.next_attempt_at
         FROM outbox o
         WHERE o.replay
           AND o.next_attempt_at <= now()
           AND (o.locked_until IS NULL OR o.locked_until <= now())
           AND NOT EXISTS (SELECT 1 FROM outbox e
                           WHERE e.tenant_id = o.tenant_id AND e.aggregate_type = o.aggregate_type
                             AND e.aggregate_id = o.aggregate_id
                             AND e.aggregate_version < o.aggregate_version AND e.replay)
         ORDER BY o.next_attempt_at, o.id
         LIMIT p_limit
         FOR UPDATE OF o SKIP LOCKED
    ), candidates AS (
        -- Live events first, then replays.
        SELECT * FROM live UNION ALL SELECT * FROM replays
    )
    UPDATE outbox o
    SET locked_until = now() + make_interval(secs => p_lease_secs),
        locked_by = p_owner,
        attempts = o.attempts + 1
    WHERE o.id = ANY (ARRAY(SELECT id FROM candidates LIMIT p_limit))
    RETURNING o.*;
END $$;

-- The record of a claim's outcomes, likewise: one short statement per batch, never worth compiling.
ALTER FUNCTION outbox_record(text, bigint[], bigint[], float8[], text[], bigint[], text[])
    SET jit = off;
