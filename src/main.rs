//! The `async-pay` binary: one subcommand per role.

use async_pay::{config::Settings, roles};
use clap::{Parser, Subcommand};
use std::{path::PathBuf, process::ExitCode};

/// Asynchronous payment processing service
#[derive(Debug, Parser)]
#[command(name = "async-pay", version)]
struct Cli {
    /// Configuration file merged over the built-in defaults (see config.example.toml).
    #[arg(long, short, global = true, env = "ASYNC_PAY_CONFIG")]
    #[arg(value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Migrate, then run the API, relay, consumer and dlq-watch in one process (Ctrl-C stops).
    Dev,
    /// Run the HTTP API (applies pending migrations first; never creates the database).
    Serve,
    /// Move outbox events to RabbitMQ (polls the outbox; several relays may run at once).
    Relay(roles::relay::Args),
    /// Process payment events through the gateway, reconcile unknown outcomes, send webhooks.
    Consume,
    /// Ask the payment provider about every payment whose outcome is unknown, once (for cron;
    /// `consume` does it continuously). Exits 1 without database, or when the provider refuses.
    Reconcile,
    /// Record every dead-lettered message in the dead_letters table.
    DlqWatch,
    /// Create the database if missing, apply pending migrations, and exit.
    Migrate,
    /// List and replay dead letters (the dead_letters table that dlq-watch fills).
    #[command(subcommand)]
    Dlq(roles::dlq::DlqCommand),
    /// Exit 0 if the API answers GET /health with 200, else 1 (for container health checks).
    Healthcheck(roles::healthcheck::Args),
}

fn main() -> ExitCode {
    async_pay::logging::init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e:#}");
            eprintln!("async-pay: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::Healthcheck(args) = cli.command {
        return roles::healthcheck(cli.config.as_deref(), args);
    }
    let settings = Settings::load(cli.config.as_deref())?;
    roles::runtime(&settings)?.block_on(async move {
        match cli.command {
            Command::Dev => roles::dev::run(settings).await,
            Command::Serve => roles::serve::run(settings).await,
            Command::Relay(args) if args.once => roles::relay_once(&settings).await,
            Command::Relay(_) => roles::relay(settings).await,
            Command::Consume => roles::consume(settings).await,
            Command::Reconcile => roles::reconcile(&settings).await,
            Command::DlqWatch => roles::dlq_watch(settings).await,
            Command::Dlq(command) => roles::dlq::run(&settings, command).await,
            Command::Migrate => roles::migrate(&settings).await,
            // Handled above, before any runtime or configuration is needed.
            Command::Healthcheck(_) => Ok(()),
        }
    })
}

#[test]
fn cli_definition_is_valid() {
    <Cli as clap::CommandFactory>::command().debug_assert();
}
