-- Delayed events: an event appended with `deliver_at` is not claimed before then.
--
-- Producers set it on append (the Rust API's `OutboxEvent::deliver_at`, or the column itself in
-- plain SQL); the claim needs nothing new: an event becomes due at `next_attempt_at`, which an
-- append with a later `deliver_at` starts at instead of now. Only an aggregate's head is ever
-- claimed, so the aggregate's later events wait behind a delayed one, in order: holding them back
-- is the rule, as for an event backing off. An event appended without `deliver_at` (or with one
-- already past) behaves as before. The column keeps what the producer asked for (set on insert
-- only: changing it afterwards is refused, since it would not move the event); retries move
-- `next_attempt_at` only. The clock is the database's. `outboxctl status` counts the pending
-- events still before their time, and the backlog's oldest-pending age counts an aggregate's
-- events behind a delayed one from its time (outbox_delayed_idx finds those aggregates).
ALTER TABLE outbox ADD COLUMN deliver_at timestamptz;

CREATE FUNCTION outbox_deliver_at() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.next_attempt_at := greatest(NEW.next_attempt_at, NEW.deliver_at);
    RETURN NEW;
END $$;

-- Only for the appends that ask for it (the other appends pay nothing).
CREATE TRIGGER outbox_deliver_at BEFORE INSERT ON outbox
    FOR EACH ROW WHEN (NEW.deliver_at IS NOT NULL) EXECUTE FUNCTION outbox_deliver_at();

CREATE FUNCTION outbox_deliver_at_is_fixed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'event %: deliver_at is set when the event is appended and cannot change (it would not move the event)',
        OLD.event_id USING ERRCODE = 'integrity_constraint_violation';
END $$;

CREATE TRIGGER outbox_deliver_at_is_fixed BEFORE UPDATE OF deliver_at ON outbox
    FOR EACH ROW WHEN (OLD.deliver_at IS DISTINCT FROM NEW.deliver_at)
    EXECUTE FUNCTION outbox_deliver_at_is_fixed();

-- The aggregates with delayed events still pending: few rows, read by the backlog.
CREATE INDEX IF NOT EXISTS outbox_delayed_idx
    ON outbox (tenant_id, aggregate_type, aggregate_id, aggregate_version) INCLUDE (deliver_at)
    WHERE status = 'pending' AND deliver_at IS NOT NULL;

-- The toolkit's functions resolve names in its schema (as V7 and V9 do).
DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION outbox_deliver_at() SET search_path = %I, pg_catalog',
                   current_schema());
    EXECUTE format('ALTER FUNCTION outbox_deliver_at_is_fixed() SET search_path = %I, pg_catalog',
                   current_schema());
END $$;
