//! The `async-pay` binary: one subcommand per role.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use async_pay::config::{Settings, redact_url};
use async_pay::shutdown::Shutdown;
use async_pay::{db, roles};
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
    /// Move outbox events to RabbitMQ (wakes on NOTIFY; several relays may run at once).
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
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
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

fn run(cli: Cli) -> anyhow::Result<()> {
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
                roles::relay::run(settings, Shutdown::on_signal()).await
            }
            Command::Consume => roles::consume::run(settings, Shutdown::on_signal()).await,
            Command::DlqWatch => roles::dlq_watch::run(settings, Shutdown::on_signal()).await,
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
