//! One module per role of the `async-pay` binary, and here each subcommand as `main.rs` calls
//! it: the role, its metrics exporter (on `metrics.bind`), what it prints. The long-running
//! roles return on SIGTERM/SIGINT.

pub mod consume;
pub mod dev;
pub mod dlq;
pub mod dlq_watch;
pub mod exporter;
pub mod healthcheck;
pub mod reconcile;
pub mod relay;
pub mod serve;

use std::path::Path;

use anyhow::Context;

use crate::config::{Settings, redact_url};
use crate::db;
use crate::shutdown::Shutdown;

/// Tokio's default size of the blocking pool.
const TOKIO_BLOCKING_THREADS: usize = 512;

/// The runtime every role runs on.
pub fn runtime(settings: &Settings) -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // The webhook sender blocks a thread per POST in flight (ureq), at most
        // webhook.concurrency: Tokio's default of 512 holds that unless it is set higher, and
        // leaves room for the rest (the gateway connector's DNS lookups, migrations). The gateway
        // connector is asynchronous: its calls in flight need no thread.
        .max_blocking_threads(TOKIO_BLOCKING_THREADS.max(settings.webhook.concurrency + 64))
        .build()
        .context("cannot start the async runtime")
}

/// Runs a role with its metrics exporter (if `metrics.bind` is set), then stops the exporter.
/// With `outbox`, each scrape also reads the outbox backlog from that pool.
async fn with_exporter(
    settings: &Settings,
    outbox: Option<db::Pool>,
    role: impl Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let exporter = exporter::serve(&settings.metrics.bind, outbox)?;
    let result = role.await;
    if let Some(e) = exporter {
        e.stop().await;
    }
    result
}

/// `async-pay relay`: until SIGTERM/SIGINT; its exporter also reports the outbox backlog.
pub async fn relay(settings: Settings) -> anyhow::Result<()> {
    let outbox = db::pool(&settings.database)?;
    let role = relay::run(settings.clone(), Shutdown::on_signal());
    with_exporter(&settings, Some(outbox), role).await
}

/// `async-pay relay --once`: publishes everything unpublished and says how many.
pub async fn relay_once(settings: &Settings) -> anyhow::Result<()> {
    let n = relay::run_once(settings).await?;
    println!("published {n} event(s)");
    Ok(())
}

/// `async-pay consume`: until SIGTERM/SIGINT.
pub async fn consume(settings: Settings) -> anyhow::Result<()> {
    let role = consume::run(settings.clone(), Shutdown::on_signal());
    with_exporter(&settings, None, role).await
}

/// `async-pay dlq-watch`: until SIGTERM/SIGINT.
pub async fn dlq_watch(settings: Settings) -> anyhow::Result<()> {
    let role = dlq_watch::run(settings.clone(), Shutdown::on_signal());
    with_exporter(&settings, None, role).await
}

/// `async-pay reconcile`: one pass, then its report.
pub async fn reconcile(settings: &Settings) -> anyhow::Result<()> {
    println!("{}", reconcile::run(settings, Shutdown::on_signal()).await?);
    Ok(())
}

/// `async-pay migrate`: creates the database if missing, applies the migrations, lists them.
pub async fn migrate(settings: &Settings) -> anyhow::Result<()> {
    let url = settings.database.url.expose();
    let applied = db::migrate(url)
        .await
        .with_context(|| format!("cannot migrate the database at {}", redact_url(url)))?;
    println!("applied {} migration(s)", applied.len());
    for m in applied {
        println!("  {m}");
    }
    Ok(())
}

/// `async-pay healthcheck`: needs no runtime, and no valid configuration when given `--url`.
pub fn healthcheck(config: Option<&Path>, args: healthcheck::Args) -> anyhow::Result<()> {
    let url = match args.url {
        Some(u) => u,
        None => healthcheck::default_url(&Settings::load(config)?.server.bind),
    };
    healthcheck::check(&url, args.timeout).map_err(|e| anyhow::anyhow!("unhealthy: {e}"))?;
    println!("healthy: {url}");
    Ok(())
}
