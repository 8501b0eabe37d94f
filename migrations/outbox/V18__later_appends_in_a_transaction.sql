-- An aggregate's second and later appends in one transaction read the aggregate twice, not three
-- times; the first append of a transaction to an aggregate is as V13 wrote it.
--
-- Before: every append (outbox_append_order, V13) did three look-ups after the first of a
-- transaction: the upsert of the aggregate's row (its conflict check finds the row this
-- transaction wrote, and writes nothing), the read of that row's last_version (the upsert
-- returned nothing), and the read of the aggregate's latest event. A bulk INSERT ... SELECT of
-- 100,000 events over 5,000 aggregates (20 per aggregate in one statement) paid all three for
-- 95% of its events.
--
-- Now, when the upsert finds the row already written by this transaction (the transaction holds
-- the aggregate), the latest event is read first, with the transaction that appended it. When
-- that is this transaction, the version is that event's plus one and the aggregate's row is not
-- read: its last_version only matters for versions retention deleted, retention alone raises it,
-- and it skips an aggregate whose row is locked; this transaction's event got a version above it
-- when it was appended. Otherwise (this transaction wrote the row but its event is not there: a
-- trigger of the service's own skipped it) the row is read as before.
--
-- Measured side by side (psql, the backend's CPU from /proc; docs/benchmarks.md): 40,000 events
-- over 2,000 aggregates in one statement, 53-59 against 63-82 µs per event; single-row appends,
-- each the first of its transaction to its aggregate, unchanged within the noise. Reading the
-- latest event before the upsert for every append, to skip the upsert too, cost first appends
-- 2-14% (a fourth look-up: after the lock the latest event must be read again) and was dropped.
--
-- txid is now set by this trigger, whatever the INSERT gave: the read above and the commit-time
-- head check (outbox_settle_head, V7) trust it to name the appending transaction. A txid given
-- by a plain INSERT was never meaningful (the column is the default's).

CREATE OR REPLACE FUNCTION outbox_append_order() RETURNS trigger
LANGUAGE plpgsql SET enable_seqscan = off SET enable_bitmapscan = off AS $$
DECLARE
    last bigint;
    previous_status text;
    top_version bigint;
    top_status text;
    top_txid xid8;
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
    NEW.txid := pg_current_xact_id();
    INSERT INTO outbox_aggregates AS a (tenant_id, aggregate_type, aggregate_id, last_version, writer)
    VALUES (NEW.tenant_id, NEW.aggregate_type, NEW.aggregate_id, 0, pg_current_xact_id())
    ON CONFLICT (tenant_id, aggregate_type, aggregate_id)
        DO UPDATE SET last_version = a.last_version, writer = excluded.writer
        WHERE a.writer IS DISTINCT FROM excluded.writer
    RETURNING a.last_version INTO last;
    IF NOT FOUND THEN
        -- This transaction holds the aggregate already. If it appended the latest event too, that
        -- event's version is the last one (see above).
        SELECT o.aggregate_version, o.status, o.txid INTO top_version, top_status, top_txid FROM outbox o
            WHERE o.tenant_id = NEW.tenant_id AND o.aggregate_type = NEW.aggregate_type
              AND o.aggregate_id = NEW.aggregate_id
            ORDER BY o.aggregate_version DESC LIMIT 1;
        IF top_txid = NEW.txid THEN
            last := top_version;
        ELSE
            SELECT a.last_version INTO last FROM outbox_aggregates a
            WHERE a.tenant_id = NEW.tenant_id AND a.aggregate_type = NEW.aggregate_type
              AND a.aggregate_id = NEW.aggregate_id;
        END IF;
    ELSE
        -- ORDER BY ... LIMIT 1, not max(): the plan PL/pgSQL caches for max() read every version
        -- of the aggregate (measured: 20,000 versions, 200 appends/s instead of 1,800). The
        -- aggregate's latest row gives the last version and, being the predecessor whenever it is
        -- still there, the new row's head decision: one read of the version index, not two.
        SELECT o.aggregate_version, o.status INTO top_version, top_status FROM outbox o
            WHERE o.tenant_id = NEW.tenant_id AND o.aggregate_type = NEW.aggregate_type
              AND o.aggregate_id = NEW.aggregate_id
            ORDER BY o.aggregate_version DESC LIMIT 1;
    END IF;
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

-- CREATE OR REPLACE keeps no SET clause: the function resolves names in the schema it was
-- installed in again (as V13 pinned it); the scan settings are in its definition.
DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION outbox_append_order() SET search_path = %I, pg_catalog',
                   current_schema());
END $$;
