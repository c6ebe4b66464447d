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

#[derive(Debug, Clone, Queryable, QueryableByName, Selectable)]
#[diesel(table_name = payments, check_for_backend(diesel::pg::Pg))]
pub struct Payment {
    pub id: Uuid,
    pub merchant: String,
    pub amount: Decimal,
    pub currency: String,
    pub description: Option<String>,
    pub metadata: serde_json::Value,
    pub status: String,
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

/// A payment claimed for a gateway call, with what an earlier call left behind.
#[derive(Debug, Clone, QueryableByName)]
pub struct Claimed {
    #[diesel(embed)]
    pub payment: Payment,
    /// The gateway state before this claim: `None` if no charge request was ever sent (POST it),
    /// `charging` or `unknown` if one may have been (ask the provider's status first).
    #[diesel(sql_type = sql_types::Nullable<sql_types::Text>)]
    pub prior_gateway_state: Option<String>,
    /// Unknown answers in a row so far (the backoff of the next check grows with it).
    #[diesel(sql_type = sql_types::Integer)]
    pub gateway_checks: i32,
}

/// Claims a pending payment for `lease` under `token`, unless another live claim holds it, to
/// call the gateway: marks it `charging` (a request may leave from now on) and due for a status
/// check when the claim ends, so a claim abandoned mid-call is reconciled even if its message is
/// gone. `None`: unknown, already final, or claimed by someone else (see [`claim_state`]).
pub async fn claim(
    conn: &mut AsyncPgConnection,
    id: Uuid,
    token: Uuid,
    lease: std::time::Duration,
) -> QueryResult<Option<Claimed>> {
    prepared::sql_query(concat!(
        "WITH prior AS ( \
             SELECT id AS prior_id, gateway_state AS prior_gateway_state FROM payments \
             WHERE id = $1 AND status = 'pending' \
               AND (claimed_until IS NULL OR claimed_until < now()) \
             FOR UPDATE) \
         UPDATE payments p SET claim_token = $2, \
                claimed_until = now() + $3 * interval '1 millisecond', \
                next_check_at = now() + $3 * interval '1 millisecond', \
                gateway_state = coalesce(p.gateway_state, 'charging') \
         FROM prior WHERE p.id = prior.prior_id \
         RETURNING prior_gateway_state, gateway_checks, ",
        payment_columns!()
    ))
    .bind::<sql_types::Uuid, _>(id)
    .bind::<sql_types::Uuid, _>(token)
    .bind::<sql_types::BigInt, _>(millis(lease))
    .get_result(conn)
    .await
    .optional()
}

/// Claims up to `limit` payments whose status check is due (an unknown outcome, or a claim
/// abandoned mid-call), oldest due first, for `lease` under `token`. Several processes share the
/// work: rows another one holds are skipped.
pub async fn claim_due_checks(
    conn: &mut AsyncPgConnection,
    token: Uuid,
    lease: std::time::Duration,
    limit: i64,
) -> QueryResult<Vec<Claimed>> {
    prepared::sql_query(concat!(
        "WITH prior AS ( \
             SELECT id AS prior_id, gateway_state AS prior_gateway_state FROM payments \
             WHERE next_check_at <= now() AND status = 'pending' \
               AND (claimed_until IS NULL OR claimed_until < now()) \
             ORDER BY next_check_at LIMIT $3 \
             FOR UPDATE SKIP LOCKED) \
         UPDATE payments p SET claim_token = $1, \
                claimed_until = now() + $2 * interval '1 millisecond', \
                next_check_at = now() + $2 * interval '1 millisecond', \
                gateway_state = coalesce(p.gateway_state, 'charging') \
         FROM prior WHERE p.id = prior.prior_id \
         RETURNING prior_gateway_state, gateway_checks, ",
        payment_columns!()
    ))
    .bind::<sql_types::Uuid, _>(token)
    .bind::<sql_types::BigInt, _>(millis(lease))
    .bind::<sql_types::BigInt, _>(limit)
    .load(conn)
    .await
}

fn millis(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Extends this holder's claim by `lease` from now (and the check that follows it), before
/// another gateway call. `false` if the claim is no longer ours: do not call.
pub async fn renew_claim(
    conn: &mut AsyncPgConnection,
    id: Uuid,
    token: Uuid,
    lease: std::time::Duration,
) -> QueryResult<bool> {
    let n = prepared::sql_query(
        "UPDATE payments SET claimed_until = now() + $3 * interval '1 millisecond', \
                next_check_at = now() + $3 * interval '1 millisecond' \
         WHERE id = $1 AND status = 'pending' AND claim_token = $2",
    )
    .bind::<sql_types::Uuid, _>(id)
    .bind::<sql_types::Uuid, _>(token)
    .bind::<sql_types::BigInt, _>(millis(lease))
    .execute(conn)
    .await?;
    Ok(n == 1)
}

/// Records an unknown gateway outcome of a claimed payment: it stays pending, the claim ends,
/// and the provider is asked about it after `recheck`. `false` if this consumer no longer held
/// the claim (nothing changed).
pub async fn record_unknown(
    conn: &mut AsyncPgConnection,
    id: Uuid,
    token: Uuid,
    reason: &str,
    recheck: std::time::Duration,
) -> QueryResult<bool> {
    let n = prepared::sql_query(
        "UPDATE payments SET gateway_state = 'unknown', gateway_reason = $3, \
                gateway_checks = gateway_checks + 1, \
                next_check_at = now() + $4 * interval '1 millisecond', \
                claim_token = NULL, claimed_until = NULL \
         WHERE id = $1 AND status = 'pending' AND claim_token = $2",
    )
    .bind::<sql_types::Uuid, _>(id)
    .bind::<sql_types::Uuid, _>(token)
    .bind::<sql_types::Text, _>(reason)
    .bind::<sql_types::BigInt, _>(millis(recheck))
    .execute(conn)
    .await?;
    Ok(n == 1)
}

/// Payments awaiting reconciliation and payments stuck pending, for the gauges.
#[derive(Debug, Clone, Copy, QueryableByName)]
pub struct PendingHealth {
    /// Pending with an unknown gateway outcome, or whose claim lapsed in the middle of a call
    /// (both wait for the provider's status).
    #[diesel(sql_type = sql_types::BigInt)]
    pub unknown: i64,
    /// Pending for longer than the given age.
    #[diesel(sql_type = sql_types::BigInt)]
    pub stuck: i64,
    /// The oldest stuck one, to name in the log.
    #[diesel(sql_type = sql_types::Nullable<sql_types::Uuid>)]
    pub oldest_stuck: Option<Uuid>,
}

/// Counts both, each through its partial index.
pub async fn pending_health(
    conn: &mut AsyncPgConnection,
    stuck_after: std::time::Duration,
) -> QueryResult<PendingHealth> {
    prepared::sql_query(
        "SELECT (SELECT count(*) FROM payments \
                 WHERE next_check_at IS NOT NULL AND (gateway_state = 'unknown' \
                       OR (gateway_state = 'charging' AND claimed_until < now()))) AS unknown, \
                (SELECT count(*) FROM payments WHERE status = 'pending' \
                 AND created_at < now() - $1 * interval '1 millisecond') AS stuck, \
                (SELECT id FROM payments WHERE status = 'pending' \
                 AND created_at < now() - $1 * interval '1 millisecond' \
                 ORDER BY created_at LIMIT 1) AS oldest_stuck",
    )
    .bind::<sql_types::BigInt, _>(millis(stuck_after))
    .get_result(conn)
    .await
}

/// Where a payment stands for a consumer that could not claim it.
#[derive(Debug, Clone, QueryableByName)]
pub struct ClaimState {
    #[diesel(sql_type = sql_types::Text)]
    pub status: String,
    /// How long the current claim still runs (zero or negative when it has lapsed).
    #[diesel(sql_type = sql_types::Nullable<sql_types::BigInt>)]
    pub claim_left_ms: Option<i64>,
}

pub async fn claim_state(
    conn: &mut AsyncPgConnection,
    id: Uuid,
) -> QueryResult<Option<ClaimState>> {
    prepared::sql_query(
        "SELECT status, (extract(epoch FROM claimed_until - now()) * 1000)::bigint AS claim_left_ms \
         FROM payments WHERE id = $1",
    )
    .bind::<sql_types::Uuid, _>(id)
    .get_result(conn)
    .await
    .optional()
}

/// What a gateway's final answer writes on the payment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome<'a> {
    pub status: crate::domain::PaymentStatus,
    pub charge_id: Option<&'a str>,
    /// `(code, message)` of a declined payment.
    pub failure: Option<(&'a str, &'a str)>,
}

/// Moves a claimed payment to its final status, once: only the holder of `token` can, and only
/// while it is pending. `None` means this consumer no longer holds it (nothing was changed).
pub async fn finalise(
    conn: &mut AsyncPgConnection,
    id: Uuid,
    token: Uuid,
    outcome: Outcome<'_>,
) -> QueryResult<Option<Payment>> {
    prepared::sql_query(concat!(
        "UPDATE payments SET status = $3, processed_at = now(), claim_token = NULL, \
                claimed_until = NULL, gateway_state = NULL, gateway_reason = NULL, \
                next_check_at = NULL, charge_id = $4, failure_code = $5, failure_message = $6 \
         WHERE id = $1 AND status = 'pending' AND claim_token = $2 \
         RETURNING ",
        payment_columns!()
    ))
    .bind::<sql_types::Uuid, _>(id)
    .bind::<sql_types::Uuid, _>(token)
    .bind::<sql_types::Text, _>(outcome.status.as_str())
    .bind::<sql_types::Nullable<sql_types::Text>, _>(outcome.charge_id)
    .bind::<sql_types::Nullable<sql_types::Text>, _>(outcome.failure.map(|f| f.0))
    .bind::<sql_types::Nullable<sql_types::Text>, _>(outcome.failure.map(|f| f.1))
    .get_result(conn)
    .await
    .optional()
}

/// Gives up claims, each `(payment id, claim token)` (a consumer shutting down, or a gateway
/// error), so the redelivered messages are processed at once instead of after the lease. Goes
/// by primary key: no scan.
pub async fn release_claims(
    conn: &mut AsyncPgConnection,
    claims: &[(Uuid, Uuid)],
) -> QueryResult<usize> {
    let (ids, tokens): (Vec<Uuid>, Vec<Uuid>) = claims.iter().copied().unzip();
    prepared::sql_query(
        "UPDATE payments p SET claim_token = NULL, claimed_until = NULL \
         FROM unnest($1::uuid[], $2::uuid[]) AS c(id, token) \
         WHERE p.id = c.id AND p.claim_token = c.token AND p.status = 'pending'",
    )
    .bind::<sql_types::Array<sql_types::Uuid>, _>(ids)
    .bind::<sql_types::Array<sql_types::Uuid>, _>(tokens)
    .execute(conn)
    .await
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
