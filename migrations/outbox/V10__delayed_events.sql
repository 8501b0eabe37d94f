-- Delayed events: an event appended with `deliver_at` is not claimed before then.
--
-- Producers set it on append (the Rust API's `OutboxEvent::deliver_at`, or the column itself in
-- plain SQL); the claim needs nothing new: an event becomes due at `next_attempt_at`, which an
-- append with a later `deliver_at` starts at instead of now. Only an aggregate's head is ever
-- claimed, so the aggregate's later events wait behind a delayed one, in order: holding them back
-- is the rule, as for an event backing off. An event appended without `deliver_at` (or with one
-- already past) behaves as before. The column keeps what the producer asked for; retries move
-- `next_attempt_at` only. `outboxctl status` counts the pending events still before their time.
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

-- The toolkit's functions resolve names in its schema (as V7 and V9 do).
DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION outbox_deliver_at() SET search_path = %I, pg_catalog',
                   current_schema());
END $$;
