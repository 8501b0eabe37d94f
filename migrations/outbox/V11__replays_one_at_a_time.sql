-- Replays of an aggregate go out one at a time, lowest version first.
--
-- Before: the claim took a replay when no replay of a lower version of its aggregate waited. So
-- when the operator replayed v1 while v2's replay was in flight (leased to a dispatcher), v1 was
-- claimable at once, by another dispatcher too: both were published at the same time, in either
-- order. The order model found it (tests/it/order_model.rs, "replays in order").
-- Now: a replay is claimable only while no other replay of its aggregate is leased, as well.
-- The one in flight goes first (it was sent before v1 was asked for), then v1, then the rest in
-- version order. A lease that runs out frees the aggregate, as it frees the row. A replay in
-- flight is not marked again (outbox_replay returns it as held): marking clears the lease, which
-- would free its aggregate while it is being published.
--
-- A claim decides on its snapshot: a claim running when the replay of v1 commits could still see
-- v2 unleased, if another claim leased v2 and had not committed yet. A transaction-level
-- advisory lock per aggregate (outbox_replay_lock_key) closes that window without anyone
-- waiting on a claim's row locks:
--   * a claim takes it, without waiting, for each replay it is about to lease, and leaves the
--     replay when someone holds it (at most one replay per aggregate is a candidate, so at most
--     a batch's worth of locks, held until the claim's autocommit);
--   * outbox_replay takes it, waiting (its lock timeout), for each aggregate it marked, in key
--     order (two replays never deadlock), after marking and before committing.
-- So a claim that leased v2 commits before the replay of v1 does, or does not lease it: any
-- claim that sees v1 marked sees v2's lease. Claims still never wait.

CREATE FUNCTION outbox_replay_lock_key(p_tenant text, p_type text, p_id text) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN hashtextextended('outbox replay ' || p_tenant || '/' || p_type || '/' || p_id, 0);

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

CREATE OR REPLACE FUNCTION outbox_replay(p_ids bigint[], OUT changed bigint[], OUT held bigint[])
LANGUAGE plpgsql AS $$
BEGIN
    WITH locked AS (
        -- A replay in flight (leased) is not marked again: held.
        SELECT id FROM outbox WHERE id = ANY (p_ids) AND status = 'published'
          AND NOT (replay AND locked_until > now())
        ORDER BY id FOR UPDATE SKIP LOCKED
    ), marked AS (
        UPDATE outbox o
        SET replay = true, attempts = 0, next_attempt_at = now(), last_error = NULL,
            failed_at = NULL, locked_until = NULL, locked_by = NULL
        FROM locked l WHERE o.id = l.id
        RETURNING o.id)
    SELECT coalesce(array_agg(id), '{}') INTO changed FROM marked;
    SELECT coalesce(array_agg(id), '{}') INTO held FROM outbox
    WHERE id = ANY (p_ids) AND status = 'published' AND NOT id = ANY (changed);
    -- Wait for any claim of these aggregates' replays to commit (see the top of the file).
    PERFORM pg_advisory_xact_lock(k) FROM (
        SELECT DISTINCT outbox_replay_lock_key(tenant_id, aggregate_type, aggregate_id) AS k
        FROM outbox WHERE id = ANY (changed)
        ORDER BY 1) keys;
END $$;

-- CREATE OR REPLACE keeps no SET clause: the replay's lock timeout (V7) and every function's
-- search_path (V7, V9) again.
ALTER FUNCTION outbox_replay(bigint[]) SET lock_timeout = '2s';
DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION outbox_claim(bigint, float8, text, text) SET search_path = %I, pg_catalog',
                   current_schema());
    EXECUTE format('ALTER FUNCTION outbox_replay(bigint[]) SET search_path = %I, pg_catalog',
                   current_schema());
    EXECUTE format('ALTER FUNCTION outbox_replay_lock_key(text, text, text) SET search_path = %I, pg_catalog',
                   current_schema());
END $$;
