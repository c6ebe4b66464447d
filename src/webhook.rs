//! Webhook signing (Standard Webhooks): `webhook-signature: v1,<base64 HMAC-SHA256>` over
//! `"{webhook-id}.{webhook-timestamp}.{body}"`, keyed with the base64-decoded part of the
//! merchant's `whsec_…` secret.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use std::collections::HashMap;
use std::io::Read;
use std::sync::Arc;
use std::time::{Duration, Instant};

use time::OffsetDateTime;
use tokio::task::JoinSet;

use crate::config::{Secret, Settings, WebhookSettings};
use crate::db::payments::Payment;
use crate::db::webhooks::{self as webhooks_db, AfterAttempt, Attempt, Delivery};
use crate::db::{self, Pool};
use crate::domain::events::webhook_event_type;
use crate::domain::{self, PaymentStatus};
use crate::shutdown::{Shutdown, backoff};

const SECRET_PREFIX: &str = "whsec_";
/// Standard Webhooks asks for 24 to 64 random bytes of key.
const KEY_LEN: std::ops::RangeInclusive<usize> = 24..=64;

/// Decodes a `whsec_…` secret into its HMAC key, or says what is wrong with it (without printing
/// the secret).
pub fn secret_key(secret: &Secret) -> Result<Vec<u8>, String> {
    let encoded = secret
        .expose()
        .strip_prefix(SECRET_PREFIX)
        .ok_or_else(|| format!("must start with {SECRET_PREFIX:?}"))?;
    let key = STANDARD
        .decode(encoded)
        .map_err(|_| "the part after \"whsec_\" must be base64".to_string())?;
    if !KEY_LEN.contains(&key.len()) {
        return Err(format!(
            "must hold {} to {} bytes of key (base64-decoded), it holds {}",
            KEY_LEN.start(),
            KEY_LEN.end(),
            key.len()
        ));
    }
    Ok(key)
}

/// One `v1,<signature>` entry for the given key.
pub fn sign(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = match Hmac::<Sha256>::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC takes keys of any length"),
    };
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

// ---------------------------------------------------------------------------------------------
// Delivery

/// First bytes of a response body kept with each attempt.
pub const RESPONSE_BODY_LIMIT: u64 = 1024;
/// Extra time on top of `webhook.timeout` before a claimed attempt counts as abandoned (its
/// sender died) and the delivery is due again.
const ATTEMPT_LEASE_MARGIN: Duration = Duration::from_secs(30);

/// The webhook body for a final payment. `payment_id`, `status` and `processed_at` are the
/// original service's fields, with the same values `GET` shows.
pub fn payload(p: &Payment) -> serde_json::Value {
    let status = p
        .status
        .parse::<PaymentStatus>()
        .unwrap_or(PaymentStatus::Pending);
    let processed_at = p.processed_at.and_then(|t| {
        t.format(&time::format_description::well_known::Rfc3339)
            .ok()
    });
    serde_json::json!({
        "type": webhook_event_type(status),
        "payment_id": p.id,
        "status": p.status,
        "processed_at": processed_at,
        "amount": domain::format_amount(p.amount),
        "currency": p.currency,
        "metadata": p.metadata,
        "charge_id": p.charge_id,
        "failure_code": p.failure_code,
        "failure_message": p.failure_message,
    })
}

/// Bytes from a merchant's endpoint as storable text: invalid UTF-8 and NUL (which PostgreSQL
/// text refuses) become U+FFFD.
fn printable(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).replace('\0', "\u{FFFD}")
}

/// The host part of a webhook URL (for per-host limits).
pub fn host_of(url: &str) -> String {
    url::Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_string))
        .unwrap_or_default()
}

/// Writes a delivery of the payment's final status to its webhook_url, due now. Call in the
/// transaction that finalises the payment (so the webhook cannot be lost) or for a resend, which
/// passes the `message_id` of the original so merchants can deduplicate. Returns the delivery
/// id, or `None` for a payment without webhook_url.
pub async fn schedule(
    conn: &mut diesel_async::AsyncPgConnection,
    p: &Payment,
    message_id: Option<&str>,
) -> diesel::QueryResult<Option<uuid::Uuid>> {
    let Some(url) = &p.webhook_url else {
        return Ok(None);
    };
    let id = uuid::Uuid::now_v7();
    let fresh = format!("msg_{}", id.simple());
    let status = p
        .status
        .parse::<PaymentStatus>()
        .unwrap_or(PaymentStatus::Pending);
    let payload = payload(p);
    webhooks_db::insert(
        conn,
        &webhooks_db::NewDelivery {
            id,
            message_id: message_id.unwrap_or(&fresh),
            payment_id: p.id,
            merchant: &p.merchant,
            event_type: webhook_event_type(status),
            url,
            host: &host_of(url),
            payload: &payload,
        },
    )
    .await?;
    Ok(Some(id))
}

/// The `webhook-signature` header value: one `v1,…` per key, space-separated.
pub fn signature_header(keys: &[Vec<u8>], id: &str, timestamp: i64, body: &[u8]) -> String {
    keys.iter()
        .map(|k| sign(k, id, timestamp, body))
        .collect::<Vec<_>>()
        .join(" ")
}

/// What the sender decides after an attempt.
pub fn after_attempt(
    attempt: i32,
    status: Option<u16>,
    delays: &[Duration],
    now: OffsetDateTime,
) -> AfterAttempt {
    match status {
        Some(s) if (200..300).contains(&s) => AfterAttempt::Delivered,
        Some(410) => AfterAttempt::Failed,
        _ => match usize::try_from(attempt - 1)
            .ok()
            .and_then(|i| delays.get(i))
        {
            Some(d) => AfterAttempt::RetryAt(now + jitter(*d)),
            None => AfterAttempt::Failed,
        },
    }
}

/// +-20 % so that many deliveries failing together do not retry together.
pub fn jitter(d: Duration) -> Duration {
    d.mul_f64(0.8 + 0.4 * fastrand::f64())
}

/// Sends due webhook deliveries, `webhook.concurrency` at a time.
pub struct Sender {
    pool: Pool,
    agent: ureq::Agent,
    settings: WebhookSettings,
    /// Signing keys per merchant, current first.
    keys: HashMap<String, Vec<Vec<u8>>>,
    wake: Arc<tokio::sync::Notify>,
}

impl Sender {
    pub fn new(
        settings: &Settings,
        pool: Pool,
        wake: Arc<tokio::sync::Notify>,
    ) -> anyhow::Result<Sender> {
        let mut keys: HashMap<String, Vec<Vec<u8>>> = HashMap::new();
        for m in &settings.merchants {
            let entry = keys.entry(m.name.clone()).or_default();
            if entry.is_empty() {
                // Current secret first, then the ones being rotated out.
                for secret in std::iter::once(&m.webhook_secret).chain(&m.previous_webhook_secrets)
                {
                    let key = secret_key(secret)
                        .map_err(|e| anyhow::anyhow!("merchant {}: {e}", m.name))?;
                    entry.push(key);
                }
            }
        }
        let config = ureq::Agent::config_builder()
            .timeout_global(Some(settings.webhook.timeout))
            .http_status_as_error(false)
            // A redirect is a failed attempt: following it could lead anywhere.
            .max_redirects(0)
            .max_redirects_will_error(false)
            // Never through a proxy from the environment: the guard must see the real target.
            .proxy(None)
            .user_agent("async-pay-webhooks/1")
            .build();
        let agent = if settings.webhook.allow_private_targets {
            ureq::Agent::new_with_config(config)
        } else {
            ureq::Agent::with_parts(
                config,
                ureq::unversioned::transport::DefaultConnector::default(),
                crate::ssrf::GuardedResolver::new(settings.webhook.allowed_ports.clone()),
            )
        };
        Ok(Sender {
            pool,
            agent,
            settings: settings.webhook.clone(),
            keys,
            wake,
        })
    }

    /// How long a claimed attempt may run before another sender may take the delivery over.
    fn lease(&self) -> Duration {
        self.settings.timeout + ATTEMPT_LEASE_MARGIN
    }

    /// Claims up to `limit` due deliveries, keeping each host within `per_host_concurrency`
    /// given what is already in flight (`per_host`).
    pub async fn claim(
        &self,
        limit: usize,
        per_host: &HashMap<String, usize>,
    ) -> anyhow::Result<Vec<Delivery>> {
        let hosts: Vec<String> = per_host.keys().cloned().collect();
        let counts: Vec<i32> = hosts.iter().map(|h| per_host[h] as i32).collect();
        let room = i32::try_from(self.settings.per_host_concurrency).unwrap_or(i32::MAX);
        let mut conn = db::conn(&self.pool).await?;
        Ok(
            webhooks_db::claim_due(&mut conn, limit as i64, self.lease(), room, &hosts, &counts)
                .await?,
        )
    }

    /// Makes one attempt of a claimed delivery and records it.
    pub async fn attempt(&self, d: Delivery) {
        let body = serde_json::to_vec(&d.payload).unwrap_or_default();
        let id = d.message_id.clone();
        let now = OffsetDateTime::now_utc();
        let ts = now.unix_timestamp();
        // A merchant removed from the configuration has no key: fail the attempt rather than
        // send an unsigned webhook.
        let keys = self.keys.get(&d.merchant).filter(|k| !k.is_empty());
        let signature = keys.map(|k| signature_header(k, &id, ts, &body));
        let agent = self.agent.clone();
        let url = d.url.clone();
        let started = Instant::now();
        let sent = tokio::task::spawn_blocking(move || -> Result<(u16, String), String> {
            let signature = signature.ok_or("no webhook secret is configured for this merchant")?;
            let mut resp = agent
                .post(&url)
                .header("content-type", "application/json")
                .header("webhook-id", &id)
                .header("webhook-timestamp", ts.to_string())
                .header("webhook-signature", &signature)
                .send(&body[..])
                .map_err(|e| e.to_string())?;
            let status = resp.status().as_u16();
            let mut buf = Vec::new();
            let _ = resp
                .body_mut()
                .as_reader()
                .take(RESPONSE_BODY_LIMIT)
                .read_to_end(&mut buf);
            Ok((status, printable(&buf)))
        })
        .await
        .unwrap_or_else(|e| Err(format!("sender task failed: {e}")));
        let took = started.elapsed();
        let (status, error, response_body) = match sent {
            Ok((s, b)) => (Some(s), None, Some(b)),
            Err(e) => (None, Some(printable(e.as_bytes())), None),
        };
        crate::metrics::webhook_attempt(status, took);
        let next = after_attempt(
            d.attempts,
            status,
            &self.settings.retry_delays,
            OffsetDateTime::now_utc(),
        );
        let total = self.settings.retry_delays.len() + 1;
        match (&next, status) {
            (AfterAttempt::Delivered, Some(s)) => {
                log::info!(
                    "webhook {} for payment {} delivered (HTTP {s}, attempt {} of {total})",
                    d.id,
                    d.payment_id,
                    d.attempts
                )
            }
            _ => log::warn!(
                "webhook {} for payment {} attempt {} of {total} failed ({}); {}",
                d.id,
                d.payment_id,
                d.attempts,
                status
                    .map(|s| format!("HTTP {s}"))
                    .or(error.clone())
                    .unwrap_or_default(),
                match next {
                    AfterAttempt::RetryAt(at) => format!("next attempt at {at}"),
                    _ => "giving up".to_string(),
                }
            ),
        }
        let attempt = Attempt {
            delivery_id: d.id,
            attempt: d.attempts,
            attempted_at: now,
            duration_ms: i32::try_from(took.as_millis()).unwrap_or(i32::MAX),
            status_code: status.map(i32::from),
            error,
            response_body,
        };
        // Recording must not be lost to a database blip: retry a few times; if it still fails
        // the claim lapses and the delivery is attempted again (at least once, never lost).
        for i in 0..5 {
            let recorded = async {
                let mut conn = db::conn(&self.pool).await?;
                webhooks_db::record_attempt(&mut conn, &attempt, next)
                    .await
                    .map_err(db::DbError::from)
            }
            .await;
            match recorded {
                Ok(()) => return,
                Err(e) => {
                    log::warn!(
                        "webhook {}: cannot record attempt {} ({e})",
                        d.id,
                        d.attempts
                    );
                    tokio::time::sleep(backoff(i, Duration::from_secs(5))).await;
                }
            }
        }
    }

    /// Claims and sends due deliveries until `shutdown`; attempts in flight finish first. At
    /// most `webhook.concurrency` attempts run at once, and at most `per_host_concurrency` to one
    /// host, so a dead endpoint slows only its own deliveries.
    pub async fn run(self: Arc<Self>, shutdown: Shutdown) {
        let mut in_flight: JoinSet<String> = JoinSet::new();
        let mut per_host: HashMap<String, usize> = HashMap::new();
        let mut failures = 0;
        loop {
            while let Some(done) = in_flight.try_join_next() {
                finished(&mut per_host, done);
            }
            let room = self.settings.concurrency.saturating_sub(in_flight.len());
            let mut claimed = 0;
            if room > 0 && !shutdown.is_triggered() {
                match self.claim(room, &per_host).await {
                    Ok(ds) => {
                        failures = 0;
                        claimed = ds.len();
                        for d in ds {
                            *per_host.entry(d.host.clone()).or_default() += 1;
                            let me = self.clone();
                            in_flight.spawn(async move {
                                let host = d.host.clone();
                                me.attempt(d).await;
                                host
                            });
                        }
                    }
                    Err(e) => {
                        let wait = backoff(failures, Duration::from_secs(30));
                        failures += 1;
                        log::warn!(
                            "webhook sender: cannot claim deliveries ({e:#}); retrying in {wait:?}"
                        );
                        if shutdown.sleep(wait).await {
                            break;
                        }
                        continue;
                    }
                }
            }
            if claimed > 0 && claimed == room {
                continue; // more may be due right now
            }
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(self.settings.poll_interval) => {}
                Some(done) = in_flight.join_next(), if !in_flight.is_empty() => finished(&mut per_host, done),
                _ = shutdown.wait() => break,
            }
        }
        // Let attempts in flight finish and be recorded (each is bounded by webhook.timeout).
        while in_flight.join_next().await.is_some() {}
    }
}

/// One attempt to `host` has ended.
fn finished(per_host: &mut HashMap<String, usize>, done: Result<String, tokio::task::JoinError>) {
    let Ok(host) = done else { return };
    if let Some(n) = per_host.get_mut(&host) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            per_host.remove(&host);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test vector published with the Standard Webhooks specification.
    #[test]
    fn matches_the_standard_webhooks_test_vector() {
        let key = secret_key(&Secret::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")).unwrap();
        let sig = sign(
            &key,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn refuses_malformed_secrets() {
        assert!(secret_key(&Secret::new("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")).is_err());
        assert!(secret_key(&Secret::new("whsec_!!!")).is_err());
        assert!(
            secret_key(&Secret::new("whsec_c2hvcnQ=")).is_err(),
            "5 bytes is too short"
        );
    }
}
