//! The settings' tests: the example file against the struct, every layer, every rule.

use std::time::Duration;

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

    let s = load_env(&[("AMQP_URL", "amqp://a:p@h1:5681/%2f, amqp://a:p@h2:5682/%2f")]).unwrap();
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
