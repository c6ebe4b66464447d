//! The HTTP connector (`gateway.kind = "http"`): speaks the contract in README.md ("Payment
//! gateway: the HTTP contract"), so a thin adapter can put any real provider behind it.
//!
//! - `POST {url}/v1/charges`, headers `Authorization: Bearer {api_key}`,
//!   `Idempotency-Key: {payment id}`, a JSON body with the payment.
//! - `GET {url}/v1/charges/{payment id}`, the same `Authorization`.
//!
//! How each answer is read is [`classify`]. Calls are asynchronous (hyper, HTTP/1.1 over a pool
//! of keep-alive connections): a call in flight is a task and a connection, not a thread, so a
//! consumer with 1,000 payments at the provider stays small. Each call is bounded by
//! `gateway.timeout` (here, and by the caller). A request is sent again on another connection
//! only when it was never written to the first one (a pooled connection found closed); once its
//! sending has started, a failure is an unknown outcome, never a second request.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Uri};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use uuid::Uuid;

use super::{Answer, ChargeRequest, Gateway, Operation};
use crate::config::{GatewaySettings, redact_url};
use crate::domain;

/// Largest answer body read; the contract's answers are a few hundred bytes.
const BODY_LIMIT: usize = 64 * 1024;
/// Idle keep-alive connections kept to the provider: as many as calls may run at once, so a
/// steady load reuses connections instead of opening one per call.
const IDLE_CONNECTIONS: usize = 1024;
/// How long an idle connection is kept (ureq's default, which this connector used before): a
/// provider that closes idle connections sooner is noticed when it closes them, and a request
/// that finds its pooled connection closed before it was written goes out on a new one.
const IDLE_AGE: Duration = Duration::from_secs(15);
/// Longest charge id accepted (a provider's reference is short: Stripe's are 27 characters).
const CHARGE_ID_LIMIT: usize = 255;
/// Longest decline message or unknown reason kept (they are stored and shown to merchants).
const TEXT_LIMIT: usize = 500;
const USER_AGENT: &str = concat!("async-pay/", env!("CARGO_PKG_VERSION"));

type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

pub struct HttpGateway {
    client: HttpClient,
    /// `{url}/v1/charges`
    charges: Uri,
    /// `Bearer {api_key}`, marked sensitive; never logged.
    authorization: HeaderValue,
    timeout: Duration,
}

impl HttpGateway {
    /// The connector for `gateway.url`, trusting the public web PKI (webpki roots).
    pub fn new(s: &GatewaySettings) -> anyhow::Result<Self> {
        let roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        Self::with_roots(s, roots)
    }

    /// The connector trusting these certificate authorities instead (tests: a local CA).
    pub fn with_roots(s: &GatewaySettings, roots: rustls::RootCertStore) -> anyhow::Result<Self> {
        let base = s.url.trim().trim_end_matches('/');
        let parsed = url::Url::parse(base)
            .map_err(|e| anyhow::anyhow!("gateway.url {}: {e}", redact_url(base)))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            anyhow::bail!(
                "gateway.url must be an http:// or https:// URL, got {}",
                redact_url(base)
            );
        }
        let charges: Uri = format!("{base}/v1/charges")
            .parse()
            .map_err(|e| anyhow::anyhow!("gateway.url {}: {e}", redact_url(base)))?;
        let mut authorization = HeaderValue::try_from(format!("Bearer {}", s.api_key.expose()))
            .map_err(|_| anyhow::anyhow!("gateway.api_key is not a valid HTTP header value"))?;
        authorization.set_sensitive(true);

        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| anyhow::anyhow!("cannot set up TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let mut tcp = HttpConnector::new();
        // The https connector below decides the scheme; this one only opens TCP connections.
        tcp.enforce_http(false);
        tcp.set_nodelay(true);
        tcp.set_connect_timeout(Some(s.timeout));
        // A connector of our own: no proxy from the environment (HTTPS_PROXY, ALL_PROXY …), the
        // bearer key goes to gateway.url and nowhere else. An egress proxy belongs in front of
        // the adapter, configured there.
        let connector = HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(tcp);
        // HTTP/1.1 only (the crate is built without HTTP/2). hyper follows no redirects: a 3xx
        // is an answer (unknown), never followed with the API key.
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(IDLE_CONNECTIONS)
            .pool_idle_timeout(IDLE_AGE)
            .pool_timer(TokioTimer::new())
            // Resend only a request that was never written (its pooled connection was found
            // closed before): hyper-util's default, named because the contract depends on it.
            .retry_canceled_requests(true)
            .build(connector);
        Ok(HttpGateway {
            client,
            charges,
            authorization,
            timeout: s.timeout,
        })
    }

    /// Sends a request and reads the answer, within `gateway.timeout`.
    async fn call(&self, operation: Operation, request: Request<Full<Bytes>>) -> Answer {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let sent = tokio::time::timeout_at(deadline, self.client.request(request)).await;
        let response = match sent {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                return Answer::Unknown {
                    reason: describe(&e),
                };
            }
            Err(_) => {
                return Answer::Unknown {
                    reason: "no answer within gateway.timeout".to_string(),
                };
            }
        };
        let status = response.status().as_u16();
        // A body that cannot be read whole (over BODY_LIMIT, cut short, past the deadline) is
        // still an answer with this status. Its connection is then closed, not reused.
        let body = tokio::time::timeout_at(
            deadline,
            Limited::new(response.into_body(), BODY_LIMIT).collect(),
        )
        .await
        .ok()
        .and_then(Result::ok)
        .map(|b| b.to_bytes())
        .unwrap_or_default();
        classify(operation, status, &body)
    }

    fn request(&self, method: hyper::Method, uri: Uri, body: Vec<u8>) -> Request<Full<Bytes>> {
        let mut request = Request::new(Full::new(Bytes::from(body)));
        *request.method_mut() = method;
        *request.uri_mut() = uri;
        let headers = request.headers_mut();
        headers.insert(header::AUTHORIZATION, self.authorization.clone());
        headers.insert(header::USER_AGENT, HeaderValue::from_static(USER_AGENT));
        request
    }
}

/// A transport error as a reason: hyper's error and its causes (no URL: it is in the
/// configuration, and the cause of a connection failure names the address).
fn describe(e: &hyper_util::client::legacy::Error) -> String {
    let mut reason = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        reason.push_str(": ");
        reason.push_str(&c.to_string());
        cause = c.source();
    }
    shorten(&reason)
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
/// | 401 / 403 | misconfiguration (our credentials): nothing charged |
/// | 429, 5xx, anything else, a body that is not this JSON | unknown |
pub fn classify(operation: Operation, status: u16, body: &[u8]) -> Answer {
    let unknown = |reason: String| Answer::Unknown { reason };
    match (status, operation) {
        (200..=299, _) => match serde_json::from_slice::<Body>(body) {
            Ok(b) => match b.status.as_str() {
                // The provider's reference is kept exactly as given, or not at all: one that
                // cannot be stored as it is (empty, NUL, over CHARGE_ID_LIMIT) is not the
                // contract's, and what the provider did is asked again later.
                "succeeded" => match b.charge_id {
                    Some(c)
                        if !c.trim().is_empty()
                            && !c.contains('\0')
                            && c.len() <= CHARGE_ID_LIMIT =>
                    {
                        Answer::Succeeded { charge_id: c }
                    }
                    _ => unknown(format!(
                        "HTTP {status}: \"succeeded\" without a usable charge_id"
                    )),
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
        let key = match HeaderValue::try_from(r.idempotency_key.as_str()) {
            Ok(k) => k,
            Err(e) => {
                return Answer::Misconfigured {
                    reason: format!("cannot build the request: {e}"),
                };
            }
        };
        let body = serde_json::to_vec(&body).unwrap_or_default();
        let mut request = self.request(hyper::Method::POST, self.charges.clone(), body);
        let headers = request.headers_mut();
        headers.insert("idempotency-key", key);
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        self.call(Operation::Charge, request).await
    }

    async fn status(&self, payment_id: Uuid) -> Answer {
        let uri = match format!("{}/{payment_id}", self.charges).parse::<Uri>() {
            Ok(u) => u,
            Err(e) => {
                return Answer::Misconfigured {
                    reason: format!("cannot build the request: {e}"),
                };
            }
        };
        let request = self.request(hyper::Method::GET, uri, Vec::new());
        self.call(Operation::Status, request).await
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
        // A POST answered 404 did not charge, but it says nothing about our configuration as a
        // whole (an adapter may answer it for one payment): unknown, asked again later.
        assert!(matches!(classify(Charge, 404, b""), Answer::Unknown { .. }));
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
        // A charge id is kept as given or not at all.
        let nul = classify(
            Charge,
            200,
            br#"{"status": "succeeded", "charge_id": "ch\u0000x"}"#,
        );
        assert!(matches!(nul, Answer::Unknown { .. }), "{nul:?}");
        let long = format!(
            r#"{{"status": "succeeded", "charge_id": "{}"}}"#,
            "c".repeat(256)
        );
        assert!(matches!(
            classify(Charge, 200, long.as_bytes()),
            Answer::Unknown { .. }
        ));
        // Decline texts are stored with NUL replaced.
        let text = classify(
            Charge,
            200,
            br#"{"status": "declined", "decline_code": "x\u0000", "message": "m"}"#,
        );
        assert_eq!(
            text,
            Answer::Declined {
                code: "x\u{FFFD}".into(),
                message: "m".into()
            }
        );
    }
}
