-- The payment gateway boundary: what the provider said, and what is still to be asked.
--
-- gateway_state: NULL = no charge request was ever sent for this payment; 'charging' = a
-- consumer claimed it to call the provider (a request may have left: whoever takes it over asks
-- the provider's status before charging again); 'unknown' = the provider's answer did not say
-- whether it charged (timeout, 5xx, "processing"): the payment is asked about with `status` at
-- next_check_at, never guessed. The provider's answer is final only as a final payment status.
ALTER TABLE payments
    ADD COLUMN gateway_state text,
    -- Why the last answer was unknown ("no answer within 10s", "HTTP 503", "processing").
    ADD COLUMN gateway_reason text,
    -- Consecutive unknown answers: the next check waits longer after each one.
    ADD COLUMN gateway_checks integer NOT NULL DEFAULT 0,
    -- When to ask the provider about this payment if nobody has finished it by then: set when a
    -- claim for a gateway call is taken (the claim's end) and after an unknown answer (backoff).
    -- Lives here, not in a message, so a dead-lettered or lost message cannot strand a charge.
    ADD COLUMN next_check_at timestamptz,
    -- The provider's id of the charge; the decline code and message of a declined payment.
    ADD COLUMN charge_id text,
    ADD COLUMN failure_code text,
    ADD COLUMN failure_message text,
    -- NOT VALID: new rows are checked at once, the existing ones by the next migration, which
    -- does not block writes (on a large table a validating ADD CONSTRAINT would hold an
    -- ACCESS EXCLUSIVE lock, stopping every POST, for as long as the scan takes).
    ADD CONSTRAINT payments_gateway_state_check CHECK (gateway_state IN ('charging', 'unknown')) NOT VALID,
    ADD CONSTRAINT payments_gateway_checks_check CHECK (gateway_checks >= 0) NOT VALID,
    ADD CONSTRAINT payments_gateway_pending_check
        CHECK (status = 'pending' OR (gateway_state IS NULL AND next_check_at IS NULL)) NOT VALID,
    ADD CONSTRAINT payments_outcome_final_check
        CHECK (status <> 'pending' OR (charge_id IS NULL AND failure_code IS NULL AND failure_message IS NULL)) NOT VALID,
    ADD CONSTRAINT payments_failure_check
        CHECK (status = 'failed' OR (failure_code IS NULL AND failure_message IS NULL)) NOT VALID;
