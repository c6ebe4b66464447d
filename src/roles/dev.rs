//! `async-pay dev`: the whole pipeline in one process, for trying it out and for development:
//! creates and migrates the database (like `migrate`), then runs the API, the relay, the
//! consumer and dlq-watch, each as its own task with its own connection pools, exactly as their
//! own subcommands would. Ctrl-C (or SIGTERM) stops them in pipeline order: the API first (no new
//! payments), then the relay, the consumer (in-flight payments finish), dlq-watch. If a role
//! ends by itself (a failure), the others are stopped too and the error is reported.
//!
//! Production runs each role as its own process (`serve`, `relay`, `consume`, `dlq-watch`), so
//! that each scales and restarts on its own.

use anyhow::Context;
use tokio::task::JoinHandle;

use super::{consume, dlq_watch, relay, serve};
use crate::config::{Settings, redact_url};
use crate::db;
use crate::shutdown::{self, Shutdown};

type Running = (&'static str, Shutdown, JoinHandle<anyhow::Result<()>>);

/// Starts a role with a stop switch of its own; `ended` is triggered when it returns.
fn start<F, Fut>(name: &'static str, run: F, settings: &Settings, ended: &Shutdown) -> Running
where
    F: FnOnce(Settings, Shutdown) -> Fut,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let stop = Shutdown::new();
    let role = run(settings.clone(), stop.clone());
    let ended = ended.clone();
    let task = tokio::spawn(async move {
        let result = role.await;
        ended.trigger();
        result
    });
    (name, stop, task)
}

pub async fn run(settings: Settings) -> anyhow::Result<()> {
    let listener = serve::bind(&settings)?;
    let url = settings.database.url.expose();
    let applied = db::migrate(url)
        .await
        .with_context(|| format!("cannot migrate the database at {}", redact_url(url)))?;
    for m in &applied {
        log::info!("applied migration {m}");
    }
    let started = serve::start_on(&settings, listener)?;
    let (api, addr) = (started.server.handle(), started.addr);
    let ended = Shutdown::new();
    let server = {
        let ended = ended.clone();
        tokio::spawn(async move {
            let result = started.server.await.context("the HTTP server failed");
            ended.trigger();
            result
        })
    };
    let roles = [
        start("relay", relay::run, &settings, &ended),
        start("consume", consume::run, &settings, &ended),
        start("dlq-watch", dlq_watch::run, &settings, &ended),
    ];
    log::info!(
        "async-pay dev: the API on http://{addr}, the relay, the consumer and dlq-watch run in \
         this process; Ctrl-C stops them"
    );
    tokio::select! {
        _ = shutdown::signal() => {}
        _ = ended.wait() => log::error!("a role stopped by itself; stopping the others"),
    }
    // In pipeline order.
    let mut first_error = None;
    let mut keep = |name: &str, r: Result<anyhow::Result<()>, tokio::task::JoinError>| {
        let r = r
            .map_err(|e| anyhow::anyhow!("the task failed: {e}"))
            .and_then(|r| r);
        if let Err(e) = r {
            log::error!("{name}: {e:#}");
            first_error.get_or_insert(e.context(name.to_string()));
        }
    };
    api.stop(true).await;
    keep("serve", server.await);
    for (name, stop, task) in roles {
        stop.trigger();
        keep(name, task.await);
    }
    log::info!("async-pay dev stopped");
    first_error.map_or(Ok(()), Err)
}
