//! The API's one error type. Every error answers the same JSON shape,
//! `{"error": {"code": "...", "message": "...", "field": "..."}}`, with a stable machine-readable
//! `code`. Internal causes are logged once, here, and never sent to the client.

use actix_web::http::StatusCode;
use actix_web::http::header::{CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{message}")]
    Validation { field: String, message: String },
    #[error("request body is not valid JSON: {0}")]
    MalformedJson(String),
    #[error("{0}")]
    BadRequest(&'static str, String),
    #[error("request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: u64 },
    #[error("Content-Type must be application/json")]
    UnsupportedMediaType,
    #[error("missing or invalid X-API-Key header")]
    Unauthorized,
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("this Idempotency-Key was already used with a different request body")]
    IdempotencyConflict,
    /// The request is valid but the resource is not in a state that allows it.
    #[error("{1}")]
    Conflict(&'static str, String),
    #[error("the database is unavailable, retry later")]
    DatabaseUnavailable,
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

/// The body of every error response.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable: `validation_failed`, `malformed_json`, `unauthorized`, ...
    pub code: String,
    /// For humans; may change.
    pub message: String,
    /// The offending field, for `validation_failed`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl ApiError {
    pub fn validation(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::Validation {
            field: field.into(),
            message: message.into(),
        }
    }

    /// The stable code clients match on.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Validation { .. } => "validation_failed",
            ApiError::MalformedJson(_) => "malformed_json",
            ApiError::BadRequest(code, _) => code,
            ApiError::PayloadTooLarge { .. } => "payload_too_large",
            ApiError::UnsupportedMediaType => "unsupported_media_type",
            ApiError::Unauthorized => "unauthorized",
            ApiError::NotFound(_) => "not_found",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::IdempotencyConflict => "idempotency_key_reused",
            ApiError::Conflict(code, _) => code,
            ApiError::DatabaseUnavailable => "database_unavailable",
            ApiError::Internal(_) => "internal_error",
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::Validation { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::MalformedJson(_) | ApiError::BadRequest(..) => StatusCode::BAD_REQUEST,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::IdempotencyConflict | ApiError::Conflict(..) => StatusCode::CONFLICT,
            ApiError::DatabaseUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        if let ApiError::Internal(cause) = self {
            log::error!("internal error: {cause:#}");
        }
        let field = match self {
            ApiError::Validation { field, .. } => Some(field.clone()),
            _ => None,
        };
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code().to_string(),
                message: self.to_string(),
                field,
            },
        };
        let mut resp = HttpResponse::build(self.status_code());
        if matches!(self, ApiError::DatabaseUnavailable) {
            resp.insert_header((RETRY_AFTER, HeaderValue::from_static("1")));
        }
        if matches!(self, ApiError::Unauthorized) {
            resp.insert_header((
                "WWW-Authenticate",
                HeaderValue::from_static("ApiKey header=\"X-API-Key\""),
            ));
        }
        resp.insert_header((CONTENT_TYPE, HeaderValue::from_static("application/json")));
        resp.json(body)
    }
}

impl From<crate::db::DbError> for ApiError {
    fn from(e: crate::db::DbError) -> Self {
        match e {
            crate::db::DbError::Unavailable(cause) => {
                log::warn!("database unavailable: {cause}");
                ApiError::DatabaseUnavailable
            }
            crate::db::DbError::Other(cause) => ApiError::Internal(cause),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::body::MessageBody;

    fn body_of(e: ApiError) -> (u16, serde_json::Value) {
        let resp = e.error_response();
        let status = resp.status().as_u16();
        let bytes = resp.into_body().try_into_bytes().unwrap();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    #[test]
    fn every_error_maps_to_its_status_and_stable_code() {
        let cases: Vec<(ApiError, u16, &str)> = vec![
            (
                ApiError::validation("amount", "must be greater than 0"),
                422,
                "validation_failed",
            ),
            (ApiError::MalformedJson("eof".into()), 400, "malformed_json"),
            (
                ApiError::BadRequest("missing_idempotency_key", "x".into()),
                400,
                "missing_idempotency_key",
            ),
            (
                ApiError::PayloadTooLarge { limit: 10 },
                413,
                "payload_too_large",
            ),
            (
                ApiError::UnsupportedMediaType,
                415,
                "unsupported_media_type",
            ),
            (ApiError::Unauthorized, 401, "unauthorized"),
            (ApiError::NotFound("payment"), 404, "not_found"),
            (ApiError::MethodNotAllowed, 405, "method_not_allowed"),
            (ApiError::IdempotencyConflict, 409, "idempotency_key_reused"),
            (
                ApiError::Conflict("payment_not_final", "x".into()),
                409,
                "payment_not_final",
            ),
            (ApiError::DatabaseUnavailable, 503, "database_unavailable"),
            (
                ApiError::Internal(anyhow::anyhow!("secret detail")),
                500,
                "internal_error",
            ),
        ];
        for (err, status, code) in cases {
            let (s, body) = body_of(err);
            assert_eq!(s, status);
            assert_eq!(body["error"]["code"], code);
            assert!(body["error"]["message"].is_string());
        }
    }

    #[test]
    fn validation_names_the_field_and_internal_hides_the_cause() {
        let (_, body) = body_of(ApiError::validation("currency", "unknown currency"));
        assert_eq!(body["error"]["field"], "currency");
        let (_, body) = body_of(ApiError::Internal(anyhow::anyhow!("password=hunter2")));
        assert!(!body.to_string().contains("hunter2"));
    }
}
