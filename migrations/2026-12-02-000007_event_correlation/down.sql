ALTER TABLE webhook_deliveries DROP COLUMN request_id;
ALTER TABLE outbox DROP COLUMN traceparent, DROP COLUMN request_id;
ALTER TABLE payments DROP COLUMN request_id;
