//! The `webhook_deliveries` and `webhook_attempts` tables.
//!
//! Statements that go to one delivery by id say "still pending" as `finished_at IS NULL`, never
//! `status = 'pending'` (the same rows, by a constraint): a generic plan could otherwise scan the
//! partial index of due deliveries, `WHERE status = 'pending'`, instead of the primary key
//! (migration 000011).

use diesel::prelude::*;
use diesel::sql_types;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use time::OffsetDateTime;
use uuid::Uuid;

use super::prepared;
use super::schema::{webhook_attempts, webhook_deliveries};

#[derive(Debug, Clone, Queryable, QueryableByName, Selectable)]
#[diesel(table_name = webhook_deliveries, check_for_backend(diesel::pg::Pg))]
pub struct Delivery {
    pub id: Uuid,
    pub message_id: String,
    pub payment_id: Uuid,
    pub merchant: String,
    pub event_type: String,
    pub url: String,
    pub host: String,
    pub payload: serde_json::Value,
    pub status: String,
    pub attempts: i32,
    pub next_attempt_at: OffsetDateTime,
    pub last_attempt_at: Option<OffsetDateTime>,
    pub last_status_code: Option<i32>,
    pub created_at: OffsetDateTime,
    pub finished_at: Option<OffsetDateTime>,
    /// The request id of the POST that created the payment: on the sender's log lines.
    pub request_id: Option<String>,
}

/// The columns of [`Delivery`], for hand-written statements: named, never `*`, for the reason
/// given at `payment_columns!` in `db::payments` (prepared statements and added columns).
macro_rules! delivery_columns {
    () => {
        "id, message_id, payment_id, merchant, event_type, url, host, payload, status, attempts, \
         next_attempt_at, last_attempt_at, last_status_code, created_at, finished_at, request_id"
    };
}

#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = webhook_deliveries)]
pub struct NewDelivery<'a> {
    pub id: Uuid,
    pub message_id: &'a str,
    pub payment_id: Uuid,
    pub merchant: &'a str,
    pub event_type: &'a str,
    pub url: &'a str,
    pub host: &'a str,
    pub payload: &'a serde_json::Value,
    pub request_id: Option<&'a str>,
}

pub async fn insert(conn: &mut AsyncPgConnection, d: &NewDelivery<'_>) -> QueryResult<usize> {
    diesel::insert_into(webhook_deliveries::table)
        .values(d)
        .execute(conn)
        .await
}

/// Claims up to `limit` due deliveries for one attempt each, oldest due first, at most `room`
/// more for each host (`room` minus what this sender already has in flight there, given as
/// parallel arrays `hosts` / `in_flight`): counts the attempt and pushes `next_attempt_at` out by
/// `lease`, so a sender that dies mid-attempt leaves the delivery due again once the lease has
/// passed (a live sender renews it with [`renew_claims`] while the attempt runs). Several senders
/// share the work (SKIP LOCKED); candidates not chosen are only locked for the statement.
pub async fn claim_due(
    conn: &mut AsyncPgConnection,
    limit: i64,
    lease: std::time::Duration,
    room: i32,
    hosts: &[String],
    in_flight: &[i32],
) -> QueryResult<Vec<Delivery>> {
    prepared::sql_query(concat!(
        "WITH busy AS (SELECT * FROM unnest($4::text[], $5::int[]) AS b(host, n)), \
         candidates AS ( \
             SELECT id, host, next_attempt_at FROM webhook_deliveries \
             WHERE status = 'pending' AND next_attempt_at <= now() \
               AND host NOT IN (SELECT host FROM busy WHERE n >= $3) \
             ORDER BY next_attempt_at LIMIT $1 * 4 FOR UPDATE SKIP LOCKED), \
         chosen AS ( \
             SELECT id FROM ( \
                 SELECT c.id, c.next_attempt_at, \
                        row_number() OVER (PARTITION BY c.host ORDER BY c.next_attempt_at) \
                          + coalesce((SELECT n FROM busy WHERE busy.host = c.host), 0) AS slot \
                 FROM candidates c) r \
             WHERE slot <= $3 ORDER BY next_attempt_at LIMIT $1) \
         UPDATE webhook_deliveries SET attempts = attempts + 1, last_attempt_at = now(), \
                next_attempt_at = now() + $2 * interval '1 millisecond' \
         WHERE id IN (SELECT id FROM chosen) \
         RETURNING ",
        delivery_columns!()
    ))
    .bind::<sql_types::BigInt, _>(limit)
    .bind::<sql_types::BigInt, _>(super::millis(lease))
    .bind::<sql_types::Integer, _>(room)
    .bind::<sql_types::Array<sql_types::Text>, _>(hosts)
    .bind::<sql_types::Array<sql_types::Integer>, _>(in_flight)
    .load(conn)
    .await
}

/// A claim [`renew_claims`] pushed forward: the delivery and its new lease end.
#[derive(Debug, Clone, QueryableByName)]
pub struct Renewed {
    #[diesel(sql_type = sql_types::Uuid)]
    pub id: Uuid,
    #[diesel(sql_type = sql_types::Timestamptz)]
    pub next_attempt_at: OffsetDateTime,
}

/// Keeps claims alive while their attempts run (the sender's heartbeat): pushes
/// `next_attempt_at` of each claimed delivery to now + `lease`. A claim is given as its delivery
/// id, the attempt number it claimed and the lease end it last wrote (parallel arrays), and is
/// renewed only while that lease end is still in the row: once the attempt is recorded (retry
/// time written) or another sender took the delivery over, the row has moved on and is left
/// alone. Returns the claims renewed, with their new lease ends.
pub async fn renew_claims(
    conn: &mut AsyncPgConnection,
    ids: &[Uuid],
    attempts: &[i32],
    lease_ends: &[OffsetDateTime],
    lease: std::time::Duration,
) -> QueryResult<Vec<Renewed>> {
    prepared::sql_query(
        "UPDATE webhook_deliveries d \
         SET next_attempt_at = now() + $4 * interval '1 millisecond' \
         FROM unnest($1::uuid[], $2::int[], $3::timestamptz[]) AS c(id, attempts, lease_end) \
         WHERE d.id = c.id AND d.attempts = c.attempts AND d.next_attempt_at = c.lease_end \
           AND d.finished_at IS NULL \
         RETURNING d.id, d.next_attempt_at",
    )
    .bind::<sql_types::Array<sql_types::Uuid>, _>(ids)
    .bind::<sql_types::Array<sql_types::Integer>, _>(attempts)
    .bind::<sql_types::Array<sql_types::Timestamptz>, _>(lease_ends)
    .bind::<sql_types::BigInt, _>(super::millis(lease))
    .load(conn)
    .await
}

/// First key of the advisory locks on a payment's deliveries (the two-key form, whose key space
/// does not overlap the one-key form of the migration lock); spells "whk1".
const DELIVERIES_LOCK_CLASS: i32 = 0x7768_6b31;

/// Takes a transaction-level lock on the deliveries of one payment, so that deciding whether to
/// write a new delivery (a resend) happens for one request at a time: the next waits, then sees
/// what the first wrote. Call inside the caller's transaction; it is released at its end.
pub async fn lock_payment_deliveries(
    conn: &mut AsyncPgConnection,
    payment_id: Uuid,
) -> QueryResult<()> {
    // Any 32 bits of the id do: two payments sharing a key only wait for each other.
    let v = payment_id.as_u128();
    let key = (v as u32 ^ (v >> 32) as u32 ^ (v >> 64) as u32 ^ (v >> 96) as u32) as i32;
    prepared::sql_query("SELECT pg_advisory_xact_lock($1, $2)")
        .bind::<sql_types::Integer, _>(DELIVERIES_LOCK_CLASS)
        .bind::<sql_types::Integer, _>(key)
        .execute(conn)
        .await
        .map(|_| ())
}

/// The newest delivery of a payment, if any.
pub async fn latest_for_payment(
    conn: &mut AsyncPgConnection,
    payment_id: Uuid,
) -> QueryResult<Option<Delivery>> {
    webhook_deliveries::table
        .filter(webhook_deliveries::payment_id.eq(payment_id))
        .order((
            webhook_deliveries::created_at.desc(),
            webhook_deliveries::id.desc(),
        ))
        .select(Delivery::as_select())
        .first(conn)
        .await
        .optional()
}

/// Makes a pending delivery due now (a resend while retries are still scheduled), unless an
/// attempt of it is under way (claimed, not yet recorded): that one stays as it is, or a second
/// sender would POST the same webhook beside it. `None` if it is no longer pending.
pub async fn make_due_now(conn: &mut AsyncPgConnection, id: Uuid) -> QueryResult<Option<Delivery>> {
    diesel::sql_query(concat!(
        "UPDATE webhook_deliveries d SET next_attempt_at = CASE \
             WHEN d.attempts > 0 AND NOT EXISTS (SELECT 1 FROM webhook_attempts a \
                  WHERE a.delivery_id = d.id AND a.attempt = d.attempts) \
             THEN d.next_attempt_at ELSE now() END \
         WHERE d.id = $1 AND d.finished_at IS NULL \
         RETURNING ",
        delivery_columns!()
    ))
    .bind::<sql_types::Uuid, _>(id)
    .get_result(conn)
    .await
    .optional()
}

/// Every attempt of every delivery of a payment, oldest first.
pub async fn attempts_for_payment(
    conn: &mut AsyncPgConnection,
    payment_id: Uuid,
) -> QueryResult<Vec<(String, Uuid, Attempt)>> {
    webhook_attempts::table
        .inner_join(webhook_deliveries::table)
        .filter(webhook_deliveries::payment_id.eq(payment_id))
        .order((webhook_attempts::attempted_at, webhook_attempts::id))
        .select((
            webhook_deliveries::message_id,
            webhook_deliveries::id,
            Attempt::as_select(),
        ))
        .load(conn)
        .await
}

#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = webhook_attempts, check_for_backend(diesel::pg::Pg))]
pub struct Attempt {
    pub delivery_id: Uuid,
    pub attempt: i32,
    pub attempted_at: OffsetDateTime,
    pub duration_ms: i32,
    pub status_code: Option<i32>,
    pub error: Option<String>,
    pub response_body: Option<String>,
}

/// What an attempt leaves the delivery as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterAttempt {
    Delivered,
    /// Given up: the schedule is exhausted, or the endpoint answered 410 Gone.
    Failed,
    RetryAt(OffsetDateTime),
}

/// Records an attempt and moves the delivery on, in one transaction.
pub async fn record_attempt(
    conn: &mut AsyncPgConnection,
    attempt: &Attempt,
    next: AfterAttempt,
) -> QueryResult<()> {
    use webhook_deliveries::dsl as d;
    conn.transaction::<_, diesel::result::Error, _>(async |c| {
        diesel::insert_into(webhook_attempts::table)
            .values(attempt)
            .on_conflict_do_nothing()
            .execute(c)
            .await?;
        // Only while this attempt is still the latest claim: a sender that overran its lease
        // must not reset the lease of the one that took over.
        let target = webhook_deliveries::table
            .filter(d::id.eq(attempt.delivery_id))
            .filter(d::finished_at.is_null())
            .filter(d::attempts.eq(attempt.attempt));
        let code = d::last_status_code.eq(attempt.status_code);
        match next {
            AfterAttempt::Delivered => {
                diesel::update(target)
                    .set((
                        d::status.eq("delivered"),
                        d::finished_at.eq(diesel::dsl::now),
                        code,
                    ))
                    .execute(c)
                    .await?
            }
            AfterAttempt::Failed => {
                diesel::update(target)
                    .set((
                        d::status.eq("failed"),
                        d::finished_at.eq(diesel::dsl::now),
                        code,
                    ))
                    .execute(c)
                    .await?
            }
            AfterAttempt::RetryAt(at) => {
                diesel::update(target)
                    .set((d::next_attempt_at.eq(at), code))
                    .execute(c)
                    .await?
            }
        };
        Ok(())
    })
    .await
}
