-- The payments example on the toolkit's inbox (migrations/outbox V5): the payment projection's
-- rules without inbox logic, in place of apply_payment_event(s), and the inbox positions of
-- the payment events already applied.

-- The payment projection's own position, for every consumer that has applied payment events.
INSERT INTO inbox_positions (consumer, tenant_id, aggregate_type, aggregate_id, last_version)
SELECT c.consumer, p.tenant_id, 'payment', p.payment_id, p.last_version
FROM payment_projection p
CROSS JOIN (SELECT DISTINCT consumer FROM processed_events
            WHERE event_type IN ('payment.paid', 'payment.refunded')) c;

-- The payment projection's rules, now without inbox logic (the inbox decided what to apply):
-- a payment.paid creates the payment's row, a payment.refunded adds to its refunds; then the
-- batch's revenue, one row per (tenant, UTC day, currency), in key order, so concurrent sinks take
-- those shared rows' locks in the same order and cannot deadlock on them. One call per batch.
CREATE FUNCTION project_payment_events(
    p_tenants text[], p_types text[], p_payments text[], p_versions bigint[], p_amounts bigint[],
    p_currencies text[], p_ats timestamptz[]
) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    FOR i IN 1 .. coalesce(array_length(p_tenants, 1), 0) LOOP
        IF p_types[i] = 'payment.paid' THEN
            INSERT INTO payment_projection (tenant_id, payment_id, status, currency, paid_minor,
                                            last_version, paid_at)
            VALUES (p_tenants[i], p_payments[i], 'paid', p_currencies[i], p_amounts[i],
                    p_versions[i], p_ats[i]);
        ELSIF p_types[i] = 'payment.refunded' THEN
            UPDATE payment_projection
            SET refunded_minor = refunded_minor + p_amounts[i],
                status = CASE WHEN refunded_minor + p_amounts[i] >= paid_minor THEN 'refunded'
                              ELSE 'partially_refunded' END,
                last_version = p_versions[i],
                updated_at = now()
            WHERE tenant_id = p_tenants[i] AND payment_id = p_payments[i];
            IF NOT FOUND THEN
                RAISE EXCEPTION 'payment %/% has no projection to refund', p_tenants[i], p_payments[i];
            END IF;
        ELSE
            RAISE EXCEPTION 'no payment projection rule for event type %', p_types[i];
        END IF;
    END LOOP;
    INSERT INTO tenant_daily_revenue AS r (tenant_id, day, currency, paid_minor, refunded_minor)
    SELECT e.tenant, (e.at AT TIME ZONE 'UTC')::date, e.currency,
           coalesce(sum(e.amount) FILTER (WHERE e.type = 'payment.paid'), 0),
           coalesce(sum(e.amount) FILTER (WHERE e.type = 'payment.refunded'), 0)
    FROM unnest(p_tenants, p_types, p_amounts, p_currencies, p_ats)
         AS e(tenant, type, amount, currency, at)
    GROUP BY 1, 2, 3
    ORDER BY 1, 2, 3
    ON CONFLICT (tenant_id, day, currency) DO UPDATE
    SET paid_minor = r.paid_minor + EXCLUDED.paid_minor,
        refunded_minor = r.refunded_minor + EXCLUDED.refunded_minor;
END $$;

DROP FUNCTION apply_payment_events(text, uuid[], text[], text[], text[], bigint[], bigint[], text[], timestamptz[]);
DROP FUNCTION apply_payment_event(text, uuid, text, text, text, bigint, bigint, text, timestamptz);
