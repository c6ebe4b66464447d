//! `GET /health`: is this process up, and can it reach its database?

use actix_web::{HttpResponse, web};
use diesel_async::RunQueryDsl;
use serde::Serialize;

use super::AppState;
use crate::api::error::ErrorDetail;
use crate::db;

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct HealthOut {
    /// `ok` or `unavailable`.
    pub status: &'static str,
    /// `ok` or `unreachable`.
    pub database: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorDetail>,
}

/// Health check
///
/// No API key needed. 200 when the database answers, 503 otherwise.
#[utoipa::path(
    get,
    path = "/health",
    tag = "operations",
    responses(
        (status = 200, description = "Up, database reachable", body = HealthOut),
        (status = 503, description = "Database unreachable", body = HealthOut),
    )
)]
pub async fn health(state: web::Data<AppState>) -> HttpResponse {
    let probe = db::with_timeout(state.db_deadline, async {
        let mut conn = db::conn(&state.pool).await?;
        diesel::sql_query("SELECT 1").execute(&mut conn).await?;
        Ok(())
    })
    .await;
    match probe {
        Ok(()) => HttpResponse::Ok().json(HealthOut {
            status: "ok",
            database: "ok",
            error: None,
        }),
        Err(e) => {
            log::warn!("health check: {e}");
            HttpResponse::ServiceUnavailable().json(HealthOut {
                status: "unavailable",
                database: "unreachable",
                error: Some(ErrorDetail {
                    code: "database_unavailable".into(),
                    message: "the database is unreachable".into(),
                    field: None,
                }),
            })
        }
    }
}
