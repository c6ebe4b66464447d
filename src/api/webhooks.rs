//! `GET /api/v1/payments/{id}/webhook-attempts` and `POST /api/v1/payments/{id}/webhook/resend`.

use actix_web::{HttpRequest, HttpResponse, web};
use serde::Serialize;
use time::OffsetDateTime;
use uuid::Uuid;

use super::{AppState, authenticate};
use crate::db::payments as payments_db;
use crate::db::webhooks as webhooks_db;
use crate::db::{self, DbError};
use crate::error::ApiError;
use crate::webhook;

#[derive(Debug, Serialize)]
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

#[derive(Debug, Serialize)]
pub struct AttemptsOut {
    pub payment_id: Uuid,
    pub attempts: Vec<AttemptOut>,
}

#[derive(Debug, Serialize)]
pub struct ResendOut {
    pub payment_id: Uuid,
    pub delivery_id: Uuid,
    pub webhook_id: String,
    pub status: &'static str,
}

fn payment_id(path: web::Path<String>) -> Result<Uuid, ApiError> {
    Uuid::parse_str(&path.into_inner()).map_err(|_| ApiError::NotFound("payment"))
}

/// Every attempt to deliver the payment's webhook, oldest first.
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

/// Schedules the payment's webhook again, now: for a merchant whose endpoint was down past the
/// retry schedule. A delivery still pending is made due now; otherwise a new delivery is written
/// with the same `webhook-id` as the last one (it is the same event) and a fresh schedule.
pub async fn resend(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let merchant = authenticate(&req, &state)?;
    let id = payment_id(path)?;
    let outcome = db::with_timeout(state.db_deadline, async {
        let mut conn = db::conn(&state.pool).await?;
        let Some(p) = payments_db::find_for_merchant(&mut conn, id, &merchant).await? else {
            return Ok(Err(ApiError::NotFound("payment")));
        };
        if p.webhook_url.is_none() {
            return Ok(Err(ApiError::Conflict(
                "no_webhook_url",
                "this payment was created without a webhook_url".into(),
            )));
        }
        if p.status == "pending" {
            return Ok(Err(ApiError::Conflict(
                "payment_not_final",
                "the payment is still pending; its webhook is sent once it is final".into(),
            )));
        }
        let latest = webhooks_db::latest_for_payment(&mut conn, id).await?;
        if let Some(d) = &latest
            && d.status == "pending"
            && let Some(d) = webhooks_db::make_due_now(&mut conn, d.id).await?
        {
            return Ok(Ok((d.id, d.message_id)));
        }
        let message_id = latest.as_ref().map(|d| d.message_id.as_str());
        let Some(delivery_id) = webhook::schedule(&mut conn, &p, message_id).await? else {
            return Err(DbError::Other(anyhow::anyhow!(
                "payment {id} has a webhook_url but no delivery was written"
            )));
        };
        let written = webhooks_db::latest_for_payment(&mut conn, id).await?;
        let webhook_id = written.map(|d| d.message_id).unwrap_or_default();
        Ok(Ok((delivery_id, webhook_id)))
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
