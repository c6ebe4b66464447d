-- The event pipeline: relay wake-ups, consumer claims, durable webhook deliveries, dead letters.

-- Wake the relay the moment an event commits (it LISTENs on this channel). One notification per
-- inserting statement; Postgres folds identical notifications of one transaction into one.
CREATE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('outbox_inserted', '');
    RETURN NULL;
END
$$;
CREATE TRIGGER outbox_notify AFTER INSERT ON outbox FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify();

-- A consumer claims a pending payment before calling the gateway: claim_token says who holds it,
-- claimed_until when the claim lapses if that consumer died. Only the holder may finalise it.
ALTER TABLE payments
    ADD COLUMN claim_token uuid,
    ADD COLUMN claimed_until timestamptz,
    ADD CONSTRAINT payments_claim_check CHECK (status = 'pending' OR (claim_token IS NULL AND claimed_until IS NULL));

-- One row per webhook to deliver, written in the transaction that finalises the payment, so a
-- final status is always followed by its webhook, whatever crashes after the commit.
CREATE TABLE webhook_deliveries (
    id               uuid PRIMARY KEY,
    -- The `webhook-id` header: the same for every attempt, and for a resend of the same event,
    -- so merchants can deduplicate on it.
    message_id       text NOT NULL,
    payment_id       uuid NOT NULL REFERENCES payments (id),
    merchant         text NOT NULL,
    event_type       text NOT NULL,
    url              text NOT NULL,
    -- The URL's host: a sender limits attempts in flight per host, so one dead endpoint cannot
    -- take every slot.
    host             text NOT NULL,
    -- The exact body every attempt sends (so the signature covers the same bytes each time).
    payload          jsonb NOT NULL,
    status           text NOT NULL DEFAULT 'pending'
                     CONSTRAINT webhook_deliveries_status_check CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts         integer NOT NULL DEFAULT 0 CONSTRAINT webhook_deliveries_attempts_check CHECK (attempts >= 0),
    -- When the next attempt is due; while an attempt runs, when its claim lapses.
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    last_attempt_at  timestamptz,
    last_status_code integer,
    created_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz
);
-- "What is due now" reads only pending rows, oldest due first.
CREATE INDEX webhook_deliveries_due_idx ON webhook_deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_payment_idx ON webhook_deliveries (payment_id, created_at);

-- Every attempt, for the merchant and for support.
CREATE TABLE webhook_attempts (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    delivery_id   uuid NOT NULL REFERENCES webhook_deliveries (id),
    attempt       integer NOT NULL,
    attempted_at  timestamptz NOT NULL,
    duration_ms   integer NOT NULL,
    status_code   integer,
    error         text,
    -- The first 1 KiB of the response body.
    response_body text,
    CONSTRAINT webhook_attempts_delivery_attempt_key UNIQUE (delivery_id, attempt)
);

-- Every message that reached the dead-letter queue, recorded by dlq-watch before it acks.
CREATE TABLE dead_letters (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id       text NOT NULL CONSTRAINT dead_letters_message_id_key UNIQUE,
    payment_id       uuid,
    reason           text NOT NULL,
    death_count      bigint NOT NULL,
    original_queue   text,
    body             bytea NOT NULL,
    headers          jsonb NOT NULL DEFAULT '{}',
    dead_lettered_at timestamptz NOT NULL DEFAULT now(),
    replayed_at      timestamptz
);
