-- The payments example's write side: payments and their refunds (the toolkit's outbox is in
-- migrations/outbox, applied before this set). Every table is keyed by tenant first: no query can
-- reach a row without naming its tenant.

CREATE TABLE payments (
    tenant_id            text        NOT NULL,
    payment_id           text        NOT NULL,
    -- 'pending' rows may be created by other flows; the paid command creates one if none exists.
    status               text        NOT NULL DEFAULT 'pending'
                         CHECK (status IN ('pending', 'paid', 'partially_refunded', 'refunded')),
    amount_minor         bigint      CHECK (amount_minor > 0),
    currency             char(3)     CHECK (currency ~ '^[A-Z]{3}$'),
    verification_method  text,
    verified_by          text,
    paid_at              timestamptz,
    paid_event_id        uuid,
    refunded_minor       bigint      NOT NULL DEFAULT 0 CHECK (refunded_minor >= 0),
    -- Aggregate version: bumped once per event, so events of one payment are totally ordered.
    version              bigint      NOT NULL DEFAULT 0 CHECK (version >= 0),
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, payment_id),
    -- The invariant the refund command keeps, enforced again by the database.
    CHECK (refunded_minor <= coalesce(amount_minor, 0)),
    CHECK (status = 'pending' OR (amount_minor IS NOT NULL AND currency IS NOT NULL
                                   AND paid_at IS NOT NULL AND paid_event_id IS NOT NULL))
);

CREATE TABLE refunds (
    tenant_id        text        NOT NULL,
    refund_id        uuid        NOT NULL,
    payment_id       text        NOT NULL,
    -- The client's Idempotency-Key header: one refund per key per tenant.
    idempotency_key  text        NOT NULL,
    amount_minor     bigint      NOT NULL CHECK (amount_minor > 0),
    -- Refunded total of the payment right after this refund: lets a replay return the original result.
    refunded_total_minor bigint  NOT NULL CHECK (refunded_total_minor >= amount_minor),
    event_id         uuid        NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, refund_id),
    UNIQUE (tenant_id, idempotency_key),
    FOREIGN KEY (tenant_id, payment_id) REFERENCES payments (tenant_id, payment_id)
);
