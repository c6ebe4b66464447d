-- Correlation: the request id of the POST that created a payment (the client's X-Request-Id if it
-- sent a sane one, else the id the API made up), and the W3C traceparent the client sent with
-- it, if valid. Every role names the request id on its log lines about the payment, so one grep
-- follows a payment through serve, relay, consume (charge, reconciliation, webhooks) and
-- dlq-watch.
--
-- payments.request_id: the payment keeps it for as long as it exists: the reconciliation sweep
-- (which has no message) and the webhook schedule (which writes it on the delivery) read it from
-- here. outbox.request_id / traceparent: the event carries both to the relay, which puts them in
-- the AMQP message headers; the outbox is emptied after relay.retention, so it cannot be where
-- the payment's id lives. The traceparent is kept only with the event: it is the caller's span,
-- the parent of the processing of that message, and means nothing to a webhook days later.
-- webhook_deliveries.request_id: the sender's log lines about a delivery name it without a join.
--
-- The same rules as the API's (domain::correlation). The constraints are NOT VALID: a new column
-- is NULL in every existing row, so there is nothing to check, and a validating ADD CONSTRAINT
-- would scan each table under an ACCESS EXCLUSIVE lock (payments and outbox are on the POST
-- path); new and updated rows are checked all the same.
ALTER TABLE payments
    ADD COLUMN request_id text,
    ADD CONSTRAINT payments_request_id_check
        CHECK (request_id ~ '^[!-~]{1,128}$') NOT VALID;

ALTER TABLE outbox
    ADD COLUMN request_id text,
    ADD COLUMN traceparent text,
    ADD CONSTRAINT outbox_request_id_check
        CHECK (request_id ~ '^[!-~]{1,128}$') NOT VALID,
    ADD CONSTRAINT outbox_traceparent_check
        CHECK (traceparent ~ '^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$'
               AND substr(traceparent, 4, 32) <> repeat('0', 32)
               AND substr(traceparent, 37, 16) <> repeat('0', 16)) NOT VALID;

ALTER TABLE webhook_deliveries
    ADD COLUMN request_id text,
    ADD CONSTRAINT webhook_deliveries_request_id_check
        CHECK (request_id ~ '^[!-~]{1,128}$') NOT VALID;
