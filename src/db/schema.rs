// @generated automatically by Diesel CLI.

diesel::table! {
    outbox (id) {
        id -> Int8,
        event_type -> Text,
        payload -> Jsonb,
        created_at -> Timestamptz,
        published_at -> Nullable<Timestamptz>,
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
    }
}

diesel::allow_tables_to_appear_in_same_query!(outbox, payments,);
