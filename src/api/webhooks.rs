//! `GET /api/v1/payments/{id}/webhook-attempts` and `POST /api/v1/payments/{id}/webhook/resend`.

use actix_web::{HttpRequest, HttpResponse, web};
use diesel_async::AsyncConnection;
use serde::Serialize;
use time::OffsetDateTime;
use uuid::Uuid;

use super::payments::payment_id;
use super::{AppState, authenticate};
use crate::api::error::{ApiError, ErrorBody};
use crate::db::payments as payments_db;
use crate::db::webhooks as webhooks_db;
use crate::db::{self, DbError};
use crate::domain::PaymentStatus;
use crate::webhook;

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AttemptOut {
    /// The `webhook-id` header the attempt carried.
    pub webhook_id: String,
    pub delivery_id: Uuid,
    pub attempt: i32,
    #[serde(with = "time::serde::rfc3339")]
    pub attempted_at: OffsetDateTime,
    pub duration_ms: i32,
    pub status_code: Option<i32>,
    pub error: Option<String>,
    /// The first 1 KiB of the response body.
    pub response_body: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AttemptsOut {
    pub payment_id: Uuid,
    pub attempts: Vec<AttemptOut>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ResendOut {
    pub payment_id: Uuid,
    pub delivery_id: Uuid,
    pub webhook_id: String,
    pub status: &'static str,
}

/// List webhook attempts
///
/// Every attempt to deliver the payment's webhook, oldest first.
#[utoipa::path(
    get,
    path = "/api/v1/payments/{id}/webhook-attempts",
    tag = "webhooks",
    params(("id" = String, Path, description = "Payment id (UUID)")),
    responses(
        (status = 200, description = "The attempts", body = AttemptsOut),
        (status = 401, description = "Missing or unknown X-API-Key", body = ErrorBody),
        (status = 404, description = "Unknown id, malformed id, or another merchant's payment", body = ErrorBody),
        (status = 503, description = "Database unavailable; retry", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn attempts(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let merchant = authenticate(&req, &state)?;
    let id = payment_id(path)?;
    let rows = db::with_timeout(state.db_deadline, async {
        let mut conn = db::conn(&state.pool).await?;
        if payments_db::find_for_merchant(&mut conn, id, &merchant)
            .await?
            .is_none()
        {
            return Ok(None);
        }
        Ok(Some(
            webhooks_db::attempts_for_payment(&mut conn, id).await?,
        ))
    })
    .await?
    .ok_or(ApiError::NotFound("payment"))?;
    let attempts = rows
        .into_iter()
        .map(|(webhook_id, delivery_id, a)| AttemptOut {
            webhook_id,
            delivery_id,
            attempt: a.attempt,
            attempted_at: a.attempted_at,
            duration_ms: a.duration_ms,
            status_code: a.status_code,
            error: a.error,
            response_body: a.response_body,
        })
        .collect();
    Ok(HttpResponse::Ok().json(AttemptsOut {
        payment_id: id,
        attempts,
    }))
}

/// Resend the webhook
///
/// Schedules the payment's webhook again, now: for a merchant whose endpoint was down past the
/// retry schedule. A delivery still pending is made due now; otherwise a new delivery is written
/// with the same `webhook-id` as the last one (it is the same event) and a fresh schedule. A
/// payment has at most one pending delivery: racing resends answer the same one.
#[utoipa::path(
    post,
    path = "/api/v1/payments/{id}/webhook/resend",
    tag = "webhooks",
    params(("id" = String, Path, description = "Payment id (UUID)")),
    responses(
        (status = 202, description = "Scheduled", body = ResendOut),
        (status = 401, description = "Missing or unknown X-API-Key", body = ErrorBody),
        (status = 404, description = "Unknown id, malformed id, or another merchant's payment", body = ErrorBody),
        (status = 409, description = "No webhook_url (`no_webhook_url`) or not final yet (`payment_not_final`)", body = ErrorBody),
        (status = 503, description = "Database unavailable; retry", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn resend(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let merchant = authenticate(&req, &state)?;
    let id = payment_id(path)?;
    let outcome = db::with_timeout(state.db_deadline, async {
        let mut conn = db::conn(&state.pool).await?;
        // One transaction, and one resend of a payment at a time: two racing resends make one
        // delivery (the second finds it pending and makes it due), never two.
        conn.transaction::<_, DbError, _>(async |c| {
            let Some(p) = payments_db::find_for_merchant(c, id, &merchant).await? else {
                return Ok(Err(ApiError::NotFound("payment")));
            };
            if p.webhook_url.is_none() {
                return Ok(Err(ApiError::Conflict(
                    "no_webhook_url",
                    "this payment was created without a webhook_url".into(),
                )));
            }
            if p.status == PaymentStatus::Pending {
                return Ok(Err(ApiError::Conflict(
                    "payment_not_final",
                    "the payment is still pending; its webhook is sent once it is final".into(),
                )));
            }
            webhooks_db::lock_payment_deliveries(c, id).await?;
            let latest = webhooks_db::latest_for_payment(c, id).await?;
            if let Some(d) = &latest
                && d.status == "pending"
                && let Some(d) = webhooks_db::make_due_now(c, d.id).await?
            {
                return Ok(Ok((d.id, d.message_id)));
            }
            let message_id = latest.as_ref().map(|d| d.message_id.as_str());
            let Some(written) = webhook::schedule(c, &p, message_id).await? else {
                return Err(DbError::Other(anyhow::anyhow!(
                    "payment {id} has a webhook_url but no delivery was written"
                )));
            };
            Ok(Ok(written))
        })
        .await
    })
    .await?;
    let (delivery_id, webhook_id) = outcome?;
    log::info!(
        "webhook of payment {id} resend requested by merchant {merchant}: delivery {delivery_id}"
    );
    Ok(HttpResponse::Accepted().json(ResendOut {
        payment_id: id,
        delivery_id,
        webhook_id,
        status: "pending",
    }))
}
