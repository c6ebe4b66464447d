//! `async-pay serve`: the HTTP API.
//!
//! Refuses to start when a merchant uses the API key published in config.example.toml (the demo
//! merchant) and `server.bind` is not a loopback address. Applies pending migrations to the
//! existing database (a missing one is an error: only `async-pay migrate` creates it), then
//! answers requests until SIGTERM/SIGINT, after which in-flight requests get
//! `server.shutdown_timeout` to finish. It never talks to RabbitMQ: a payment and its event are
//! committed together and the relay moves the event. While the database is down,
//! requests answer 503 after at most `database.acquire_timeout` + `database.query_timeout`, and
//! the pool reconnects by itself when the database is back. `GET /metrics` serves the Prometheus
//! metrics of this process ([`crate::metrics`]), on the API port or, with `server.metrics_bind`
//! set, only on that address (with a one-connection pool of its own for the outbox gauges).

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use actix_web::middleware::{Logger, from_fn};
use actix_web::{App, HttpServer, web};
use anyhow::Context;

use super::exporter::{self, Exporter};
use crate::api::{self, AppState};
use crate::config::{DatabaseSettings, Settings, redact_url};
use crate::db;

/// A server bound to its address but not yet awaited (tests spawn it and use `addr`).
pub struct Started {
    pub server: actix_web::dev::Server,
    pub addr: SocketAddr,
    /// `/metrics` on its own address (`server.metrics_bind`), already running; stop it after
    /// the server.
    pub metrics: Option<Exporter>,
}

/// Binds `server.bind`. The demo merchant's API key is published (config.example.toml, the
/// README), so a server that accepts it listens on loopback only, or does not start.
pub fn bind(settings: &Settings) -> anyhow::Result<TcpListener> {
    let listener = TcpListener::bind(&settings.server.bind)
        .with_context(|| format!("cannot listen on {}", settings.server.bind))?;
    let addr = listener.local_addr()?;
    let demo = settings.merchants_with_published_keys();
    if !demo.is_empty() {
        let names = demo.join(", ");
        if !addr.ip().to_canonical().is_loopback() {
            anyhow::bail!(
                "refusing to serve on {addr}: merchant {names} uses the API key published in \
                 config.example.toml and the README, which anyone can read; it is accepted only \
                 when server.bind is a loopback address (127.0.0.1, ::1). Configure your own \
                 merchants, either with the environment variable ASYNC_PAY__MERCHANTS='[{{name = \
                 \"shop\", api_key = \"<random key>\", webhook_secret = \"whsec_<base64 of 32 \
                 random bytes>\"}}]' or with [[merchants]] entries in a config file (--config \
                 PATH or ASYNC_PAY_CONFIG); config.example.toml documents them"
            );
        }
        log::warn!(
            "merchant {names} uses the API key published in config.example.toml: accepted only \
             because the API listens on loopback ({addr})"
        );
    }
    Ok(listener)
}

/// Binds the listener (so the port is known before anything runs) and builds the server.
pub fn start(settings: &Settings) -> anyhow::Result<Started> {
    start_on(settings, bind(settings)?)
}

/// Builds the server on a listener from [`bind`].
pub fn start_on(settings: &Settings, listener: TcpListener) -> anyhow::Result<Started> {
    // Never more workers than connections: each worker holds its own share of the pool.
    let workers = match settings.server.workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
    .min(settings.database.pool_size);
    // One pool per worker, each with its share of `database.pool_size`, together exactly
    // `pool_size`. A connection's I/O task runs on the worker (runtime) that opened it, so with
    // one shared pool about half the queries hopped between worker threads twice; per-worker
    // pools cut serve's CPU per GET from about 85 to 62-73 µs (measured on 2 cores, 2026-11-26).
    // The price: a request waits only for its own worker's connections.
    let shares: Vec<DatabaseSettings> = (0..workers)
        .map(|i| {
            let mut share = settings.database.clone();
            share.pool_size = settings.database.pool_size / workers
                + usize::from(i < settings.database.pool_size % workers);
            share
        })
        .collect();
    let states = shares
        .iter()
        .map(|share| Ok(web::Data::new(AppState::new(settings, db::pool(share)?))))
        .collect::<anyhow::Result<Vec<_>>>()?;
    // The factory runs once per worker, and again for a worker that actix restarts after it
    // died: that one gets a new pool of the dead worker's size rather than sharing a live one.
    let next = Arc::new(AtomicUsize::new(0));
    let app_settings = settings.clone();
    let addr = listener.local_addr()?;
    let metrics_on_api_port = api::metrics_on_api_port(settings);
    let exporter = if metrics_on_api_port {
        None
    } else {
        // One connection is plenty for a scrape every few seconds, and keeps scrapes from
        // taking connections from requests.
        let mut scrape = settings.database.clone();
        scrape.pool_size = 1;
        exporter::serve(&settings.server.metrics_bind, Some(db::pool(&scrape)?))
            .context("server.metrics_bind")?
    };
    let server = HttpServer::new(move || {
        let n = next.fetch_add(1, Ordering::Relaxed);
        let state = match states.get(n) {
            Some(state) => state.clone(),
            None => match db::pool(&shares[n % workers]) {
                Ok(pool) => web::Data::new(AppState::new(&app_settings, pool)),
                Err(e) => {
                    log::error!("restarted HTTP worker: {e:#}; it shares a pool with another");
                    states[n % workers].clone()
                }
            },
        };
        App::new()
            .app_data(state)
            // Innermost: a request id for the response header and every log line of the request.
            .wrap(from_fn(api::request_id::middleware))
            // Method, path, status, size, duration, request id: never other headers (API keys)
            // or bodies.
            .wrap(Logger::new(r#"%a "%r" %s %b %Dms req=%{x-request-id}o"#))
            // Outermost: counts every request, labelled with its matched route pattern.
            .wrap(from_fn(api::metrics::track_http))
            .configure(|cfg| api::routes(cfg, metrics_on_api_port))
    })
    .shutdown_timeout(settings.server.shutdown_timeout.as_secs().max(1))
    .workers(workers)
    .listen(listener)?;
    Ok(Started {
        server: server.run(),
        addr,
        metrics: exporter,
    })
}

pub async fn run(settings: Settings) -> anyhow::Result<()> {
    // First, so that a server that must not start touches nothing.
    let listener = bind(&settings)?;
    let url = settings.database.url.expose();
    // Never creates the database (only `async-pay migrate` does): a typo in the URL must fail
    // loudly instead of taking payments into a new, empty database.
    let applied = db::migrate_existing(url)
        .await
        .with_context(|| format!("cannot prepare the database at {}", redact_url(url)))?;
    for m in &applied {
        log::info!("applied migration {m}");
    }
    let started = start_on(&settings, listener)?;
    log::info!("serving the API on http://{}", started.addr);
    let served = started.server.await.context("the HTTP server failed");
    if let Some(exporter) = started.metrics {
        exporter.stop().await;
    }
    served
}
