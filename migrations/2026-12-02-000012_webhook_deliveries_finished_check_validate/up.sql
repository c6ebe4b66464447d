-- Checks the deliveries that existed before 000011 against its constraint. VALIDATE takes a
-- SHARE UPDATE EXCLUSIVE lock: reads and writes go on while the table is scanned.
ALTER TABLE webhook_deliveries VALIDATE CONSTRAINT webhook_deliveries_finished_check;
