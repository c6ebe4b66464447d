//! `GET /health`: is this process up, and can it reach its database?

use actix_web::{HttpResponse, web};
use diesel_async::RunQueryDsl;
use serde_json::json;

use super::AppState;
use crate::db;

pub async fn health(state: web::Data<AppState>) -> HttpResponse {
    let probe = db::with_timeout(state.db_deadline, async {
        let mut conn = db::conn(&state.pool).await?;
        diesel::sql_query("SELECT 1").execute(&mut conn).await?;
        Ok(())
    })
    .await;
    match probe {
        Ok(()) => HttpResponse::Ok().json(json!({"status": "ok", "database": "ok"})),
        Err(e) => {
            log::warn!("health check: {e}");
            HttpResponse::ServiceUnavailable().json(json!({
                "status": "unavailable",
                "database": "unreachable",
                "error": {"code": "database_unavailable", "message": "the database is unreachable"},
            }))
        }
    }
}
