//! `GET /api/v1/payments`: a merchant's payments, newest first, with keyset pagination.

use actix_web::{HttpRequest, HttpResponse, web};
use serde::Serialize;
use time::OffsetDateTime;
use uuid::Uuid;

use super::response::PaymentOut;
use crate::api::error::{ApiError, ErrorBody};
use crate::api::{AppState, authenticate};
use crate::db::{self, payments as payments_db};
use crate::domain::PaymentStatus;

/// Default and largest page of the payment list.
pub const DEFAULT_PAGE: i64 = 50;
pub const MAX_PAGE: i64 = 200;

/// Query parameters of the payment list (documentation; parsed by hand for JSON errors).
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(
    dead_code,
    reason = "only describes the query for the OpenAPI document"
)]
pub struct ListQuery {
    /// Only payments with this status.
    status: Option<PaymentStatus>,
    /// Only payments created strictly after this time (RFC 3339).
    created_after: Option<OffsetDateTime>,
    /// Only payments created strictly before this time (RFC 3339).
    created_before: Option<OffsetDateTime>,
    /// Page size, 1 to 200 (default 50).
    #[param(minimum = 1, maximum = 200)]
    limit: Option<i64>,
    /// `next_cursor` of the previous page.
    #[param(pattern = "^[A-Za-z0-9_-]{16,}$")]
    cursor: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PaymentList {
    /// Newest first.
    pub data: Vec<PaymentOut>,
    /// Pass as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}

fn encode_cursor(created_at: OffsetDateTime, id: Uuid) -> String {
    use base64::Engine;
    let micros = created_at.unix_timestamp_nanos() / 1000;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{micros}.{id}"))
}

fn decode_cursor(raw: &str) -> Option<(OffsetDateTime, Uuid)> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(raw)
        .ok()?;
    let text = String::from_utf8(bytes).ok()?;
    let (micros, id) = text.split_once('.')?;
    let at =
        OffsetDateTime::from_unix_timestamp_nanos(micros.parse::<i128>().ok()?.checked_mul(1000)?)
            .ok()?;
    // Only times PostgreSQL can compare with (and this API could have issued).
    if !(1..=9999).contains(&at.year()) {
        return None;
    }
    Some((at, Uuid::parse_str(id).ok()?))
}

fn parse_list_query(query: &str) -> Result<(payments_db::ListFilter, i64), ApiError> {
    let mut filter = payments_db::ListFilter::default();
    let mut limit = DEFAULT_PAGE;
    let time = |field: &'static str, v: &str| {
        OffsetDateTime::parse(v, &time::format_description::well_known::Rfc3339).map_err(|_| {
            ApiError::validation(
                field,
                "must be an RFC 3339 time such as 2026-11-25T12:00:00Z",
            )
        })
    };
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        match k.as_ref() {
            "status" => {
                filter.status = Some(v.parse().map_err(|_| {
                    ApiError::validation("status", "must be one of pending, succeeded, failed")
                })?)
            }
            "created_after" => filter.created_after = Some(time("created_after", &v)?),
            "created_before" => filter.created_before = Some(time("created_before", &v)?),
            "limit" => {
                limit = v
                    .parse::<i64>()
                    .ok()
                    .filter(|n| (1..=MAX_PAGE).contains(n))
                    .ok_or_else(|| {
                        ApiError::validation(
                            "limit",
                            format!("must be a whole number from 1 to {MAX_PAGE}"),
                        )
                    })?
            }
            "cursor" => {
                filter.after = Some(decode_cursor(&v).ok_or_else(|| {
                    ApiError::validation("cursor", "is not a cursor this API returned")
                })?)
            }
            other => {
                let shown: String = other.chars().take(64).collect();
                return Err(ApiError::validation(
                    shown.clone(),
                    format!(
                        "unknown query parameter {shown:?}; allowed: status, created_after, created_before, limit, cursor"
                    ),
                ));
            }
        }
    }
    Ok((filter, limit))
}

/// List payments
///
/// The merchant's payments, newest first, a page at a time. Keyset pagination on
/// (created_at, id): pages do not shift when new payments arrive.
#[utoipa::path(
    get,
    path = "/api/v1/payments",
    tag = "payments",
    params(ListQuery),
    responses(
        (status = 200, description = "A page of payments", body = PaymentList),
        (status = 401, description = "Missing or unknown X-API-Key", body = ErrorBody),
        (status = 422, description = "A query parameter is invalid; `field` names it", body = ErrorBody),
        (status = 503, description = "Database unavailable; retry", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn list(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let merchant = authenticate(&req, &state)?;
    let (filter, limit) = parse_list_query(req.query_string())?;
    let mut rows = db::with_timeout(state.db_deadline, async {
        let mut conn = db::conn(&state.pool).await?;
        Ok(payments_db::list_for_merchant(&mut conn, &merchant, &filter, limit + 1).await?)
    })
    .await?;
    let next_cursor = if rows.len() as i64 > limit {
        rows.truncate(limit as usize);
        rows.last()
            .map(|v| encode_cursor(v.payment.created_at, v.payment.id))
    } else {
        None
    };
    let data = rows.into_iter().map(PaymentOut::from).collect();
    Ok(HttpResponse::Ok().json(PaymentList { data, next_cursor }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        let at = OffsetDateTime::from_unix_timestamp_nanos(1_764_000_000_123_456_000).unwrap();
        let id = Uuid::now_v7();
        assert_eq!(decode_cursor(&encode_cursor(at, id)), Some((at, id)));
        assert_eq!(decode_cursor("not-a-cursor"), None);
        let ancient = OffsetDateTime::from_unix_timestamp(-300_000_000_000).unwrap();
        assert_eq!(
            decode_cursor(&encode_cursor(ancient, id)),
            None,
            "outside PostgreSQL's range"
        );
        assert!(parse_list_query("limit=0").is_err());
        assert!(parse_list_query("limit=201").is_err());
        assert!(parse_list_query("status=done").is_err());
        assert!(parse_list_query("sort=asc").is_err());
        assert!(parse_list_query("created_after=yesterday").is_err());
        let (f, n) =
            parse_list_query("status=failed&limit=7&created_before=2026-11-25T12:00:00Z").unwrap();
        assert_eq!((f.status, n), (Some(PaymentStatus::Failed), 7));
    }
}
