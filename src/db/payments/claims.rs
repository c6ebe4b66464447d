//! The processing state of a payment: the claim a consumer holds while it asks the gateway,
//! the unknown outcomes waiting for a status check, and the final outcome written once.

use diesel::prelude::*;
use diesel::sql_types;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::Payment;
use crate::db::{millis, prepared};

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

/// The claim statement for the payments `prior` selects (and locks): claimed under `$2` for `$3`
/// milliseconds, marked `charging`, due for a status check when the claim ends; returns each
/// with its gateway state before the claim.
macro_rules! claim_statement {
    ($prior:literal) => {
        concat!(
            "WITH prior AS ( \
                 SELECT id AS prior_id, gateway_state AS prior_gateway_state FROM payments \
                 WHERE ",
            $prior,
            ") \
             UPDATE payments p SET claim_token = $2, \
                    claimed_until = now() + $3 * interval '1 millisecond', \
                    next_check_at = now() + $3 * interval '1 millisecond', \
                    gateway_state = coalesce(p.gateway_state, 'charging') \
             FROM prior WHERE p.id = prior.prior_id \
             RETURNING prior_gateway_state, gateway_checks, ",
            payment_columns!()
        )
    };
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
    prepared::sql_query(claim_statement!(
        "id = $1 AND status = 'pending' AND (claimed_until IS NULL OR claimed_until < now()) \
         FOR UPDATE"
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
    prepared::sql_query(claim_statement!(
        "next_check_at <= now() AND status = 'pending' \
         AND (claimed_until IS NULL OR claimed_until < now()) \
         ORDER BY next_check_at LIMIT $1 FOR UPDATE SKIP LOCKED"
    ))
    .bind::<sql_types::BigInt, _>(limit)
    .bind::<sql_types::Uuid, _>(token)
    .bind::<sql_types::BigInt, _>(millis(lease))
    .load(conn)
    .await
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

/// Counts both, each through its partial index (`processed_at IS NULL` is how "pending" is said
/// here: see migration 000010 for why the index does not say `status = 'pending'`).
pub async fn pending_health(
    conn: &mut AsyncPgConnection,
    stuck_after: std::time::Duration,
) -> QueryResult<PendingHealth> {
    prepared::sql_query(
        "SELECT (SELECT count(*) FROM payments \
                 WHERE next_check_at IS NOT NULL AND (gateway_state = 'unknown' \
                       OR (gateway_state = 'charging' \
                           AND coalesce(claimed_until, '-infinity') < now()))) AS unknown, \
                (SELECT count(*) FROM payments WHERE processed_at IS NULL \
                 AND created_at < now() - $1 * interval '1 millisecond') AS stuck, \
                (SELECT id FROM payments WHERE processed_at IS NULL \
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
    pub status: crate::domain::PaymentStatus,
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
