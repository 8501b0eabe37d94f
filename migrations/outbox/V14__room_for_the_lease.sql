-- Room on every page for each row's next version (the outbox's lease, the aggregate's writer), and
-- an event id default that costs what its body does.
--
-- 1. The lease stays on its page. A claim writes each row's lease (locked_until, locked_by,
-- attempts): no indexed column changes, so it can be a HOT update, which adds no index entry,
-- but only when the row's page has room for the new version. With V1's fillfactor of 70 a page
-- of ~600-byte events holds 9 rows and room for 4 more versions: measured, 20,000 of 50,000
-- leases were HOT, and each of the others wrote a new entry into every index of the outbox
-- (the four unique ones and the claim indexes). At 50 a page has room for about one new version
-- of each row on it, but not always (a lease version is a few bytes longer than the row, and
-- 1 lease in 300 was not HOT at several row sizes); at 45, every lease was HOT for rows of 234
-- to 4,234 bytes (tests/it/statements.rs, `a_claim_writes_every_lease_on_the_rows_own_page`).
-- A claim + record of 50,000 events in one session took 0.74x the time (docs/benchmarks.md).
-- The price is space: retained published rows fill their pages to 45% instead of 70% (the
-- publish update is never HOT: its new version goes to a page with room under the
-- fillfactor), so the heap of a retained history is up to 1.55x larger; the indexes, which the
-- claim and the record read, are not. Only pages written from now on are filled to 45%;
-- existing pages keep what they hold (no rewrite, and only a moment's SHARE UPDATE EXCLUSIVE
-- lock: appends, claims and records go on).
ALTER TABLE outbox SET (fillfactor = 45);

-- The aggregate's row (V13) is written once by every transaction that appends to the aggregate
-- (its writer changes; no indexed column does). At the default fillfactor (100) no page had room
-- for the new version: 0 of 50,000 such writes were HOT, each added an entry to the aggregates'
-- key index and put the row at the table's end. At 45 all 50,000 were HOT, and an
-- `INSERT ... SELECT` of 50,000 second events took 2.51-2.55 s instead of 2.78-2.79 s (0.91x, two
-- rounds each, alternating); the table came out 7.6 MB instead of 6.7 MB.
ALTER TABLE outbox_aggregates SET (fillfactor = 45);

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
ALTER FUNCTION outbox_uuid_v7() RESET search_path;
