//! The webhook sender: claims due deliveries (at most `webhook.concurrency` in flight, at most
//! `per_host_concurrency` per host), POSTs each signed, records every attempt, and keeps its
//! claims alive while attempts run. Each attempt logs under the request id of the POST that
//! created its payment (kept on the delivery row).

use std::collections::HashMap;
use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use time::OffsetDateTime;
use tokio::task::JoinSet;

use super::policy::after_attempt;
use super::slots::{InFlight, Slot, lock, reap, spawn_holding};
use crate::config::{Settings, WebhookSettings};
use crate::db::webhooks::{self as webhooks_db, AfterAttempt, Attempt, Delivery};
use crate::db::{self, Pool};
use crate::shutdown::{Shutdown, backoff};
use crate::signing::{secret_key, signature_header};

/// First bytes of a response body kept with each attempt.
pub const RESPONSE_BODY_LIMIT: u64 = 1024;
/// Shortest claim on an attempt. A claim lasts `webhook.timeout` (at least this) and is renewed
/// every third of that while its attempt runs, so a sender that dies leaves its deliveries due
/// again within one lease; below about 3 s a heartbeat delayed by a busy database would let
/// another sender take over an attempt that is still running (a duplicate webhook).
const MIN_ATTEMPT_LEASE: Duration = Duration::from_secs(3);

/// Bytes from a merchant's endpoint as storable text: invalid UTF-8 and NUL (which PostgreSQL
/// text refuses) become U+FFFD.
fn printable(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).replace('\0', "\u{FFFD}")
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
                    let key = secret_key(secret.expose())
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

    /// How long a claim on an attempt lasts unless renewed: `webhook.timeout`, at least
    /// [`MIN_ATTEMPT_LEASE`]. The heartbeat renews it every third of that while the attempt runs.
    fn lease(&self) -> Duration {
        self.settings.timeout.max(MIN_ATTEMPT_LEASE)
    }

    /// Renews the claims of the attempts in flight every third of the lease, until aborted. A
    /// renewal that fails (database unreachable) is logged; the claims may then lapse and another
    /// sender may repeat an attempt that is still running (the merchant deduplicates on
    /// `webhook-id`).
    async fn heartbeat(self: Arc<Self>, state: Arc<Mutex<InFlight>>) {
        let lease = self.lease();
        let every = lease / 3;
        loop {
            tokio::time::sleep(every).await;
            let (ids, attempts, ends): (Vec<_>, Vec<_>, Vec<_>) = {
                let st = lock(&state);
                let mut ids = Vec::with_capacity(st.claims.len());
                let mut attempts = Vec::with_capacity(st.claims.len());
                let mut ends = Vec::with_capacity(st.claims.len());
                for (id, (n, end)) in &st.claims {
                    ids.push(*id);
                    attempts.push(*n);
                    ends.push(*end);
                }
                (ids, attempts, ends)
            };
            if ids.is_empty() {
                continue;
            }
            let renewed = db::with_timeout(every, async {
                let mut conn = db::conn(&self.pool).await?;
                Ok(webhooks_db::renew_claims(&mut conn, &ids, &attempts, &ends, lease).await?)
            })
            .await;
            match renewed {
                Ok(rows) => {
                    let mut st = lock(&state);
                    for r in rows {
                        // Only while the attempt is still in flight (its slot may be gone by now).
                        if let Some(claim) = st.claims.get_mut(&r.id) {
                            claim.1 = r.next_attempt_at;
                        }
                    }
                }
                Err(e) => log::warn!(
                    "webhook sender: cannot renew the claims of {} attempts in flight ({e})",
                    ids.len()
                ),
            }
        }
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
    /// host, so a dead endpoint slows only its own deliveries. While attempts run, a heartbeat
    /// renews their claims, so they stay short: if this process dies, its deliveries are due
    /// again within one lease (`webhook.timeout`, at least [`MIN_ATTEMPT_LEASE`]).
    pub async fn run(self: Arc<Self>, shutdown: Shutdown) {
        let mut in_flight: JoinSet<()> = JoinSet::new();
        let state = Arc::new(Mutex::new(InFlight::default()));
        let heartbeat = tokio::spawn(self.clone().heartbeat(state.clone()));
        let mut failures = 0;
        loop {
            while let Some(done) = in_flight.try_join_next() {
                reap(done);
            }
            let room = self.settings.concurrency.saturating_sub(in_flight.len());
            let mut claimed = 0;
            if room > 0 && !shutdown.is_triggered() {
                let per_host = lock(&state).per_host.clone();
                match self.claim(room, &per_host).await {
                    Ok(ds) => {
                        failures = 0;
                        claimed = ds.len();
                        for d in ds {
                            let slot = Slot::take(&state, &d);
                            let me = self.clone();
                            // Under the request id of the POST that created the payment.
                            let request_id = d.request_id.clone();
                            let attempt = async move { me.attempt(d).await };
                            spawn_holding(
                                &mut in_flight,
                                slot,
                                crate::logging::scope(request_id, attempt),
                            );
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
                Some(done) = in_flight.join_next(), if !in_flight.is_empty() => reap(done),
                _ = shutdown.wait() => break,
            }
        }
        // Let attempts in flight finish and be recorded (each is bounded by webhook.timeout),
        // their claims renewed meanwhile.
        while let Some(done) = in_flight.join_next().await {
            reap(done);
        }
        heartbeat.abort();
    }
}
