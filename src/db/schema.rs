// @generated automatically by Diesel CLI.

diesel::table! {
    dead_letters (id) {
        id -> Int8,
        message_id -> Text,
        payment_id -> Nullable<Uuid>,
        reason -> Text,
        death_count -> Int8,
        original_queue -> Nullable<Text>,
        body -> Bytea,
        headers -> Jsonb,
        dead_lettered_at -> Timestamptz,
        replayed_at -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    outbox (id) {
        id -> Int8,
        event_type -> Text,
        payload -> Jsonb,
        created_at -> Timestamptz,
        published_at -> Nullable<Timestamptz>,
        request_id -> Nullable<Text>,
        traceparent -> Nullable<Text>,
    }
}

diesel::table! {
    payments (id) {
        id -> Uuid,
        merchant -> Text,
        amount -> Numeric,
        currency -> Text,
        description -> Nullable<Text>,
        metadata -> Jsonb,
        status -> Text,
        #[max_length = 255]
        idempotency_key -> Varchar,
        request_fingerprint -> Bytea,
        webhook_url -> Nullable<Text>,
        created_at -> Timestamptz,
        processed_at -> Nullable<Timestamptz>,
        claim_token -> Nullable<Uuid>,
        claimed_until -> Nullable<Timestamptz>,
        gateway_state -> Nullable<Text>,
        gateway_reason -> Nullable<Text>,
        gateway_checks -> Int4,
        next_check_at -> Nullable<Timestamptz>,
        charge_id -> Nullable<Text>,
        failure_code -> Nullable<Text>,
        failure_message -> Nullable<Text>,
        request_id -> Nullable<Text>,
    }
}

diesel::table! {
    webhook_attempts (id) {
        id -> Int8,
        delivery_id -> Uuid,
        attempt -> Int4,
        attempted_at -> Timestamptz,
        duration_ms -> Int4,
        status_code -> Nullable<Int4>,
        error -> Nullable<Text>,
        response_body -> Nullable<Text>,
    }
}

diesel::table! {
    webhook_deliveries (id) {
        id -> Uuid,
        message_id -> Text,
        payment_id -> Uuid,
        merchant -> Text,
        event_type -> Text,
        url -> Text,
        host -> Text,
        payload -> Jsonb,
        status -> Text,
        attempts -> Int4,
        next_attempt_at -> Timestamptz,
        last_attempt_at -> Nullable<Timestamptz>,
        last_status_code -> Nullable<Int4>,
        created_at -> Timestamptz,
        finished_at -> Nullable<Timestamptz>,
        request_id -> Nullable<Text>,
    }
}

diesel::joinable!(webhook_attempts -> webhook_deliveries (delivery_id));
diesel::joinable!(webhook_deliveries -> payments (payment_id));

diesel::allow_tables_to_appear_in_same_query!(
    dead_letters,
    outbox,
    payments,
    webhook_attempts,
    webhook_deliveries,
);
