-- The reconciliation sweep: "which payments are due to be asked about", oldest due first. Only
-- payments a consumer has taken to the gateway are in it (never the POST path).
-- CONCURRENTLY: built without blocking writes; it cannot run inside a transaction, hence
-- metadata.toml and one statement per migration.
CREATE INDEX CONCURRENTLY IF NOT EXISTS payments_next_check_idx ON payments (next_check_at) WHERE next_check_at IS NOT NULL;
