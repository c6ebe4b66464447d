-- pgbench: what one POST /api/v1/payments commits. The statement is the one
-- src/db/payments.rs insert_with_event sends (payment INSERT + outbox INSERT in one CTE, one
-- implicit transaction, on a database migrated by `async-pay migrate`). Values that the
-- API binds as parameters are computed here from pgbench's random numbers:
--   id                  time-ordered like the API's UUIDv7 (microseconds, then random bits), so
--                       the primary key sees the same append-mostly inserts;
--   idempotency_key     unique per transaction;
--   request_fingerprint 32 bytes (sha256), as the API's SHA-256;
--   request_id          32 hex digits, as the id the API makes up when the client sends none
--                       (the wrk script sends no X-Request-Id and no traceparent).
-- The other values are the wrk script's request body.
\set key random(1, 9223372036854775806)
\set r random(1, 9223372036854775806)
WITH p AS (
    INSERT INTO payments (id, merchant, amount, currency, description, metadata,
                          idempotency_key, request_fingerprint, webhook_url, request_id)
    VALUES ((lpad(to_hex((extract(epoch FROM clock_timestamp()) * 1000000)::bigint), 16, '0')
             || lpad(to_hex(:r::bigint), 16, '0'))::uuid,
            'demo', 100.50, 'RUB', 'Order #123', '{"order_id": "123"}'::jsonb,
            'pgb-' || :key::bigint, sha256(('pgb-' || :key::bigint)::bytea), NULL,
            md5('req-' || :key::bigint))
    ON CONFLICT (merchant, idempotency_key) DO NOTHING
    RETURNING id, merchant, amount, currency, description, metadata, status, idempotency_key,
              request_fingerprint, webhook_url, created_at, processed_at, charge_id, failure_code,
              failure_message, request_id
), o AS (
    INSERT INTO outbox (event_type, payload, request_id, traceparent)
    SELECT 'payment.created', jsonb_build_object('payment_id', p.id), p.request_id, NULL FROM p
)
SELECT * FROM p;
