//! `POST /api/v1/payments` and `GET /api/v1/payments/{id}`.

use actix_web::http::header::{CONTENT_TYPE, LOCATION};
use actix_web::{HttpRequest, HttpResponse, web};
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use rust_decimal::Decimal;
use serde::Serialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use uuid::Uuid;

use super::{AppState, authenticate, read_body};
use crate::db::payments::{self as payments_db, NewPayment, Payment, PaymentView};
use crate::db::{self, DbError};
use crate::domain::{self, Currency, PaymentStatus};
use crate::error::{ApiError, ErrorBody};

pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;
pub const MAX_DESCRIPTION_CHARS: usize = 1000;
pub const MAX_METADATA_BYTES: usize = 16 * 1024;
pub const MAX_WEBHOOK_URL_LEN: usize = 2048;
/// How long creation waits for DNS when checking a webhook host; a name that does not resolve in
/// time is accepted and checked again at delivery.
const SSRF_RESOLVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);
const FIELDS: [&str; 5] = [
    "amount",
    "currency",
    "description",
    "metadata",
    "webhook_url",
];

/// A validated payment request.
#[derive(Debug, Clone, PartialEq)]
pub struct PaymentRequest {
    /// Scale 2.
    pub amount: Decimal,
    pub currency: Currency,
    pub description: Option<String>,
    /// Always an object (`{}` when absent).
    pub metadata: Value,
    /// Normalised by the WHATWG URL parser (`https://example.com` becomes `https://example.com/`).
    pub webhook_url: Option<String>,
}

impl PaymentRequest {
    /// Parses and validates a request body. Malformed JSON is a 400; anything that parses but
    /// breaks a rule is a 422 naming the field.
    pub fn parse(body: &[u8]) -> Result<Self, ApiError> {
        let value: Value =
            serde_json::from_slice(body).map_err(|e| ApiError::MalformedJson(e.to_string()))?;
        let Value::Object(mut obj) = value else {
            return Err(ApiError::validation("body", "must be a JSON object"));
        };
        if let Some(unknown) = obj.keys().find(|k| !FIELDS.contains(&k.as_str())) {
            let shown: String = unknown.chars().take(64).collect();
            return Err(ApiError::validation(
                shown.clone(),
                format!("unknown field {shown:?}; allowed: {}", FIELDS.join(", ")),
            ));
        }
        let amount = match obj.remove("amount") {
            None | Some(Value::Null) => return Err(ApiError::validation("amount", "is required")),
            Some(Value::String(s)) => domain::parse_amount(&s),
            Some(Value::Number(n)) => domain::parse_amount(&n.to_string()),
            Some(_) => Err(domain::AmountError::NotANumber),
        }
        .map_err(|e| ApiError::validation("amount", e.to_string()))?;

        let currency = match obj.remove("currency") {
            None | Some(Value::Null) => {
                return Err(ApiError::validation("currency", "is required"));
            }
            Some(Value::String(s)) => s.parse::<Currency>().ok(),
            Some(_) => None,
        }
        .ok_or_else(|| ApiError::validation("currency", "must be one of RUB, USD, EUR"))?;

        let description = match obj.remove("description") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => {
                if s.chars().count() > MAX_DESCRIPTION_CHARS {
                    return Err(ApiError::validation(
                        "description",
                        format!("must be at most {MAX_DESCRIPTION_CHARS} characters"),
                    ));
                }
                if s.contains('\0') {
                    return Err(ApiError::validation(
                        "description",
                        "must not contain NUL characters",
                    ));
                }
                Some(s)
            }
            Some(_) => return Err(ApiError::validation("description", "must be a string")),
        };

        let metadata = match obj.remove("metadata") {
            None | Some(Value::Null) => Value::Object(Map::new()),
            Some(v @ Value::Object(_)) => {
                if has_nul(&v) {
                    return Err(ApiError::validation(
                        "metadata",
                        "must not contain NUL characters",
                    ));
                }
                if has_unstorable_number(&v) {
                    return Err(ApiError::validation(
                        "metadata",
                        "numbers must have an exponent between -1000 and 1000",
                    ));
                }
                if serde_json::to_vec(&v)
                    .map(|b| b.len())
                    .unwrap_or(usize::MAX)
                    > MAX_METADATA_BYTES
                {
                    return Err(ApiError::validation(
                        "metadata",
                        format!("must be at most {MAX_METADATA_BYTES} bytes as JSON"),
                    ));
                }
                v
            }
            Some(_) => return Err(ApiError::validation("metadata", "must be a JSON object")),
        };

        let webhook_url = match obj.remove("webhook_url") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(normalize_webhook_url(&s)?),
            Some(_) => return Err(ApiError::validation("webhook_url", "must be a string")),
        };

        Ok(PaymentRequest {
            amount,
            currency,
            description,
            metadata,
            webhook_url,
        })
    }

    /// SHA-256 of the request's meaning: equal amounts, equal URLs and equal metadata (whatever
    /// the key order or number spelling) give the same fingerprint.
    pub fn fingerprint(&self) -> [u8; 32] {
        let mut canon = String::new();
        canon.push_str(&domain::format_amount(self.amount));
        canon.push('\n');
        canon.push_str(self.currency.as_str());
        canon.push('\n');
        write_canonical_json(&serde_json::json!(self.description), &mut canon);
        canon.push('\n');
        write_canonical_json(&self.metadata, &mut canon);
        canon.push('\n');
        write_canonical_json(&serde_json::json!(self.webhook_url), &mut canon);
        Sha256::digest(canon.as_bytes()).into()
    }
}

fn has_nul(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains('\0'),
        Value::Array(a) => a.iter().any(has_nul),
        Value::Object(o) => o.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        _ => false,
    }
}

/// Largest decimal exponent accepted in metadata numbers: PostgreSQL's jsonb stores numbers as
/// NUMERIC and refuses `1e200000`; no real metadata needs more than this.
const MAX_METADATA_EXPONENT: i64 = 1000;

fn has_unstorable_number(v: &Value) -> bool {
    match v {
        Value::Number(n) => {
            let text = n.to_string();
            match text.split_once(['e', 'E']) {
                None => false,
                Some((_, exp)) => exp
                    .parse::<i64>()
                    .map_or(true, |e| e.abs() > MAX_METADATA_EXPONENT),
            }
        }
        Value::Array(a) => a.iter().any(has_unstorable_number),
        Value::Object(o) => o.values().any(has_unstorable_number),
        _ => false,
    }
}

/// The request's metadata (or any JSON) with object keys sorted and every number in one exact
/// spelling, so that two values with the same meaning give the same text: `1e3`, `1000.0` and
/// `1000` are one number, as they are to PostgreSQL's jsonb (which stores `1e3` as `1000`).
pub fn canonical_json(v: &Value) -> String {
    let mut out = String::new();
    write_canonical_json(v, &mut out);
    out
}

fn write_canonical_json(v: &Value, out: &mut String) {
    match v {
        Value::Object(o) => {
            let mut entries: Vec<_> = o.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                write_canonical_json(v, out);
            }
            out.push('}');
        }
        Value::Array(a) => {
            out.push('[');
            for (i, v) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical_json(v, out);
            }
            out.push(']');
        }
        Value::Number(n) => out.push_str(&canonical_number(&n.to_string())),
        other => out.push_str(&other.to_string()),
    }
}

/// Where the value is `0.DIGITS x 10^point`, the points [`canonical_number`] writes out in full:
/// enough for every `Decimal` (at most 29 digits before the point and 28 after it), few enough
/// that `1e1000` in metadata does not become a thousand characters to hash.
const POSITIONAL_PLACES: std::ops::RangeInclusive<i64> = -28..=29;

/// A JSON number's text in one exact spelling per value: `1e3`, `1000.0` and `01000` give `1000`;
/// `-0.0` gives `0`; `2.50E-1` gives `0.25`. Exact for every magnitude (no float, no 28-digit
/// limit). Numbers within `POSITIONAL_PLACES` of the decimal point are written out in full —
/// every number a `Decimal` holds is, and gets what `Decimal::normalize` prints, so fingerprints
/// stored before this function existed still match; others are written `0.DIGITSe<N>`
/// (`1e1000` gives `0.1e1001`), so the text never grows beyond the digits given. Text that is
/// not a JSON number is returned unchanged.
fn canonical_number(text: &str) -> String {
    let (negative, rest) = match text.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, text),
    };
    let (mantissa, exponent) = match rest.split_once(['e', 'E']) {
        Some((m, e)) => match e.trim_start_matches('+').parse::<i64>() {
            Ok(e) => (m, e),
            Err(_) => return text.to_string(),
        },
        None => (rest, 0),
    };
    let (int_part, frac_part) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if int_part.is_empty()
        || !(int_part.bytes().chain(frac_part.bytes())).all(|b| b.is_ascii_digit())
    {
        return text.to_string();
    }
    // value = 0.DIGITS x 10^point, with DIGITS free of leading and trailing zeros
    let all: String = format!("{int_part}{frac_part}");
    let leading = all.bytes().take_while(|&b| b == b'0').count();
    let digits = all[leading..].trim_end_matches('0');
    if digits.is_empty() {
        return "0".to_string();
    }
    let point = (int_part.len() as i64 - leading as i64).saturating_add(exponent);
    let sign = if negative { "-" } else { "" };
    if !POSITIONAL_PLACES.contains(&point) {
        return format!("{sign}0.{digits}e{point}");
    }
    let mut out = String::with_capacity(digits.len() + point.unsigned_abs() as usize + 3);
    out.push_str(sign);
    if point <= 0 {
        out.push_str("0.");
        out.extend(std::iter::repeat_n('0', point.unsigned_abs() as usize));
        out.push_str(digits);
    } else if point as usize >= digits.len() {
        out.push_str(digits);
        out.extend(std::iter::repeat_n('0', point as usize - digits.len()));
    } else {
        out.push_str(&digits[..point as usize]);
        out.push('.');
        out.push_str(&digits[point as usize..]);
    }
    out
}

/// An absolute http(s) URL, normalised.
fn normalize_webhook_url(raw: &str) -> Result<String, ApiError> {
    let invalid = |why: &str| ApiError::validation("webhook_url", why.to_string());
    if raw.len() > MAX_WEBHOOK_URL_LEN {
        return Err(invalid("must be at most 2048 characters"));
    }
    if raw.contains(|c: char| c.is_whitespace() || c.is_control()) {
        return Err(invalid("must not contain spaces or control characters"));
    }
    let url = url::Url::parse(raw).map_err(|_| invalid("must be an absolute http or https URL"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(invalid("must be an absolute http or https URL"));
    }
    let normalized = url.to_string();
    if normalized.len() > MAX_WEBHOOK_URL_LEN {
        return Err(invalid("must be at most 2048 characters"));
    }
    Ok(normalized)
}

fn idempotency_key(req: &HttpRequest) -> Result<String, ApiError> {
    let missing = || {
        ApiError::BadRequest(
            "missing_idempotency_key",
            "the Idempotency-Key header is required".into(),
        )
    };
    let raw = req.headers().get("Idempotency-Key").ok_or_else(missing)?;
    let key = std::str::from_utf8(raw.as_bytes()).map_err(|_| {
        ApiError::BadRequest(
            "invalid_idempotency_key",
            "Idempotency-Key must be UTF-8 text".into(),
        )
    })?;
    if key.trim().is_empty() {
        return Err(missing());
    }
    if key.chars().count() > MAX_IDEMPOTENCY_KEY_LEN {
        return Err(ApiError::BadRequest(
            "invalid_idempotency_key",
            format!("Idempotency-Key must be at most {MAX_IDEMPOTENCY_KEY_LEN} characters"),
        ));
    }
    if key.contains(|c: char| c.is_control()) {
        return Err(ApiError::BadRequest(
            "invalid_idempotency_key",
            "Idempotency-Key must not contain control characters".into(),
        ));
    }
    Ok(key.to_string())
}

/// The body is always read as JSON. A declared type that is clearly something else (text,
/// multipart, XML) is refused with 415; a missing type and curl's default for `-d`
/// (`application/x-www-form-urlencoded`) are tolerated.
fn check_content_type(req: &HttpRequest) -> Result<(), ApiError> {
    let Some(ct) = req.headers().get(CONTENT_TYPE) else {
        return Ok(());
    };
    let ct = ct.to_str().unwrap_or("").to_ascii_lowercase();
    let essence = ct.split(';').next().unwrap_or("").trim();
    if essence == "application/json"
        || essence == "application/x-www-form-urlencoded"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
    {
        Ok(())
    } else {
        Err(ApiError::UnsupportedMediaType)
    }
}

/// The request body of `POST /api/v1/payments` (documentation of what [`PaymentRequest::parse`]
/// accepts; unknown fields are refused).
#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code, reason = "only describes the body for the OpenAPI document")]
pub struct PaymentIn {
    /// Greater than 0, at most 2 decimal places, at most 16 digits before the point. A JSON
    /// string (`"100.50"`) or a JSON number (`100.5`), read exactly.
    #[schema(value_type = String, example = "100.50",
        pattern = r"^([1-9][0-9]{0,15}(\.[0-9]{1,2})?|0\.(0[1-9]|[1-9][0-9]?))$")]
    amount: String,
    currency: Currency,
    /// At most 1000 characters.
    #[schema(max_length = 1000)]
    description: Option<String>,
    /// Any JSON object, at most 16 KiB.
    #[schema(value_type = Option<Object>)]
    metadata: Option<Value>,
    /// Absolute http(s) URL, at most 2048 characters, not pointing to a private network.
    #[schema(max_length = 2048, example = "https://example.com/webhook")]
    webhook_url: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CreatedOut {
    pub payment_id: Uuid,
    #[schema(value_type = PaymentStatus)]
    pub status: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PaymentOut {
    pub id: Uuid,
    /// Always two decimals, as a string: `"100.50"`.
    #[schema(example = "100.50")]
    pub amount: String,
    #[schema(value_type = Currency)]
    pub currency: String,
    pub description: Option<String>,
    #[schema(value_type = Object)]
    pub metadata: Value,
    #[schema(value_type = PaymentStatus)]
    pub status: String,
    pub idempotency_key: String,
    pub webhook_url: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub processed_at: Option<OffsetDateTime>,
    /// The payment provider's reference of the charge, once final (`null` before).
    pub charge_id: Option<String>,
    /// Why a `failed` payment failed: the provider's decline code (`card_declined`,
    /// `insufficient_funds`, …, or `gateway_rejected` when the provider refused the request
    /// itself); `null` otherwise.
    pub failure_code: Option<String>,
    /// The provider's human-readable reason for `failure_code`; `null` otherwise.
    pub failure_message: Option<String>,
    pub webhook: WebhookOut,
}

/// Where the payment's webhook stands (its newest delivery).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct WebhookOut {
    /// `none` (no webhook_url), `pending`, `delivered` or `failed`.
    #[schema(pattern = "^(none|pending|delivered|failed)$")]
    pub status: String,
    pub attempts: i32,
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_attempt_at: Option<OffsetDateTime>,
    pub last_status_code: Option<i32>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub next_attempt_at: Option<OffsetDateTime>,
}

impl From<PaymentView> for PaymentOut {
    fn from(v: PaymentView) -> Self {
        let webhook = match (&v.payment.webhook_url, v.webhook_status) {
            (None, _) => WebhookOut {
                status: "none".into(),
                attempts: 0,
                last_attempt_at: None,
                last_status_code: None,
                next_attempt_at: None,
            },
            // Not final yet: the webhook will be due once it is.
            (Some(_), None) => WebhookOut {
                status: "pending".into(),
                attempts: 0,
                last_attempt_at: None,
                last_status_code: None,
                next_attempt_at: None,
            },
            (Some(_), Some(status)) => WebhookOut {
                next_attempt_at: v.webhook_next_attempt_at.filter(|_| status == "pending"),
                status,
                attempts: v.webhook_attempts.unwrap_or(0),
                last_attempt_at: v.webhook_last_attempt_at,
                last_status_code: v.webhook_last_status_code,
            },
        };
        PaymentOut {
            webhook,
            ..PaymentOut::from_payment(v.payment)
        }
    }
}

impl PaymentOut {
    fn from_payment(p: Payment) -> Self {
        PaymentOut {
            id: p.id,
            amount: domain::format_amount(p.amount),
            currency: p.currency,
            description: p.description,
            metadata: p.metadata,
            status: p.status,
            idempotency_key: p.idempotency_key,
            webhook_url: p.webhook_url,
            created_at: p.created_at,
            processed_at: p.processed_at,
            charge_id: p.charge_id,
            failure_code: p.failure_code,
            failure_message: p.failure_message,
            webhook: WebhookOut {
                status: "none".into(),
                attempts: 0,
                last_attempt_at: None,
                last_status_code: None,
                next_attempt_at: None,
            },
        }
    }
}

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

    fn parse(body: &str) -> Result<PaymentRequest, ApiError> {
        PaymentRequest::parse(body.as_bytes())
    }

    fn field_of(body: &str) -> String {
        match parse(body) {
            Err(ApiError::Validation { field, .. }) => field,
            other => panic!("expected a validation error for {body}, got {other:?}"),
        }
    }

    #[test]
    fn accepts_amount_as_string_or_exact_number() {
        let a = parse(r#"{"amount": "100.50", "currency": "RUB"}"#).unwrap();
        let b = parse(r#"{"amount": 100.5, "currency": "RUB"}"#).unwrap();
        assert_eq!(a.amount, b.amount);
        assert_eq!(a.fingerprint(), b.fingerprint());
        let big = parse(r#"{"amount": 1234567890123456.78, "currency": "USD"}"#).unwrap();
        assert_eq!(domain::format_amount(big.amount), "1234567890123456.78");
    }

    #[test]
    fn every_rule_names_its_field() {
        assert_eq!(field_of(r#"{"amount": "0", "currency": "RUB"}"#), "amount");
        assert_eq!(
            field_of(r#"{"amount": "1.001", "currency": "RUB"}"#),
            "amount"
        );
        assert_eq!(
            field_of(r#"{"amount": "12345678901234567", "currency": "RUB"}"#),
            "amount"
        );
        assert_eq!(field_of(r#"{"amount": true, "currency": "RUB"}"#), "amount");
        assert_eq!(field_of(r#"{"currency": "RUB"}"#), "amount");
        assert_eq!(
            field_of(r#"{"amount": "1", "currency": "GBP"}"#),
            "currency"
        );
        assert_eq!(field_of(r#"{"amount": "1"}"#), "currency");
        assert_eq!(
            field_of(r#"{"amount": "1", "currency": "RUB", "colour": "red"}"#),
            "colour"
        );
        assert_eq!(
            field_of(r#"{"amount": "1", "currency": "RUB", "metadata": [1]}"#),
            "metadata"
        );
        let big_meta = format!(
            r#"{{"amount": "1", "currency": "RUB", "metadata": {{"k": "{}"}}}}"#,
            "x".repeat(16 * 1024)
        );
        assert_eq!(field_of(&big_meta), "metadata");
        let long_desc = format!(
            r#"{{"amount": "1", "currency": "RUB", "description": "{}"}}"#,
            "é".repeat(1001)
        );
        assert_eq!(field_of(&long_desc), "description");
        let ok_desc = format!(
            r#"{{"amount": "1", "currency": "RUB", "description": "{}"}}"#,
            "é".repeat(1000)
        );
        assert!(
            parse(&ok_desc).is_ok(),
            "1000 characters (2000 bytes) is allowed"
        );
        assert_eq!(
            field_of(r#"{"amount": "1", "currency": "RUB", "description": "a\u0000b"}"#),
            "description"
        );
        for url in [
            "ftp://example.com/",
            "/relative",
            "https://",
            "not a url",
            "mailto:a@b.c",
        ] {
            let body = format!(r#"{{"amount": "1", "currency": "RUB", "webhook_url": "{url}"}}"#);
            assert_eq!(field_of(&body), "webhook_url", "{url}");
        }
        let long_url = format!(
            r#"{{"amount": "1", "currency": "RUB", "webhook_url": "https://e.com/{}"}}"#,
            "a".repeat(2040)
        );
        assert_eq!(field_of(&long_url), "webhook_url");
        assert_eq!(field_of("[1, 2]"), "body");
    }

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
        let huge = r#"{"amount": "1", "currency": "RUB", "metadata": {"a": [1e200000]}}"#;
        assert_eq!(field_of(huge), "metadata", "a number jsonb cannot store");
        assert!(parse(r#"{"amount": "1", "currency": "RUB", "metadata": {"a": 1.5e300}}"#).is_ok());
        assert!(parse_list_query("limit=0").is_err());
        assert!(parse_list_query("limit=201").is_err());
        assert!(parse_list_query("status=done").is_err());
        assert!(parse_list_query("sort=asc").is_err());
        assert!(parse_list_query("created_after=yesterday").is_err());
        let (f, n) =
            parse_list_query("status=failed&limit=7&created_before=2026-11-25T12:00:00Z").unwrap();
        assert_eq!((f.status, n), (Some(PaymentStatus::Failed), 7));
    }

    #[test]
    fn malformed_json_is_not_a_validation_error() {
        for body in ["", "{", "{\"amount\": }", "nope", "{\"a\":1} trailing"] {
            assert!(
                matches!(parse(body), Err(ApiError::MalformedJson(_))),
                "{body:?}"
            );
        }
    }

    #[test]
    fn fingerprint_compares_meaning_not_bytes() {
        let a = parse(r#"{"amount": "100.5", "currency": "RUB", "metadata": {"a": 1, "b": {"x": 2, "y": 3}}, "webhook_url": "https://example.com"}"#).unwrap();
        let b = parse(r#"{"webhook_url": "https://EXAMPLE.com/", "metadata": {"b": {"y": 3, "x": 2.0}, "a": 1}, "currency": "RUB", "amount": 100.50}"#).unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
        let c = parse(r#"{"amount": "100.51", "currency": "RUB", "metadata": {"a": 1, "b": {"x": 2, "y": 3}}, "webhook_url": "https://example.com"}"#).unwrap();
        assert_ne!(a.fingerprint(), c.fingerprint());
        let d = parse(r#"{"amount": "100.5", "currency": "RUB", "metadata": {"a": "1", "b": {"x": 2, "y": 3}}, "webhook_url": "https://example.com"}"#).unwrap();
        assert_ne!(
            a.fingerprint(),
            d.fingerprint(),
            "the string \"1\" is not the number 1"
        );
        let e = parse(r#"{"amount": "100.5", "currency": "RUB", "description": null}"#).unwrap();
        let f = parse(r#"{"amount": "100.5", "currency": "RUB", "metadata": {}}"#).unwrap();
        assert_eq!(
            e.fingerprint(),
            f.fingerprint(),
            "absent, null and empty are the same"
        );
    }

    #[test]
    fn numbers_have_one_canonical_spelling() {
        for (a, b) in [
            ("1e3", "1000"),
            ("1000.0", "1000"),
            ("10E2", "1000"),
            ("1E+3", "1000"),
            ("-0", "0"),
            ("-0.0e5", "0"),
            ("0", "0"),
            ("2.50E-1", "0.25"),
            ("-12.3400", "-12.34"),
            ("0.001", "0.001"),
            ("1e-3", "0.001"),
            ("123.456e1", "1234.56"),
            ("123.456e-5", "0.00123456"),
        ] {
            assert_eq!(canonical_number(a), b, "{a}");
        }
        // PostgreSQL's jsonb prints a large exponent out in full; both spellings mean one number.
        let written = "-4.6258100558555635e+228";
        let stored = format!("-46258100558555635{}", "0".repeat(212));
        assert_eq!(canonical_number(written), "-0.46258100558555635e229");
        assert_eq!(canonical_number(&stored), "-0.46258100558555635e229");
        assert_eq!(canonical_number("0.000123e-40"), "0.123e-43");
        assert_eq!(canonical_number("1e999999999999"), "0.1e1000000000000");
        // The edges of the positional range: a Decimal's largest and smallest magnitudes.
        assert_eq!(canonical_number("7.9e28"), format!("79{}", "0".repeat(27)));
        assert_eq!(canonical_number("1e-28"), format!("0.{}1", "0".repeat(27)));
        assert_eq!(canonical_number("1e29"), "0.1e30");
    }

    proptest::proptest! {
        #[test]
        fn canonical_numbers_match_decimal_where_decimal_is_exact(
            int in "-?(0|[1-9][0-9]{0,12})",
            frac in proptest::option::of("[0-9]{1,12}"),
            exp in proptest::option::of(-14i32..14),
        ) {
            let mut text = int.clone();
            if let Some(f) = &frac {
                text.push('.');
                text.push_str(f);
            }
            if let Some(e) = exp {
                text.push_str(&format!("e{e}"));
            }
            let decimal = Decimal::from_scientific(&text)
                .or_else(|_| Decimal::from_str_exact(&text))
                .unwrap()
                .normalize()
                .to_string();
            proptest::prop_assert_eq!(canonical_number(&text), decimal, "{}", text);
        }
    }
}
