//! Request ids: every request gets one (the client's `X-Request-Id` if it sent a sane one, a new
//! UUID otherwise), echoed in the response header and printed on every log line written while
//! the request is handled ([`crate::logging`]).

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::middleware::Next;

pub const HEADER: &str = "x-request-id";
/// Longest client-supplied id that is kept; longer or odd ones are replaced.
const MAX_LEN: usize = 128;

fn acceptable(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_LEN && id.bytes().all(|b| b.is_ascii_graphic())
}

/// Middleware: `App::new().wrap(from_fn(request_id::middleware))`.
pub async fn middleware(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let id = req
        .headers()
        .get(HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| acceptable(v))
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    let mut res = crate::logging::scope(id.clone(), next.call(req)).await?;
    if let Ok(v) = HeaderValue::from_str(&id) {
        res.headers_mut().insert(HeaderName::from_static(HEADER), v);
    }
    Ok(res)
}
