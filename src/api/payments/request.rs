//! The request of `POST /api/v1/payments`: its headers (Idempotency-Key, Content-Type) and its
//! body, parsed and validated into a [`PaymentRequest`], and its fingerprint.

use actix_web::HttpRequest;
use actix_web::http::header::CONTENT_TYPE;
use rust_decimal::Decimal;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::api::error::ApiError;
use crate::api::idempotency::write_canonical_json;
use crate::domain::{self, Currency};

pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;
pub const MAX_DESCRIPTION_CHARS: usize = 1000;
pub const MAX_METADATA_BYTES: usize = 16 * 1024;
pub const MAX_WEBHOOK_URL_LEN: usize = 2048;
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

pub fn idempotency_key(req: &HttpRequest) -> Result<String, ApiError> {
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
pub fn check_content_type(req: &HttpRequest) -> Result<(), ApiError> {
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
    fn metadata_numbers_jsonb_cannot_store_are_refused() {
        let huge = r#"{"amount": "1", "currency": "RUB", "metadata": {"a": [1e200000]}}"#;
        assert_eq!(field_of(huge), "metadata", "a number jsonb cannot store");
        assert!(parse(r#"{"amount": "1", "currency": "RUB", "metadata": {"a": 1.5e300}}"#).is_ok());
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
}
