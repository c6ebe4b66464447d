//! The HTTP connector (`gateway.kind = "http"`): speaks the contract in README.md ("Payment
//! gateway: the HTTP contract"), so a thin adapter can put any real provider behind it.
//!
//! - `POST {url}/v1/charges`, headers `Authorization: Bearer {api_key}`,
//!   `Idempotency-Key: {payment id}`, a JSON body with the payment.
//! - `GET {url}/v1/charges/{payment id}`, the same `Authorization`.
//!
//! How each answer is read is [`classify`]. Calls are blocking (ureq) on Tokio's blocking pool;
//! each is bounded by `gateway.timeout` (ureq's global timeout, and the caller's own).

use async_trait::async_trait;
use uuid::Uuid;

use super::{Answer, ChargeRequest, Gateway, Operation};
use crate::config::{GatewaySettings, redact_url};
use crate::domain;

/// Largest answer body read; the contract's answers are a few hundred bytes.
const BODY_LIMIT: u64 = 64 * 1024;
/// ureq's per-connection buffers (128 KiB each by default): the contract's messages are small,
/// and a consumer keeps up to `amqp.prefetch` calls open at once.
const BUFFER_SIZE: usize = 16 * 1024;
/// Idle keep-alive connections kept to the provider: as many as calls may run at once, so a
/// steady load reuses connections instead of opening one per call.
const IDLE_CONNECTIONS: usize = 1024;
/// Longest decline message or unknown reason kept (they are stored and shown to merchants).
const TEXT_LIMIT: usize = 500;

pub struct HttpGateway {
    agent: ureq::Agent,
    /// `{url}/v1/charges`
    charges: String,
    /// `Bearer {api_key}`; never logged.
    authorization: String,
}

impl HttpGateway {
    pub fn new(s: &GatewaySettings) -> anyhow::Result<Self> {
        let base = s.url.trim().trim_end_matches('/');
        let parsed = url::Url::parse(base)
            .map_err(|e| anyhow::anyhow!("gateway.url {}: {e}", redact_url(base)))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            anyhow::bail!(
                "gateway.url must be an http:// or https:// URL, got {}",
                redact_url(base)
            );
        }
        let config = ureq::Agent::config_builder()
            .timeout_global(Some(s.timeout))
            .http_status_as_error(false)
            // A redirect from a payment provider is not part of the contract: read it as an
            // answer (unknown), never follow it with the API key.
            .max_redirects(0)
            .max_redirects_will_error(false)
            .input_buffer_size(BUFFER_SIZE)
            .output_buffer_size(BUFFER_SIZE)
            .max_idle_connections(IDLE_CONNECTIONS)
            .max_idle_connections_per_host(IDLE_CONNECTIONS)
            .user_agent(concat!("async-pay/", env!("CARGO_PKG_VERSION")))
            .build();
        Ok(HttpGateway {
            agent: config.into(),
            charges: format!("{base}/v1/charges"),
            authorization: format!("Bearer {}", s.api_key.expose()),
        })
    }

    /// Sends a request on the blocking pool and reads the answer.
    async fn call(&self, operation: Operation, request: ureq::http::Request<Vec<u8>>) -> Answer {
        let agent = self.agent.clone();
        let sent = tokio::task::spawn_blocking(move || -> Result<(u16, Vec<u8>), String> {
            let mut resp = agent.run(request).map_err(describe)?;
            let status = resp.status().as_u16();
            // A body that cannot be read whole is still an answer with this status.
            let body = resp
                .body_mut()
                .with_config()
                .limit(BODY_LIMIT)
                .read_to_vec()
                .unwrap_or_default();
            Ok((status, body))
        })
        .await;
        match sent {
            Ok(Ok((status, body))) => classify(operation, status, &body),
            Ok(Err(reason)) => Answer::Unknown { reason },
            Err(e) => Answer::Unknown {
                reason: format!("the call did not finish: {e}"),
            },
        }
    }
}

/// A transport error as a reason (no URL: it is in the configuration, and the error text of a
/// connection failure already names the address).
fn describe(e: ureq::Error) -> String {
    match e {
        ureq::Error::Timeout(_) => "no answer within gateway.timeout".to_string(),
        other => shorten(&other.to_string()),
    }
}

/// A provider's text as storable text: at most [`TEXT_LIMIT`] bytes, NUL (which PostgreSQL
/// text refuses) as U+FFFD.
fn shorten(s: &str) -> String {
    let s = s.replace('\0', "\u{FFFD}");
    if s.len() <= TEXT_LIMIT {
        return s;
    }
    let mut end = TEXT_LIMIT;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// The contract's answer body.
#[derive(Debug, serde::Deserialize)]
struct Body {
    status: String,
    #[serde(default)]
    charge_id: Option<String>,
    #[serde(default)]
    decline_code: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

/// Reads an HTTP answer as the contract defines it:
///
/// | answer | means |
/// |---|---|
/// | 2xx `{"status": "succeeded", "charge_id": …}` | succeeded |
/// | 2xx `{"status": "declined", "decline_code": …, "message": …}` | declined (final) |
/// | 2xx `{"status": "processing"}` | unknown: ask again later |
/// | 404 on GET | the provider never received this charge: charging it is safe |
/// | 409 | a request with this key is in progress: unknown |
/// | 400 / 422 on POST | the provider refuses the request itself: declined, `gateway_rejected` |
/// | 401 / 403; 404 / 405 on POST | misconfiguration (credentials, URL): nothing charged |
/// | 429, 5xx, anything else, a body that is not this JSON | unknown |
pub fn classify(operation: Operation, status: u16, body: &[u8]) -> Answer {
    let unknown = |reason: String| Answer::Unknown { reason };
    match (status, operation) {
        (200..=299, _) => match serde_json::from_slice::<Body>(body) {
            Ok(b) => match b.status.as_str() {
                "succeeded" => match b.charge_id.filter(|c| !c.trim().is_empty()) {
                    Some(charge_id) => Answer::Succeeded {
                        charge_id: shorten(&charge_id),
                    },
                    None => unknown(format!("HTTP {status}: \"succeeded\" without a charge_id")),
                },
                "declined" => Answer::Declined {
                    code: shorten(
                        b.decline_code
                            .as_deref()
                            .filter(|c| !c.trim().is_empty())
                            .unwrap_or("declined"),
                    ),
                    message: shorten(b.message.as_deref().unwrap_or("declined by the provider")),
                },
                "processing" => unknown("processing".to_string()),
                other => unknown(format!(
                    "HTTP {status} with unknown status {:?}",
                    shorten(other)
                )),
            },
            Err(_) => unknown(format!(
                "HTTP {status} with a body that is not the contract's JSON"
            )),
        },
        (404, Operation::Status) => Answer::NotFound,
        (409, _) => unknown("HTTP 409: a request with this idempotency key is in progress".into()),
        (400 | 422, Operation::Charge) => Answer::Declined {
            code: "gateway_rejected".to_string(),
            message: shorten(&rejection_message(status, body)),
        },
        (401 | 403, _) => Answer::Misconfigured {
            reason: format!("HTTP {status}: the provider refused gateway.api_key"),
        },
        (404 | 405, Operation::Charge) => Answer::Misconfigured {
            reason: format!("HTTP {status} on POST /v1/charges: is gateway.url right?"),
        },
        _ => unknown(format!("HTTP {status}")),
    }
}

/// What a 400/422 said, for the payment's failure message.
fn rejection_message(status: u16, body: &[u8]) -> String {
    let said = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            v.get("message")
                .or_else(|| v.pointer("/error/message"))
                .and_then(|m| m.as_str())
                .map(str::to_string)
        });
    match said {
        Some(m) => format!("the provider refused the request (HTTP {status}): {m}"),
        None => format!("the provider refused the request (HTTP {status})"),
    }
}

#[async_trait]
impl Gateway for HttpGateway {
    async fn charge(&self, r: &ChargeRequest) -> Answer {
        let body = serde_json::json!({
            "payment_id": r.payment_id,
            "merchant": r.merchant,
            "amount": domain::format_amount(r.amount),
            "currency": r.currency.as_str(),
            "description": r.description,
            "metadata": r.metadata,
        });
        let request = ureq::http::Request::post(&self.charges)
            .header("Authorization", &self.authorization)
            .header("Idempotency-Key", &r.idempotency_key)
            .header("Content-Type", "application/json")
            .body(serde_json::to_vec(&body).unwrap_or_default());
        match request {
            Ok(req) => self.call(Operation::Charge, req).await,
            Err(e) => Answer::Misconfigured {
                reason: format!("cannot build the request: {e}"),
            },
        }
    }

    async fn status(&self, payment_id: Uuid) -> Answer {
        let request = ureq::http::Request::get(format!("{}/{payment_id}", self.charges))
            .header("Authorization", &self.authorization)
            .body(Vec::new());
        match request {
            Ok(req) => self.call(Operation::Status, req).await,
            Err(e) => Answer::Misconfigured {
                reason: format!("cannot build the request: {e}"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Operation::{Charge, Status};

    #[test]
    fn answers_are_read_as_the_contract_says() {
        let ok = br#"{"status": "succeeded", "charge_id": "ch_1"}"#;
        assert_eq!(
            classify(Charge, 200, ok),
            Answer::Succeeded {
                charge_id: "ch_1".into()
            }
        );
        assert_eq!(classify(Status, 201, ok), classify(Charge, 200, ok));
        let no = br#"{"status": "declined", "decline_code": "insufficient_funds", "message": "Not enough"}"#;
        assert_eq!(
            classify(Charge, 200, no),
            Answer::Declined {
                code: "insufficient_funds".into(),
                message: "Not enough".into()
            }
        );
        for (op, status, body) in [
            (Charge, 200, &br#"{"status": "processing"}"#[..]),
            (Charge, 200, br#"{"status": "succeeded"}"#),
            (Charge, 200, br#"{"status": "maybe"}"#),
            (Charge, 200, b"<html>"),
            (Charge, 409, b""),
            (Charge, 429, b""),
            (Charge, 500, ok),
            (Charge, 503, b""),
            (Status, 500, b""),
            (Status, 302, b""),
            (Charge, 404 + 1000, b""),
        ] {
            assert!(
                matches!(classify(op, status, body), Answer::Unknown { .. }),
                "{op:?} {status} {:?}",
                String::from_utf8_lossy(body)
            );
        }
        assert_eq!(classify(Status, 404, b""), Answer::NotFound);
        assert!(matches!(
            classify(Charge, 404, b""),
            Answer::Misconfigured { .. }
        ));
        for s in [401, 403] {
            assert!(matches!(
                classify(Charge, s, b""),
                Answer::Misconfigured { .. }
            ));
            assert!(matches!(
                classify(Status, s, b""),
                Answer::Misconfigured { .. }
            ));
        }
        let rejected = classify(Charge, 422, br#"{"message": "currency not supported"}"#);
        assert_eq!(
            rejected,
            Answer::Declined {
                code: "gateway_rejected".into(),
                message: "the provider refused the request (HTTP 422): currency not supported"
                    .into()
            }
        );
        assert!(matches!(classify(Status, 422, b""), Answer::Unknown { .. }));
        // Text that PostgreSQL could not store never reaches it.
        let nul = classify(
            Charge,
            200,
            br#"{"status": "succeeded", "charge_id": "ch\u0000x"}"#,
        );
        assert_eq!(
            nul,
            Answer::Succeeded {
                charge_id: "ch\u{FFFD}x".into()
            }
        );
    }
}
