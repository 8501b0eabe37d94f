-- A lane for the tenants that are not being drained in bulk: outbox_claim_waiting below (its
-- caller: shared/src/postgres/outbox.rs; the drain's lane: shared/src/dispatcher/lane.rs).
--
-- Before: the claim was fair between tenants (V8), but a claim is one step of a pipeline. Beside
-- another tenant's 200,000 events, a quiet tenant's event committed now was leased by the next
-- claim, waited as the batch leased ahead while the batch before it went to the bus, and then
-- went out with 499 rows of the other tenant: commit to publish took 537 ms at the p99 against
-- 11 ms with no backlog (48.6x; docs/benchmarks.md).
-- Now: while a batch is on the bus, the drain claims every few milliseconds (its lane) the due
-- heads of every tenant except those it is draining in bulk (p_skip: the tenants with the most
-- rows in its last full claim), and publishes them at once. The main claim's rows of other
-- tenants go at once too. So a quiet tenant's event waits one poll of the lane, not a batch of
-- someone else's.
--
-- The rows it leases are those outbox_claim (V8, V11) would: pending aggregate heads that are
-- due and not leased, FOR UPDATE SKIP LOCKED, the lease written in this one autocommitted
-- statement under a fresh owner that fences the outcomes (outbox_record). So every ordering rule
-- holds as it does for the main claim: an aggregate's next event is a head only once this one
-- is recorded as published. It takes no replays (the main claim does; they are done already).
-- Between its tenants, the batch is shared as V8's first round does: each gets up to
-- ceil(p_limit / tenants) rows in due order, and the cut goes turn by turn; within a turn the
-- tenants go in an order drawn from the owner (fresh per claim), so with more tenants than the
-- batch none is always last.
-- Cost: one index descent per tenant with pending heads (the skipped ones included), then each
-- tenant's few due heads. With only skipped tenants waiting, it reads two index pages.
CREATE FUNCTION outbox_claim_waiting(p_limit bigint, p_lease_secs float8, p_owner text, p_skip text[])
RETURNS SETOF outbox LANGUAGE plpgsql SET jit = off AS $$
BEGIN
    IF p_limit IS NULL OR p_limit < 1 OR p_lease_secs IS NULL OR p_lease_secs <= 0
       OR p_owner IS NULL OR p_skip IS NULL OR array_position(p_skip, NULL) IS NOT NULL THEN
        RAISE EXCEPTION 'outbox_claim_waiting(%, %, %, %): a batch of at least 1, a positive lease, an owner and the tenants to skip (an array without NULLs, empty for none) are required',
            p_limit, p_lease_secs, p_owner, p_skip USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN QUERY
    -- Tenants with pending heads: one descent of the index each.
    WITH RECURSIVE tenants AS (
        (SELECT o.tenant_id FROM outbox o
         WHERE o.status = 'pending' AND o.is_head
         ORDER BY o.tenant_id LIMIT 1)
        UNION ALL
        SELECT (SELECT o.tenant_id FROM outbox o
                WHERE o.status = 'pending' AND o.is_head AND o.tenant_id > t.tenant_id
                ORDER BY o.tenant_id LIMIT 1)
        FROM tenants t WHERE t.tenant_id IS NOT NULL
    ), active AS MATERIALIZED (
        SELECT tenant_id FROM tenants
        WHERE tenant_id IS NOT NULL AND tenant_id <> ALL (p_skip)
    ), share AS (
        SELECT ceil(p_limit::float8 / greatest(count(*), 1))::int8 AS n FROM active
    ), taken AS (
        SELECT h.id, h.tenant_id,
               row_number() OVER (PARTITION BY h.tenant_id
                                  ORDER BY h.next_attempt_at, h.id) AS turn
        FROM active a CROSS JOIN share s CROSS JOIN LATERAL (
            SELECT o.id, o.tenant_id, o.next_attempt_at
            FROM outbox o
            WHERE o.tenant_id = a.tenant_id AND o.status = 'pending' AND o.is_head
              AND o.next_attempt_at <= now()
              AND (o.locked_until IS NULL OR o.locked_until <= now())
            ORDER BY o.next_attempt_at, o.id
            LIMIT s.n
            FOR UPDATE OF o SKIP LOCKED) h
    )
    UPDATE outbox o
    SET locked_until = now() + make_interval(secs => p_lease_secs),
        locked_by = p_owner,
        attempts = o.attempts + 1
    WHERE o.id = ANY (ARRAY(
        SELECT id FROM taken
        ORDER BY turn, hashtext(tenant_id || p_owner), tenant_id COLLATE "C"
        LIMIT p_limit))
    RETURNING o.*;
END $$;

DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION outbox_claim_waiting(bigint, float8, text, text[]) SET search_path = %I, pg_catalog',
                   current_schema());
END $$;
