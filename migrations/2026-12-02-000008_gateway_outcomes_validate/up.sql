-- Checks the rows that existed before 000005 against its constraints. VALIDATE takes a SHARE
-- UPDATE EXCLUSIVE lock: reads and writes go on while the table is scanned.
ALTER TABLE payments VALIDATE CONSTRAINT payments_gateway_state_check;
ALTER TABLE payments VALIDATE CONSTRAINT payments_gateway_checks_check;
ALTER TABLE payments VALIDATE CONSTRAINT payments_gateway_pending_check;
ALTER TABLE payments VALIDATE CONSTRAINT payments_outcome_final_check;
ALTER TABLE payments VALIDATE CONSTRAINT payments_failure_check;
