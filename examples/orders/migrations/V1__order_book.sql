-- The orders service's read model: one row per order, kept by the `order_book` projection.
CREATE TABLE order_book (
    tenant_id   text        NOT NULL,
    order_id    text        NOT NULL,
    total_minor bigint      NOT NULL,
    status      text        NOT NULL CHECK (status IN ('placed', 'shipped')),
    carrier     text,
    version     bigint      NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, order_id)
);
