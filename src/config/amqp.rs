//! `amqp.urls`: the broker addresses, taken apart.

use anyhow::bail;

use super::{AmqpSettings, Secret, redact_url};

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
