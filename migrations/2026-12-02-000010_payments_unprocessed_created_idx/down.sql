DROP INDEX CONCURRENTLY IF EXISTS payments_unprocessed_created_idx;
