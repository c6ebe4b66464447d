-- pgbench, commit-to-broker step: the statement of create.sql (what one POST commits), with one
-- difference in data only: the idempotency key is 'lat-RATE-CLIENT-N' (the step's rate, pgbench
-- client, its N-th transaction; run with -D n=0 -D rate=500), so the bench can find each row's
-- commit time in pgbench's per-transaction log (-l: the moment the client got the COMMIT's
-- answer) and time the event from its commit to its arrival at the broker.
\set n :n + 1
\set r random(1, 9223372036854775806)
WITH p AS (
    INSERT INTO payments (id, merchant, amount, currency, description, metadata,
                          idempotency_key, request_fingerprint, webhook_url, request_id)
    VALUES ((lpad(to_hex((extract(epoch FROM clock_timestamp()) * 1000000)::bigint), 16, '0')
             || lpad(to_hex(:r::bigint), 16, '0'))::uuid,
            'demo', 100.50, 'RUB', 'Order #123', '{"order_id": "123"}'::jsonb,
            'lat-' || :rate || '-' || :client_id || '-' || :n,
            sha256(('lat-' || :rate || '-' || :client_id || '-' || :n)::bytea), NULL,
            md5('req-' || :rate || '-' || :client_id || '-' || :n))
    ON CONFLICT (merchant, idempotency_key) DO NOTHING
    RETURNING id, merchant, amount, currency, description, metadata, status, idempotency_key,
              request_fingerprint, webhook_url, created_at, processed_at, charge_id, failure_code,
              failure_message, request_id
), o AS (
    INSERT INTO outbox (event_type, payload, request_id, traceparent)
    SELECT 'payment.created', jsonb_build_object('payment_id', p.id), p.request_id, NULL FROM p
)
SELECT * FROM p;
