//! The `async-pay` binary: one subcommand per role.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use async_pay::config::{Settings, duration_str, redact_url};
use async_pay::shutdown::Shutdown;
use async_pay::{db, metrics, roles};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "async-pay",
    version,
    about = "Asynchronous payment processing service"
)]
struct Cli {
    /// Configuration file merged over the built-in defaults (see config.example.toml).
    #[arg(
        long,
        short,
        global = true,
        env = "ASYNC_PAY_CONFIG",
        value_name = "PATH"
    )]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the HTTP API (applies pending migrations first).
    Serve,
    /// Move outbox events to RabbitMQ (polls the outbox; several relays may run at once).
    Relay {
        /// Publish everything unpublished, print how many, and exit (for cron). Exits non-zero
        /// when the database or RabbitMQ is unreachable.
        #[arg(long)]
        once: bool,
    },
    /// Process payment events through the gateway and send webhooks.
    Consume,
    /// Record every dead-lettered message in the dead_letters table.
    DlqWatch,
    /// Apply pending database migrations and exit.
    Migrate,
    /// List and replay dead letters (the dead_letters table that dlq-watch fills).
    Dlq {
        #[command(subcommand)]
        command: roles::dlq::DlqCommand,
    },
    /// Exit 0 if the API answers GET /health with 200, else 1 (for container health checks).
    Healthcheck {
        /// URL to ask; default: /health on server.bind (a wildcard address becomes loopback).
        #[arg(long, value_name = "URL")]
        url: Option<String>,
        /// Give up after this long ("500ms", "3s").
        #[arg(long, default_value = "3s", value_parser = duration_str::parse)]
        timeout: Duration,
    },
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format(async_pay::api::request_id::log_format)
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e:#}");
            eprintln!("async-pay: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a role, then stops its metrics exporter.
async fn with_exporter(
    exporter: Option<metrics::Exporter>,
    role: impl Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let result = role.await;
    if let Some(e) = exporter {
        e.stop().await;
    }
    result
}

/// `async-pay healthcheck`: needs no runtime, and no valid configuration when given `--url`.
fn healthcheck(
    config: Option<&Path>,
    url: Option<String>,
    timeout: Duration,
) -> anyhow::Result<()> {
    let url = match url {
        Some(u) => u,
        None => roles::healthcheck::default_url(&Settings::load(config)?.server.bind),
    };
    roles::healthcheck::check(&url, timeout).map_err(|e| anyhow::anyhow!("unhealthy: {e}"))?;
    println!("healthy: {url}");
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::Healthcheck { url, timeout } = cli.command {
        return healthcheck(cli.config.as_deref(), url, timeout);
    }
    let settings = Settings::load(cli.config.as_deref())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        match cli.command {
            Command::Serve => roles::serve::run(settings).await,
            Command::Relay { once: true } => {
                let n = roles::relay::run_once(&settings).await?;
                println!("published {n} event(s)");
                Ok(())
            }
            Command::Relay { once: false } => {
                // The relay's exporter also reports the outbox backlog, read at each scrape.
                let outbox = db::pool(&settings.database)?;
                let exporter = metrics::serve(&settings.metrics.bind, Some(outbox))?;
                with_exporter(exporter, roles::relay::run(settings, Shutdown::on_signal())).await
            }
            Command::Consume => {
                let exporter = metrics::serve(&settings.metrics.bind, None)?;
                with_exporter(
                    exporter,
                    roles::consume::run(settings, Shutdown::on_signal()),
                )
                .await
            }
            Command::DlqWatch => {
                let exporter = metrics::serve(&settings.metrics.bind, None)?;
                with_exporter(
                    exporter,
                    roles::dlq_watch::run(settings, Shutdown::on_signal()),
                )
                .await
            }
            Command::Dlq { command } => roles::dlq::run(&settings, command).await,
            // Handled above, before any runtime or configuration is needed.
            Command::Healthcheck { .. } => Ok(()),
            Command::Migrate => {
                let url = settings.database.url.expose();
                let applied = db::migrate(url).await.with_context(|| {
                    format!("cannot migrate the database at {}", redact_url(url))
                })?;
                println!("applied {} migration(s)", applied.len());
                for m in applied {
                    println!("  {m}");
                }
                Ok(())
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_valid() {
        super::Cli::command().debug_assert();
    }
}
