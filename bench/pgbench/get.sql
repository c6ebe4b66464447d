-- pgbench: what one GET /api/v1/payments/{id} reads: the statement of src/db/payments/mod.rs
-- view_for_merchant (the payment by primary key and merchant, with its newest webhook delivery).
-- bench.py loads :rows payments whose ids are lpad(to_hex(i), 32, '0') for i in 1..rows first.
-- Keep it in step with view_select!/view_for_merchant when they change.
\set i random(1, :rows)
SELECT id, merchant, amount, currency, description, metadata, status, idempotency_key,
       request_fingerprint, webhook_url, created_at, processed_at, charge_id, failure_code,
       failure_message, request_id,
       webhook_status, webhook_attempts, webhook_last_attempt_at,
       webhook_last_status_code, webhook_next_attempt_at
FROM payments p
LEFT JOIN LATERAL (SELECT status AS webhook_status, attempts AS webhook_attempts,
                          last_attempt_at AS webhook_last_attempt_at,
                          last_status_code AS webhook_last_status_code,
                          next_attempt_at AS webhook_next_attempt_at
                   FROM webhook_deliveries w WHERE w.payment_id = p.id
                   ORDER BY w.created_at DESC, w.id DESC LIMIT 1) d ON true
WHERE p.id = lpad(to_hex(:i::bigint), 32, '0')::uuid AND p.merchant = 'demo';
