//! The metrics endpoint of the roles other than `serve` (and of `serve` itself when
//! `server.metrics_bind` moves its `/metrics` off the API port): `GET /metrics` and
//! `GET /health` ("the process is up") on an address of their own.

use std::net::{SocketAddr, TcpListener};

use actix_web::dev::ServerHandle;
use actix_web::{App, HttpResponse, HttpServer, web};
use anyhow::Context;

use crate::api::metrics::{OUTBOX_QUERY_TIMEOUT, exposition};
use crate::db::{Pool, outbox};
use crate::metrics::get;

/// The metrics endpoint of a role other than `serve`, stopped with [`Exporter::stop`].
pub struct Exporter {
    /// The address it listens on (the real port when bound to port 0).
    pub addr: SocketAddr,
    handle: ServerHandle,
}

impl Exporter {
    /// Stops accepting scrapes and waits for the server to end.
    pub async fn stop(self) {
        self.handle.stop(true).await;
    }
}

struct ExporterState {
    outbox: Option<Pool>,
}

async fn exporter_metrics(state: web::Data<ExporterState>) -> HttpResponse {
    let outbox = match &state.outbox {
        Some(pool) => outbox::record_backlog(pool, OUTBOX_QUERY_TIMEOUT).await,
        None => false,
    };
    exposition(get().render(outbox))
}

async fn exporter_health() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"status": "ok"}))
}

/// Serves `GET /metrics` (and `GET /health`, "the process is up") on `bind` for a role other
/// than `serve`, in the background; `""` means off (`Ok(None)`). With `outbox`, each scrape
/// reads the outbox gauges from that pool (the relay's exporter does). Must be called inside the
/// Tokio runtime.
pub fn serve(bind: &str, outbox: Option<Pool>) -> anyhow::Result<Option<Exporter>> {
    let bind = bind.trim();
    if bind.is_empty() {
        return Ok(None);
    }
    let listener =
        TcpListener::bind(bind).with_context(|| format!("cannot serve metrics on {bind}"))?;
    let addr = listener.local_addr()?;
    let state = web::Data::new(ExporterState { outbox });
    let server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .route("/metrics", web::get().to(exporter_metrics))
            .route("/health", web::get().to(exporter_health))
    })
    // One thread is plenty for a scrape every few seconds.
    .workers(1)
    // The role owns SIGTERM/SIGINT and stops this server itself.
    .disable_signals()
    .shutdown_timeout(1)
    .listen(listener)
    .with_context(|| format!("cannot serve metrics on {bind}"))?
    .run();
    let handle = server.handle();
    tokio::spawn(async move {
        if let Err(e) = server.await {
            log::error!("the metrics server failed: {e}");
        }
    });
    log::info!("serving metrics on http://{addr}/metrics");
    Ok(Some(Exporter { addr, handle }))
}
