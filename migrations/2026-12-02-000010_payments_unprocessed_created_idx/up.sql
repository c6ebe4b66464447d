-- Pending payments by age: the "stuck" gauge (pending longer than gateway.stuck_after) reads
-- only the pending ones. It is the one index the gateway work adds to the POST path.
-- Its predicate is `processed_at IS NULL` (the same rows as status = 'pending', by the
-- payments_processed_at_check constraint), never `status = 'pending'`: the consumer's statements
-- by id also say `status = 'pending'`, and a generic plan cached while the table was small chose
-- an index with that predicate over the primary key, scanning every pending payment per claim
-- (measured: 70 million index entries read for 10,000 payments, the consumer 3x slower).
-- CONCURRENTLY: built without blocking writes; it cannot run inside a transaction, hence
-- metadata.toml and one statement per migration.
CREATE INDEX CONCURRENTLY IF NOT EXISTS payments_unprocessed_created_idx ON payments (created_at) WHERE processed_at IS NULL;
