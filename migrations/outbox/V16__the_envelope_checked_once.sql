-- The envelope's metadata shape is checked by the append's CloudEvents trigger, not by a CHECK
-- constraint (V5's outbox_metadata_makes_an_envelope), for two reasons measured on V15:
--
-- 1. The cost of a statement. PostgreSQL builds a table's CHECK expressions for every statement
-- that inserts or updates a row (from their stored form: parsed, simplified and compiled, each
-- time), and this one is seven jsonb look-ups. A one-row INSERT through the public append paid
-- for it on every event: 20,000 single-row appends in transactions of 100 (psql, the backend's
-- CPU from /proc, two databases side by side, three rounds) took 208 -> 179 µs per event of
-- first events and 259 -> 203 µs per event of second events with the check in the trigger, where
-- PL/pgSQL evaluates it as one cached expression. Every claim's lease update, record, replay and
-- redrive paid the same per statement, and evaluated the check for each row it updated although
-- none of them changes the metadata.
--
-- 2. A fault. A constraint, even NOT VALID, is checked on every UPDATE of a row, whatever the
-- update changes (V12 made its own checks a trigger for this reason). A row whose metadata the
-- envelope cannot carry, stored before V5 added the constraint, made the lease update of every
-- claim that took it fail: the claim failed as a whole, again at each poll, and nothing behind it
-- went out (tests/it/migrations.rs,
-- a_row_stored_before_the_metadata_check_goes_dead_instead_of_failing_every_claim). Such a row now
-- is claimed and goes dead with the envelope's reason, as V12's rules do for rows stored before.
--
-- What stays the same: every new row is checked, by the same expression, after the append
-- trigger filled the defaults (this trigger fires after it, in name order), including in sessions
-- with session_replication_role = replica (ENABLE ALWAYS: a restore or a replication apply is
-- checked too); the error is a check_violation that names the constraint
-- outbox_metadata_makes_an_envelope, as before, with a message that says which event and a hint
-- that says what the envelope needs (the message is not PostgreSQL's "violates check constraint"
-- any more, and the detail is the metadata, not the whole row). A metadata that the expression
-- finds NULL, not false, passes, as it passed the constraint.
-- What differs: a trigger can be disabled (ALTER TABLE ... DISABLE TRIGGER, a data-only restore
-- with --disable-triggers), a constraint cannot; a BEFORE INSERT trigger of your own whose name
-- sorts after outbox_is_a_cloudevent runs after the check. An UPDATE that changes a row's
-- metadata is checked by the same function (the trigger outbox_metadata_makes_an_envelope below),
-- so such an update is now refused for an empty source or a version beyond CloudEvents' range
-- too; no toolkit statement updates the metadata.
--
-- On a live outbox: the migration takes the outbox's ACCESS EXCLUSIVE lock first (dropping the
-- constraint needs it; creating the trigger needs less, and taking the strongest lock first leaves
-- no upgrade to deadlock on). It waits for the transactions that have used the outbox to end, and
-- every statement on the outbox after it (appends, claims, feed reads) waits behind it; so it
-- waits at most 5 s (lock_timeout): behind a longer transaction the migration fails, having
-- changed nothing, and is run again. Once it holds the lock it is a catalog change only.

SET LOCAL lock_timeout = '5s';
LOCK TABLE outbox IN ACCESS EXCLUSIVE MODE;

CREATE OR REPLACE FUNCTION outbox_is_a_cloudevent() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.aggregate_version > 2147483647 THEN
        RAISE EXCEPTION 'aggregate %/%/% version % is beyond CloudEvents'' Integer range (at most 2147483647)',
            NEW.tenant_id, NEW.aggregate_type, NEW.aggregate_id, NEW.aggregate_version
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.metadata ->> 'source' = '' THEN
        RAISE EXCEPTION 'event of %/%/%: metadata source is empty (CloudEvents requires a non-empty URI-reference)',
            NEW.tenant_id, NEW.aggregate_type, NEW.aggregate_id
            USING ERRCODE = 'check_violation',
                  HINT = 'Set metadata.source to the producing service, e.g. "payments".';
    END IF;
    -- V5's constraint, word for word: NOT (NULL) is not true, so what passed it passes here.
    IF NOT (jsonb_typeof(NEW.metadata) = 'object'
            AND jsonb_typeof(NEW.metadata -> 'correlation_id') = 'string'
            AND jsonb_typeof(NEW.metadata -> 'source') = 'string'
            AND coalesce(jsonb_typeof(NEW.metadata -> 'causation_id'), 'null') IN ('string', 'null')
            AND coalesce(jsonb_typeof(NEW.metadata -> 'traceparent'), 'null') IN ('string', 'null')
            AND coalesce(jsonb_typeof(NEW.metadata -> 'tracestate'), 'null') IN ('string', 'null')
            AND coalesce(jsonb_typeof(NEW.metadata -> 'xray_trace_header'), 'null') IN ('string', 'null')) THEN
        RAISE EXCEPTION 'event of %/%/%: its metadata cannot make an envelope',
            NEW.tenant_id, NEW.aggregate_type, NEW.aggregate_id
            USING ERRCODE = 'check_violation', CONSTRAINT = 'outbox_metadata_makes_an_envelope',
                  DETAIL = 'Metadata: ' || left(NEW.metadata::text, 500),
                  HINT = 'Metadata is a JSON object whose correlation_id and source are strings, and whose causation_id, traceparent, tracestate and xray_trace_header are strings when present.';
    END IF;
    RETURN NEW;
END $$;

DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION outbox_is_a_cloudevent() SET search_path = %I, pg_catalog',
                   current_schema());
END $$;

-- An update that changes the metadata is checked as an append is; no other update runs it. The
-- constraint's name, so an error names the same rule whichever path it came from.
CREATE TRIGGER outbox_metadata_makes_an_envelope BEFORE UPDATE OF metadata ON outbox
    FOR EACH ROW WHEN (OLD.metadata IS DISTINCT FROM NEW.metadata)
    EXECUTE FUNCTION outbox_is_a_cloudevent();
ALTER TABLE outbox ENABLE ALWAYS TRIGGER outbox_metadata_makes_an_envelope;

-- IF EXISTS: an operator may have dropped it by hand to get past the fault above.
ALTER TABLE outbox DROP CONSTRAINT IF EXISTS outbox_metadata_makes_an_envelope;
