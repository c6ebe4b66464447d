-- Pending payments by age: the "stuck" gauge (pending longer than gateway.stuck_after) reads
-- only the pending ones. It is the one index the gateway work adds to the POST path.
-- CONCURRENTLY: built without blocking writes; it cannot run inside a transaction, hence
-- metadata.toml and one statement per migration.
CREATE INDEX CONCURRENTLY IF NOT EXISTS payments_pending_created_idx ON payments (created_at) WHERE status = 'pending';
