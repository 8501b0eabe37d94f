-- The transactional outbox: one row per event, appended in the producer's own transaction and
-- published by the dispatcher. Every row names its tenant.

CREATE TABLE outbox (
    id                 bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id           uuid        NOT NULL UNIQUE,
    tenant_id          text        NOT NULL,
    aggregate_type     text        NOT NULL,
    aggregate_id       text        NOT NULL,
    aggregate_version  bigint      NOT NULL CHECK (aggregate_version > 0),
    event_type         text        NOT NULL,
    schema_version     integer     NOT NULL CHECK (schema_version > 0),
    payload            jsonb       NOT NULL,
    -- correlation_id, causation_id, traceparent, tracestate, xray_trace_header, source
    metadata           jsonb       NOT NULL DEFAULT '{}'::jsonb,
    idempotency_key    text,
    status             text        NOT NULL DEFAULT 'pending'
                       CHECK (status IN ('pending', 'published', 'dead')),
    attempts           integer     NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_at    timestamptz NOT NULL DEFAULT now(),
    -- The claim is a lease, not a held lock: a row leased by a dispatcher that died becomes
    -- claimable again once locked_until passes.
    locked_until       timestamptz,
    locked_by          text,
    last_error         text,
    -- Id of the inserting transaction. Sequence values are taken in id order but committed in any
    -- order; the dispatcher only claims rows whose transaction is older than every transaction
    -- still running, so a late-committing smaller id is never skipped.
    txid               xid8        NOT NULL DEFAULT pg_current_xact_id(),
    created_at         timestamptz NOT NULL DEFAULT now(),
    published_at       timestamptz,
    UNIQUE (tenant_id, idempotency_key),
    UNIQUE (tenant_id, aggregate_type, aggregate_id, aggregate_version)
);

-- Serves the claim: only unpublished rows are indexed, so its cost stays flat however many
-- published rows are retained. The claim orders by (next_attempt_at, id), the index order.
CREATE INDEX outbox_claim_idx ON outbox (next_attempt_at, id) WHERE status = 'pending';


-- The outbox is a queue: rows are inserted, updated once or twice and removed. Vacuum it early
-- and without throttling so dead index entries do not pile up at the head of the claim index.
-- Free space on every page lets the lease update (no indexed column changes) be a HOT update
-- that adds no index entries.
ALTER TABLE outbox SET (
    fillfactor = 70,
    autovacuum_vacuum_scale_factor = 0.0,
    autovacuum_vacuum_threshold = 5000,
    autovacuum_vacuum_insert_scale_factor = 0.0,
    autovacuum_vacuum_insert_threshold = 20000,
    autovacuum_analyze_scale_factor = 0.02,
    autovacuum_vacuum_cost_delay = 0
);
