-- Claims that cost what they take, and a lane for the tenants not being drained in bulk.
--
-- 1. Each tenant's share is read from its own part of the claim index.
--
-- Before: outbox_claim (V8, V11) read each tenant's due heads `WHERE tenant_id = a.tenant_id
-- ... ORDER BY next_attempt_at, id`. Inside the function the statement runs with a generic
-- plan, which cannot tell one tenant from another, and PostgreSQL read those heads from the
-- pending index (outbox_claim_idx, every tenant's pending rows in due order), filtering out
-- the other tenants' rows one by one: beside another tenant's 60,000 waiting events, a quiet
-- tenant's share of a claim walked all 60,000 (a claim of 500 took 57 ms, 40 of them there).
-- So a claim beside another tenant's backlog cost in proportion to that backlog, and ran long
-- exactly when a quiet tenant waited for it. EXPLAIN of the statement with its parameters
-- written in (a custom plan, `explain_claim`) used the tenant index, which is why the
-- claim-plan test did not see it.
-- It happens whenever the statistics know one tenant (a tenant starts beside another's
-- backlog): a generic `tenant_id = $1` then looks like every row to the planner, and the
-- smaller pending index wins. Ordering by tenant_id first alone does not help: with the
-- equality the planner drops tenant_id from the order.
-- Now: each share scan also compares the whole index key, `(tenant_id, next_attempt_at, id) >=
-- ($t, '-infinity', 0)` (in the second round, `> ($t, last_at, last_id)`, where the first round
-- ended), and orders by it. Only outbox_tenant_claim_idx can use that as an index condition;
-- on the pending index it would be a filter, so the planner takes the tenant index, under either
-- plan (1.8 ms against 8.7 for a claim of 100 beside 20,000; 0.2 against 40 for the lane's).
-- The equality and `next_attempt_at <= now()` stay: they end each tenant's scan at its first
-- head backing off (a range in place of the equality did not, and read them all).
-- tests/it/fairness.rs `a_claim_reads_only_the_rows_it_takes_under_either_plan` counts the rows
-- a claim fetches under both plans (20,201 to take 100 on V11's claim), and tests/it/order.rs
-- `parked_and_backing_off_rows_are_not_read_by_the_claim` the pages its index scans read.

-- 2. A lane for the tenants that are not being drained in bulk: outbox_claim_waiting below (its
-- caller: shared/src/postgres/outbox.rs; the drain's lane: shared/src/dispatcher/lane.rs).
--
-- Before: the claim was fair between tenants (V8), but a claim is one step of a pipeline. Beside
-- another tenant's 200,000 events, a quiet tenant's event committed now was leased by the next
-- claim, waited as the batch leased ahead while the batch before it went to the bus, and then
-- went out with 499 rows of the other tenant: commit to publish took 537 ms at the p99 against
-- 11 ms with no backlog (48.6x; docs/benchmarks.md).
-- Now: while a batch is on the bus, the drain claims every few milliseconds (its lane) the due
-- heads of every tenant except those it is draining in bulk (p_skip: the tenants with the most
-- rows in its last full claim), and publishes them at once. The main claim's rows of other
-- tenants go at once too. So a quiet tenant's event waits one poll of the lane, not a batch of
-- someone else's.
--
-- The rows it leases are those outbox_claim (V8, V11) would: pending aggregate heads that are
-- due and not leased, FOR UPDATE SKIP LOCKED, the lease written in this one autocommitted
-- statement under a fresh owner that fences the outcomes (outbox_record). So every ordering rule
-- holds as it does for the main claim: an aggregate's next event is a head only once this one
-- is recorded as published. It takes no replays (the main claim does; they are done already).
-- Between its tenants, the batch is shared as V8's first round does: each gets up to
-- ceil(p_limit / tenants) rows in due order, and the cut goes turn by turn; within a turn the
-- tenants go in an order drawn from the owner (fresh per claim), so with more tenants than the
-- batch none is always last.
-- Cost: one index descent per tenant with pending heads (the skipped ones included), then each
-- tenant's few due heads. With only skipped tenants waiting, it reads two index pages.
CREATE FUNCTION outbox_claim_waiting(p_limit bigint, p_lease_secs float8, p_owner text, p_skip text[])
RETURNS SETOF outbox LANGUAGE plpgsql SET jit = off AS $$
BEGIN
    IF p_limit IS NULL OR p_limit < 1 OR p_lease_secs IS NULL OR p_lease_secs <= 0
       OR p_owner IS NULL OR p_skip IS NULL OR array_position(p_skip, NULL) IS NOT NULL THEN
        RAISE EXCEPTION 'outbox_claim_waiting(%, %, %, %): a batch of at least 1, a positive lease, an owner and the tenants to skip (an array without NULLs, empty for none) are required',
            p_limit, p_lease_secs, p_owner, p_skip USING ERRCODE = 'invalid_parameter_value';
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
        SELECT tenant_id FROM tenants
        WHERE tenant_id IS NOT NULL AND tenant_id <> ALL (p_skip)
    ), share AS (
        SELECT ceil(p_limit::float8 / greatest(count(*), 1))::int8 AS n FROM active
    ), taken AS (
        SELECT h.id, h.tenant_id,
               row_number() OVER (PARTITION BY h.tenant_id
                                  ORDER BY h.next_attempt_at, h.id) AS turn
        FROM active a CROSS JOIN share s CROSS JOIN LATERAL (
            SELECT o.id, o.tenant_id, o.next_attempt_at
            FROM outbox o
            WHERE o.tenant_id = a.tenant_id AND o.status = 'pending' AND o.is_head
              AND o.next_attempt_at <= now()
              AND (o.tenant_id, o.next_attempt_at, o.id) >= (a.tenant_id, '-infinity', 0)
              AND (o.locked_until IS NULL OR o.locked_until <= now())
            ORDER BY o.tenant_id, o.next_attempt_at, o.id
            LIMIT s.n
            FOR UPDATE OF o SKIP LOCKED) h
    )
    UPDATE outbox o
    SET locked_until = now() + make_interval(secs => p_lease_secs),
        locked_by = p_owner,
        attempts = o.attempts + 1
    WHERE o.id = ANY (ARRAY(
        SELECT id FROM taken
        ORDER BY turn, hashtext(tenant_id || p_owner), tenant_id COLLATE "C"
        LIMIT p_limit))
    RETURNING o.*;
END $$;

-- The claim of (1); only its two share scans changed.
CREATE OR REPLACE FUNCTION outbox_claim(p_limit bigint, p_lease_secs float8, p_owner text, p_after text)
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
              AND (o.tenant_id, o.next_attempt_at, o.id) >= (a.tenant_id, '-infinity', 0)
              AND (o.locked_until IS NULL OR o.locked_until <= now())
            ORDER BY o.tenant_id, o.next_attempt_at, o.id
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
              AND (o.tenant_id, o.next_attempt_at, o.id) > (f.tenant_id, f.last_at, f.last_id)
              AND (o.locked_until IS NULL OR o.locked_until <= now())
            ORDER BY o.tenant_id, o.next_attempt_at, o.id
            LIMIT greatest(r.n, 0)
            FOR UPDATE OF o SKIP LOCKED) h
    ), live AS (
        -- Turn by turn; within a turn, tenants after p_after first, in byte order (the caller's).
        SELECT id, next_attempt_at FROM (
            SELECT * FROM first_round UNION ALL SELECT * FROM second_round) p
        ORDER BY turn, tenant_id COLLATE "C" <= p_after COLLATE "C", tenant_id COLLATE "C"
        LIMIT p_limit
    ), replays AS (
        SELECT o.id, o.next_attempt_at,
               outbox_replay_lock_key(o.tenant_id, o.aggregate_type, o.aggregate_id) AS lock_key
         FROM outbox o
         WHERE o.replay
           AND o.next_attempt_at <= now()
           AND (o.locked_until IS NULL OR o.locked_until <= now())
           AND NOT EXISTS (SELECT 1 FROM outbox e
                           WHERE e.tenant_id = o.tenant_id AND e.aggregate_type = o.aggregate_type
                             AND e.aggregate_id = o.aggregate_id AND e.replay AND e.id <> o.id
                             AND (e.aggregate_version < o.aggregate_version
                                  OR e.locked_until > now()))
         ORDER BY o.next_attempt_at, o.id
         LIMIT p_limit
         FOR UPDATE OF o SKIP LOCKED
    ), replays_free AS (
        -- Only replays whose aggregate no replay of the operator's is committing right now.
        SELECT id, next_attempt_at FROM replays WHERE pg_try_advisory_xact_lock(lock_key)
    ), candidates AS (
        -- Live events first, then replays.
        SELECT * FROM live UNION ALL SELECT * FROM replays_free
    )
    UPDATE outbox o
    SET locked_until = now() + make_interval(secs => p_lease_secs),
        locked_by = p_owner,
        attempts = o.attempts + 1
    WHERE o.id = ANY (ARRAY(SELECT id FROM candidates LIMIT p_limit))
    RETURNING o.*;
END $$;

-- CREATE OR REPLACE keeps no SET clause: the claim's search_path (V9, V11) again; jit = off is
-- in its definition.
DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION outbox_claim(bigint, float8, text, text) SET search_path = %I, pg_catalog',
                   current_schema());
    EXECUTE format('ALTER FUNCTION outbox_claim_waiting(bigint, float8, text, text[]) SET search_path = %I, pg_catalog',
                   current_schema());
END $$;
