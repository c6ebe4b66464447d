//! Request ids: every request gets one (the client's `X-Request-Id` if it sent a sane one, a new
//! UUID otherwise), echoed in the response header and printed on every log line written while
//! the request is handled ([`crate::logging`]). A new payment keeps it, and the event the POST
//! writes carries it through every role ([`crate::domain::correlation`]).

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::middleware::Next;

use crate::domain::correlation::{Correlation, request_id_ok};

pub const HEADER: &str = "x-request-id";
/// The W3C Trace Context header a client may send with a request.
pub const TRACEPARENT: &str = "traceparent";

/// This request's id (set by [`middleware`]) and the client's `traceparent` if it is valid: what
/// a new payment and its event keep.
pub fn correlation(req: &actix_web::HttpRequest) -> Correlation {
    let traceparent = req.headers().get(TRACEPARENT).and_then(|v| v.to_str().ok());
    Correlation::checked(crate::logging::current().as_deref(), traceparent)
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
        // Longer or odd ones are replaced.
        .filter(|v| request_id_ok(v))
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    let mut res = crate::logging::scope(id.clone(), next.call(req)).await?;
    if let Ok(v) = HeaderValue::from_str(&id) {
        res.headers_mut().insert(HeaderName::from_static(HEADER), v);
    }
    Ok(res)
}
