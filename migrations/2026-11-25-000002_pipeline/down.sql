DROP TABLE dead_letters;
DROP TABLE webhook_attempts;
DROP TABLE webhook_deliveries;
ALTER TABLE payments DROP CONSTRAINT payments_claim_check, DROP COLUMN claimed_until, DROP COLUMN claim_token;
DROP TRIGGER outbox_notify ON outbox;
DROP FUNCTION outbox_notify();
