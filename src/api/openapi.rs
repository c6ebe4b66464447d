//! `GET /openapi.json`: the OpenAPI 3.1 document, generated from the handlers' annotations and
//! the DTOs themselves, so it cannot drift from the code (a test compares it with the routes).

use actix_web::{HttpResponse, web};
use utoipa::openapi::security::{ApiKey, ApiKeyValue, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{AppState, METRICS_PATH, health, payments, webhooks};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "async-pay",
        description = "Asynchronous payment processing: create payments (answered 202 at once), \
                       follow them to a final status, and receive signed webhooks."
    ),
    paths(
        payments::create,
        payments::list::list,
        payments::get,
        webhooks::attempts,
        webhooks::resend,
        health::health,
        document,
        super::metrics::scrape,
    ),
    modifiers(&ApiKeyAuth),
    tags(
        (name = "payments", description = "Create and read payments"),
        (name = "webhooks", description = "Webhook deliveries of a payment"),
        (name = "operations", description = "Health and API description"),
    )
)]
pub struct ApiDoc;

struct ApiKeyAuth;

impl Modify for ApiKeyAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        if let Some(components) = openapi.components.as_mut() {
            components.add_security_scheme(
                "api_key",
                SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                    "X-API-Key",
                    "The merchant's API key",
                ))),
            );
        }
    }
}

/// OpenAPI document
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operations",
    responses((status = 200, description = "This document (OpenAPI 3.1)", content_type = "application/json"))
)]
pub async fn document(state: web::Data<AppState>) -> HttpResponse {
    let mut doc = ApiDoc::openapi();
    // The document describes what this port serves.
    if !state.metrics_on_api_port {
        doc.paths.paths.remove(METRICS_PATH);
    }
    HttpResponse::Ok().json(doc)
}
