-- A delivery is pending exactly while it has no finished_at. The code always set both together;
-- now the statements that go to one delivery by id say `finished_at IS NULL` where they said
-- `status = 'pending'`, and this makes the two mean the same rows.
-- Why: webhook_deliveries_due_idx (the sender's "which are due" index) is partial, WHERE status =
-- 'pending'. A statement by id that also says `status = 'pending'` can run a generic plan, cached
-- while the table has no statistics, that scans that index instead of the primary key: every
-- pending delivery read per recorded attempt (the trap migration 000010 avoids on payments).
-- NOT VALID: new rows are checked at once, the existing ones by the next migration, which
-- validates without blocking writes.
ALTER TABLE webhook_deliveries
    ADD CONSTRAINT webhook_deliveries_finished_check
    CHECK ((status = 'pending') = (finished_at IS NULL)) NOT VALID;
