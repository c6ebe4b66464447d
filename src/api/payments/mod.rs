//! `POST /api/v1/payments` and `GET /api/v1/payments/{id}`; the list is in [`list`], the
//! request's parsing in [`request`], the answers' shapes in [`response`].

pub mod list;
pub mod request;
pub mod response;

use actix_web::http::header::LOCATION;
use actix_web::{HttpRequest, HttpResponse, web};
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use uuid::Uuid;

use super::{AppState, authenticate, read_body};
use crate::api::error::{ApiError, ErrorBody};
use crate::db::payments::{self as payments_db, NewPayment, Payment};
use crate::db::{self, DbError};
use crate::domain;
pub use request::PaymentRequest;
use request::{PaymentIn, check_content_type, idempotency_key};
use response::{CreatedOut, PaymentOut};

/// How long creation waits for DNS when checking a webhook host; a name that does not resolve in
/// time is accepted and checked again at delivery.
const SSRF_RESOLVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);
enum Created {
    New(Payment),
    Replayed(Payment),
}

/// Maps a CHECK violation to the field it guards: the database has the last word on every rule.
fn constraint_error(e: &DieselError) -> Option<ApiError> {
    let DieselError::DatabaseError(DatabaseErrorKind::CheckViolation, info) = e else {
        return None;
    };
    let field = match info.constraint_name()? {
        "payments_amount_check" => "amount",
        "payments_currency_check" => "currency",
        "payments_description_check" => "description",
        "payments_metadata_check" => "metadata",
        "payments_webhook_url_check" => "webhook_url",
        "payments_idempotency_key_check" => "idempotency_key",
        _ => return None,
    };
    Some(ApiError::validation(
        field,
        "is not accepted by the database's rules",
    ))
}

/// Create a payment
///
/// Stores the payment and its `payment.created` event in one transaction and answers at once;
/// processing happens asynchronously. Idempotent per merchant and `Idempotency-Key`.
#[utoipa::path(
    post,
    path = "/api/v1/payments",
    tag = "payments",
    request_body(content = PaymentIn, content_type = "application/json"),
    params(
        ("Idempotency-Key" = String, Header, pattern = "^[!-~]{1,255}$",
            description = "Unique per payment (1 to 255 characters; visible ASCII is always safe); a retry with the same key and body returns the same payment"),
        ("X-Request-Id" = Option<String>, Header,
            description = "Your id of this request (1 to 128 visible ASCII characters; otherwise one is made up), echoed in the response; every log line about the payment, in every process, names it"),
        ("traceparent" = Option<String>, Header,
            description = "W3C Trace Context of the caller; kept with the payment's event (and passed to the consumer) only if valid"),
    ),
    responses(
        (status = 202, description = "Accepted (or replayed: header Idempotent-Replayed: true)", body = CreatedOut,
            headers(("Location" = String, description = "URL of the payment"))),
        (status = 400, description = "Malformed JSON or a missing/invalid Idempotency-Key", body = ErrorBody),
        (status = 401, description = "Missing or unknown X-API-Key", body = ErrorBody),
        (status = 409, description = "The Idempotency-Key was used with another body", body = ErrorBody),
        (status = 413, description = "Body over server.max_body", body = ErrorBody),
        (status = 415, description = "Content-Type is not JSON", body = ErrorBody),
        (status = 422, description = "A field breaks a rule; `field` names it. For `webhook_url` also: a port outside `webhook.allowed_ports` (default 80, 443, 8080, 8443), or a host that is or resolves to an address that is not globally reachable (the message names the range and its RFC)", body = ErrorBody),
        (status = 503, description = "Database unavailable; retry", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn create(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let merchant = authenticate(&req, &state)?;
    let key = idempotency_key(&req)?;
    check_content_type(&req)?;
    let body = read_body(&req, payload, state.max_body).await?;
    let input = PaymentRequest::parse(&body)?;
    if let Some(url) = &input.webhook_url
        && !state.allow_private_targets
    {
        let parsed = url::Url::parse(url)
            .map_err(|_| ApiError::validation("webhook_url", "is not a valid URL"))?;
        crate::ssrf::check_target(&parsed, &state.webhook_ports, SSRF_RESOLVE_TIMEOUT)
            .await
            .map_err(|e| ApiError::validation("webhook_url", e.to_string()))?;
    }
    let fingerprint = input.fingerprint();
    let correlation = super::request_id::correlation(&req);
    let new = NewPayment {
        id: Uuid::now_v7(),
        merchant: &merchant,
        amount: input.amount,
        currency: input.currency.as_str(),
        description: input.description.as_deref(),
        metadata: &input.metadata,
        idempotency_key: &key,
        request_fingerprint: &fingerprint,
        webhook_url: input.webhook_url.as_deref(),
        request_id: correlation.request_id.as_deref(),
        traceparent: correlation.traceparent.as_deref(),
    };
    let outcome = db::with_timeout(state.db_deadline, async {
        let mut conn = db::conn(&state.pool).await?;
        match payments_db::insert_with_event(&mut conn, &new).await {
            Ok(Some(p)) => return Ok(Ok(Created::New(p))),
            Ok(None) => {}
            Err(e) => {
                return constraint_error(&e)
                    .map(Err)
                    .ok_or_else(|| DbError::from(e));
            }
        }
        match payments_db::find_by_idempotency_key(&mut conn, &merchant, &key).await? {
            Some(p) if p.request_fingerprint == fingerprint => Ok(Ok(Created::Replayed(p))),
            Some(_) => {
                crate::metrics::payment_conflicted();
                Ok(Err(ApiError::IdempotencyConflict))
            }
            None => Err(DbError::Other(anyhow::anyhow!(
                "idempotency key conflicted but no payment holds it"
            ))),
        }
    })
    .await??;
    let (payment, replayed) = match outcome {
        Created::New(p) => {
            crate::metrics::payment_created();
            log::info!(
                "payment {} created for merchant {} ({} {})",
                p.id,
                merchant,
                domain::format_amount(p.amount),
                p.currency
            );
            (p, false)
        }
        Created::Replayed(p) => {
            crate::metrics::payment_replayed();
            log::info!(
                "payment {} replayed for idempotency key of merchant {}",
                p.id,
                merchant
            );
            (p, true)
        }
    };
    let mut resp = HttpResponse::Accepted();
    resp.insert_header((LOCATION, format!("/api/v1/payments/{}", payment.id)));
    if replayed {
        resp.insert_header(("Idempotent-Replayed", "true"));
    }
    Ok(resp.json(CreatedOut {
        payment_id: payment.id,
        status: payment.status,
        created_at: payment.created_at,
    }))
}

/// The `{id}` of a payment URL. A malformed id answers 404 like an unknown one: to the client
/// both are "no such payment".
pub(super) fn payment_id(path: web::Path<String>) -> Result<Uuid, ApiError> {
    Uuid::parse_str(&path.into_inner()).map_err(|_| ApiError::NotFound("payment"))
}

/// Fetch a payment
#[utoipa::path(
    get,
    path = "/api/v1/payments/{id}",
    tag = "payments",
    params(("id" = String, Path, description = "Payment id (UUID)")),
    responses(
        (status = 200, description = "The payment", body = PaymentOut),
        (status = 401, description = "Missing or unknown X-API-Key", body = ErrorBody),
        (status = 404, description = "Unknown id, malformed id, or another merchant's payment", body = ErrorBody),
        (status = 503, description = "Database unavailable; retry", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn get(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let merchant = authenticate(&req, &state)?;
    let id = payment_id(path)?;
    let view = db::with_timeout(state.db_deadline, async {
        let mut conn = db::conn(&state.pool).await?;
        Ok(payments_db::view_for_merchant(&mut conn, id, &merchant).await?)
    })
    .await?
    .ok_or(ApiError::NotFound("payment"))?;
    Ok(HttpResponse::Ok().json(PaymentOut::from(view)))
}
