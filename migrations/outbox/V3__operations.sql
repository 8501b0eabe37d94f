-- Operating the outbox: finding dead rows fast, retention of published rows in bounded batches,
-- and the state behind the command handler's wake-up call to the dispatcher.

-- When the row last failed to publish (a retry was scheduled or it went dead): orders the
-- "last errors" an operator looks at first.
ALTER TABLE outbox ADD COLUMN failed_at timestamptz;

-- Dead rows are few and looked up often (metrics on every dispatcher invocation, status,
-- redrive): a partial index keeps those lookups independent of the table's size.
CREATE INDEX outbox_dead_idx ON outbox (id) WHERE status = 'dead';

-- Draining dispatchers, one row each: a dispatcher that polls until its deadline renews its row
-- (a few seconds ahead) and deletes it when it stops; the row of one that died expires. While
-- any row holds, commands need not wake a dispatcher.
CREATE TABLE outbox_dispatcher_heartbeats (
    owner         text        PRIMARY KEY,
    active_until  timestamptz NOT NULL
);

-- One row: when a command last woke a dispatcher. Lets thousands of commands a second wake it at
-- most once per debounce window.
CREATE TABLE outbox_dispatch_state (
    id         smallint    PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    kicked_at  timestamptz
);
INSERT INTO outbox_dispatch_state (id) VALUES (1);

-- Called by a command after it committed an event. kick = true for exactly one caller per
-- debounce window while no dispatcher is draining: that caller invokes the dispatcher.
-- wait_ms: how long the answer stays "no need" (the heartbeat or the debounce window).
CREATE FUNCTION outbox_request_kick(debounce interval, OUT kick boolean, OUT wait_ms double precision)
LANGUAGE plpgsql AS $$
DECLARE
    active  timestamptz;
    kicked  timestamptz;
BEGIN
    SELECT max(active_until) INTO active
    FROM outbox_dispatcher_heartbeats WHERE active_until > now();
    IF active IS NOT NULL THEN
        kick := false;
        wait_ms := extract(epoch FROM active - now()) * 1000;
        RETURN;
    END IF;
    -- The WHERE is re-checked after a concurrent update commits, so only one caller wins.
    UPDATE outbox_dispatch_state SET kicked_at = now()
    WHERE id = 1 AND (kicked_at IS NULL OR kicked_at <= now() - debounce);
    IF FOUND THEN
        kick := true;
        wait_ms := extract(epoch FROM debounce) * 1000;
    ELSE
        SELECT kicked_at INTO kicked FROM outbox_dispatch_state WHERE id = 1;
        kick := false;
        -- The winner's transaction may have started after this one: never more than a window.
        wait_ms := least(greatest(extract(epoch FROM kicked + debounce - now()) * 1000, 0),
                         extract(epoch FROM debounce) * 1000);
    END IF;
END $$;

-- The first outbox id whose row was created at or after `at` (one past the last id when none
-- was), by binary search over the primary key: about 25 index probes whatever the table's size.
-- Ids are taken in insertion order, so created_at grows with id up to the length of a
-- transaction; callers use the id as a bound and still test the row's own timestamps.
CREATE FUNCTION outbox_first_id_at(at timestamptz)
RETURNS bigint LANGUAGE plpgsql STABLE AS $$
DECLARE
    lo       bigint;
    hi       bigint;
    mid      bigint;
    probe_id bigint;
    probe_at timestamptz;
BEGIN
    SELECT min(id), max(id) + 1 INTO lo, hi FROM outbox;
    IF lo IS NULL THEN
        RETURN 1;
    END IF;
    WHILE lo < hi LOOP
        mid := lo + (hi - lo) / 2;
        SELECT id, created_at INTO probe_id, probe_at
        FROM outbox WHERE id >= mid ORDER BY id LIMIT 1;
        IF probe_id IS NULL OR probe_at >= at THEN
            hi := mid;
        ELSE
            lo := probe_id + 1;
        END IF;
    END LOOP;
    RETURN lo;
END $$;

-- Deletes up to max_rows published rows whose publication is older than retention, oldest
-- first, in one short transaction; returns how many. Run it again until it returns less than
-- max_rows. Only rows below the first id created after the cutoff are visited, so a run never
-- scans the rows still retained, and SKIP LOCKED means it never waits for, nor blocks, a
-- dispatcher. Dead and pending rows are never deleted.
CREATE FUNCTION outbox_delete_published(retention interval, max_rows integer)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    cutoff  timestamptz := now() - retention;
    bound   bigint := outbox_first_id_at(cutoff);
    deleted integer;
BEGIN
    DELETE FROM outbox
    WHERE id = ANY (ARRAY(
        SELECT id FROM outbox
        WHERE id < bound
          AND status = 'published' AND published_at < cutoff
        ORDER BY id
        LIMIT max_rows
        FOR UPDATE SKIP LOCKED));
    GET DIAGNOSTICS deleted = ROW_COUNT;
    RETURN deleted;
END $$;
