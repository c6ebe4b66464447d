-- The payment gateway boundary: what the provider said, and what is still to be asked.
--
-- gateway_state: NULL = no charge request was ever sent for this payment; 'charging' = a
-- consumer claimed it to call the provider (a request may have left: whoever takes it over asks
-- the provider's status before charging again); 'unknown' = the provider's answer did not say
-- whether it charged (timeout, 5xx, "processing"): the payment is asked about with `status` at
-- next_check_at, never guessed. The provider's answer is final only as a final payment status.
ALTER TABLE payments
    ADD COLUMN gateway_state text
        CONSTRAINT payments_gateway_state_check CHECK (gateway_state IN ('charging', 'unknown')),
    -- Why the last answer was unknown ("no answer within 10s", "HTTP 503", "processing").
    ADD COLUMN gateway_reason text,
    -- Consecutive unknown answers: the next check waits longer after each one.
    ADD COLUMN gateway_checks integer NOT NULL DEFAULT 0
        CONSTRAINT payments_gateway_checks_check CHECK (gateway_checks >= 0),
    -- When to ask the provider about this payment if nobody has finished it by then: set when a
    -- claim for a gateway call is taken (the claim's end) and after an unknown answer (backoff).
    -- Lives here, not in a message, so a dead-lettered or lost message cannot strand a charge.
    ADD COLUMN next_check_at timestamptz,
    -- The provider's id of the charge; the decline code and message of a declined payment.
    ADD COLUMN charge_id text,
    ADD COLUMN failure_code text,
    ADD COLUMN failure_message text,
    ADD CONSTRAINT payments_gateway_pending_check
        CHECK (status = 'pending' OR (gateway_state IS NULL AND next_check_at IS NULL)),
    ADD CONSTRAINT payments_outcome_final_check
        CHECK (status <> 'pending' OR (charge_id IS NULL AND failure_code IS NULL AND failure_message IS NULL)),
    ADD CONSTRAINT payments_failure_check
        CHECK (status = 'failed' OR (failure_code IS NULL AND failure_message IS NULL));

-- The reconciliation sweep: "which payments are due to be asked about", oldest due first. Only
-- payments a consumer has taken to the gateway are in it (never the POST path).
CREATE INDEX payments_next_check_idx ON payments (next_check_at) WHERE next_check_at IS NOT NULL;

-- Pending payments by age: the "stuck" gauge (pending longer than gateway.stuck_after) reads
-- only the pending ones. It is the one index this feature adds to the POST path.
CREATE INDEX payments_pending_created_idx ON payments (created_at) WHERE status = 'pending';
