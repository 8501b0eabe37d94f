-- An aggregate's second and later appends in one transaction read one row instead of three;
-- the first append of a transaction to an aggregate reads two, or three when another producer
-- appended while it waited (or the aggregate has a row but no events).
--
-- Before: every append (outbox_append_order, V13) took the aggregate's row with an upsert (its
-- conflict check, lock and, for the transaction's first append to the aggregate, a new version of
-- the row), read the row's last_version again when the upsert wrote nothing (every later append),
-- then read the aggregate's latest event. A bulk INSERT ... SELECT of 100,000 events over 5,000
-- aggregates (20 each) paid all three for 95% of its events.
--
-- Now, in a transaction that has appended before (a hint kept in the setting outbox.appending_xact,
-- only a hint: a wrong one costs a look-up, not a version), the latest event is read first, with
-- whether this transaction appended it: its txid is this
-- transaction's and so is its xmin (both: txid is a plain column an INSERT or a restore can give,
-- and a 32-bit xmin comes round again after 2^32 transactions; an event appended inside a
-- savepoint has the savepoint's xmin, so it does not count: the next append takes the aggregate's
-- row (finding it written by this transaction) and reads its last_version, as V17 did, which is
-- correct and slower for clients that wrap every statement in a savepoint). Not closed: an event
-- whose txid names this transaction (given by an INSERT, restored or replicated from a cluster
-- whose transaction ids ran ahead of this one's) that this transaction then UPDATEs (its xmin
-- becomes this transaction's), and rows this transaction inserted with the outbox's triggers off
-- (session_replication_role = replica), pass for this transaction's appends. Both need this
-- transaction to write that very row outside the append; the second turns off versions too.
-- * When this transaction appended it, the transaction holds the aggregate already (the append
--   that wrote that event took the lock in the same (sub)transaction, and a rollback that takes
--   the lock away takes the event with it), and the version is that event's plus one. The
--   aggregate's row is not read: its last_version only remembers versions retention deleted,
--   retention alone raises it and skips an aggregate whose row is locked, and this
--   transaction's event got a version above it.
-- * Otherwise the upsert takes the aggregate as before, and now also keeps the row's previous
--   writer (previous_writer, new). The event read before the lock is still the latest if that
--   writer had committed when it was read (the read's snapshot sees it): every producer that
--   appends writes the row first, so none appended after it. Only if not (another producer
--   appended and committed between the read and the lock, or the aggregate has a row but no
--   events) is the latest event read again. The writer is the trigger's own record, never a
--   column an INSERT gives: txid is one (a plain INSERT, a data-only restore or a logical
--   replica from another cluster can bring any value, a transaction id of this one's included),
--   and a stale read taken for current gives a version already taken, a unique violation that
--   reads as "already appended". The statuses read may
--   be older than the commit, as before; the commit-time head check (outbox_settle_head, V7) is
--   there for that. A snapshot producer (REPEATABLE READ, SERIALIZABLE) behind another's append
--   still fails at the upsert with a serialization failure.
-- A transaction's first append takes V13's path unchanged (the upsert, then the latest event),
-- and sets the hint: reading first there would cost a single-row append the snapshot and the
-- checks for nothing (a form that read first for every append measured 1.02-1.17x of V17's CPU
-- per single-row append, docs/benchmarks.md).
-- * When the upsert finds the row written by this transaction but its latest event is not this
--   transaction's (a trigger of the service's own skipped that event), the row's last_version is
--   read, as before.
--
-- On a live outbox: adding the column takes outbox_aggregates' ACCESS EXCLUSIVE lock, which waits
-- for the transactions that appended (they hold rows of it) and makes appends and retention wait
-- behind it; it waits at most 5 s (lock_timeout): behind a longer transaction the migration fails,
-- having changed nothing, and is run again. Once it holds the lock it is a catalog change only (a
-- column without a default).

SET LOCAL lock_timeout = '5s';
ALTER TABLE outbox_aggregates ADD COLUMN previous_writer xid8;
COMMENT ON COLUMN outbox_aggregates.previous_writer IS
    'The writer before the last (set by the append that wrote the row last; V18).';

CREATE OR REPLACE FUNCTION outbox_append_order() RETURNS trigger
LANGUAGE plpgsql SET enable_seqscan = off SET enable_bitmapscan = off AS $$
DECLARE
    last bigint;
    previous_status text;
    top_version bigint;
    top_status text;
    writer_before xid8;
    me xid8 := pg_current_xact_id();
    ours boolean;
    seen pg_snapshot;
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
    IF current_setting('outbox.appending_xact', true) IS DISTINCT FROM me::text THEN
        -- This transaction's first append (see above): V13's path.
        PERFORM set_config('outbox.appending_xact', me::text, true);
        INSERT INTO outbox_aggregates AS a (tenant_id, aggregate_type, aggregate_id, last_version, writer)
        VALUES (NEW.tenant_id, NEW.aggregate_type, NEW.aggregate_id, 0, me)
        ON CONFLICT (tenant_id, aggregate_type, aggregate_id)
            DO UPDATE SET last_version = a.last_version, writer = excluded.writer,
                          previous_writer = a.writer
            WHERE a.writer IS DISTINCT FROM excluded.writer
        RETURNING a.last_version INTO last;
        IF NOT FOUND THEN
            SELECT a.last_version INTO last FROM outbox_aggregates a
            WHERE a.tenant_id = NEW.tenant_id AND a.aggregate_type = NEW.aggregate_type
              AND a.aggregate_id = NEW.aggregate_id;
        END IF;
        SELECT o.aggregate_version, o.status INTO top_version, top_status FROM outbox o
            WHERE o.tenant_id = NEW.tenant_id AND o.aggregate_type = NEW.aggregate_type
              AND o.aggregate_id = NEW.aggregate_id
            ORDER BY o.aggregate_version DESC LIMIT 1;
        last := greatest(last, coalesce(top_version, 0));
    ELSE
        -- The aggregate's latest event gives the last version and, being the predecessor whenever
        -- it is still there, the new row's head decision. ORDER BY ... LIMIT 1, not max(): the plan
        -- PL/pgSQL caches for max() read every version of the aggregate (measured: 20,000 versions,
        -- 200 appends/s instead of 1,800).
        SELECT o.aggregate_version, o.status, o.txid = me AND o.xmin = me::xid,
               CASE WHEN o.txid = me AND o.xmin = me::xid THEN NULL ELSE pg_current_snapshot() END
            INTO top_version, top_status, ours, seen
            FROM outbox o
            WHERE o.tenant_id = NEW.tenant_id AND o.aggregate_type = NEW.aggregate_type
              AND o.aggregate_id = NEW.aggregate_id
            ORDER BY o.aggregate_version DESC LIMIT 1;
        IF ours THEN
            -- This transaction appended the latest event: it holds the aggregate (see above).
            last := top_version;
        ELSE
            -- Locks the aggregate until this transaction ends: the first append of a transaction
            -- to an aggregate writes a new version of its row (V7's no-op upsert, recording the
            -- writer and the one before). Each producer writing the row is what makes a producer
            -- whose snapshot is older (REPEATABLE READ, SERIALIZABLE) fail with a serialization
            -- failure instead of taking a version it cannot see is taken. The writer is compared as
            -- a 64-bit transaction id: the row's 32-bit xmin comes round again after 2^32
            -- transactions. A row written inside a savepoint counts as the transaction's (the
            -- writer is the top-level id); if the savepoint rolls back, its write goes with it and
            -- the next append writes the row again.
            INSERT INTO outbox_aggregates AS a (tenant_id, aggregate_type, aggregate_id, last_version, writer)
            VALUES (NEW.tenant_id, NEW.aggregate_type, NEW.aggregate_id, 0, me)
            ON CONFLICT (tenant_id, aggregate_type, aggregate_id)
                DO UPDATE SET last_version = a.last_version, writer = excluded.writer,
                              previous_writer = a.writer
                WHERE a.writer IS DISTINCT FROM excluded.writer
            RETURNING a.last_version, a.previous_writer INTO last, writer_before;
            IF NOT FOUND THEN
                -- This transaction wrote the row before, but its latest event is not there.
                SELECT a.last_version INTO last FROM outbox_aggregates a
                WHERE a.tenant_id = NEW.tenant_id AND a.aggregate_type = NEW.aggregate_type
                  AND a.aggregate_id = NEW.aggregate_id;
            ELSIF writer_before IS NOT NULL
                  AND NOT coalesce(pg_visible_in_snapshot(writer_before, seen), false) THEN
                -- Someone may have appended between the read and the lock: read again.
                SELECT o.aggregate_version, o.status INTO top_version, top_status FROM outbox o
                    WHERE o.tenant_id = NEW.tenant_id AND o.aggregate_type = NEW.aggregate_type
                      AND o.aggregate_id = NEW.aggregate_id
                    ORDER BY o.aggregate_version DESC LIMIT 1;
            END IF;
            last := greatest(last, coalesce(top_version, 0));
        END IF;
    END IF;
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
