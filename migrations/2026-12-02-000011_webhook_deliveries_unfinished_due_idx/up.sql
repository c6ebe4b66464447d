-- The webhook sender's "which deliveries are due" index, with a predicate the statements by id
-- do not imply. Its predecessor said `WHERE status = 'pending'`, as do the statements that record
-- an attempt of one delivery by id: a generic plan cached while the table was small chose it over
-- the primary key, scanning every pending delivery per recorded attempt (the same trap as
-- migration 000010 avoids on payments). A finished delivery always has `finished_at` set, so
-- `finished_at IS NULL` holds every pending one; the sender's query says both.
-- CONCURRENTLY: built without blocking writes; it cannot run inside a transaction, hence
-- metadata.toml and one statement per migration.
CREATE INDEX CONCURRENTLY IF NOT EXISTS webhook_deliveries_unfinished_due_idx ON webhook_deliveries (next_attempt_at) WHERE finished_at IS NULL;
