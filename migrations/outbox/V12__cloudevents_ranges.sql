-- What cannot be sent as a CloudEvent is refused at append, with a clear error, instead of going
-- dead at the dispatcher (shared/src/envelope.rs keeps the same rules for rows already stored):
--   * aggregate_version is a CloudEvents Integer (signed 32-bit): at most 2147483647;
--   * the metadata's source is a non-empty string (CloudEvents requires a non-empty
--     URI-reference; the envelope percent-encodes what a URI cannot hold).
-- NOT VALID: rows already stored are not read (no table scan, no long lock); new rows and
-- updates are checked. `ALTER TABLE outbox VALIDATE CONSTRAINT ...` checks the old ones later,
-- under a lock that lets writes go on.
ALTER TABLE outbox ADD CONSTRAINT outbox_version_is_a_cloudevents_integer
    CHECK (aggregate_version <= 2147483647) NOT VALID;
ALTER TABLE outbox ADD CONSTRAINT outbox_source_is_not_empty
    CHECK (metadata ->> 'source' <> '') NOT VALID;
