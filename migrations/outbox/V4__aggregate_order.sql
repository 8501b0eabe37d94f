-- Per-aggregate order without a cluster-wide commit horizon, and a claim that reads only what can
-- go now.
--
-- Before: the claim took only rows whose inserting transaction was older than every running
-- transaction (pg_snapshot_xmin), so one long transaction anywhere in the cluster (another
-- database included) stopped all publishing; and it probed every candidate for an earlier
-- unpublished version, rereading every parked row on each call.
--
-- Now: appending an event locks its aggregate's row in outbox_aggregates until the appending
-- transaction ends, so an aggregate's next version can only commit after its predecessor, for
-- every producer (the payment command, a service appending by SQL, a trigger). And each row
-- records whether it is its aggregate's head (nothing unpublished before it): the claim's index
-- holds pending heads only.

-- One row per aggregate ever appended to: its last version. Rows are never deleted (a version
-- must never be handed out twice).
CREATE TABLE outbox_aggregates (
    tenant_id         text   NOT NULL,
    aggregate_type    text   NOT NULL,
    aggregate_id      text   NOT NULL,
    last_version      bigint NOT NULL CHECK (last_version > 0),
    -- The last version before the latest append (0 for the first): lets the append trigger find
    -- its predecessor with the same statement that locks the aggregate.
    previous_version  bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant_id, aggregate_type, aggregate_id)
);

INSERT INTO outbox_aggregates (tenant_id, aggregate_type, aggregate_id, last_version)
SELECT tenant_id, aggregate_type, aggregate_id, max(aggregate_version)
FROM outbox GROUP BY tenant_id, aggregate_type, aggregate_id;

-- Whether nothing of the aggregate before this row is unpublished. A pending head can go as
-- soon as it is due; a pending row that is not a head is parked behind its predecessor.
ALTER TABLE outbox ADD COLUMN is_head boolean NOT NULL DEFAULT false;

UPDATE outbox o SET is_head = true
WHERE o.status <> 'published'
  AND NOT EXISTS (SELECT 1 FROM outbox e
                  WHERE e.tenant_id = o.tenant_id AND e.aggregate_type = o.aggregate_type
                    AND e.aggregate_id = o.aggregate_id
                    AND e.aggregate_version < o.aggregate_version
                    AND e.status <> 'published');

-- The claim's index: due order over pending heads only. Parked rows are not in it at all, and
-- rows backing off sort after everything due, so neither is read by a claim.
CREATE INDEX outbox_head_claim_idx ON outbox (next_attempt_at, id)
    WHERE status = 'pending' AND is_head;

-- Every append: lock the aggregate, assign or check the version, decide the head flag.
--   * aggregate_version NULL: the next version is assigned (last + 1).
--   * aggregate_version given (the payment command uses the payment's own version): it must be
--     above the last one, or the append fails with a unique violation, as a duplicate would.
--   * head: the predecessor is published (or gone: retention only deletes published rows). The
--     predecessor is read FOR SHARE, so a dispatcher marking it published right now finishes
--     first and this append sees the result; a dispatcher that comes after this lock skips the
--     row (SKIP LOCKED) and records it once this transaction ends, promoting this row then.
CREATE FUNCTION outbox_append_order() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    assigned  bigint;
    previous  bigint;
    previous_status text;
BEGIN
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

CREATE TRIGGER outbox_append_order BEFORE INSERT ON outbox
    FOR EACH ROW EXECUTE FUNCTION outbox_append_order();


-- The commit horizon is gone; txid stays as a diagnostic (which transaction appended the row).
COMMENT ON COLUMN outbox.txid IS 'Transaction that appended the row (diagnostics only).';

-- Heads again after an operator moved rows back to pending (redrive, replay): for each touched
-- aggregate, exactly its lowest unpublished row is the head.
CREATE FUNCTION outbox_reset_heads(ids bigint[]) RETURNS void
LANGUAGE sql AS $$
    WITH touched AS (
        SELECT DISTINCT tenant_id, aggregate_type, aggregate_id FROM outbox WHERE id = ANY (ids)
    ), heads AS (
        SELECT h.id
        FROM touched t
        CROSS JOIN LATERAL (
            SELECT o.id FROM outbox o
            WHERE o.tenant_id = t.tenant_id AND o.aggregate_type = t.aggregate_type
              AND o.aggregate_id = t.aggregate_id AND o.status <> 'published'
            ORDER BY o.aggregate_version LIMIT 1) h
    )
    UPDATE outbox o SET is_head = (o.id IN (SELECT id FROM heads))
    FROM touched t
    WHERE o.tenant_id = t.tenant_id AND o.aggregate_type = t.aggregate_type
      AND o.aggregate_id = t.aggregate_id AND o.status <> 'published'
      AND o.is_head IS DISTINCT FROM (o.id IN (SELECT id FROM heads));
$$;

-- Vacuum always cleans the outbox's indexes. Since PostgreSQL 14, vacuum skips index cleanup when
-- under about 2% of a table's pages hold dead rows ("bypass"). On a large outbox that is the usual
-- case, yet those dead entries are exactly the head of the claim's partial index (rows just
-- published, dead-lettered or re-headed): every claim then visits their heap pages before the
-- first live row. Measured on 1M published + 60k pending rows after 20,000 heads went dead: the
-- claim's index scan read 647 buffers after a bypassing vacuum, 26 after one that cleaned the
-- index (docs/claim-plan.md).
ALTER TABLE outbox SET (vacuum_index_cleanup = on);
