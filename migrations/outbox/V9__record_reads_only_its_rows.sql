-- The record reads only the rows it records, whatever the backlog.
--
-- outbox_record (migration V7) found the claim's live rows to publish with
--     SELECT ... FROM outbox WHERE id = ANY (locked) AND id = ANY (p_published) AND status = 'pending'
-- which the planner, estimating one row for two arrays, served from the pending index
-- (outbox_claim_idx): a scan of every pending row's entry, filtered against both arrays, on every
-- record. With 100,000 rows pending that one statement took 10.7 ms of a 47 ms record of 500
-- (measured with auto_explain), and it grew with the backlog; the replays' statement had the same
-- shape over the replay index. The rows locked for the record now
-- say themselves whether they are live: their status is read in the same statement that locks
-- them (after the lock, so it is their current status), and no other statement of the record
-- reads the outbox beyond the ids it was given.
--
-- Also: outbox_claim (V8) was created after V7 pinned every toolkit function's search_path, so it
-- resolved `outbox` by the caller's search_path. Every function is pinned again here.

CREATE OR REPLACE FUNCTION outbox_record(
    p_owner text, p_published bigint[], p_retry bigint[], p_delays float8[], p_retry_errors text[],
    p_dead bigint[], p_dead_errors text[], OUT deferred bigint[]
) LANGUAGE plpgsql SET lock_timeout = '2s' SET jit = off AS $$
DECLARE
    ours bigint[];
    locked bigint[];
    live_locked bigint[];
    live_published bigint[];
    replays_locked bigint[];
    replays_published bigint[];
    result record;
BEGIN
    SELECT coalesce(array_agg(id), '{}') INTO ours FROM outbox
    WHERE id = ANY (p_published || p_retry || p_dead) AND locked_by = p_owner
      AND (status = 'pending' OR replay);
    -- Locked in id order, SKIP LOCKED, each row's status read as it is once locked; the live
    -- ones published are matched against p_published as sets (hashed, never a join the planner
    -- could turn into a loop over both arrays).
    SELECT coalesce(array_agg(id), '{}'), coalesce(array_agg(id) FILTER (WHERE live), '{}'),
           coalesce(array_agg(id) FILTER (WHERE NOT live), '{}')
    INTO locked, live_locked, replays_locked
    FROM (SELECT id, status = 'pending' AS live FROM outbox
          WHERE id = ANY (ours) AND locked_by = p_owner AND (status = 'pending' OR replay)
          ORDER BY id FOR UPDATE SKIP LOCKED) l;
    live_published := ARRAY(SELECT unnest(live_locked) INTERSECT SELECT unnest(p_published)
                            ORDER BY 1);
    replays_published := ARRAY(SELECT unnest(replays_locked) INTERSECT SELECT unnest(p_published));
    deferred := ARRAY(SELECT unnest(ours) EXCEPT SELECT unnest(locked));

    SELECT * INTO result FROM outbox_mark_done(live_published, 'published', NULL);
    deferred := deferred || result.held;

    -- A locked row that is not live is a replay (status published, replay set).
    UPDATE outbox SET replay = false, locked_until = NULL, locked_by = NULL, last_error = NULL
    WHERE id = ANY (replays_published);

    UPDATE outbox o
    SET next_attempt_at = now() + make_interval(secs => r.delay_secs),
        last_error = r.error, failed_at = now(), locked_until = NULL, locked_by = NULL
    FROM unnest(p_retry, p_delays, p_retry_errors) AS r(id, delay_secs, error)
    WHERE o.id = r.id AND o.id = ANY (locked);

    UPDATE outbox o
    SET status = CASE WHEN o.replay THEN o.status ELSE 'dead' END,
        replay = false,
        last_error = CASE WHEN o.replay THEN 'replay abandoned: ' || r.error ELSE r.error END,
        failed_at = now(), locked_until = NULL, locked_by = NULL
    FROM unnest(p_dead, p_dead_errors) AS r(id, error)
    WHERE o.id = r.id AND o.id = ANY (locked);
END $$;

-- Every toolkit function resolves names in the schema it was installed in (as V7 does).
DO $$
DECLARE
    f regprocedure;
BEGIN
    FOR f IN SELECT p.oid::regprocedure FROM pg_proc p
             WHERE p.pronamespace = current_schema()::regnamespace
               AND (p.proname LIKE 'outbox\_%' OR p.proname LIKE 'inbox\_%')
    LOOP
        EXECUTE format('ALTER FUNCTION %s SET search_path = %I, pg_catalog', f, current_schema());
    END LOOP;
END $$;
