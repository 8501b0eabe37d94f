-- The outbox as a toolkit: any producer's rows are publishable, any consumer's projections plug
-- into one inbox, existing tables can be captured by trigger, and the inbox stays bounded.

-- 1. Rows from any producer carry the metadata the envelope needs -------------------------------
-- Before: the column defaulted to '{}', which the table accepted and the dispatcher then
-- dead-lettered ("missing field correlation_id"). Now the append trigger fills what is missing
-- (correlation id = the event id, source = the session's `outbox.source` setting, else
-- 'database') and a CHECK refuses at insert what still cannot make an envelope.
-- Event ids written by SQL producers and capture triggers are time-ordered (UUID version 7, as
-- the Rust producers write them): the unique index on event_id then grows at its right edge
-- instead of taking inserts on random pages of a large index.
CREATE FUNCTION outbox_uuid_v7() RETURNS uuid LANGUAGE sql VOLATILE AS $$
    SELECT encode(
        set_bit(set_bit(
            overlay(uuid_send(gen_random_uuid())
                    placing substring(int8send(floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3)
                    FROM 1 FOR 6),
            52, 1), 53, 1),
        'hex')::uuid
$$;

ALTER TABLE outbox ALTER COLUMN event_id SET DEFAULT outbox_uuid_v7();

CREATE OR REPLACE FUNCTION outbox_append_order() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    assigned  bigint;
    previous  bigint;
    previous_status text;
BEGIN
    IF jsonb_typeof(NEW.metadata) = 'object' THEN
        NEW.metadata := jsonb_build_object(
            'correlation_id', NEW.event_id::text,
            'source', coalesce(nullif(current_setting('outbox.source', true), ''), 'database'))
            || NEW.metadata;
    END IF;
    INSERT INTO outbox_aggregates AS a (tenant_id, aggregate_type, aggregate_id, last_version)
    VALUES (NEW.tenant_id, NEW.aggregate_type, NEW.aggregate_id, coalesce(NEW.aggregate_version, 1))
    ON CONFLICT (tenant_id, aggregate_type, aggregate_id) DO UPDATE
        SET previous_version = a.last_version,
            last_version = coalesce(NEW.aggregate_version, a.last_version + 1)
    RETURNING last_version, previous_version INTO assigned, previous;
    IF NEW.aggregate_version IS NOT NULL AND NEW.aggregate_version <= previous THEN
        RAISE EXCEPTION 'aggregate %/%/% is at version % already: cannot append version %',
            NEW.tenant_id, NEW.aggregate_type, NEW.aggregate_id, previous, NEW.aggregate_version
            USING ERRCODE = 'unique_violation',
                  CONSTRAINT = 'outbox_tenant_id_aggregate_type_aggregate_id_aggregate_vers_key';
    END IF;
    NEW.aggregate_version := assigned;
    IF previous = 0 THEN
        NEW.is_head := true;
    ELSE
        SELECT status INTO previous_status FROM outbox
        WHERE tenant_id = NEW.tenant_id AND aggregate_type = NEW.aggregate_type
          AND aggregate_id = NEW.aggregate_id AND aggregate_version = previous
        FOR SHARE;
        NEW.is_head := previous_status IS NULL OR previous_status = 'published';
    END IF;
    RETURN NEW;
END $$;

-- What the envelope reads from the metadata, with the types it reads them as. NOT VALID: rows
-- already in the table are not checked (old dead rows stay as they are), every new row is.
ALTER TABLE outbox ADD CONSTRAINT outbox_metadata_makes_an_envelope CHECK (
    jsonb_typeof(metadata) = 'object'
    AND jsonb_typeof(metadata -> 'correlation_id') = 'string'
    AND jsonb_typeof(metadata -> 'source') = 'string'
    AND coalesce(jsonb_typeof(metadata -> 'causation_id'), 'null') IN ('string', 'null')
    AND coalesce(jsonb_typeof(metadata -> 'traceparent'), 'null') IN ('string', 'null')
    AND coalesce(jsonb_typeof(metadata -> 'tracestate'), 'null') IN ('string', 'null')
    AND coalesce(jsonb_typeof(metadata -> 'xray_trace_header'), 'null') IN ('string', 'null')
) NOT VALID;

-- 2. One inbox for every consumer and projection --------------------------------------------------
-- Per consumer and aggregate, the last version applied. With it the inbox knows, for any event:
-- applied already (its processed_events row, or a version at or below the position), next in
-- line (applied now), or ahead of a missing predecessor (a gap: redelivered later). Positions are
-- never deleted, so a redelivery older than the inbox retention is still recognised as applied.
-- Used through inbox_take and inbox_record below (shared/src/postgres/projections.rs).
CREATE TABLE inbox_positions (
    consumer        text        NOT NULL,
    tenant_id       text        NOT NULL,
    aggregate_type  text        NOT NULL,
    aggregate_id    text        NOT NULL,
    last_version    bigint      NOT NULL CHECK (last_version > 0),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, tenant_id, aggregate_type, aggregate_id)
);

-- Inbox retention deletes by age.
CREATE INDEX processed_events_processed_at_idx ON processed_events (processed_at);

-- The inbox's two statements per batch, as functions so the server keeps their plans per
-- session (the verdicts are computed by the caller, in delivery order, between the two):
-- inbox_take locks the positions of the batch's aggregates that exist, in key order (concurrent
-- sinks cannot deadlock on them; one primary-key probe per aggregate), and writes the inbox rows,
-- returning the ids that were new for this consumer.
CREATE FUNCTION inbox_take(
    p_consumer text, p_event_ids uuid[], p_tenants text[], p_event_types text[],
    p_aggregate_types text[], p_aggregate_ids text[],
    OUT new_ids uuid[], OUT tenants text[], OUT aggregate_types text[], OUT aggregate_ids text[],
    OUT versions bigint[]
) LANGUAGE plpgsql AS $$
BEGIN
    SELECT array_agg(p.tenant_id), array_agg(p.aggregate_type), array_agg(p.aggregate_id),
           array_agg(p.last_version)
    INTO tenants, aggregate_types, aggregate_ids, versions
    FROM (SELECT l.*
          FROM (SELECT DISTINCT * FROM unnest(p_tenants, p_aggregate_types, p_aggregate_ids)
                ORDER BY 1, 2, 3) AS k(t, at, ai)
          CROSS JOIN LATERAL (
              SELECT i.tenant_id, i.aggregate_type, i.aggregate_id, i.last_version
              FROM inbox_positions i
              WHERE i.consumer = p_consumer AND i.tenant_id = k.t AND i.aggregate_type = k.at
                AND i.aggregate_id = k.ai
              FOR UPDATE) l) p;
    WITH inserted AS (
        INSERT INTO processed_events (consumer, event_id, tenant_id, event_type)
        SELECT p_consumer, * FROM unnest(p_event_ids, p_tenants, p_event_types)
        ON CONFLICT DO NOTHING
        RETURNING event_id)
    SELECT array_agg(event_id) INTO new_ids FROM inserted;
END $$;

-- inbox_record advances the positions of the aggregates whose events are applied (never
-- backwards, in key order) and removes the inbox rows of gaps, so their redelivery is judged
-- afresh.
CREATE FUNCTION inbox_record(
    p_consumer text, p_tenants text[], p_aggregate_types text[], p_aggregate_ids text[],
    p_versions bigint[], p_gaps uuid[]
) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF cardinality(p_tenants) > 0 THEN
        INSERT INTO inbox_positions AS p (consumer, tenant_id, aggregate_type, aggregate_id,
                                          last_version)
        SELECT p_consumer, * FROM unnest(p_tenants, p_aggregate_types, p_aggregate_ids, p_versions)
        ORDER BY 2, 3, 4
        ON CONFLICT (consumer, tenant_id, aggregate_type, aggregate_id) DO UPDATE
        SET last_version = EXCLUDED.last_version, updated_at = now()
        WHERE p.last_version < EXCLUDED.last_version;
    END IF;
    IF cardinality(p_gaps) > 0 THEN
        DELETE FROM processed_events WHERE consumer = p_consumer AND event_id = ANY (p_gaps);
    END IF;
END $$;

-- 3. Trigger capture for tables whose code cannot change -------------------------------------------
-- Each insert, update or delete of a captured table appends `<table>.created|updated|deleted` to
-- the outbox in the writer's transaction: aggregate = the row's primary key (columns joined by
-- '/'), version assigned per row by the append trigger (under its aggregate lock, so two writers of
-- one row are ordered as they commit), tenant from the named column, payload {"before", "after"}
-- as JSON. The trigger's arguments: aggregate type, tenant column, primary key columns.
CREATE FUNCTION outbox_capture_row() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_row     jsonb;
    v_before  jsonb;
    v_after   jsonb;
    v_key     text;
    v_tenant  text;
    v_verb    text;
BEGIN
    IF TG_OP = 'INSERT' THEN
        v_after := to_jsonb(NEW); v_row := v_after; v_verb := 'created';
    ELSIF TG_OP = 'UPDATE' THEN
        v_before := to_jsonb(OLD); v_after := to_jsonb(NEW); v_row := v_after; v_verb := 'updated';
    ELSE
        v_before := to_jsonb(OLD); v_row := v_before; v_verb := 'deleted';
    END IF;
    v_tenant := v_row ->> TG_ARGV[1];
    IF v_tenant IS NULL OR v_tenant = '' THEN
        RAISE EXCEPTION 'outbox capture of %.%: the row has no tenant in column %',
            TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_ARGV[1] USING ERRCODE = 'not_null_violation';
    END IF;
    SELECT string_agg(v_row ->> k, '/' ORDER BY n) INTO v_key
    FROM unnest(TG_ARGV[2:]) WITH ORDINALITY AS a(k, n);
    INSERT INTO outbox (tenant_id, aggregate_type, aggregate_id, event_type, schema_version,
                        payload, metadata)
    VALUES (v_tenant, TG_ARGV[0], v_key, TG_TABLE_NAME || '.' || v_verb, 1,
            jsonb_build_object('before', v_before, 'after', v_after),
            jsonb_build_object('source', 'capture:' || TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME));
    RETURN NULL;
END $$;

-- Installs (or re-installs) the capture trigger on a table; refuses a table without a primary key
-- or without the tenant column, naming what is missing.
CREATE FUNCTION outbox_capture_enable(p_table regclass, p_aggregate_type text, p_tenant_column text)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    v_keys text[];
BEGIN
    IF p_aggregate_type IS NULL OR p_aggregate_type = '' THEN
        RAISE EXCEPTION 'capture of %: the aggregate type must not be empty', p_table
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
    WHERE i.indrelid = p_table AND i.indisprimary;
    IF v_keys IS NULL THEN
        RAISE EXCEPTION 'capture of %: the table has no primary key to name its rows by', p_table
            USING ERRCODE = 'invalid_table_definition';
    END IF;
    EXECUTE format('DROP TRIGGER IF EXISTS outbox_capture ON %s', p_table);
    EXECUTE format('CREATE TRIGGER outbox_capture AFTER INSERT OR UPDATE OR DELETE ON %s '
                   'FOR EACH ROW EXECUTE FUNCTION outbox_capture_row(%s)',
                   p_table,
                   (SELECT string_agg(quote_literal(x), ', ')
                    FROM unnest(ARRAY[p_aggregate_type, p_tenant_column] || v_keys) AS x));
    RETURN format('capturing %s as %s (tenant column %s, key %s)', p_table, p_aggregate_type,
                  p_tenant_column, array_to_string(v_keys, ', '));
END $$;

CREATE FUNCTION outbox_capture_disable(p_table regclass) RETURNS text
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = p_table AND tgname = 'outbox_capture') THEN
        RETURN format('%s was not captured', p_table);
    END IF;
    EXECUTE format('DROP TRIGGER outbox_capture ON %s', p_table);
    RETURN format('stopped capturing %s', p_table);
END $$;
