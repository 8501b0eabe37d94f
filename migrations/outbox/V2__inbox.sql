-- Read side: the inbox that makes a consumer's effect exactly-once.

-- One row per (consumer, event) applied: written in the same transaction as the projection
-- change, so a redelivered or replayed event finds its row and changes nothing.
CREATE TABLE processed_events (
    consumer      text        NOT NULL,
    event_id      uuid        NOT NULL,
    tenant_id     text        NOT NULL,
    event_type    text        NOT NULL,
    processed_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);
