//! The rules of the settings that types cannot express.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::bail;

use super::{DEFAULT_TOML, GatewayKind, MerchantSettings, Settings};

impl Settings {
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
