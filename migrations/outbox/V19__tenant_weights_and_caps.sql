-- Tenants weighted, capped and paused: the claim's shares read outbox_tenant_limits.
--
-- Before: the claim (V8, V15) gave every tenant with due heads the same share of a batch, and the
-- lane's claim (V15) the same. A team could not give a tenant a larger share, cap a tenant whose
-- consumers take only so many events a second, or hold a tenant's events back while its consumers
-- are down, short of stopping every dispatcher.
-- Now a row of outbox_tenant_limits changes that tenant's part; a tenant without one is as before:
-- * weight (1 to 1,000; 1 without a row): the tenants with due heads share each claim in
--   proportion to their weights, ceil(batch * weight / their weights' sum) rows each in the first
--   round; what is left goes to those that had more, again by weight. The batch is cut round by
--   round, a tenant of weight w having w rows in each (weighted round robin): 3:1 is three rows
--   of one tenant for each of the other's, all through the batch. Each tenant with due heads
--   gets at least min(its due heads no one holds, weight * floor(batch / the weights' sum), its
--   allowance). Within a round the rotation of V8 goes on (tenants after p_after first), so with a
--   batch smaller than the weights' sum every tenant is still served in turn, at shares that
--   follow the weights less closely. The caller's rotation (shared/src/postgres/outbox.rs) goes
--   on after a tenant this claim served; with weights it may be one that ended an earlier round
--   than the last, so the next claim starts at least one tenant further, never behind.
-- * max_per_second (at least 1; no cap without it): the tenant's live events leased at most at
--   that rate, over every dispatcher and the lanes, with bursts up to one second's worth. A token
--   bucket in the row (tokens, refilled_at): each claim refills it for the time since it was last
--   spent and takes at most its whole tokens. The row is locked (FOR UPDATE SKIP LOCKED) by the
--   claim that spends it, so two claims never spend the same tokens: a concurrent claim skips the
--   tenant for that claim. A lease that expires and is claimed again spends tokens again (it goes
--   to the bus again).
-- * paused: none of the tenant's live events is leased. They stay pending in order; resuming
--   lets them go in version order, as a dispatcher coming back would.
-- Only live events: an operator's replays (outboxctl replay) fill what live events leave of a
-- batch whatever the tenant's weight, cap or pause, as before; pause a consumer's replays by not
-- starting them.
-- Every ordering rule is as it was: the shares choose which tenants' due heads a claim takes,
-- never which event of an aggregate goes next (heads only, V7).
--
-- Cost: one call of outbox_tenant_shares per claim, which reads the table (empty: nothing) for the
-- tenants with pending heads; for capped tenants, a row locked and (when the claim took some of
-- theirs) written per claim. Measured against V18's claim in docs/benchmarks.md.
--
-- On a live outbox: CREATE TABLE and CREATE OR REPLACE FUNCTION only; a claim running while it
-- commits finishes on the old definition.

CREATE TABLE outbox_tenant_limits (
    tenant_id      text PRIMARY KEY,
    weight         integer NOT NULL DEFAULT 1 CHECK (weight BETWEEN 1 AND 1000),
    max_per_second integer CHECK (max_per_second >= 1),
    paused         boolean NOT NULL DEFAULT false,
    -- The bucket: NULL is full (a new row, or one whose cap was just set).
    tokens         double precision CHECK (tokens >= 0),
    refilled_at    timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE outbox_tenant_limits IS
    'A tenant''s weight, cap and pause in the claim (V19); a tenant without a row has weight 1, no cap, not paused.';

-- The tenants of p_tenants that may have rows in a claim, with their weights and allowances
-- (NULL: no cap) and, for capped tenants, their buckets refilled (tokens). A paused tenant is left
-- out, and so is a capped one with less than a whole token or whose row another claim holds right
-- now (FOR UPDATE SKIP LOCKED: the claim that locks a bucket alone spends it, until its
-- transaction ends). Both claims below call it; each spends what it took in the same statement,
-- never moving refilled_at back (now() is its transaction's start: a claim that started before
-- another spent the bucket refills nothing for the time before that spend). Called by hand inside
-- an open transaction, it holds the capped tenants' buckets until that transaction ends, and the
-- claims meanwhile take none of those tenants' events.
CREATE FUNCTION outbox_tenant_shares(p_tenants text[])
RETURNS TABLE (tenant_id text, weight integer, allowance bigint, tokens float8)
LANGUAGE plpgsql ROWS 100 SET jit = off AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH budget AS MATERIALIZED (
        SELECT l.tenant_id,
               least(l.max_per_second::float8,
                     coalesce(l.tokens, l.max_per_second)
                     + l.max_per_second * greatest(extract(epoch FROM now() - l.refilled_at)::float8, 0)) AS tokens
        FROM outbox_tenant_limits l
        WHERE l.tenant_id = ANY (p_tenants) AND l.max_per_second IS NOT NULL AND NOT l.paused
        FOR UPDATE SKIP LOCKED
    )
    SELECT t.tenant_id, coalesce(l.weight, 1),
           CASE WHEN l.max_per_second IS NOT NULL THEN floor(b.tokens)::int8 END, b.tokens
    FROM unnest(p_tenants) AS t(tenant_id)
    LEFT JOIN outbox_tenant_limits l ON l.tenant_id = t.tenant_id
    LEFT JOIN budget b ON b.tenant_id = t.tenant_id
    WHERE NOT coalesce(l.paused, false) AND (l.max_per_second IS NULL OR b.tokens >= 1);
END $$;

-- The claim of V15 with the tenants' weights, caps and pauses (the CTEs active, quota; the
-- shares; the cut's order; spent).
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
        -- Tenants that may have rows in this claim, their weights and allowances (NULL: no cap).
        SELECT * FROM outbox_tenant_shares(ARRAY(
            SELECT tenant_id FROM tenants WHERE tenant_id IS NOT NULL))
    ), quota AS MATERIALIZED (
        -- Each tenant's first share: its part of the batch by weight, within its allowance.
        SELECT a.tenant_id, a.weight, a.allowance,
               least(ceil(p_limit::float8 * a.weight / w.weights)::int8, a.allowance) AS n
        FROM active a CROSS JOIN (SELECT sum(weight)::float8 AS weights FROM active) w
    ), first_round AS MATERIALIZED (
        -- Each tenant's first share of due heads, numbered in due order (its turns).
        SELECT h.id, h.tenant_id, h.next_attempt_at, q.weight,
               row_number() OVER (PARTITION BY h.tenant_id
                                  ORDER BY h.next_attempt_at, h.id) AS turn
        FROM quota q CROSS JOIN LATERAL (
            SELECT o.id, o.tenant_id, o.next_attempt_at
            FROM outbox o
            WHERE o.tenant_id = q.tenant_id AND o.status = 'pending' AND o.is_head
              AND o.next_attempt_at <= now()
              AND (o.tenant_id, o.next_attempt_at, o.id) >= (q.tenant_id, '-infinity', 0)
              AND (o.locked_until IS NULL OR o.locked_until <= now())
            ORDER BY o.tenant_id, o.next_attempt_at, o.id
            LIMIT q.n
            FOR UPDATE OF o SKIP LOCKED) h
    ), filled AS MATERIALIZED (
        -- Tenants that had a whole share and may take more, and where the share ended.
        SELECT f.tenant_id, q.weight, q.allowance, max(f.turn) AS turns,
               max(f.next_attempt_at) AS last_at, max(f.id) FILTER (WHERE f.turn = q.n) AS last_id
        FROM first_round f JOIN quota q ON q.tenant_id = f.tenant_id
        GROUP BY f.tenant_id, q.weight, q.allowance, q.n
        HAVING max(f.turn) = q.n AND (q.allowance IS NULL OR q.allowance > q.n)
    ), rest AS (
        -- What the first round left of the batch, split between them by weight.
        SELECT (p_limit - (SELECT count(*) FROM first_round))::float8 AS n,
               greatest((SELECT sum(weight) FROM filled), 1)::float8 AS weights
    ), second_round AS (
        SELECT h.id, h.tenant_id, h.next_attempt_at, f.weight,
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
            LIMIT greatest(least(ceil(r.n * f.weight / r.weights)::int8, f.allowance - f.turns), 0)
            FOR UPDATE OF o SKIP LOCKED) h
    ), live AS (
        -- Round by round, a tenant of weight w having w turns in each; within a round, tenants
        -- after p_after first, in byte order (the caller's), each with its turns in due order.
        SELECT id FROM (
            SELECT * FROM first_round UNION ALL SELECT * FROM second_round) p
        ORDER BY ceil(turn::float8 / weight), tenant_id COLLATE "C" <= p_after COLLATE "C",
                 tenant_id COLLATE "C", turn
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
        SELECT id FROM live
        UNION ALL
        SELECT id FROM replays_free
    ), leased AS (
        UPDATE outbox o
        SET locked_until = now() + make_interval(secs => p_lease_secs),
            locked_by = p_owner,
            attempts = o.attempts + 1
        WHERE o.id = ANY (ARRAY(SELECT id FROM candidates LIMIT p_limit))
        RETURNING o.*
    ), spent AS (
        -- The capped tenants' tokens this claim took (their live rows); nothing to do, and
        -- nothing read, when no tenant is capped.
        UPDATE outbox_tenant_limits l
        SET tokens = greatest(a.tokens - s.n, 0), refilled_at = greatest(l.refilled_at, now())
        FROM active a
        CROSS JOIN LATERAL (SELECT count(*) AS n FROM leased x
                            WHERE x.tenant_id = a.tenant_id AND NOT x.replay) s
        WHERE a.allowance IS NOT NULL AND l.tenant_id = a.tenant_id AND s.n > 0
          -- By key: the table may hold many tenants (an index scan, not a scan of them all).
          AND l.tenant_id = ANY (ARRAY(SELECT c.tenant_id FROM active c WHERE c.allowance IS NOT NULL))
    )
    SELECT * FROM leased;
END $$;

-- The lane's claim of V15 with the same weights, caps and pauses.
CREATE OR REPLACE FUNCTION outbox_claim_waiting(p_limit bigint, p_lease_secs float8, p_owner text, p_skip text[])
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
        SELECT * FROM outbox_tenant_shares(ARRAY(
            SELECT tenant_id FROM tenants
            WHERE tenant_id IS NOT NULL AND tenant_id <> ALL (p_skip)))
    ), quota AS MATERIALIZED (
        SELECT a.tenant_id, a.weight,
               least(ceil(p_limit::float8 * a.weight / w.weights)::int8, a.allowance) AS n
        FROM active a CROSS JOIN (SELECT sum(weight)::float8 AS weights FROM active) w
    ), taken AS (
        SELECT h.id, h.tenant_id, q.weight,
               row_number() OVER (PARTITION BY h.tenant_id
                                  ORDER BY h.next_attempt_at, h.id) AS turn
        FROM quota q CROSS JOIN LATERAL (
            SELECT o.id, o.tenant_id, o.next_attempt_at
            FROM outbox o
            WHERE o.tenant_id = q.tenant_id AND o.status = 'pending' AND o.is_head
              AND o.next_attempt_at <= now()
              AND (o.tenant_id, o.next_attempt_at, o.id) >= (q.tenant_id, '-infinity', 0)
              AND (o.locked_until IS NULL OR o.locked_until <= now())
            ORDER BY o.tenant_id, o.next_attempt_at, o.id
            LIMIT q.n
            FOR UPDATE OF o SKIP LOCKED) h
    ), leased AS (
        UPDATE outbox o
        SET locked_until = now() + make_interval(secs => p_lease_secs),
            locked_by = p_owner,
            attempts = o.attempts + 1
        WHERE o.id = ANY (ARRAY(
            SELECT id FROM taken
            ORDER BY ceil(turn::float8 / weight), hashtext(tenant_id || p_owner), tenant_id COLLATE "C",
                     turn
            LIMIT p_limit))
        RETURNING o.*
    ), spent AS (
        UPDATE outbox_tenant_limits l
        SET tokens = greatest(a.tokens - s.n, 0), refilled_at = greatest(l.refilled_at, now())
        FROM active a
        CROSS JOIN LATERAL (SELECT count(*) AS n FROM leased x WHERE x.tenant_id = a.tenant_id) s
        WHERE a.allowance IS NOT NULL AND l.tenant_id = a.tenant_id AND s.n > 0
          -- By key: the table may hold many tenants (an index scan, not a scan of them all).
          AND l.tenant_id = ANY (ARRAY(SELECT c.tenant_id FROM active c WHERE c.allowance IS NOT NULL))
    )
    SELECT * FROM leased;
END $$;

-- CREATE OR REPLACE keeps no SET clause: both claims' search_path again (V15), and the shares';
-- jit = off is in their definitions.
DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION outbox_claim(bigint, float8, text, text) SET search_path = %I, pg_catalog',
                   current_schema());
    EXECUTE format('ALTER FUNCTION outbox_claim_waiting(bigint, float8, text, text[]) SET search_path = %I, pg_catalog',
                   current_schema());
    EXECUTE format('ALTER FUNCTION outbox_tenant_shares(text[]) SET search_path = %I, pg_catalog',
                   current_schema());
END $$;
