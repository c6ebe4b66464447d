-- Replaced by webhook_deliveries_unfinished_due_idx (migration 000011).
DROP INDEX CONCURRENTLY IF EXISTS webhook_deliveries_due_idx;
