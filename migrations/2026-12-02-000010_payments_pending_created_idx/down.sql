DROP INDEX CONCURRENTLY IF EXISTS payments_pending_created_idx;
