//! The `async-pay` binary: one subcommand per role.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use async_pay::config::{Settings, duration_str};
use async_pay::roles;
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
    /// Run the whole pipeline in one process, for development and trying it out: create and
    /// migrate the database, then the API, relay, consumer and dlq-watch; Ctrl-C stops them.
    Dev,
    /// Run the HTTP API (applies pending migrations first; never creates the database).
    Serve,
    /// Move outbox events to RabbitMQ (wakes on NOTIFY; several relays may run at once).
    Relay {
        /// Publish everything unpublished, print how many, and exit (for cron). Exits non-zero
        /// when the database or RabbitMQ is unreachable.
        #[arg(long)]
        once: bool,
    },
    /// Process payment events through the gateway, reconcile unknown outcomes, send webhooks.
    Consume,
    /// Ask the payment provider about every payment whose outcome is unknown, once, and exit
    /// (for cron; `consume` does the same continuously). Exits non-zero when the database is
    /// unreachable or the provider refuses our configuration.
    Reconcile,
    /// Record every dead-lettered message in the dead_letters table.
    DlqWatch,
    /// Create the database if missing, apply pending migrations, and exit.
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
    async_pay::logging::init();
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
    if let Command::Healthcheck { url, timeout } = cli.command {
        return roles::healthcheck(cli.config.as_deref(), url, timeout);
    }
    let settings = Settings::load(cli.config.as_deref())?;
    roles::runtime(&settings)?.block_on(async move {
        match cli.command {
            Command::Dev => roles::dev::run(settings).await,
            Command::Serve => roles::serve::run(settings).await,
            Command::Relay { once: true } => roles::relay_once(&settings).await,
            Command::Relay { once: false } => roles::relay(settings).await,
            Command::Consume => roles::consume(settings).await,
            Command::Reconcile => roles::reconcile(&settings).await,
            Command::DlqWatch => roles::dlq_watch(settings).await,
            Command::Dlq { command } => roles::dlq::run(&settings, command).await,
            Command::Migrate => roles::migrate(&settings).await,
            // Handled above, before any runtime or configuration is needed.
            Command::Healthcheck { .. } => Ok(()),
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
