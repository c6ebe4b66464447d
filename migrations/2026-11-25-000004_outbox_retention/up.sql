-- The relay's retention sweep deletes published rows older than relay.retention, oldest first:
-- this index finds them without walking the rows that are kept.
CREATE INDEX outbox_published_at_idx ON outbox (published_at) WHERE published_at IS NOT NULL;
