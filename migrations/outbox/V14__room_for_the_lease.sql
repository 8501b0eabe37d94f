-- Room on every page for each row's lease, and an event id default that costs what its body does.
--
-- 1. The lease stays on its page. A claim writes each row's lease (locked_until, locked_by,
-- attempts): no indexed column changes, so it can be a HOT update, which adds no index entry,
-- but only when the row's page has room for the new version, which is longer than the row by
-- the lease itself (the dispatcher's lease owner is its log stream's name and a 32-digit id, about
-- 85 bytes). With V1's fillfactor of 70, 15,000 of 50,000 leases were HOT (events of ~600 bytes,
-- an 85-byte owner), and each of the others wrote a new entry into every index of the outbox (the
-- four unique ones and the claim indexes). At 45, 1 lease in 8 still found no room for the
-- smallest rows (~260 bytes); at 40 every lease was HOT for rows of ~260 to ~1,650 bytes (as
-- they sit on the page; larger payloads go to TOAST), which
-- tests/it/statements.rs `a_claim_writes_every_lease_on_the_rows_own_page` checks. A claim +
-- record of 50,000 events in one session took 1.78-1.94 s instead of 2.53 s (0.70-0.77x, two
-- rounds each, alternating; docs/benchmarks.md).
-- The price is space: retained published rows fill their pages to 40% instead of 70% (the
-- publish update is never HOT, and its new version moves to a page with room under the
-- fillfactor whenever its own page has none), so the heap of a retained history grows up to
-- 1.75x, and with it the pages retention's DELETE and VACUUM visit; the indexes, which the claim
-- and the record read, do not change. Only pages written from now on are filled to 40%;
-- existing pages keep what they hold (no rewrite, and only a moment's SHARE UPDATE EXCLUSIVE
-- lock: appends, claims and records go on).
ALTER TABLE outbox SET (fillfactor = 40);

-- 2. The event id default is inlined. outbox_uuid_v7() (V5) is the outbox's default event id, so
-- every plain-SQL and captured append calls it. V7 pinned every toolkit function's search_path,
-- and a SQL function with a SET clause is never inlined: each call saved and restored the
-- setting (4.7 µs per call measured, against 2.0 inlined and 1.1 for gen_random_uuid alone).
-- Its body now names only pg_catalog, schema-qualified where the grammar allows it (overlay,
-- substring and extract are the grammar's own, which always resolve in pg_catalog), so it
-- needs no search_path and resolves the same for every caller. Same bits as before: a 48-bit
-- Unix millisecond timestamp, version 7, the rest random.
CREATE OR REPLACE FUNCTION outbox_uuid_v7() RETURNS uuid LANGUAGE sql VOLATILE AS $$
    SELECT pg_catalog.encode(
        pg_catalog.set_bit(pg_catalog.set_bit(
            overlay(pg_catalog.uuid_send(pg_catalog.gen_random_uuid())
                    placing substring(pg_catalog.int8send(
                        pg_catalog.floor(extract(epoch FROM pg_catalog.clock_timestamp())
                                         OPERATOR(pg_catalog.*) 1000)::pg_catalog.int8) FROM 3)
                    FROM 1 FOR 6),
            52, 1), 53, 1),
        'hex')::pg_catalog.uuid
$$;
-- CREATE OR REPLACE has dropped the pinned search_path. A later migration that pins every
-- toolkit function again (as V7 and V9 do) must leave this one out, or it is no longer inlined
-- (tests/it/migrations.rs, every_toolkit_function_resolves_names_in_its_own_schema).
