-- The SQL floor of the paid command: the same two inserts in one transaction, no handler.
\set id random(1, 1000000000000)
BEGIN;
INSERT INTO payments (tenant_id, payment_id, status, amount_minor, currency, verification_method,
                      verified_by, paid_at, paid_event_id, version)
VALUES ('raw', 'p' || :id, 'paid', 1250, 'EUR', 'card_3ds', 'acs.examplebank.com', now(),
        gen_random_uuid(), 1)
ON CONFLICT DO NOTHING;
INSERT INTO outbox (event_id, tenant_id, aggregate_type, aggregate_id, aggregate_version,
                    event_type, schema_version, payload, metadata)
VALUES (gen_random_uuid(), 'raw', 'payment', 'p' || :id, 1, 'payment.paid', 1,
        '{"paymentId":"p1","amountMinor":1250,"currency":"EUR","verificationMethod":"card_3ds","verifiedBy":"acs.examplebank.com","paidAt":"2026-11-22T10:00:00Z"}',
        '{"correlation_id":"c","causation_id":"r","source":"payments"}')
ON CONFLICT DO NOTHING;
COMMIT;
