//! The `payments` table.

use diesel::prelude::*;
use diesel::sql_types;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use rust_decimal::Decimal;
use time::OffsetDateTime;
use uuid::Uuid;

use super::prepared;
use super::schema::payments;
use crate::domain::events::PAYMENT_CREATED;
use crate::domain::{Currency, PaymentStatus};

#[derive(Debug, Clone, Queryable, QueryableByName, Selectable)]
#[diesel(table_name = payments, check_for_backend(diesel::pg::Pg))]
pub struct Payment {
    pub id: Uuid,
    pub merchant: String,
    pub amount: Decimal,
    pub currency: Currency,
    pub description: Option<String>,
    pub metadata: serde_json::Value,
    pub status: PaymentStatus,
    pub idempotency_key: String,
    pub request_fingerprint: Vec<u8>,
    pub webhook_url: Option<String>,
    pub created_at: OffsetDateTime,
    pub processed_at: Option<OffsetDateTime>,
    /// The provider's reference of the charge (final payments charged through a gateway).
    pub charge_id: Option<String>,
    /// Why a failed payment failed: the provider's decline code and message.
    pub failure_code: Option<String>,
    pub failure_message: Option<String>,
    /// The request id of the POST that created it (`domain::correlation`): on every log line
    /// about the payment. Never shown by the API.
    pub request_id: Option<String>,
}

/// The columns of [`Payment`], for hand-written statements. Named, never `*`: a statement is
/// prepared once per connection, and PostgreSQL refuses to run a prepared `SELECT *` or
/// `RETURNING *` after a migration adds a column ("cached plan must not change result type"),
/// which would break every running process during a rolling deploy.
macro_rules! payment_columns {
    () => {
        "id, merchant, amount, currency, description, metadata, status, idempotency_key, \
         request_fingerprint, webhook_url, created_at, processed_at, charge_id, failure_code, \
         failure_message, request_id"
    };
}

// After `payment_columns!`, which it uses.
mod claims;

pub use claims::*;

#[derive(Debug, Clone)]
pub struct NewPayment<'a> {
    pub id: Uuid,
    pub merchant: &'a str,
    pub amount: Decimal,
    pub currency: &'a str,
    pub description: Option<&'a str>,
    pub metadata: &'a serde_json::Value,
    pub idempotency_key: &'a str,
    pub request_fingerprint: &'a [u8],
    pub webhook_url: Option<&'a str>,
    /// Checked by `domain::correlation`: kept on the payment and its outbox event.
    pub request_id: Option<&'a str>,
    /// Checked by `domain::correlation`: kept on the outbox event only.
    pub traceparent: Option<&'a str>,
}

/// Inserts the payment and its `payment.created` outbox row in ONE statement (so one round trip
/// and one implicit transaction: both rows or neither). Returns `None` when the merchant already
/// has a payment with this idempotency key; no outbox row is written then. Concurrent requests
/// with the same key wait on the unique index and get `None`, never an error. The event carries
/// the request id and traceparent to the relay, which puts them in the message's headers.
pub async fn insert_with_event(
    conn: &mut AsyncPgConnection,
    new: &NewPayment<'_>,
) -> QueryResult<Option<Payment>> {
    prepared::sql_query(concat!(
        "WITH p AS ( \
             INSERT INTO payments (id, merchant, amount, currency, description, metadata, \
                                   idempotency_key, request_fingerprint, webhook_url, request_id) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $11) \
             ON CONFLICT (merchant, idempotency_key) DO NOTHING \
             RETURNING ",
        payment_columns!(),
        " ), o AS ( \
             INSERT INTO outbox (event_type, payload, request_id, traceparent) \
             SELECT $10, jsonb_build_object('payment_id', p.id), p.request_id, $12 FROM p \
         ) \
         SELECT * FROM p",
    ))
    .bind::<sql_types::Uuid, _>(new.id)
    .bind::<sql_types::Text, _>(new.merchant)
    .bind::<sql_types::Numeric, _>(new.amount)
    .bind::<sql_types::Text, _>(new.currency)
    .bind::<sql_types::Nullable<sql_types::Text>, _>(new.description)
    .bind::<sql_types::Jsonb, _>(new.metadata)
    .bind::<sql_types::Text, _>(new.idempotency_key)
    .bind::<sql_types::Bytea, _>(new.request_fingerprint)
    .bind::<sql_types::Nullable<sql_types::Text>, _>(new.webhook_url)
    .bind::<sql_types::Text, _>(PAYMENT_CREATED)
    .bind::<sql_types::Nullable<sql_types::Text>, _>(new.request_id)
    .bind::<sql_types::Nullable<sql_types::Text>, _>(new.traceparent)
    .get_result(conn)
    .await
    .optional()
}

pub async fn find_by_idempotency_key(
    conn: &mut AsyncPgConnection,
    merchant: &str,
    key: &str,
) -> QueryResult<Option<Payment>> {
    payments::table
        .filter(payments::merchant.eq(merchant))
        .filter(payments::idempotency_key.eq(key))
        .select(Payment::as_select())
        .first(conn)
        .await
        .optional()
}

/// A payment by id, only if it belongs to `merchant` (another merchant's payment is "not found").
pub async fn find_for_merchant(
    conn: &mut AsyncPgConnection,
    id: Uuid,
    merchant: &str,
) -> QueryResult<Option<Payment>> {
    payments::table
        .filter(payments::id.eq(id))
        .filter(payments::merchant.eq(merchant))
        .select(Payment::as_select())
        .first(conn)
        .await
        .optional()
}

pub async fn find(conn: &mut AsyncPgConnection, id: Uuid) -> QueryResult<Option<Payment>> {
    payments::table
        .find(id)
        .select(Payment::as_select())
        .first(conn)
        .await
        .optional()
}

/// `SELECT` of [`PaymentView`]: the payment `p` and its newest webhook delivery `d` (whose
/// columns are all named `webhook_*`, so the payment's columns need no table prefix).
macro_rules! view_select {
    () => {
        concat!(
            "SELECT ",
            payment_columns!(),
            ", webhook_status, webhook_attempts, webhook_last_attempt_at, \
               webhook_last_status_code, webhook_next_attempt_at \
             FROM payments p \
             LEFT JOIN LATERAL (SELECT status AS webhook_status, attempts AS webhook_attempts, \
                                       last_attempt_at AS webhook_last_attempt_at, \
                                       last_status_code AS webhook_last_status_code, \
                                       next_attempt_at AS webhook_next_attempt_at \
                                FROM webhook_deliveries w WHERE w.payment_id = p.id \
                                ORDER BY w.created_at DESC, w.id DESC LIMIT 1) d ON true"
        )
    };
}

/// A payment with the state of its newest webhook delivery, read in one round trip.
#[derive(Debug, Clone, QueryableByName)]
pub struct PaymentView {
    #[diesel(embed)]
    pub payment: Payment,
    #[diesel(sql_type = sql_types::Nullable<sql_types::Text>)]
    pub webhook_status: Option<String>,
    #[diesel(sql_type = sql_types::Nullable<sql_types::Integer>)]
    pub webhook_attempts: Option<i32>,
    #[diesel(sql_type = sql_types::Nullable<sql_types::Timestamptz>)]
    pub webhook_last_attempt_at: Option<OffsetDateTime>,
    #[diesel(sql_type = sql_types::Nullable<sql_types::Integer>)]
    pub webhook_last_status_code: Option<i32>,
    #[diesel(sql_type = sql_types::Nullable<sql_types::Timestamptz>)]
    pub webhook_next_attempt_at: Option<OffsetDateTime>,
}

/// [`find_for_merchant`] plus the newest webhook delivery, in one statement.
pub async fn view_for_merchant(
    conn: &mut AsyncPgConnection,
    id: Uuid,
    merchant: &str,
) -> QueryResult<Option<PaymentView>> {
    prepared::sql_query(concat!(
        view_select!(),
        " WHERE p.id = $1 AND p.merchant = $2"
    ))
    .bind::<sql_types::Uuid, _>(id)
    .bind::<sql_types::Text, _>(merchant)
    .get_result(conn)
    .await
    .optional()
}

/// Filters of the payment list.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub status: Option<crate::domain::PaymentStatus>,
    pub created_after: Option<OffsetDateTime>,
    pub created_before: Option<OffsetDateTime>,
    /// Continue after this (created_at, id), exclusive.
    pub after: Option<(OffsetDateTime, Uuid)>,
}

/// A merchant's payments, newest first (created_at, then id), at most `limit`, each with its
/// newest webhook delivery. Left to `diesel::sql_query` (planned per call): with its catch-all
/// filters a cached generic plan could not use the values given.
pub async fn list_for_merchant(
    conn: &mut AsyncPgConnection,
    merchant: &str,
    filter: &ListFilter,
    limit: i64,
) -> QueryResult<Vec<PaymentView>> {
    diesel::sql_query(concat!(
        view_select!(),
        " WHERE p.merchant = $1 \
           AND ($2::text IS NULL OR p.status = $2) \
           AND ($3::timestamptz IS NULL OR p.created_at > $3) \
           AND ($4::timestamptz IS NULL OR p.created_at < $4) \
           AND ($5::timestamptz IS NULL OR (p.created_at, p.id) < ($5, $6)) \
         ORDER BY p.created_at DESC, p.id DESC \
         LIMIT $7"
    ))
    .bind::<sql_types::Text, _>(merchant)
    .bind::<sql_types::Nullable<sql_types::Text>, _>(filter.status.map(|s| s.as_str()))
    .bind::<sql_types::Nullable<sql_types::Timestamptz>, _>(filter.created_after)
    .bind::<sql_types::Nullable<sql_types::Timestamptz>, _>(filter.created_before)
    .bind::<sql_types::Nullable<sql_types::Timestamptz>, _>(filter.after.map(|a| a.0))
    .bind::<sql_types::Nullable<sql_types::Uuid>, _>(filter.after.map(|a| a.1))
    .bind::<sql_types::BigInt, _>(limit)
    .load(conn)
    .await
}
