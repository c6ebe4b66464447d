DROP INDEX CONCURRENTLY IF EXISTS payments_next_check_idx;
