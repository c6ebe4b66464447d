//! The HTTP API: routes, authentication, request reading. Handlers live in one file per resource.

pub mod error;
pub mod health;
pub mod idempotency;
pub mod metrics;
pub mod openapi;
pub mod payments;
pub mod request_id;
pub mod webhooks;

use std::sync::Arc;
use std::time::Duration;

use actix_web::Route;
use actix_web::http::Method;
use actix_web::http::header::CONTENT_LENGTH;
use actix_web::web::{self, Bytes, BytesMut};
use actix_web::{HttpRequest, HttpResponse};
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::api::error::ApiError;
use crate::config::Settings;
use crate::db::Pool;

/// What every handler needs; one per HTTP worker, each with its own share of the pool.
pub struct AppState {
    pub pool: Pool,
    pub merchants: Merchants,
    pub max_body: u64,
    /// Upper bound for the database work of one request: waiting for a connection plus the
    /// queries. Past it the request answers 503 instead of hanging.
    pub db_deadline: Duration,
    /// `webhook.allow_private_targets`: when false, webhook URLs pointing inside the network
    /// are refused.
    pub allow_private_targets: bool,
    /// `webhook.allowed_ports`: the only ports a webhook URL may use (unless private targets are
    /// allowed).
    pub webhook_ports: Vec<u16>,
    /// `GET /metrics` is served on the API port (`server.metrics_bind` is empty).
    pub metrics_on_api_port: bool,
}

impl AppState {
    pub fn new(settings: &Settings, pool: Pool) -> Self {
        AppState {
            pool,
            merchants: Merchants::new(settings),
            max_body: settings.server.max_body.0,
            db_deadline: settings.database.acquire_timeout + settings.database.query_timeout,
            allow_private_targets: settings.webhook.allow_private_targets,
            webhook_ports: settings.webhook.allowed_ports.clone(),
            metrics_on_api_port: metrics_on_api_port(settings),
        }
    }
}

/// API keys, stored as SHA-256 digests so that comparing them takes the same time whatever the
/// key's length or content.
pub struct Merchants {
    keys: Vec<([u8; 32], Arc<str>)>,
}

impl Merchants {
    pub fn new(settings: &Settings) -> Self {
        let keys = settings
            .merchants
            .iter()
            .map(|m| {
                (
                    digest(m.api_key.expose().as_bytes()),
                    Arc::<str>::from(m.name.as_str()),
                )
            })
            .collect();
        Merchants { keys }
    }

    /// The merchant this key belongs to. Compares against every key without stopping early, in
    /// constant time per key, so timing tells nothing about which key was close.
    pub fn authenticate(&self, presented: &[u8]) -> Option<Arc<str>> {
        let presented = digest(presented);
        let mut found = None;
        for (key, name) in &self.keys {
            if bool::from(key.ct_eq(&presented)) {
                found = Some(name.clone());
            }
        }
        found
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// The merchant behind the request's `X-API-Key`, or 401.
pub fn authenticate(req: &HttpRequest, state: &AppState) -> Result<Arc<str>, ApiError> {
    let key = req
        .headers()
        .get("X-API-Key")
        .ok_or(ApiError::Unauthorized)?;
    state
        .merchants
        .authenticate(key.as_bytes())
        .ok_or(ApiError::Unauthorized)
}

/// Reads the body up to `limit` bytes. A declared Content-Length over the limit is refused before
/// a single byte is read; a chunked body is cut off as soon as it passes the limit.
pub async fn read_body(
    req: &HttpRequest,
    mut payload: web::Payload,
    limit: u64,
) -> Result<Bytes, ApiError> {
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    let mut buf = BytesMut::with_capacity(declared.unwrap_or(1024).min(limit) as usize);
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| match e {
            actix_web::error::PayloadError::Overflow => ApiError::PayloadTooLarge { limit },
            other => ApiError::BadRequest(
                "invalid_body",
                format!("could not read the request body: {other}"),
            ),
        })?;
        if (buf.len() + chunk.len()) as u64 > limit {
            return Err(ApiError::PayloadTooLarge { limit });
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

/// The path of the metrics route, which leaves the API port when `server.metrics_bind` is set.
pub const METRICS_PATH: &str = "/metrics";

/// True when `serve` answers `GET /metrics` on its API port.
pub fn metrics_on_api_port(settings: &Settings) -> bool {
    settings.server.metrics_bind.trim().is_empty()
}

/// Every route of the API: path, method, handler. The single list both the server and the
/// OpenAPI test read, so a route cannot exist undocumented (or the other way round).
pub fn route_table() -> Vec<(&'static str, Method, Route)> {
    vec![
        ("/health", Method::GET, web::get().to(health::health)),
        (
            "/openapi.json",
            Method::GET,
            web::get().to(openapi::document),
        ),
        (METRICS_PATH, Method::GET, web::get().to(metrics::scrape)),
        (
            "/api/v1/payments",
            Method::POST,
            web::post().to(payments::create),
        ),
        (
            "/api/v1/payments",
            Method::GET,
            web::get().to(payments::list::list),
        ),
        (
            "/api/v1/payments/{id}",
            Method::GET,
            web::get().to(payments::get),
        ),
        (
            "/api/v1/payments/{id}/webhook-attempts",
            Method::GET,
            web::get().to(webhooks::attempts),
        ),
        (
            "/api/v1/payments/{id}/webhook/resend",
            Method::POST,
            web::post().to(webhooks::resend),
        ),
    ]
}

/// Registers [`route_table`], with or without `GET /metrics` (off the API port when it has its
/// own address). Unknown paths and wrong methods answer the JSON error shape too.
pub fn routes(cfg: &mut web::ServiceConfig, metrics: bool) {
    let mut resources: Vec<(&'static str, actix_web::Resource, Vec<Method>)> = Vec::new();
    for (path, method, route) in route_table() {
        if path == METRICS_PATH && !metrics {
            continue;
        }
        match resources.iter_mut().find(|(p, _, _)| *p == path) {
            Some((_, r, methods)) => {
                let taken = std::mem::replace(r, web::resource(path));
                *r = taken.route(route);
                methods.push(method);
            }
            None => resources.push((path, web::resource(path).route(route), vec![method])),
        }
    }
    for (_, r, methods) in resources {
        // 405 names the methods that do exist (RFC 9110 asks for the Allow header).
        let allow = methods
            .iter()
            .map(Method::as_str)
            .collect::<Vec<_>>()
            .join(", ");
        cfg.service(r.default_service(web::to(move || {
            let allow = allow.clone();
            async move {
                let mut resp =
                    actix_web::ResponseError::error_response(&ApiError::MethodNotAllowed);
                if let Ok(v) = actix_web::http::header::HeaderValue::from_str(&allow) {
                    resp.headers_mut().insert(actix_web::http::header::ALLOW, v);
                }
                resp
            }
        })));
    }
    cfg.default_service(web::to(not_found));
}

async fn not_found() -> Result<HttpResponse, ApiError> {
    Err(ApiError::NotFound("route"))
}
