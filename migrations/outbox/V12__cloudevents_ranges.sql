-- What cannot be sent as a CloudEvent is refused at append, with a clear error, instead of going
-- dead at the dispatcher (shared/src/envelope.rs keeps the same rules for rows stored before):
--   * aggregate_version is a CloudEvents Integer (signed 32-bit): at most 2147483647;
--   * the metadata's source is a non-empty string (CloudEvents requires a non-empty
--     URI-reference; the envelope percent-encodes what a URI cannot hold).
-- A trigger on INSERT only, not a CHECK constraint: a constraint, even NOT VALID, is checked on
-- every later UPDATE of a row too, so a row stored before this migration would make the claim's
-- lease update, the record's successor promotion and a replay fail for their whole batch. Rows
-- stored before are left as they are and go dead, with the reason, when claimed.
-- ENABLE ALWAYS: it fires for sessions that skip ordinary triggers (session_replication_role =
-- replica, as a restore or a replication apply sets) as well. It runs after outbox_append_order
-- (triggers fire in name order), so it sees the version that trigger assigned.
CREATE FUNCTION outbox_is_a_cloudevent() RETURNS trigger
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
    RETURN NEW;
END $$;

CREATE TRIGGER outbox_is_a_cloudevent BEFORE INSERT ON outbox
    FOR EACH ROW EXECUTE FUNCTION outbox_is_a_cloudevent();
ALTER TABLE outbox ENABLE ALWAYS TRIGGER outbox_is_a_cloudevent;

DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION outbox_is_a_cloudevent() SET search_path = %I, pg_catalog',
                   current_schema());
END $$;
