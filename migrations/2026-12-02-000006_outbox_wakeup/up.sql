-- The relay no longer LISTENs: it polls the partial index of unpublished rows
-- (relay.poll_interval while events flow, backing off to relay.idle_poll_interval when idle).
-- A transaction that has called pg_notify takes one lock for the whole PostgreSQL instance at
-- commit (the notification queue is kept in commit order), so every POST committed through this
-- trigger one after another: the create statement did 3.8k tx/s with it and 10.7k without it
-- under pgbench -c 32 on the bench machine (bench/README.md).
DROP TRIGGER outbox_notify ON outbox;
DROP FUNCTION outbox_notify();

-- Every event leaves two dead tuples: one when the relay marks it published (an UPDATE that can
-- never be HOT, since published_at is in both partial indexes) and one when retention deletes it.
-- With the default threshold (20 % of the table) an outbox holding 7 days of events would gather
-- millions of them before autovacuum came, and the claim's partial index its dead entries with
-- them. A fixed threshold instead: vacuum once 10,000 rows changed, whatever the table's size.
-- Autovacuum still visits a database at most once per autovacuum_naptime (1 min by default), and
-- a server may run without it, so the relay also vacuums the outbox itself every 10 s. Why not
-- partitions by time: see bench/README.md.
ALTER TABLE outbox SET (
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 10000,
    autovacuum_vacuum_insert_scale_factor = 0,
    autovacuum_vacuum_insert_threshold = 10000
);
