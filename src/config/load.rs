//! Layering: the built-in defaults, the file, `DATABASE_URL` / `AMQP_URL`, then
//! `ASYNC_PAY__<SECTION>__<KEY>` variables; unknown keys name themselves.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, bail};

use super::types::without_quoted;
use super::{DEFAULT_TOML, Settings};

/// Prefix of the environment variables that override single settings.
const ENV_PREFIX: &str = "ASYNC_PAY__";

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
