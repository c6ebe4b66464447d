//! `serve`'s metrics: the HTTP middleware that counts every request by its route pattern, and
//! `GET /metrics` (the outbox gauges read from the database at scrape time).

use std::time::Duration;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::Method;
use actix_web::middleware::Next;
use actix_web::{HttpResponse, web};

use super::AppState;
use crate::db::outbox;
use crate::metrics::{self, get};

/// How long a scrape may wait for the outbox query before it answers without the outbox gauges.
pub const OUTBOX_QUERY_TIMEOUT: Duration = Duration::from_secs(2);
/// The route label of requests that matched no route: never the raw path, which would let any
/// client create a new time series per URL.
pub const UNMATCHED_ROUTE: &str = "unmatched";
/// Methods outside the standard set share one label value (clients choose the method).
fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

pub fn exposition(body: String) -> HttpResponse {
    HttpResponse::Ok()
        .content_type(metrics::CONTENT_TYPE)
        .body(body)
}

/// Prometheus metrics
///
/// `GET /metrics` of `serve`: every metric in the Prometheus text format, with the outbox
/// gauges read from the database at scrape time.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses((status = 200, description = "Prometheus text exposition format", content_type = "text/plain"))
)]
pub async fn scrape(state: web::Data<AppState>) -> HttpResponse {
    let outbox =
        outbox::record_backlog(&state.pool, state.db_deadline.min(OUTBOX_QUERY_TIMEOUT)).await;
    exposition(get().render(outbox))
}

/// HTTP metrics middleware for `serve`: `App::new().wrap(from_fn(metrics::track_http))`. The route
/// label is the matched route pattern (`/api/v1/payments/{id}`), never the raw path.
pub async fn track_http(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let started = std::time::Instant::now();
    let method = req.method().clone();
    let res = next.call(req).await;
    // The route is read from the request the router has marked (an index walk). Asking before
    // the call would match the path against the route patterns a second time (regexes: 4 % of
    // serve's CPU per GET); keeping a clone of the request across the call would make routing
    // panic, as it needs the only reference. Handlers' errors arrive here as responses; an `Err`
    // comes only from a middleware and has no route.
    let (status, route) = match &res {
        Ok(r) => (r.status(), r.request().match_pattern()),
        Err(e) => (e.as_response_error().status_code(), None),
    };
    metrics::http_request(
        method_label(&method),
        route.as_deref().unwrap_or(UNMATCHED_ROUTE),
        status.as_u16(),
        started.elapsed(),
    );
    res
}
