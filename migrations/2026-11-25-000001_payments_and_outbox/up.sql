-- Payments and the transactional outbox. Every rule the API enforces is also a constraint here,
-- so no other writer (a script, a future service) can store a row the API would refuse.

CREATE TABLE payments (
    id                  uuid PRIMARY KEY,
    merchant            text NOT NULL CONSTRAINT payments_merchant_check CHECK (merchant <> ''),
    amount              numeric(18, 2) NOT NULL CONSTRAINT payments_amount_check CHECK (amount > 0),
    currency            text NOT NULL CONSTRAINT payments_currency_check CHECK (currency IN ('RUB', 'USD', 'EUR')),
    description         text CONSTRAINT payments_description_check CHECK (char_length(description) <= 1000),
    metadata            jsonb NOT NULL DEFAULT '{}'
                        CONSTRAINT payments_metadata_check
                        CHECK (jsonb_typeof(metadata) = 'object' AND octet_length(metadata::text) <= 16384),
    status              text NOT NULL DEFAULT 'pending'
                        CONSTRAINT payments_status_check CHECK (status IN ('pending', 'succeeded', 'failed')),
    idempotency_key     varchar(255) NOT NULL CONSTRAINT payments_idempotency_key_check CHECK (idempotency_key <> ''),
    -- SHA-256 of the request's canonical form: the same key with another body is a 409.
    request_fingerprint bytea NOT NULL CONSTRAINT payments_request_fingerprint_check CHECK (octet_length(request_fingerprint) = 32),
    webhook_url         text CONSTRAINT payments_webhook_url_check
                        CHECK (char_length(webhook_url) <= 2048 AND webhook_url ~ '^https?://[^[:space:]]+$'),
    created_at          timestamptz NOT NULL DEFAULT now(),
    processed_at        timestamptz,
    -- A payment is final exactly when it has been processed.
    CONSTRAINT payments_processed_at_check CHECK ((status = 'pending') = (processed_at IS NULL)),
    CONSTRAINT payments_merchant_idempotency_key_key UNIQUE (merchant, idempotency_key)
);

CREATE TABLE outbox (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_type   text NOT NULL CONSTRAINT outbox_event_type_check CHECK (event_type <> ''),
    payload      jsonb NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz
);

-- "Oldest unpublished first" reads only this index, however many published rows the table
-- holds: it contains just the unpublished ones, in id (= insertion) order.
CREATE INDEX outbox_unpublished_idx ON outbox (id) WHERE published_at IS NULL;
