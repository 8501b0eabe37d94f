-- The events feed: each tenant's published events in the order they were published, read with a
-- cursor that neither skips nor repeats an event while the outbox grows and old rows are deleted,
-- and acknowledged per consumer.

-- 1. A feed position per published event ---------------------------------------------------------
-- Given when the event is first marked published (never again: a replay re-publishes the event
-- but leaves it where it is in the feed). Positions of one tenant commit in increasing order:
-- the marking transaction locks the tenant's row in outbox_feed_tenants before it draws them, so
-- a later position of that tenant can only be drawn once the earlier transaction has ended. A
-- reader that has seen position P will therefore never find a committed position below P later,
-- which is what makes "everything after the cursor" complete. A long transaction elsewhere in the
-- cluster holds back nothing; two dispatchers marking the same tenant take turns for the few
-- milliseconds of the mark.
CREATE SEQUENCE outbox_feed_position_seq AS bigint;

ALTER TABLE outbox ADD COLUMN feed_position bigint;

CREATE TABLE outbox_feed_tenants (
    tenant_id          text        PRIMARY KEY,
    last_published_at  timestamptz NOT NULL DEFAULT now()
);

-- Events published before this migration join the feed in the order they were published.
UPDATE outbox o SET feed_position = p.position
FROM (SELECT id, nextval('outbox_feed_position_seq') AS position
      FROM (SELECT id FROM outbox
            WHERE status = 'published' OR published_at IS NOT NULL
            ORDER BY published_at, id) ordered) p
WHERE o.id = p.id;

INSERT INTO outbox_feed_tenants (tenant_id)
SELECT DISTINCT tenant_id FROM outbox WHERE feed_position IS NOT NULL;

-- A page is one index range scan: the tenant's positions after the cursor, in order. The cost of
-- a page follows the page size, not the rows retained.
CREATE INDEX outbox_feed_idx ON outbox (tenant_id, feed_position) WHERE feed_position IS NOT NULL;

-- 2. Acknowledgments, one per event and consumer ------------------------------------------------
-- Deleted with their event when retention deletes it.
CREATE TABLE outbox_feed_acks (
    event_id         uuid        NOT NULL REFERENCES outbox (event_id) ON DELETE CASCADE,
    consumer         text        NOT NULL CHECK (consumer ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$'),
    tenant_id        text        NOT NULL,
    acknowledged_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (event_id, consumer)
);
