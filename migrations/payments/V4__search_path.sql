-- The payment projection's function resolves names in the schema it was installed in, whatever
-- the caller's search_path, as every function of the toolkit does since migrations/outbox V7.
DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION project_payment_events(text[], text[], text[], bigint[], bigint[], '
                   'text[], timestamptz[]) SET search_path = %I, pg_catalog', current_schema());
END $$;
