//! `async-pay healthcheck [--url URL]`: asks a running `serve` for `GET /health` and exits 0
//! when it answers 200, 1 otherwise (no answer, timeout, 503 because the database is down).
//! Made for container health checks on images without curl. Without `--url` it derives the URL
//! from `server.bind` (a wildcard address becomes loopback).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use crate::config::duration_str;

/// The options of `async-pay healthcheck`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// URL to ask; default: /health on server.bind (a wildcard address becomes loopback).
    #[arg(long, value_name = "URL")]
    pub url: Option<String>,
    /// Give up after this long ("500ms", "3s").
    #[arg(long, default_value = "3s", value_parser = duration_str::parse)]
    pub timeout: Duration,
}

/// The `/health` URL of a server bound to `bind` ("0.0.0.0:8000" becomes
/// "http://127.0.0.1:8000/health").
pub fn default_url(bind: &str) -> String {
    match bind.parse::<SocketAddr>() {
        Ok(mut addr) => {
            if addr.ip().is_unspecified() {
                addr.set_ip(match addr.ip() {
                    IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                    IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
                });
            }
            format!("http://{addr}/health")
        }
        // A host name ("localhost:8000").
        Err(_) => format!("http://{bind}/health"),
    }
}

/// GETs `url`; Ok with the body on 200, Err with the reason otherwise.
pub fn check(url: &str, timeout: Duration) -> Result<String, String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .http_status_as_error(false)
        .build()
        .into();
    let mut resp = agent.get(url).call().map_err(|e| format!("{url}: {e}"))?;
    let status = resp.status().as_u16();
    let body = resp
        .body_mut()
        .with_config()
        .limit(4096)
        .read_to_string()
        .unwrap_or_default();
    if status == 200 {
        Ok(body)
    } else {
        Err(format!("{url}: HTTP {status} {}", body.trim()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_binds_become_loopback() {
        assert_eq!(default_url("0.0.0.0:8000"), "http://127.0.0.1:8000/health");
        assert_eq!(default_url("[::]:8000"), "http://[::1]:8000/health");
        assert_eq!(default_url("127.0.0.1:9"), "http://127.0.0.1:9/health");
        assert_eq!(
            default_url("localhost:8000"),
            "http://localhost:8000/health"
        );
    }

    #[test]
    fn nothing_listening_is_unhealthy() {
        // Port 1 on loopback: nothing listens there.
        let err = check("http://127.0.0.1:1/health", Duration::from_secs(2)).unwrap_err();
        assert!(err.contains("127.0.0.1:1"), "{err}");
    }
}
