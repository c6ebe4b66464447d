//! Settings: `config.example.toml` is the documented, compiled-in default; a file given with
//! `--config` (or `ASYNC_PAY_CONFIG`) is merged over it, then `DATABASE_URL` / `AMQP_URL`, then
//! `ASYNC_PAY__<SECTION>__<KEY>` environment variables. Unknown keys are an error naming the key.
//! `amqp.url`, the older spelling of a single broker address, is read as `amqp.urls` with one
//! element in every layer.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

/// The documented defaults, compiled in.
pub const DEFAULT_TOML: &str = include_str!("../config.example.toml");

/// Prefix of the environment variables that override single settings.
const ENV_PREFIX: &str = "ASYNC_PAY__";

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

/// A string that must never be printed: its `Debug` and `Display` are redacted.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    /// The secret itself. Call sites are easy to audit with a search for `expose`.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A byte count written as "512B", "64KiB", "1MiB" (or a bare integer of bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (digits, unit) = s.split_at(split);
        let n: u64 = digits
            .parse()
            .map_err(|_| format!("invalid size {s:?}: expected e.g. \"64KiB\""))?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" | "K" | "KB" | "kB" => 1024,
            "MiB" | "M" | "MB" => 1024 * 1024,
            "GiB" | "G" | "GB" => 1024 * 1024 * 1024,
            other => {
                return Err(format!(
                    "invalid size unit {other:?} in {s:?}: use B, KiB, MiB or GiB"
                ));
            }
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("size {s:?} is too large"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        if n > 0 && n.is_multiple_of(1024 * 1024) {
            write!(f, "{}MiB", n / (1024 * 1024))
        } else if n > 0 && n.is_multiple_of(1024) {
            write!(f, "{}KiB", n / 1024)
        } else {
            write!(f, "{n}B")
        }
    }
}

impl Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Str(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(ByteSize(n)),
            Raw::Str(s) => ByteSize::parse(&s).map_err(serde::de::Error::custom),
        }
    }
}

/// Durations as human strings: "250ms", "2s", "5m", "7d".
pub mod duration_str {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn parse(s: &str) -> Result<Duration, String> {
        humantime::parse_duration(s.trim()).map_err(|e| {
            format!("invalid duration {s:?} ({e}): expected e.g. \"250ms\", \"2s\", \"5m\"")
        })
    }

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A list of durations, e.g. `["1s", "2s"]`.
pub mod duration_list {
    use std::time::Duration;

    use serde::ser::SerializeSeq;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[Duration], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(v.len()))?;
        for d in v {
            seq.serialize_element(&humantime::format_duration(*d).to_string())?;
        }
        seq.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|s| super::duration_str::parse(s).map_err(serde::de::Error::custom))
            .collect()
    }
}

/// A list of secrets (broker URLs): a TOML list of strings, or one string of comma-separated
/// items (`AMQP_URL=amqp://a:5672,amqp://b:5672`). A comma inside an item is written `%2C`.
pub mod secret_list {
    use serde::de::{SeqAccess, Visitor};
    use serde::ser::SerializeSeq;
    use serde::{Deserializer, Serializer};

    use super::Secret;

    pub fn serialize<S: Serializer>(v: &[Secret], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(v.len()))?;
        for item in v {
            seq.serialize_element(item)?;
        }
        seq.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Secret>, D::Error> {
        d.deserialize_any(Items)
    }

    struct Items;

    impl<'de> Visitor<'de> for Items {
        type Value = Vec<Secret>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a URL, several separated by commas, or a list of URLs")
        }

        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(Secret::new)
                .collect())
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(item) = seq.next_element::<String>()? {
                out.push(Secret::new(item.trim()));
            }
            Ok(out)
        }
    }
}

/// One address of `amqp.urls`, taken apart.
#[derive(Debug, Clone)]
pub struct AmqpAddress {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Secret,
    pub vhost: String,
    /// The URL with its password replaced, for logs and errors.
    pub redacted: String,
}

impl AmqpAddress {
    /// `amqp://user:password@host:port/vhost`; user and password default to guest, the port to
    /// 5672, the vhost to `/` (written `%2f`). The error never contains the password.
    pub fn parse(raw: &str) -> Result<AmqpAddress, String> {
        let redacted = redact_url(raw);
        let url = url::Url::parse(raw).map_err(|e| format!("{redacted} is not a URL ({e})"))?;
        if url.scheme() != "amqp" {
            return Err(format!(
                "must start with amqp:// (TLS is not built in), got {redacted}"
            ));
        }
        let user = match url.username() {
            "" => "guest".to_string(),
            u => percent_decode(u),
        };
        let password = Secret::new(
            url.password()
                .map_or_else(|| "guest".into(), percent_decode),
        );
        let vhost = match url.path() {
            "" | "/" => "/".to_string(),
            p => percent_decode(&p[1..]),
        };
        Ok(AmqpAddress {
            host: url
                .host_str()
                .filter(|h| !h.is_empty())
                .unwrap_or("127.0.0.1")
                .to_string(),
            port: url.port().unwrap_or(5672),
            user,
            password,
            vhost,
            redacted,
        })
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl AmqpSettings {
    /// Every address of `urls`, taken apart; an error names the first bad one.
    pub fn addresses(&self) -> anyhow::Result<Vec<AmqpAddress>> {
        if self.urls.is_empty() {
            bail!("invalid configuration at `amqp.urls`: at least one broker address is needed");
        }
        self.urls
            .iter()
            .enumerate()
            .map(|(i, u)| {
                AmqpAddress::parse(u.expose())
                    .map_err(|e| anyhow::anyhow!("invalid configuration at `amqp.urls[{i}]`: {e}"))
            })
            .collect()
    }
}

impl Settings {
    /// Loads the settings the way every role does: defaults, file, environment.
    pub fn load(path: Option<&Path>) -> anyhow::Result<Self> {
        Self::load_from(path, std::env::vars())
    }

    /// Like [`Settings::load`] with an explicit environment (tests).
    pub fn load_from(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> anyhow::Result<Self> {
        let defaults: toml::Table =
            toml::from_str(DEFAULT_TOML).context("the built-in config.example.toml is invalid")?;
        let mut merged = defaults.clone();
        if let Some(path) = path {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read config file {}", path.display()))?;
            let mut file: toml::Table = toml::from_str(&text)
                .with_context(|| format!("config file {} is not valid TOML", path.display()))?;
            fold_amqp_url(&mut file).with_context(|| format!("config file {}", path.display()))?;
            merge(&mut merged, file);
        }
        let env: HashMap<String, String> = env.into_iter().collect();
        // AMQP_URL may hold several addresses, comma-separated (read by `secret_list`).
        for (shorthand, section, key) in [
            ("DATABASE_URL", "database", "url"),
            ("AMQP_URL", "amqp", "urls"),
        ] {
            if let Some(v) = env.get(shorthand).filter(|v| !v.is_empty())
                && defaults.contains_key(section)
            {
                set_path(
                    &mut merged,
                    &[section.to_string(), key.to_string()],
                    toml::Value::String(v.clone()),
                );
            }
        }
        let mut overrides: Vec<(&String, &String)> = env
            .iter()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX))
            .collect();
        overrides.sort();
        for (key, raw) in overrides {
            let mut path: Vec<String> = key[ENV_PREFIX.len()..]
                .split("__")
                .map(str::to_ascii_lowercase)
                .collect();
            if path == ["amqp", "url"] {
                path[1] = "urls".to_string();
            }
            if path.iter().any(String::is_empty) {
                bail!("environment variable {key}: empty section or key name");
            }
            let value = env_value(lookup(&defaults, &path), raw);
            set_path(&mut merged, &path, value);
        }
        Self::from_table(merged)
    }

    /// Deserializes a merged table, naming the offending key on error, then validates.
    pub fn from_table(table: toml::Table) -> anyhow::Result<Self> {
        let settings: Settings = serde_path_to_error::deserialize(toml::Value::Table(table))
            .map_err(|e| {
                let path = e.path().to_string();
                // serde quotes the offending value; for settings that hold secrets, it must not
                // reach a log or a terminal.
                let why = if path.starts_with("merchants")
                    || path.ends_with("url")
                    || path.ends_with("urls")
                    || path.ends_with("api_key")
                {
                    without_quoted(&e.inner().to_string())
                } else {
                    e.inner().to_string()
                };
                anyhow::anyhow!("invalid configuration at `{path}`: {why}")
            })?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks the rules that types cannot express.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.database.pool_size == 0 {
            bail!("invalid configuration at `database.pool_size`: must be at least 1");
        }
        if self.server.max_body.0 == 0 {
            bail!("invalid configuration at `server.max_body`: must be more than 0 bytes");
        }
        self.amqp.addresses()?;
        if self.amqp.delivery_limit == 0 {
            bail!("invalid configuration at `amqp.delivery_limit`: must be at least 1");
        }
        if self.amqp.prefetch == 0 {
            bail!("invalid configuration at `amqp.prefetch`: must be at least 1");
        }
        if self.relay.batch_size == 0 {
            bail!("invalid configuration at `relay.batch_size`: must be at least 1");
        }
        if self.relay.poll_interval < Duration::from_millis(1) {
            bail!("invalid configuration at `relay.poll_interval`: must be at least 1ms");
        }
        if self.relay.poll_interval > self.relay.idle_poll_interval {
            // Before 2026-12 poll_interval was the fallback behind LISTEN/NOTIFY ("2s"); the relay
            // now polls, so such a value would be its latency.
            bail!(
                "invalid configuration at `relay.poll_interval`: must not exceed relay.idle_poll_interval ({}); it is the pace while events flow (default 2ms)",
                humantime::format_duration(self.relay.idle_poll_interval)
            );
        }
        if self.gateway.min_delay > self.gateway.max_delay {
            bail!(
                "invalid configuration at `gateway.min_delay`: must not exceed gateway.max_delay"
            );
        }
        if !(0.0..=1.0).contains(&self.gateway.success_rate) {
            bail!("invalid configuration at `gateway.success_rate`: must be between 0 and 1");
        }
        self.validate_gateway()?;
        if self.webhook.concurrency == 0 {
            bail!("invalid configuration at `webhook.concurrency`: must be at least 1");
        }
        if self.webhook.per_host_concurrency == 0 {
            bail!("invalid configuration at `webhook.per_host_concurrency`: must be at least 1");
        }
        if self.webhook.allowed_ports.is_empty() || self.webhook.allowed_ports.contains(&0) {
            bail!(
                "invalid configuration at `webhook.allowed_ports`: list at least one port, none of them 0"
            );
        }
        if self.merchants.is_empty() {
            bail!("invalid configuration at `merchants`: at least one merchant is needed");
        }
        let mut keys = std::collections::HashSet::new();
        let mut secrets: HashMap<&str, &MerchantSettings> = HashMap::new();
        for (i, m) in self.merchants.iter().enumerate() {
            let at = format!("merchants[{i}]");
            if m.name.trim().is_empty() {
                bail!("invalid configuration at `{at}.name`: must not be empty");
            }
            if m.api_key.expose().is_empty() {
                bail!("invalid configuration at `{at}.api_key`: must not be empty");
            }
            if !keys.insert(m.api_key.expose()) {
                bail!("invalid configuration at `{at}.api_key`: the same key is configured twice");
            }
            crate::signing::secret_key(m.webhook_secret.expose()).map_err(|e| {
                anyhow::anyhow!("invalid configuration at `{at}.webhook_secret`: {e}")
            })?;
            for (j, old) in m.previous_webhook_secrets.iter().enumerate() {
                crate::signing::secret_key(old.expose()).map_err(|e| {
                    anyhow::anyhow!(
                        "invalid configuration at `{at}.previous_webhook_secrets[{j}]`: {e}"
                    )
                })?;
            }
            if let Some(other) = secrets.insert(&m.name, m)
                && (other.webhook_secret != m.webhook_secret
                    || other.previous_webhook_secrets != m.previous_webhook_secrets)
            {
                bail!(
                    "invalid configuration at `{at}.webhook_secret`: entries of merchant {:?} must share their webhook secrets",
                    m.name
                );
            }
        }
        Ok(())
    }
}

/// Reads `amqp.url` of one layer as `amqp.urls` (a layer setting both is an error).
fn fold_amqp_url(layer: &mut toml::Table) -> anyhow::Result<()> {
    let Some(toml::Value::Table(amqp)) = layer.get_mut("amqp") else {
        return Ok(());
    };
    if let Some(url) = amqp.remove("url") {
        if amqp.contains_key("urls") {
            bail!("invalid configuration at `amqp.url`: set amqp.url or amqp.urls, not both");
        }
        amqp.insert("urls".to_string(), url);
    }
    Ok(())
}

impl Settings {
    fn validate_gateway(&self) -> anyhow::Result<()> {
        let g = &self.gateway;
        if g.timeout.is_zero() {
            bail!("invalid configuration at `gateway.timeout`: must be more than 0");
        }
        // A floor, so that many unknown outcomes cannot make the sweep hammer the provider.
        if g.recheck_min < Duration::from_millis(100) || g.recheck_min > g.recheck_max {
            bail!(
                "invalid configuration at `gateway.recheck_min`: must be at least 100ms and at most gateway.recheck_max"
            );
        }
        if g.reconcile_interval.is_zero() {
            bail!("invalid configuration at `gateway.reconcile_interval`: must be more than 0");
        }
        match g.kind {
            // A simulated call longer than the timeout would be unknown every time.
            GatewayKind::Simulated if g.max_delay >= g.timeout => bail!(
                "invalid configuration at `gateway.max_delay`: must be less than gateway.timeout ({})",
                humantime::format_duration(g.timeout)
            ),
            GatewayKind::Simulated => {}
            GatewayKind::Http => {
                let ok = url::Url::parse(g.url.trim()).is_ok_and(|u| {
                    matches!(u.scheme(), "http" | "https")
                        && u.has_host()
                        && u.query().is_none()
                        && u.fragment().is_none()
                });
                if !ok {
                    bail!(
                        "invalid configuration at `gateway.url`: gateway.kind = \"http\" needs the provider's base URL without query or fragment, e.g. \"https://psp.example.com\""
                    );
                }
                let key = g.api_key.expose();
                if key.trim().is_empty() {
                    bail!(
                        "invalid configuration at `gateway.api_key`: gateway.kind = \"http\" needs the provider's API key (ASYNC_PAY__GATEWAY__API_KEY)"
                    );
                }
                // It is sent in a header: a line break or other control character would make
                // every call fail (and pause processing for good).
                if !key.bytes().all(|b| b.is_ascii_graphic()) {
                    bail!(
                        "invalid configuration at `gateway.api_key`: must be visible ASCII characters only (no spaces or line breaks)"
                    );
                }
            }
        }
        Ok(())
    }

    /// Names of the merchants whose API key is one that the built-in `config.example.toml`
    /// publishes (the demo merchant): anyone who read it or the README knows that key.
    pub fn merchants_with_published_keys(&self) -> Vec<&str> {
        let published: Vec<String> = toml::from_str::<toml::Table>(DEFAULT_TOML)
            .ok()
            .and_then(|t| t.get("merchants")?.as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter_map(|m| Some(m.get("api_key")?.as_str()?.to_string()))
            .collect();
        self.merchants
            .iter()
            .filter(|m| published.iter().any(|k| k == m.api_key.expose()))
            .map(|m| m.name.as_str())
            .collect()
    }
}

/// Deep-merges `over` into `base`: tables merge key by key, anything else replaces.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

fn lookup<'a>(table: &'a toml::Table, path: &[String]) -> Option<&'a toml::Value> {
    let (first, rest) = path.split_first()?;
    let v = table.get(first)?;
    if rest.is_empty() {
        return Some(v);
    }
    match v {
        toml::Value::Table(t) => lookup(t, rest),
        _ => None,
    }
}

fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) {
    let Some((first, rest)) = path.split_first() else {
        return;
    };
    if rest.is_empty() {
        table.insert(first.clone(), value);
        return;
    }
    let entry = table
        .entry(first.clone())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    if !entry.is_table() {
        *entry = toml::Value::Table(toml::Table::new());
    }
    if let toml::Value::Table(t) = entry {
        set_path(t, rest, value);
    }
}

/// An environment value is taken as a plain string where the default is a string (so an API key
/// of digits stays a string), and parsed as a TOML value otherwise (numbers, booleans, lists).
fn env_value(default: Option<&toml::Value>, raw: &str) -> toml::Value {
    if matches!(default, Some(toml::Value::String(_))) {
        return toml::Value::String(raw.to_string());
    }
    toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

/// A connection URL with its password replaced, for log lines and error messages.
pub fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            // libpq-style `?password=…` too.
            if u.query_pairs()
                .any(|(k, _)| k.eq_ignore_ascii_case("password"))
            {
                let pairs: Vec<(String, String)> = u
                    .query_pairs()
                    .map(|(k, v)| {
                        let v = if k.eq_ignore_ascii_case("password") {
                            "***".into()
                        } else {
                            v.into_owned()
                        };
                        (k.into_owned(), v)
                    })
                    .collect();
                u.query_pairs_mut().clear().extend_pairs(pairs);
            }
            u.to_string()
        }
        Err(_) => "<unparseable url>".to_string(),
    }
}

/// An error message with every quoted value replaced by `"…"`.
fn without_quoted(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut inside = false;
    for c in message.chars() {
        match (c, inside) {
            ('"', false) => {
                inside = true;
                out.push_str("\"…");
            }
            ('"', true) => {
                inside = false;
                out.push('"');
            }
            (_, false) => out.push(c),
            (_, true) => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_env(vars: &[(&str, &str)]) -> anyhow::Result<Settings> {
        Settings::load_from(
            None,
            vars.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    /// Collects the dotted key paths of a table (array-of-tables entries share one path).
    fn key_paths(prefix: &str, v: &toml::Value, out: &mut std::collections::BTreeSet<String>) {
        match v {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    let p = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    out.insert(p.clone());
                    key_paths(&p, v, out);
                }
            }
            toml::Value::Array(a) if a.iter().all(toml::Value::is_table) => {
                for v in a {
                    key_paths(prefix, v, out);
                }
            }
            _ => {}
        }
    }

    #[test]
    fn example_file_and_settings_struct_have_the_same_keys() {
        let example: toml::Value = toml::from_str(DEFAULT_TOML).unwrap();
        let settings = load_env(&[]).unwrap();
        let round_trip = toml::Value::try_from(&settings).unwrap();
        let (mut a, mut b) = (Default::default(), Default::default());
        key_paths("", &example, &mut a);
        key_paths("", &round_trip, &mut b);
        assert_eq!(a, b, "config.example.toml and Settings disagree");
        // And each documented default reads back as itself.
        let again: Settings =
            Settings::from_table(round_trip.as_table().cloned().unwrap_or_default()).unwrap();
        assert_eq!(format!("{again:?}"), format!("{settings:?}"));
    }

    #[test]
    fn defaults_match_the_documented_values() {
        let s = load_env(&[]).unwrap();
        assert_eq!(s.server.bind, "127.0.0.1:8000");
        assert_eq!(s.server.max_body, ByteSize(64 * 1024));
        assert_eq!(s.database.pool_size, 16);
        assert_eq!(s.database.acquire_timeout, Duration::from_secs(2));
        assert_eq!(s.merchants[0].name, "demo");
    }

    #[test]
    fn environment_overrides_file_and_shorthands() {
        let s = load_env(&[
            ("DATABASE_URL", "postgres://a@h/x"),
            ("ASYNC_PAY__DATABASE__POOL_SIZE", "3"),
            ("ASYNC_PAY__SERVER__ACQUIRE", "x"),
        ]);
        let err = format!("{:#}", s.err().map(|e| e.to_string()).unwrap_or_default());
        assert!(
            err.contains("server.acquire"),
            "unknown env key must be named: {err}"
        );

        let s = load_env(&[
            ("DATABASE_URL", "postgres://a@h/x"),
            ("ASYNC_PAY__DATABASE__POOL_SIZE", "3"),
        ])
        .unwrap();
        assert_eq!(s.database.url.expose(), "postgres://a@h/x");
        assert_eq!(s.database.pool_size, 3);

        let s = load_env(&[
            ("DATABASE_URL", "postgres://a@h/x"),
            ("ASYNC_PAY__DATABASE__URL", "postgres://b@h/y"),
            ("ASYNC_PAY__MERCHANTS__0", "ignored"),
        ]);
        assert!(
            s.is_err(),
            "a scalar where the merchants list belongs is an error"
        );

        let s = load_env(&[
            ("ASYNC_PAY__DATABASE__URL", "postgres://b@h/y"),
            ("ASYNC_PAY__SERVER__MAX_BODY", "1MiB"),
            (
                "ASYNC_PAY__MERCHANTS",
                r#"[{name = "m", api_key = "12345", webhook_secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}]"#,
            ),
        ])
        .unwrap();
        assert_eq!(s.database.url.expose(), "postgres://b@h/y");
        assert_eq!(s.server.max_body, ByteSize(1024 * 1024));
        assert_eq!(s.merchants.len(), 1);
        assert_eq!(s.merchants[0].api_key.expose(), "12345");
    }

    #[test]
    fn the_old_relay_fallback_interval_is_refused_with_the_reason() {
        let s = load_env(&[]).unwrap();
        assert_eq!(s.relay.poll_interval, Duration::from_millis(2));
        assert_eq!(s.relay.idle_poll_interval, Duration::from_millis(50));
        // "2s" was the default when the relay woke on NOTIFY; now it would be its latency.
        let err = load_env(&[("ASYNC_PAY__RELAY__POLL_INTERVAL", "2s")])
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default();
        assert!(
            err.contains("relay.poll_interval") && err.contains("idle_poll_interval"),
            "{err}"
        );
        assert!(load_env(&[("ASYNC_PAY__RELAY__POLL_INTERVAL", "0s")]).is_err());
        let s = load_env(&[
            ("ASYNC_PAY__RELAY__POLL_INTERVAL", "2s"),
            ("ASYNC_PAY__RELAY__IDLE_POLL_INTERVAL", "2s"),
        ])
        .unwrap();
        assert_eq!(s.relay.poll_interval, Duration::from_secs(2));
    }

    #[test]
    fn file_layer_and_unknown_keys() {
        let dir = std::env::temp_dir().join(format!("async-pay-cfg-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.toml");
        std::fs::write(
            &good,
            "[server]\nbind = \"0.0.0.0:9000\"\n[database]\nacquire_timeout = \"250ms\"\n",
        )
        .unwrap();
        let s = Settings::load_from(Some(&good), Vec::new()).unwrap();
        assert_eq!(s.server.bind, "0.0.0.0:9000");
        assert_eq!(s.database.acquire_timeout, Duration::from_millis(250));
        assert_eq!(s.database.pool_size, 16, "unset keys keep their defaults");

        let bad = dir.join("bad.toml");
        std::fs::write(&bad, "[database]\npool_sise = 3\n").unwrap();
        let err = Settings::load_from(Some(&bad), Vec::new())
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default();
        assert!(err.contains("database.pool_sise"), "{err}");

        let dur = dir.join("dur.toml");
        std::fs::write(&dur, "[database]\nacquire_timeout = \"soon\"\n").unwrap();
        let err = Settings::load_from(Some(&dur), Vec::new())
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default();
        assert!(err.contains("database.acquire_timeout"), "{err}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn secrets_are_redacted_in_debug_output() {
        let s = load_env(&[("ASYNC_PAY__DATABASE__URL", "postgres://u:hunter2@h/db")]).unwrap();
        let dbg = format!("{s:?}");
        assert!(!dbg.contains("secret-api-key"));
        assert!(!dbg.contains("hunter2"));
        assert!(!dbg.contains(s.merchants[0].webhook_secret.expose()));
        assert_eq!(redact_url(s.database.url.expose()), "postgres://u:***@h/db");
        assert_eq!(
            redact_url("postgres://h/db?password=hunter2&sslmode=disable"),
            "postgres://h/db?password=***&sslmode=disable"
        );
        // A malformed merchants variable is not echoed back.
        let err = load_env(&[("ASYNC_PAY__MERCHANTS", "[{name = 'x', api_key = 'hunter3'")])
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default();
        assert!(err.contains("merchants"), "{err}");
        assert!(!err.contains("hunter3"), "{err}");
    }

    #[test]
    fn merchants_sharing_a_name_must_share_a_secret_and_keys_are_unique() {
        let two = |k2: &str, s2: &str| {
            load_env(&[(
                "ASYNC_PAY__MERCHANTS",
                &format!(
                    r#"[{{name = "m", api_key = "k1", webhook_secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}},
                       {{name = "m", api_key = "{k2}", webhook_secret = "{s2}"}}]"#
                ),
            )])
        };
        assert!(two("k2", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_ok());
        assert!(two("k1", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_err());
        assert!(two("k2", "whsec_5FXVJnDsZtZr1/Khk2JT33r5q9dF2GBAPID525tBOoU=").is_err());
        assert!(two("k2", "not-a-secret").is_err());
    }

    #[test]
    fn amqp_urls_take_a_list_a_comma_separated_string_or_the_old_single_url() {
        let urls = |s: &Settings| -> Vec<String> {
            s.amqp.urls.iter().map(|u| u.expose().to_string()).collect()
        };
        let s = load_env(&[]).unwrap();
        assert_eq!(urls(&s), ["amqp://guest:guest@127.0.0.1:5672/%2f"]);

        let s =
            load_env(&[("AMQP_URL", "amqp://a:p@h1:5681/%2f, amqp://a:p@h2:5682/%2f")]).unwrap();
        assert_eq!(
            urls(&s),
            ["amqp://a:p@h1:5681/%2f", "amqp://a:p@h2:5682/%2f"]
        );
        let hosts: Vec<(String, u16)> = s
            .amqp
            .addresses()
            .unwrap()
            .into_iter()
            .map(|a| (a.host, a.port))
            .collect();
        assert_eq!(hosts, [("h1".to_string(), 5681), ("h2".to_string(), 5682)]);

        let s = load_env(&[("ASYNC_PAY__AMQP__URL", "amqp://h3")]).unwrap();
        assert_eq!(urls(&s), ["amqp://h3"]);
        let s = load_env(&[("ASYNC_PAY__AMQP__URLS", r#"["amqp://h4", "amqp://h5"]"#)]).unwrap();
        assert_eq!(urls(&s), ["amqp://h4", "amqp://h5"]);

        let dir = std::env::temp_dir().join(format!("async-pay-cfg-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let old = dir.join("old.toml");
        std::fs::write(&old, "[amqp]\nurl = \"amqp://u:p@old:5999/v\"\n").unwrap();
        let s = Settings::load_from(Some(&old), Vec::new()).unwrap();
        assert_eq!(
            urls(&s),
            ["amqp://u:p@old:5999/v"],
            "amqp.url is a list of one"
        );
        let a = &s.amqp.addresses().unwrap()[0];
        assert_eq!(
            (a.host.as_str(), a.port, a.user.as_str(), a.vhost.as_str()),
            ("old", 5999, "u", "v")
        );
        assert_eq!(a.redacted, "amqp://u:***@old:5999/v");
        // The environment still wins over the file's single url.
        let s = Settings::load_from(
            Some(&old),
            vec![("AMQP_URL".to_string(), "amqp://e1,amqp://e2".to_string())],
        )
        .unwrap();
        assert_eq!(urls(&s), ["amqp://e1", "amqp://e2"]);
        let both = dir.join("both.toml");
        std::fs::write(&both, "[amqp]\nurl = \"amqp://a\"\nurls = [\"amqp://b\"]\n").unwrap();
        let err = format!(
            "{:#}",
            Settings::load_from(Some(&both), Vec::new()).unwrap_err()
        );
        assert!(err.contains("amqp.url or amqp.urls, not both"), "{err}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_bad_broker_address_is_named_without_its_password() {
        let err = |v: &str| format!("{:#}", load_env(&[("AMQP_URL", v)]).unwrap_err());
        let e = err("amqp://u:hunter2@h1/%2f,amqps://u:hunter2@h2/%2f");
        assert!(e.contains("amqp.urls[1]") && e.contains("TLS"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
        let e = err("amqp://u:hunter2@h1/%2f,not a url hunter2");
        assert!(e.contains("amqp.urls[1]"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
        let e = err(",");
        assert!(e.contains("at least one broker address"), "{e}");
        let e = format!(
            "{:#}",
            load_env(&[("ASYNC_PAY__AMQP__URLS", "[1, 2]")]).unwrap_err()
        );
        assert!(e.contains("amqp.urls"), "{e}");
    }

    #[test]
    fn the_demo_merchant_is_known_by_its_published_key() {
        assert_eq!(
            load_env(&[]).unwrap().merchants_with_published_keys(),
            ["demo"]
        );
        let own = load_env(&[(
            "ASYNC_PAY__MERCHANTS",
            r#"[{name = "demo", api_key = "k-9f2c", webhook_secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}]"#,
        )])
        .unwrap();
        assert!(own.merchants_with_published_keys().is_empty());
        let copied = load_env(&[(
            "ASYNC_PAY__MERCHANTS",
            r#"[{name = "shop", api_key = "secret-api-key", webhook_secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}]"#,
        )])
        .unwrap();
        assert_eq!(copied.merchants_with_published_keys(), ["shop"]);
    }

    #[test]
    fn gateway_settings_are_checked_and_the_key_never_shown() {
        let http = |extra: &[(&str, &str)]| {
            let mut v = vec![
                ("ASYNC_PAY__GATEWAY__KIND", "http"),
                ("ASYNC_PAY__GATEWAY__URL", "https://psp.example.com"),
                ("ASYNC_PAY__GATEWAY__API_KEY", "sk_live_hunter4"),
            ];
            v.extend_from_slice(extra);
            load_env(&v)
                .err()
                .map(|e| format!("{e:#}"))
                .unwrap_or_default()
        };
        assert_eq!(http(&[]), "", "a complete http gateway is valid");
        for (extra, field) in [
            (("ASYNC_PAY__GATEWAY__URL", ""), "gateway.url"),
            (("ASYNC_PAY__GATEWAY__URL", "ftp://psp"), "gateway.url"),
            (
                ("ASYNC_PAY__GATEWAY__URL", "https://psp/?v=1"),
                "gateway.url",
            ),
            (("ASYNC_PAY__GATEWAY__API_KEY", ""), "gateway.api_key"),
            (
                ("ASYNC_PAY__GATEWAY__API_KEY", "sk_hunter4\r\nX: y"),
                "gateway.api_key",
            ),
            (
                ("ASYNC_PAY__GATEWAY__RECHECK_MIN", "1ms"),
                "gateway.recheck_min",
            ),
            (("ASYNC_PAY__GATEWAY__KIND", "paypal"), "gateway.kind"),
        ] {
            let err = http(&[extra]);
            assert!(err.contains(field), "{extra:?}: {err}");
            assert!(!err.contains("hunter4"), "the key is never shown: {err}");
        }
        // The simulation must answer within the timeout, or every call would be unknown.
        let err = load_env(&[
            ("ASYNC_PAY__GATEWAY__MAX_DELAY", "10s"),
            ("ASYNC_PAY__GATEWAY__TIMEOUT", "10s"),
        ])
        .err()
        .map(|e| format!("{e:#}"))
        .unwrap_or_default();
        assert!(err.contains("gateway.max_delay"), "{err}");
    }

    #[test]
    fn byte_sizes_parse() {
        assert_eq!(ByteSize::parse("64KiB"), Ok(ByteSize(65536)));
        assert_eq!(ByteSize::parse("10"), Ok(ByteSize(10)));
        assert!(ByteSize::parse("64XB").is_err());
        assert_eq!(ByteSize(65536).to_string(), "64KiB");
    }
}
