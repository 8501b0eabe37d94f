-- The payments example's read side: the projections its sink keeps, through the toolkit's inbox
-- (processed_events, migrations/outbox V2).

-- Per-payment status as the events tell it.
CREATE TABLE payment_projection (
    tenant_id       text        NOT NULL,
    payment_id      text        NOT NULL,
    status          text        NOT NULL CHECK (status IN ('paid', 'partially_refunded', 'refunded')),
    currency        char(3)     NOT NULL,
    paid_minor      bigint      NOT NULL CHECK (paid_minor > 0),
    refunded_minor  bigint      NOT NULL DEFAULT 0 CHECK (refunded_minor >= 0),
    -- The aggregate version of the last event applied: the next one must be exactly one more.
    last_version    bigint      NOT NULL,
    paid_at         timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, payment_id)
);

-- Per-tenant daily revenue by currency: a running sum, so an event applied twice shows at once.
CREATE TABLE tenant_daily_revenue (
    tenant_id       text    NOT NULL,
    day             date    NOT NULL,
    currency        char(3) NOT NULL,
    paid_minor      bigint  NOT NULL DEFAULT 0,
    refunded_minor  bigint  NOT NULL DEFAULT 0,
    net_minor       bigint  GENERATED ALWAYS AS (paid_minor - refunded_minor) STORED,
    PRIMARY KEY (tenant_id, day, currency)
);

-- Applies one payment event's inbox row and payment projection change for one consumer, in the
-- caller's transaction, and says what it did (the caller adds the revenue of what was applied, for
-- the whole batch at once, in key order: concurrent batches then take those shared rows' locks in
-- the same order and cannot deadlock on them):
--   'applied'    the inbox row and the projection change were written;
--   'duplicate'  this consumer had applied this event already: nothing written;
--   'stale'      an older version than the projection holds: only the inbox row written;
--   'gap'        an earlier event of the payment is not applied yet: nothing written (redeliver);
--   'error: …'   the change failed: nothing written (the exception block is a subtransaction).
-- One round trip per event, and one row lock per payment, so concurrent sinks serialize per payment.
-- p_at is not used here; it stays in the signature so every change is passed whole.
CREATE FUNCTION apply_payment_event(
    p_consumer text, p_event_id uuid, p_tenant text, p_type text, p_payment text,
    p_version bigint, p_amount bigint, p_currency text, p_at timestamptz
) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    v_inserted integer;
    v_last     bigint;
BEGIN
    INSERT INTO processed_events (consumer, event_id, tenant_id, event_type)
    VALUES (p_consumer, p_event_id, p_tenant, p_type)
    ON CONFLICT DO NOTHING;
    GET DIAGNOSTICS v_inserted = ROW_COUNT;
    IF v_inserted = 0 THEN
        RETURN 'duplicate';
    END IF;

    SELECT last_version INTO v_last
    FROM payment_projection
    WHERE tenant_id = p_tenant AND payment_id = p_payment
    FOR UPDATE;

    IF p_type = 'payment.paid' THEN
        -- A payment's first event: if the projection exists, it was applied already.
        IF FOUND THEN
            RETURN 'stale';
        END IF;
        INSERT INTO payment_projection (tenant_id, payment_id, status, currency, paid_minor,
                                        last_version, paid_at)
        VALUES (p_tenant, p_payment, 'paid', p_currency, p_amount, p_version, p_at);
    ELSIF p_type = 'payment.refunded' THEN
        IF NOT FOUND OR v_last < p_version - 1 THEN
            DELETE FROM processed_events WHERE consumer = p_consumer AND event_id = p_event_id;
            RETURN 'gap';
        END IF;
        IF v_last >= p_version THEN
            RETURN 'stale';
        END IF;
        UPDATE payment_projection
        SET refunded_minor = refunded_minor + p_amount,
            status = CASE WHEN refunded_minor + p_amount >= paid_minor THEN 'refunded'
                          ELSE 'partially_refunded' END,
            last_version = p_version,
            updated_at = now()
        WHERE tenant_id = p_tenant AND payment_id = p_payment;
    ELSE
        RAISE EXCEPTION 'no projection rule for event type %', p_type;
    END IF;
    RETURN 'applied';
EXCEPTION WHEN OTHERS THEN
    RETURN 'error: ' || SQLSTATE || ' ' || SQLERRM;
END
$$;

-- A whole SQS batch in one call: the changes in order, one outcome each (see above).
CREATE FUNCTION apply_payment_events(
    p_consumer text, p_event_ids uuid[], p_tenants text[], p_types text[], p_payments text[],
    p_versions bigint[], p_amounts bigint[], p_currencies text[], p_ats timestamptz[]
) RETURNS text[] LANGUAGE plpgsql AS $$
DECLARE
    v_outcomes text[] := '{}';
BEGIN
    FOR i IN 1 .. coalesce(array_length(p_event_ids, 1), 0) LOOP
        v_outcomes := v_outcomes || apply_payment_event(
            p_consumer, p_event_ids[i], p_tenants[i], p_types[i], p_payments[i],
            p_versions[i], p_amounts[i], p_currencies[i], p_ats[i]);
    END LOOP;
    RETURN v_outcomes;
END
$$;
