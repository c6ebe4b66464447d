//! Settings: `config.example.toml` is the documented, compiled-in default; a file given with
//! `--config` (or `ASYNC_PAY_CONFIG`) is merged over it, then `DATABASE_URL` / `AMQP_URL`, then
//! `ASYNC_PAY__<SECTION>__<KEY>` environment variables. Unknown keys are an error naming the key.
//! `amqp.url`, the older spelling of a single broker address, is read as `amqp.urls` with one
//! element in every layer.

mod amqp;
mod load;
#[cfg(test)]
mod tests;
mod types;
mod validate;

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use amqp::AmqpAddress;
pub use types::{ByteSize, Secret, duration_list, duration_str, redact_url, secret_list};

/// The documented defaults, compiled in.
pub const DEFAULT_TOML: &str = include_str!("../../config.example.toml");

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub server: ServerSettings,
    pub database: DatabaseSettings,
    pub amqp: AmqpSettings,
    pub relay: RelaySettings,
    pub consume: ConsumeSettings,
    pub gateway: GatewaySettings,
    pub webhook: WebhookSettings,
    pub metrics: MetricsSettings,
    pub merchants: Vec<MerchantSettings>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSettings {
    /// Empty = no metrics endpoint for the non-HTTP roles.
    pub bind: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpSettings {
    /// The nodes of one RabbitMQ cluster (or the one broker); see [`AmqpSettings::addresses`].
    #[serde(with = "secret_list")]
    pub urls: Vec<Secret>,
    pub exchange: String,
    pub queue: String,
    pub routing_key: String,
    pub dead_letter_exchange: String,
    pub dead_letter_queue: String,
    pub delivery_limit: u32,
    pub prefetch: u16,
    #[serde(with = "duration_str")]
    pub confirm_timeout: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelaySettings {
    #[serde(with = "duration_str")]
    pub poll_interval: Duration,
    #[serde(with = "duration_str")]
    pub idle_poll_interval: Duration,
    pub batch_size: u32,
    #[serde(with = "duration_str")]
    pub retention: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumeSettings {
    #[serde(with = "duration_str")]
    pub shutdown_timeout: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewaySettings {
    pub kind: GatewayKind,
    #[serde(with = "duration_str")]
    pub timeout: Duration,
    #[serde(with = "duration_str")]
    pub recheck_min: Duration,
    #[serde(with = "duration_str")]
    pub recheck_max: Duration,
    #[serde(with = "duration_str")]
    pub reconcile_interval: Duration,
    #[serde(with = "duration_str")]
    pub stuck_after: Duration,
    #[serde(with = "duration_str")]
    pub min_delay: Duration,
    #[serde(with = "duration_str")]
    pub max_delay: Duration,
    pub success_rate: f64,
    pub url: String,
    pub api_key: Secret,
}

/// Which payment gateway `consume` and `reconcile` talk to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GatewayKind {
    /// The original service's in-process simulation.
    Simulated,
    /// A real provider through the HTTP contract (README.md).
    Http,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSettings {
    #[serde(with = "duration_str")]
    pub timeout: Duration,
    #[serde(with = "duration_list")]
    pub retry_delays: Vec<Duration>,
    pub concurrency: usize,
    pub per_host_concurrency: usize,
    #[serde(with = "duration_str")]
    pub poll_interval: Duration,
    pub allow_private_targets: bool,
    pub allowed_ports: Vec<u16>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    pub bind: String,
    pub workers: usize,
    pub max_body: ByteSize,
    #[serde(with = "duration_str")]
    pub shutdown_timeout: Duration,
    /// Where `serve` answers `GET /metrics`; empty = on `bind`, with the API.
    pub metrics_bind: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    pub url: Secret,
    pub pool_size: usize,
    #[serde(with = "duration_str")]
    pub acquire_timeout: Duration,
    #[serde(with = "duration_str")]
    pub query_timeout: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MerchantSettings {
    pub name: String,
    pub api_key: Secret,
    pub webhook_secret: Secret,
    #[serde(default)]
    pub previous_webhook_secrets: Vec<Secret>,
}
