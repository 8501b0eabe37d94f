-- The append reads by index after an ANALYZE of a small outbox, and writes its aggregate's row
-- once per transaction instead of once per event.
--
-- The fault: the append trigger (outbox_append_order) and the commit-time trigger
-- (outbox_settle_head) look rows up by key. PL/pgSQL plans those lookups once per session and
-- keeps the plan; after an ANALYZE of a nearly empty outbox (a new deployment, a table emptied
-- by retention) the planner takes a sequential scan as the cheaper plan, and keeps it while the
-- table grows. A bulk append then reads the whole outbox per row: 30,000 events over 5,000
-- aggregates took over 60 s (cancelled) instead of 2 s after `ANALYZE` of a 3-row outbox, and
-- a long-lived producer session kept its slow plan until the next ANALYZE. With sequential
-- scans off alone, an outbox analyzed while it held only dead rows (reltuples 0 over 2,311
-- pages: an ANALYZE during a large append that then rolled back) got bitmap scans of the
-- idempotency index instead, which read every row of the tenant: a 100,000-event append ran
-- for over 12 minutes. Both functions now run with sequential and bitmap scans off: their
-- every statement is a key lookup, which the index of its key serves in a few page reads
-- (after an ANALYZE of a small outbox, tests/it/statements.rs,
-- appends_look_rows_up_by_index_after_an_analyze_of_a_small_outbox). Not closed: an outbox
-- analyzed while it held only dead rows (statistics of 0 rows) still gets plain scans of the
-- idempotency index (it leads with tenant_id, as the version key does, and is smaller), which
-- read all of a tenant's rows per append; the next ANALYZE ends it (docs/operations.md).
--
-- The cost: the aggregate's lock is an `INSERT ... ON CONFLICT DO UPDATE` that wrote a new
-- version of the aggregate's row on every append: 20 versions of one row in a bulk append of 20
-- events per aggregate, each conflict check walking that chain. Then two reads of the version
-- index (the latest version, then the predecessor's status). Now the row is written once per
-- transaction and aggregate, and locked only after that (the lock mode is the upsert's:
-- retention's SKIP LOCKED still skips an aggregate being appended to); the latest row is read
-- once, and it is the predecessor. Measured, 100,000 events over 5,000 aggregates in one
-- INSERT ... SELECT: the trigger's own time 50 -> 28-33 µs per event (pg_stat_user_functions),
-- PostgreSQL's CPU for the statement 0.77x over three runs (docs/benchmarks.md).
--
-- Unchanged: versions, heads, errors and their codes, and the isolation behaviour: a producer
-- in REPEATABLE READ behind another producer's committed append to the same aggregate gets a
-- serialization failure, which it retries (with a lock alone it was a duplicate-version error,
-- which reads as "already appended": tests/it/order.rs,
-- a_snapshot_producer_behind_another_append_gets_a_serialization_failure_and_its_retry_goes_on).
-- The transaction that last wrote the aggregate's row at append (NULL for rows no append has
-- written since V13; retention's update of last_version leaves it as it is).
ALTER TABLE outbox_aggregates ADD COLUMN writer xid8;

CREATE OR REPLACE FUNCTION outbox_append_order() RETURNS trigger
LANGUAGE plpgsql SET enable_seqscan = off SET enable_bitmapscan = off AS $$
DECLARE
    last bigint;
    previous_status text;
    top_version bigint;
    top_status text;
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
    -- Locks the aggregate until this transaction ends: the first append of a transaction to
    -- an aggregate writes a new version of its row (V7's no-op upsert, now recording the
    -- writer), later ones of the same transaction only lock the row they wrote (the update's
    -- WHERE is false, the row is locked all the same). Each producer writing the row is what
    -- makes a producer whose snapshot is older (REPEATABLE READ, SERIALIZABLE) fail with a
    -- serialization failure instead of taking a version it cannot see is taken. The writer is
    -- compared as a 64-bit transaction id: the row's 32-bit xmin comes round again after 2^32
    -- transactions, and a transaction that matched an old row's xmin would skip its write.
    -- A row written inside a savepoint counts as the transaction's (the writer is the
    -- top-level id); if the savepoint rolls back, its write goes with it and the next append
    -- writes the row again.
    INSERT INTO outbox_aggregates AS a (tenant_id, aggregate_type, aggregate_id, last_version, writer)
    VALUES (NEW.tenant_id, NEW.aggregate_type, NEW.aggregate_id, 0, pg_current_xact_id())
    ON CONFLICT (tenant_id, aggregate_type, aggregate_id)
        DO UPDATE SET last_version = a.last_version, writer = excluded.writer
        WHERE a.writer IS DISTINCT FROM excluded.writer
    RETURNING a.last_version INTO last;
    IF NOT FOUND THEN
        SELECT a.last_version INTO last FROM outbox_aggregates a
        WHERE a.tenant_id = NEW.tenant_id AND a.aggregate_type = NEW.aggregate_type
          AND a.aggregate_id = NEW.aggregate_id;
    END IF;
    -- ORDER BY ... LIMIT 1, not max(): the plan PL/pgSQL caches for max() read every version of
    -- the aggregate (measured: 20,000 versions, 200 appends/s instead of 1,800).
    -- The aggregate's latest row gives the last version and, being the predecessor whenever it
    -- is still there, the new row's head decision: one read of the version index, not two.
    SELECT o.aggregate_version, o.status INTO top_version, top_status FROM outbox o
        WHERE o.tenant_id = NEW.tenant_id AND o.aggregate_type = NEW.aggregate_type
          AND o.aggregate_id = NEW.aggregate_id
        ORDER BY o.aggregate_version DESC LIMIT 1;
    last := greatest(last, coalesce(top_version, 0));
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
        IF top_version = NEW.aggregate_version - 1 THEN
            previous_status := top_status;
        END IF;
        NEW.is_head := previous_status IS NULL OR previous_status IN ('published', 'discarded');
    END IF;
    RETURN NEW;
END $$;

ALTER FUNCTION outbox_settle_head() SET enable_seqscan = off;
ALTER FUNCTION outbox_settle_head() SET enable_bitmapscan = off;

DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION outbox_append_order() SET search_path = %I, pg_catalog',
                   current_schema());
END $$;
