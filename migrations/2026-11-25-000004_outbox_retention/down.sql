DROP INDEX outbox_published_at_idx;
