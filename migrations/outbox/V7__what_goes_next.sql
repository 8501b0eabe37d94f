-- What may go next for an aggregate, in one place. (Over 400 lines on purpose: the rule and every
-- function that keeps it live in this one file, so none of them can drift from the others.)
-- Every path that creates, publishes, fails,
-- kills, requeues, replays, discards or deletes an outbox row keeps it right in its own
-- transaction, and none of them waits on a producer.
--
-- The rule: an aggregate's versions are 1..n with no gap; an event is *done* once published or
-- discarded (never undone: a replay re-delivers a published event without reopening it); the
-- aggregate's *head* is its first event that is not done, and only a pending head is claimable.
-- `outbox.is_head` is that rule kept in the row for the claim's partial index. It is written by
-- exactly three functions below:
--   * outbox_append_order (BEFORE INSERT): the new row is head when its predecessor is done;
--   * outbox_settle_head (deferred to the producer's COMMIT): looks again when it was not, so a
--     predecessor published while the producer's transaction was open is seen;
--   * outbox_mark_done (record published, discard): the row stops being head, its successor
--     becomes head.
-- Redrive (dead -> pending), retries, dead-lettering and retention never change a head: a dead
-- event is its aggregate's head (only heads are claimed), and retention deletes done rows only.
--
-- Why no one waits on a producer: a producer holds its aggregate's outbox_aggregates row for its
-- whole transaction (that orders versions as commits), which dispatchers and operators never
-- touch; the only lock a producer takes on another row is the FOR SHARE of its predecessor in
-- outbox_settle_head, during its COMMIT. outbox_mark_done locks the rows it changes and their
-- successors with SKIP LOCKED and hands back, as *held*, what it could not lock: the caller
-- records those outcomes on a later call.

-- 1. Columns and states ----------------------------------------------------------------------
ALTER TABLE outbox DROP CONSTRAINT outbox_status_check;
ALTER TABLE outbox ADD CONSTRAINT outbox_status_check
    CHECK (status IN ('pending', 'published', 'dead', 'discarded'));

-- A replay: a published event to be delivered again, outside its aggregate's order (it is done
-- already; the aggregate's live events go on). Replays of one aggregate go out in version order
-- among themselves.
ALTER TABLE outbox ADD COLUMN replay boolean NOT NULL DEFAULT false;
-- A discarded event: dead, then given up by an operator; kept for audit, never published.
ALTER TABLE outbox ADD COLUMN discarded_at timestamptz;
ALTER TABLE outbox ADD COLUMN discard_reason text;

CREATE INDEX outbox_replay_claim_idx ON outbox (next_attempt_at, id) WHERE replay;

-- Versions come from the outbox itself (an append that inserts nothing takes none).
ALTER TABLE outbox_aggregates DROP CONSTRAINT outbox_aggregates_last_version_check;
ALTER TABLE outbox_aggregates ADD CONSTRAINT outbox_aggregates_last_version_check
    CHECK (last_version >= 0);
ALTER TABLE outbox_aggregates DROP COLUMN previous_version;
UPDATE outbox_aggregates a SET last_version = m.v
FROM (SELECT tenant_id, aggregate_type, aggregate_id, max(aggregate_version) AS v
      FROM outbox GROUP BY 1, 2, 3) m
WHERE a.tenant_id = m.tenant_id AND a.aggregate_type = m.aggregate_type
  AND a.aggregate_id = m.aggregate_id AND a.last_version < m.v;

-- Replays requeued by the code before this migration (pending again, with a feed position):
-- published rows with a replay to deliver.
UPDATE outbox SET status = 'published', replay = true, published_at = coalesce(published_at, now())
WHERE status = 'pending' AND feed_position IS NOT NULL;

-- Heads recomputed by the rule (the code before could strand or double them).
UPDATE outbox o SET is_head = h.head
FROM (SELECT id,
             status IN ('pending', 'dead')
             AND coalesce(bool_and(status IN ('published', 'discarded'))
                     OVER (PARTITION BY tenant_id, aggregate_type, aggregate_id
                           ORDER BY aggregate_version
                           ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), true) AS head
      FROM outbox) h
WHERE o.id = h.id AND o.is_head IS DISTINCT FROM h.head;

DROP FUNCTION outbox_reset_heads(bigint[]);

-- 2. Appending ---------------------------------------------------------------------------------
-- Every append (Rust, plain SQL with or without a version, ON CONFLICT, INSERT ... SELECT, COPY,
-- capture triggers): lock the aggregate, take the next version, decide the head.
--   * The version is one past the highest the aggregate ever had: the highest row of the outbox
--     (rows earlier in the same statement are visible here), or outbox_aggregates.last_version,
--     which retention sets before it deletes an aggregate's latest row. Nothing is taken before
--     the row is really inserted, so an append skipped by ON CONFLICT takes no version.
--   * An explicit aggregate_version must be exactly the next one: at or below the last is a
--     duplicate (unique violation), above it would leave a gap consumers wait on forever.
CREATE OR REPLACE FUNCTION outbox_append_order() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    last bigint;
    previous_status text;
BEGIN
    IF NEW.status <> 'pending' OR NEW.replay THEN
        RAISE EXCEPTION 'an event is appended pending (got status %, replay %)', NEW.status, NEW.replay
            USING ERRCODE = 'check_violation';
    END IF;
    IF jsonb_typeof(NEW.metadata) = 'object' THEN
        NEW.metadata := jsonb_build_object(
            'correlation_id', NEW.event_id::text,
            'source', coalesce(nullif(current_setting('outbox.source', true), ''), 'database'))
            || NEW.metadata;
    END IF;
    -- Locks the aggregate until this transaction ends (the no-op update takes the row lock).
    INSERT INTO outbox_aggregates AS a (tenant_id, aggregate_type, aggregate_id, last_version)
    VALUES (NEW.tenant_id, NEW.aggregate_type, NEW.aggregate_id, 0)
    ON CONFLICT (tenant_id, aggregate_type, aggregate_id) DO UPDATE SET last_version = a.last_version
    RETURNING a.last_version INTO last;
    -- ORDER BY ... LIMIT 1, not max(): the plan PL/pgSQL caches for max() read every version of
    -- the aggregate (measured: 20,000 versions, 200 appends/s instead of 1,800).
    SELECT greatest(last, coalesce((
        SELECT o.aggregate_version FROM outbox o
        WHERE o.tenant_id = NEW.tenant_id AND o.aggregate_type = NEW.aggregate_type
          AND o.aggregate_id = NEW.aggregate_id
        ORDER BY o.aggregate_version DESC LIMIT 1), 0)) INTO last;
    IF NEW.aggregate_version IS NULL THEN
        NEW.aggregate_version := last + 1;
    ELSIF NEW.aggregate_version <= last THEN
        RAISE EXCEPTION 'aggregate %/%/% is at version % already: cannot append version %',
            NEW.tenant_id, NEW.aggregate_type, NEW.aggregate_id, last, NEW.aggregate_version
            USING ERRCODE = 'unique_violation',
                  CONSTRAINT = 'outbox_tenant_id_aggregate_type_aggregate_id_aggregate_vers_key';
    ELSIF NEW.aggregate_version > last + 1 THEN
        RAISE EXCEPTION 'aggregate %/%/% is at version %: the next event must be version %, not %',
            NEW.tenant_id, NEW.aggregate_type, NEW.aggregate_id, last, last + 1,
            NEW.aggregate_version
            USING ERRCODE = 'check_violation', CONSTRAINT = 'outbox_versions_gap_free',
                  HINT = 'Leave aggregate_version out to have the next version assigned.';
    END IF;
    IF NEW.aggregate_version = 1 THEN
        NEW.is_head := true;
    ELSE
        -- Done is final, so a done predecessor makes this row head for good. Gone means done:
        -- retention deletes published rows only.
        SELECT o.status INTO previous_status FROM outbox o
        WHERE o.tenant_id = NEW.tenant_id AND o.aggregate_type = NEW.aggregate_type
          AND o.aggregate_id = NEW.aggregate_id AND o.aggregate_version = NEW.aggregate_version - 1;
        NEW.is_head := previous_status IS NULL OR previous_status IN ('published', 'discarded');
    END IF;
    RETURN NEW;
END $$;

-- At the producer's COMMIT, for a row that was not head when appended: its predecessor may have
-- been published (or discarded) since. The predecessor is read FOR SHARE, so a dispatcher
-- recording it right now finishes first (one short statement) and this sees the result; a
-- dispatcher that comes after this lock skips the row and records it on its next call, when
-- this row is committed and it promotes it itself. A predecessor of the same transaction cannot
-- be done before this commits: its own record promotes this row.
CREATE FUNCTION outbox_settle_head() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    previous record;
    previous_status text;
BEGIN
    SELECT o.id, o.status, o.txid INTO previous FROM outbox o
    WHERE o.tenant_id = NEW.tenant_id AND o.aggregate_type = NEW.aggregate_type
      AND o.aggregate_id = NEW.aggregate_id AND o.aggregate_version = NEW.aggregate_version - 1;
    IF FOUND AND previous.status NOT IN ('published', 'discarded') THEN
        IF previous.txid = pg_current_xact_id() THEN
            RETURN NULL;
        END IF;
        SELECT o.status INTO previous_status FROM outbox o WHERE o.id = previous.id FOR SHARE;
        IF FOUND AND previous_status NOT IN ('published', 'discarded') THEN
            RETURN NULL;
        END IF;
    END IF;
    UPDATE outbox SET is_head = true WHERE id = NEW.id AND NOT is_head;
    RETURN NULL;
END $$;

CREATE CONSTRAINT TRIGGER outbox_settle_head AFTER INSERT ON outbox
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW WHEN (NOT NEW.is_head) EXECUTE FUNCTION outbox_settle_head();

-- An event's identity and place in its aggregate never change (an ON CONFLICT DO UPDATE that
-- rewrote them would break the chain), and an event not done is never deleted (discard it).
CREATE FUNCTION outbox_refuse_rewrite() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'event % is %: only published events are deleted (discard a dead one first)',
            OLD.event_id, OLD.status USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RAISE EXCEPTION 'event %: event id, tenant, aggregate and version of an outbox event cannot change',
        OLD.event_id USING ERRCODE = 'integrity_constraint_violation';
END $$;

CREATE TRIGGER outbox_identity_is_fixed
    BEFORE UPDATE OF event_id, tenant_id, aggregate_type, aggregate_id, aggregate_version ON outbox
    FOR EACH ROW
    WHEN (OLD.event_id IS DISTINCT FROM NEW.event_id OR OLD.tenant_id IS DISTINCT FROM NEW.tenant_id
          OR OLD.aggregate_type IS DISTINCT FROM NEW.aggregate_type
          OR OLD.aggregate_id IS DISTINCT FROM NEW.aggregate_id
          OR OLD.aggregate_version IS DISTINCT FROM NEW.aggregate_version)
    EXECUTE FUNCTION outbox_refuse_rewrite();

CREATE TRIGGER outbox_only_done_rows_go BEFORE DELETE ON outbox
    FOR EACH ROW WHEN (OLD.status NOT IN ('published', 'discarded'))
    EXECUTE FUNCTION outbox_refuse_rewrite();

-- 3. Done: published or discarded ------------------------------------------------------------
-- Marks live events done (p_status 'published' or 'discarded') and makes each one's successor
-- head. The rows must be locked by the caller. Their successors are locked here with SKIP LOCKED:
-- a row whose successor someone holds right now (a producer committing the next version, an
-- operator) comes back in `held`, unchanged, for a later call. Published rows get their feed
-- position (tenants locked in one order, migration V6).
CREATE FUNCTION outbox_mark_done(p_ids bigint[], p_status text, p_reason text,
                                 OUT done bigint[], OUT held bigint[], OUT promoted bigint[])
LANGUAGE plpgsql AS $$
DECLARE
    candidates bigint[];
    successors bigint[];
    lockable bigint[];
BEGIN
    -- Each row with its successor (NULL when it has none yet), as two arrays in one order.
    SELECT coalesce(array_agg(p.id ORDER BY p.id), '{}'), coalesce(array_agg(s.id ORDER BY p.id), '{}')
    INTO candidates, successors
    FROM outbox p
    LEFT JOIN LATERAL (
        SELECT n.id FROM outbox n
        WHERE n.tenant_id = p.tenant_id AND n.aggregate_type = p.aggregate_type
          AND n.aggregate_id = p.aggregate_id AND n.aggregate_version > p.aggregate_version
        ORDER BY n.aggregate_version LIMIT 1) s ON true
    WHERE p.id = ANY (p_ids);
    SELECT coalesce(array_agg(id), '{}') INTO lockable FROM (
        SELECT id FROM outbox WHERE id = ANY (successors) ORDER BY id FOR UPDATE SKIP LOCKED) l;
    SELECT coalesce(array_agg(r) FILTER (WHERE s IS NULL OR s = ANY (lockable)), '{}'),
           coalesce(array_agg(r) FILTER (WHERE s IS NOT NULL AND NOT s = ANY (lockable)), '{}'),
           coalesce(array_agg(s) FILTER (WHERE s = ANY (lockable)), '{}')
    INTO done, held, promoted
    FROM unnest(candidates, successors) AS pair(r, s);
    IF cardinality(done) = 0 THEN
        RETURN;
    END IF;
    IF p_status = 'published' THEN
        INSERT INTO outbox_feed_tenants AS t (tenant_id)
        SELECT DISTINCT tenant_id FROM outbox WHERE id = ANY (done) ORDER BY 1
        ON CONFLICT (tenant_id) DO UPDATE SET last_published_at = now();
        UPDATE outbox o
        SET status = 'published', published_at = now(), is_head = false, locked_until = NULL,
            locked_by = NULL, last_error = NULL,
            feed_position = coalesce(o.feed_position, f.position)
        FROM (SELECT id, nextval('outbox_feed_position_seq') AS position
              FROM (SELECT unnest(done) AS id ORDER BY 1) ids) f
        WHERE o.id = f.id;
    ELSE
        UPDATE outbox
        SET status = 'discarded', is_head = false, discarded_at = now(), discard_reason = p_reason,
            locked_until = NULL, locked_by = NULL
        WHERE id = ANY (done);
    END IF;
    UPDATE outbox SET is_head = true WHERE id = ANY (promoted) AND NOT is_head;
END $$;

-- 4. The dispatcher's record, one statement -------------------------------------------------
-- Records one claim's outcomes. Fenced by the lease: only rows still leased to p_owner change (a
-- late outcome, after the lease passed to another dispatcher, changes nothing). Rows someone
-- else holds right now come back as `deferred`, never waited for; the drain records them later.
-- Published live events are done (outbox_mark_done); published replays are delivered; retries
-- wait their delay; dead live events park their aggregate; a replay out of attempts ends with
-- its error (the event stays published).
CREATE FUNCTION outbox_record(
    p_owner text, p_published bigint[], p_retry bigint[], p_delays float8[], p_retry_errors text[],
    p_dead bigint[], p_dead_errors text[], OUT deferred bigint[]
) LANGUAGE plpgsql AS $$
DECLARE
    ours bigint[];
    locked bigint[];
    live_published bigint[];
    result record;
BEGIN
    SELECT coalesce(array_agg(id), '{}') INTO ours FROM outbox
    WHERE id = ANY (p_published || p_retry || p_dead) AND locked_by = p_owner
      AND (status = 'pending' OR replay);
    SELECT coalesce(array_agg(id), '{}') INTO locked FROM (
        SELECT id FROM outbox
        WHERE id = ANY (ours) AND locked_by = p_owner AND (status = 'pending' OR replay)
        ORDER BY id FOR UPDATE SKIP LOCKED) l;
    deferred := ARRAY(SELECT unnest(ours) EXCEPT SELECT unnest(locked));

    SELECT coalesce(array_agg(id), '{}') INTO live_published FROM outbox
    WHERE id = ANY (locked) AND id = ANY (p_published) AND status = 'pending';
    SELECT * INTO result FROM outbox_mark_done(live_published, 'published', NULL);
    deferred := deferred || result.held;

    UPDATE outbox SET replay = false, locked_until = NULL, locked_by = NULL, last_error = NULL
    WHERE id = ANY (locked) AND id = ANY (p_published) AND replay;

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

-- 5. The operator's operations ---------------------------------------------------------------
-- Each takes the rows of a selection (ids), skips what someone holds right now (reported as
-- held: run it again), and keeps the rule above.

-- Redrive: dead events back in line. A dead event is its aggregate's head already.
CREATE FUNCTION outbox_redrive(p_ids bigint[], OUT changed bigint[], OUT held bigint[])
LANGUAGE plpgsql AS $$
BEGIN
    WITH locked AS (
        SELECT id FROM outbox WHERE id = ANY (p_ids) AND status = 'dead'
        ORDER BY id FOR UPDATE SKIP LOCKED
    ), moved AS (
        UPDATE outbox o
        SET status = 'pending', attempts = 0, next_attempt_at = now(), last_error = NULL,
            failed_at = NULL, locked_until = NULL, locked_by = NULL
        FROM locked l WHERE o.id = l.id
        RETURNING o.id)
    SELECT coalesce(array_agg(id), '{}') INTO changed FROM moved;
    SELECT coalesce(array_agg(id), '{}') INTO held FROM outbox
    WHERE id = ANY (p_ids) AND status = 'dead' AND NOT id = ANY (changed);
END $$;

-- Replay: published events delivered again, as they were (same event id and version), outside
-- their aggregate's order: the aggregate's live events neither wait for them nor are overtaken
-- in the chain. Consumers recognise them as applied (event id, aggregate version).
CREATE FUNCTION outbox_replay(p_ids bigint[], OUT changed bigint[], OUT held bigint[])
LANGUAGE plpgsql AS $$
BEGIN
    WITH locked AS (
        SELECT id FROM outbox WHERE id = ANY (p_ids) AND status = 'published'
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
END $$;

-- Discard: dead events given up, kept with the reason; each aggregate's next event goes.
CREATE FUNCTION outbox_discard(p_ids bigint[], p_reason text,
                               OUT discarded bigint[], OUT held bigint[], OUT unparked bigint[])
LANGUAGE plpgsql AS $$
DECLARE
    locked bigint[];
    result record;
BEGIN
    IF p_reason IS NULL OR btrim(p_reason) = '' THEN
        RAISE EXCEPTION 'a discard needs a reason' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT coalesce(array_agg(id), '{}') INTO locked FROM (
        SELECT id FROM outbox WHERE id = ANY (p_ids) AND status = 'dead'
        ORDER BY id FOR UPDATE SKIP LOCKED) l;
    SELECT * INTO result FROM outbox_mark_done(locked, 'discarded', p_reason);
    discarded := result.done;
    unparked := result.promoted;
    SELECT coalesce(array_agg(id), '{}') INTO held FROM outbox
    WHERE id = ANY (p_ids) AND status = 'dead' AND NOT id = ANY (discarded);
END $$;

-- Retention: published rows whose replay is delivered; never pending, dead or discarded ones.
-- Before an aggregate's latest row goes, its version is kept in outbox_aggregates.last_version
-- (the next append continues from it), under the aggregate's lock taken SKIP LOCKED: the latest
-- row of an aggregate a producer is appending to right now stays for the next run.
CREATE OR REPLACE FUNCTION outbox_delete_published(retention interval, max_rows integer)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    cutoff     timestamptz := now() - retention;
    bound      bigint := outbox_first_id_at(cutoff);
    candidates bigint[];
    kept_back  bigint[];
    deleted    integer;
BEGIN
    candidates := ARRAY(
        SELECT id FROM outbox
        WHERE id < bound
          AND status = 'published' AND NOT replay AND published_at < cutoff
        ORDER BY id
        LIMIT max_rows
        FOR UPDATE SKIP LOCKED);
    WITH latest AS (
        SELECT c.id, c.tenant_id, c.aggregate_type, c.aggregate_id, c.aggregate_version
        FROM outbox c
        WHERE c.id = ANY (candidates)
          AND NOT EXISTS (SELECT 1 FROM outbox n
                          WHERE n.tenant_id = c.tenant_id AND n.aggregate_type = c.aggregate_type
                            AND n.aggregate_id = c.aggregate_id
                            AND n.aggregate_version > c.aggregate_version)
    ), locked AS (
        SELECT a.tenant_id, a.aggregate_type, a.aggregate_id, l.aggregate_version
        FROM outbox_aggregates a
        JOIN latest l ON l.tenant_id = a.tenant_id AND l.aggregate_type = a.aggregate_type
                     AND l.aggregate_id = a.aggregate_id
        ORDER BY 1, 2, 3
        FOR UPDATE OF a SKIP LOCKED
    ), kept AS (
        UPDATE outbox_aggregates a SET last_version = k.aggregate_version
        FROM locked k
        WHERE a.tenant_id = k.tenant_id AND a.aggregate_type = k.aggregate_type
          AND a.aggregate_id = k.aggregate_id AND a.last_version < k.aggregate_version
    )
    SELECT coalesce(array_agg(l.id), '{}') INTO kept_back
    FROM latest l
    WHERE NOT EXISTS (SELECT 1 FROM locked k
                      WHERE k.tenant_id = l.tenant_id AND k.aggregate_type = l.aggregate_type
                        AND k.aggregate_id = l.aggregate_id);
    DELETE FROM outbox WHERE id = ANY (candidates) AND NOT id = ANY (kept_back);
    GET DIAGNOSTICS deleted = ROW_COUNT;
    RETURN deleted;
END $$;

-- 6. Capture that does not depend on the writer's session -----------------------------------
-- The aggregate id is the primary key's key columns (never its INCLUDE columns), one value as
-- it is, several joined by '/' with '%' and '/' inside a value escaped (%25, %2F): two rows never
-- share an aggregate. A change of the key or the tenant is a delete of the old aggregate and a
-- create of the new one.
CREATE OR REPLACE FUNCTION outbox_capture_row() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_old     jsonb;
    v_new     jsonb;
    v_source  text := 'capture:' || TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME;
    -- TG_ARGV: aggregate type, tenant column, key columns.
    v_type    text := TG_ARGV[0];
    v_tenant  text := TG_ARGV[1];
    v_keys    text[] := TG_ARGV[2:];
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN v_old := to_jsonb(OLD); END IF;
    IF TG_OP IN ('UPDATE', 'INSERT') THEN v_new := to_jsonb(NEW); END IF;
    IF TG_OP = 'UPDATE'
       AND (outbox_capture_key(v_old, v_keys) IS DISTINCT FROM outbox_capture_key(v_new, v_keys)
            OR (v_old ->> v_tenant) IS DISTINCT FROM (v_new ->> v_tenant)) THEN
        PERFORM outbox_capture_append(v_old, v_type, v_tenant, v_keys, 'deleted', v_old, NULL, v_source, TG_TABLE_NAME);
        PERFORM outbox_capture_append(v_new, v_type, v_tenant, v_keys, 'created', NULL, v_new, v_source, TG_TABLE_NAME);
    ELSIF TG_OP = 'INSERT' THEN
        PERFORM outbox_capture_append(v_new, v_type, v_tenant, v_keys, 'created', NULL, v_new, v_source, TG_TABLE_NAME);
    ELSIF TG_OP = 'UPDATE' THEN
        PERFORM outbox_capture_append(v_new, v_type, v_tenant, v_keys, 'updated', v_old, v_new, v_source, TG_TABLE_NAME);
    ELSE
        PERFORM outbox_capture_append(v_old, v_type, v_tenant, v_keys, 'deleted', v_old, NULL, v_source, TG_TABLE_NAME);
    END IF;
    RETURN NULL;
END $$;

CREATE FUNCTION outbox_capture_key(p_row jsonb, p_columns text[]) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN cardinality(p_columns) = 1 THEN min(p_row ->> k)
                ELSE string_agg(replace(replace(p_row ->> k, '%', '%25'), '/', '%2F'), '/' ORDER BY n)
           END
    FROM unnest(p_columns) WITH ORDINALITY AS a(k, n)
$$;

CREATE FUNCTION outbox_capture_append(p_row jsonb, p_type text, p_tenant_column text,
                                      p_keys text[], p_verb text, p_before jsonb,
                                      p_after jsonb, p_source text, p_table text)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_tenant text := p_row ->> p_tenant_column;
BEGIN
    IF v_tenant IS NULL OR v_tenant = '' THEN
        RAISE EXCEPTION 'outbox capture of %: the row has no tenant in column %', p_source, p_tenant_column
            USING ERRCODE = 'not_null_violation';
    END IF;
    INSERT INTO outbox (tenant_id, aggregate_type, aggregate_id, event_type, schema_version,
                        payload, metadata)
    VALUES (v_tenant, p_type, outbox_capture_key(p_row, p_keys), p_table || '.' || p_verb, 1,
            jsonb_build_object('before', p_before, 'after', p_after),
            jsonb_build_object('source', p_source));
END $$;

CREATE OR REPLACE FUNCTION outbox_capture_enable(p_table regclass, p_aggregate_type text, p_tenant_column text)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    v_keys text[];
BEGIN
    IF p_aggregate_type IS NULL OR p_aggregate_type = '' THEN
        RAISE EXCEPTION 'capture of %: the aggregate type must not be empty', p_table
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- The outbox's own tables: capturing them would append from every append (no end).
    IF p_table IN ('outbox'::regclass, 'outbox_aggregates'::regclass, 'outbox_feed_tenants'::regclass,
                   'outbox_feed_acks'::regclass, 'outbox_dispatcher_heartbeats'::regclass,
                   'outbox_dispatch_state'::regclass, 'processed_events'::regclass,
                   'inbox_positions'::regclass) THEN
        RAISE EXCEPTION 'capture of %: the outbox''s own tables cannot be captured', p_table
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = p_table AND attname = p_tenant_column
                   AND attnum > 0 AND NOT attisdropped) THEN
        RAISE EXCEPTION 'capture of %: the table has no column %', p_table, p_tenant_column
            USING ERRCODE = 'undefined_column';
    END IF;
    SELECT array_agg(a.attname::text ORDER BY k.n) INTO v_keys
    FROM pg_index i
    CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, n)
    JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
    WHERE i.indrelid = p_table AND i.indisprimary AND k.n <= i.indnkeyatts;
    IF v_keys IS NULL THEN
        RAISE EXCEPTION 'capture of %: the table has no primary key to name its rows by', p_table
            USING ERRCODE = 'invalid_table_definition';
    END IF;
    EXECUTE format('DROP TRIGGER IF EXISTS outbox_capture ON %s', p_table);
    EXECUTE format('CREATE TRIGGER outbox_capture AFTER INSERT OR UPDATE OR DELETE ON %s '
                   'FOR EACH ROW EXECUTE FUNCTION %I.outbox_capture_row(%s)',
                   p_table, current_schema(),
                   (SELECT string_agg(quote_literal(x), ', ')
                    FROM unnest(ARRAY[p_aggregate_type, p_tenant_column] || v_keys) AS x));
    RETURN format('capturing %s as %s (tenant column %s, key %s)', p_table, p_aggregate_type,
                  p_tenant_column, array_to_string(v_keys, ', '));
END $$;

-- 7. Every function of the toolkit resolves names in the schema it was installed in, whatever the
-- caller's search_path (a capture fired by a writer whose search_path is `crm` would otherwise
-- look for `crm.outbox`). Dispatcher and operator functions give up on a lock after 2 s (a
-- conflict the caller retries) rather than wait without bound.
DO $$
DECLARE
    f regprocedure;
BEGIN
    FOR f IN SELECT p.oid::regprocedure FROM pg_proc p
             WHERE p.pronamespace = current_schema()::regnamespace
               AND (p.proname LIKE 'outbox\_%' OR p.proname LIKE 'inbox\_%')
    LOOP
        -- The toolkit's schema first: current_schema() inside is that schema (capture_enable
        -- names its trigger function by it).
        EXECUTE format('ALTER FUNCTION %s SET search_path = %I, pg_catalog', f, current_schema());
    END LOOP;
END $$;

ALTER FUNCTION outbox_record(text, bigint[], bigint[], float8[], text[], bigint[], text[])
    SET lock_timeout = '2s';
ALTER FUNCTION outbox_redrive(bigint[]) SET lock_timeout = '2s';
ALTER FUNCTION outbox_replay(bigint[]) SET lock_timeout = '2s';
ALTER FUNCTION outbox_discard(bigint[], text) SET lock_timeout = '2s';
ALTER FUNCTION outbox_delete_published(interval, integer) SET lock_timeout = '2s';
