//! The real `async-pay` binary, one process per role, talking to PostgreSQL and RabbitMQ through
//! proxies the test can cut. Logs go to files so a test can search them.

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::broker::TestBroker;
use crate::helpers::*;
use crate::proxy::Proxy;
use crate::receiver::Receiver;

/// A database password that trust auth ignores, to prove it never reaches a log.
pub const DB_PASSWORD: &str = "db-pass-never-logged";

pub struct Proc {
    pub role: String,
    child: Child,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: the process dies at once, mid-whatever.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits for the exit; returns how long it took, or None if it did not exit
    /// within `limit` (it is then killed).
    pub fn term(&mut self, limit: Duration) -> Option<Duration> {
        let started = Instant::now();
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        while started.elapsed() < limit {
            if let Ok(Some(_)) = self.child.try_wait() {
                return Some(started.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill9();
        None
    }

    /// SIGINT (Ctrl-C), then waits for the exit; its status, or None if it did not exit within
    /// `limit` (it is then killed).
    pub fn interrupt(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let started = Instant::now();
        let _ = Command::new("kill")
            .args(["-INT", &self.pid().to_string()])
            .status();
        while started.elapsed() < limit {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill9();
        None
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// POSTs payments (blocking) whose webhooks go to the stack's receiver.
struct Poster {
    agent: ureq::Agent,
    url: String,
    hook: String,
}

impl Poster {
    /// (status, payment id if accepted); status 0 when no response came.
    fn post(
        &self,
        idempotency_key: &str,
        metadata: Option<serde_json::Value>,
    ) -> (u16, Option<String>) {
        let mut body = json!({"amount": "1.00", "currency": "USD", "webhook_url": self.hook});
        if let Some(m) = metadata {
            body["metadata"] = m;
        }
        let body = body.to_string();
        match self
            .agent
            .post(&self.url)
            .header("X-API-Key", KEY_A)
            .header("Idempotency-Key", idempotency_key)
            .header("Content-Type", "application/json")
            .send(body.as_bytes())
        {
            Ok(mut r) => {
                let status = r.status().as_u16();
                let v: serde_json::Value =
                    serde_json::from_str(&r.body_mut().read_to_string().unwrap_or_default())
                        .unwrap_or_default();
                let id = v["payment_id"].as_str().filter(|_| status == 202);
                (status, id.map(str::to_string))
            }
            Err(_) => (0, None),
        }
    }
}

/// One test's services: database, queue names, proxies, webhook receiver, and its processes.
pub struct Stack {
    pub db: TestDb,
    pub broker: TestBroker,
    pub pg: Proxy,
    pub mq: Proxy,
    pub receiver: Receiver,
    pub port: u16,
    pub env: Vec<(String, String)>,
    pub logs: PathBuf,
    procs: Vec<Proc>,
}

impl Drop for Stack {
    /// Stops the processes; keeps their logs only when the test failed (and says where).
    fn drop(&mut self) {
        self.procs.clear();
        if std::thread::panicking() {
            eprintln!("logs of the async-pay processes: {}", self.logs.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.logs);
        }
    }
}

impl Stack {
    /// `extra` env entries override the defaults below.
    pub async fn new(extra: &[(&str, &str)]) -> Stack {
        Self::build(None, extra).await
    }

    /// A stack whose roles connect to these RabbitMQ nodes (a cluster of the test's own), not to
    /// the shared broker through `mq`.
    pub async fn on_brokers(urls: &[String], extra: &[(&str, &str)]) -> Stack {
        Self::build(Some(urls), extra).await
    }

    async fn build(brokers: Option<&[String]>, extra: &[(&str, &str)]) -> Stack {
        let db = TestDb::new().await;
        let mut settings = settings(&db.url);
        if let Some(urls) = brokers {
            // The queue names are removed from these nodes at the end, too.
            settings.amqp.urls = urls.iter().map(async_pay::config::Secret::new).collect();
        }
        let broker = TestBroker::new(&mut settings);
        let pg = Proxy::start("127.0.0.1:5432".parse().unwrap()).await;
        let mq = Proxy::start("127.0.0.1:5672".parse().unwrap()).await;
        let receiver = Receiver::start().await;
        let port = free_port();
        let logs = std::env::temp_dir().join(format!("async-pay-{}", db.name));
        std::fs::create_dir_all(&logs).unwrap();
        let mut db_url = url::Url::parse(&db.url).unwrap();
        db_url.set_port(Some(pg.addr.port())).unwrap();
        db_url.set_password(Some(DB_PASSWORD)).unwrap();
        let a = &broker.settings;
        let merchants = format!(
            r#"[{{name = "a", api_key = "{KEY_A}", webhook_secret = "{SECRET_A}"}}, {{name = "a", api_key = "{KEY_A2}", webhook_secret = "{SECRET_A}"}}, {{name = "b", api_key = "{KEY_B}", webhook_secret = "{SECRET_B}"}}]"#
        );
        let mut env: Vec<(String, String)> = vec![
            ("RUST_LOG", "info"),
            ("DATABASE_URL", db_url.as_str()),
            (
                "AMQP_URL",
                &brokers.map(|urls| urls.join(",")).unwrap_or_else(|| {
                    format!("amqp://guest:guest@127.0.0.1:{}/%2f", mq.addr.port())
                }),
            ),
            ("ASYNC_PAY__AMQP__EXCHANGE", &a.exchange),
            ("ASYNC_PAY__AMQP__QUEUE", &a.queue),
            ("ASYNC_PAY__AMQP__ROUTING_KEY", &a.routing_key),
            (
                "ASYNC_PAY__AMQP__DEAD_LETTER_EXCHANGE",
                &a.dead_letter_exchange,
            ),
            ("ASYNC_PAY__AMQP__DEAD_LETTER_QUEUE", &a.dead_letter_queue),
            ("ASYNC_PAY__AMQP__CONFIRM_TIMEOUT", "5s"),
            ("ASYNC_PAY__SERVER__BIND", &format!("127.0.0.1:{port}")),
            ("ASYNC_PAY__SERVER__WORKERS", "2"),
            ("ASYNC_PAY__SERVER__SHUTDOWN_TIMEOUT", "3s"),
            ("ASYNC_PAY__DATABASE__POOL_SIZE", "8"),
            ("ASYNC_PAY__DATABASE__ACQUIRE_TIMEOUT", "1s"),
            ("ASYNC_PAY__DATABASE__QUERY_TIMEOUT", "2s"),
            ("ASYNC_PAY__GATEWAY__MIN_DELAY", "10ms"),
            ("ASYNC_PAY__GATEWAY__MAX_DELAY", "50ms"),
            ("ASYNC_PAY__CONSUME__SHUTDOWN_TIMEOUT", "3s"),
            (
                "ASYNC_PAY__WEBHOOK__RETRY_DELAYS",
                r#"["300ms", "600ms", "1s", "2s", "4s"]"#,
            ),
            ("ASYNC_PAY__WEBHOOK__TIMEOUT", "2s"),
            ("ASYNC_PAY__WEBHOOK__POLL_INTERVAL", "200ms"),
            // Every webhook of a stack goes to one local receiver, i.e. one host.
            ("ASYNC_PAY__WEBHOOK__PER_HOST_CONCURRENCY", "32"),
            ("ASYNC_PAY__WEBHOOK__ALLOW_PRIVATE_TARGETS", "true"),
            ("ASYNC_PAY__MERCHANTS", &merchants),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        for (k, v) in extra {
            env.retain(|(ek, _)| ek != k);
            env.push((k.to_string(), v.to_string()));
        }
        Stack {
            db,
            broker,
            pg,
            mq,
            receiver,
            port,
            env,
            logs,
            procs: Vec::new(),
        }
    }

    /// Starts a role (`serve`, `relay`, `consume`, `dlq-watch`) and returns its index.
    pub fn start(&mut self, role: &str) -> usize {
        let n = self.procs.len();
        let log = std::fs::File::create(self.logs.join(format!("{n}-{role}.log"))).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_async-pay"))
            .arg(role)
            .env_remove("ASYNC_PAY_CONFIG")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.procs.push(Proc {
            role: role.to_string(),
            child,
        });
        n
    }

    /// Runs a one-shot command (`reconcile`, `relay --once`, `dlq list`) with this stack's
    /// environment and waits for it.
    pub fn run(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_async-pay"))
            .args(args)
            .env_remove("ASYNC_PAY_CONFIG")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    pub fn proc(&mut self, i: usize) -> &mut Proc {
        &mut self.procs[i]
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Waits until `serve` answers /health with 200.
    pub async fn wait_healthy(&self) {
        wait_healthy(&self.url("/health")).await;
    }

    /// POSTs one payment whose webhook goes to the receiver; returns (status, payment id).
    pub async fn pay(&self, key: &str) -> (u16, Option<String>) {
        let body = json!({"amount": "10.00", "currency": "EUR", "webhook_url": self.receiver.url("/hook")});
        let r = request(
            "POST",
            &self.url("/api/v1/payments"),
            &[
                ("X-API-Key", KEY_A),
                ("Idempotency-Key", key),
                ("Content-Type", "application/json"),
            ],
            Some(body.to_string().into_bytes()),
        )
        .await;
        (r.status, r.json["payment_id"].as_str().map(str::to_string))
    }

    /// POSTs `n` payments from `threads` threads; returns the accepted ids and every status seen.
    pub fn pay_many(&self, prefix: &str, n: usize, threads: usize) -> (Vec<String>, Vec<u16>) {
        self.pay_many_with(prefix, n, threads, |_| None)
    }

    /// [`Stack::pay_many`], payment `i` with `metadata(i)`.
    pub fn pay_many_with(
        &self,
        prefix: &str,
        n: usize,
        threads: usize,
        metadata: fn(usize) -> Option<serde_json::Value>,
    ) -> (Vec<String>, Vec<u16>) {
        let per = n.div_ceil(threads);
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (poster, prefix) = (self.poster(), prefix.to_string());
                std::thread::spawn(move || {
                    let mut ids = Vec::new();
                    let mut statuses = Vec::new();
                    for i in (t * per)..((t + 1) * per).min(n) {
                        let (status, id) = poster.post(&format!("{prefix}-{i}"), metadata(i));
                        statuses.push(status);
                        ids.extend(id);
                    }
                    (ids, statuses)
                })
            })
            .collect();
        let mut ids = Vec::new();
        let mut statuses = Vec::new();
        for h in handles {
            let (i, s) = h.join().unwrap();
            ids.extend(i);
            statuses.extend(s);
        }
        (ids, statuses)
    }

    /// Waits until the outbox holds no unpublished event (every event is in RabbitMQ).
    pub async fn wait_published(&self, limit: Duration) {
        let db = &self.db;
        eventually(limit, "every event to be published", || async {
            (db.count("SELECT count(*) AS n FROM outbox WHERE published_at IS NULL") == 0)
                .then_some(())
        })
        .await;
    }

    /// POSTs a payment every `every` from a thread of its own until `stop` is set; the thread
    /// returns the accepted ids and every status seen.
    pub fn pay_steadily(
        &self,
        prefix: &str,
        every: Duration,
        stop: Arc<AtomicBool>,
    ) -> std::thread::JoinHandle<(Vec<String>, Vec<u16>)> {
        let (poster, prefix) = (self.poster(), prefix.to_string());
        std::thread::spawn(move || {
            let mut ids = Vec::new();
            let mut statuses = Vec::new();
            let mut next = Instant::now();
            for i in 0.. {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let (status, id) = poster.post(&format!("{prefix}-{i}"), None);
                statuses.push(status);
                ids.extend(id);
                next += every;
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
            (ids, statuses)
        })
    }

    fn poster(&self) -> Poster {
        Poster {
            agent: ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(Duration::from_secs(30)))
                .build()
                .into(),
            url: self.url("/api/v1/payments"),
            hook: self.receiver.url("/hook"),
        }
    }

    /// Every log line written so far by every process of this stack.
    pub fn all_logs(&self) -> String {
        let mut out = String::new();
        for e in std::fs::read_dir(&self.logs).unwrap().flatten() {
            out.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
        }
        out
    }

    /// The end-of-scenario count: every accepted payment final with one outcome, its webhook
    /// delivered, nothing pending, no unpublished event, and exactly `dead` dead letters.
    pub async fn assert_nothing_lost(&self, accepted: &[String], dead: i64, limit: Duration) {
        let db = &self.db;
        eventually(limit, "every accepted payment to be final", || async {
            (db.count("SELECT count(*) AS n FROM payments WHERE status = 'pending'") == 0)
                .then_some(())
        })
        .await;
        let ids: HashSet<&String> = accepted.iter().collect();
        assert_eq!(ids.len(), accepted.len(), "202s carried distinct payments");
        assert_eq!(
            db.count("SELECT count(*) AS n FROM payments"),
            accepted.len() as i64,
            "accepted = stored"
        );
        assert_eq!(
            db.count("SELECT count(*) AS n FROM payments WHERE status IN ('succeeded', 'failed') AND processed_at IS NOT NULL"),
            accepted.len() as i64,
            "accepted = final"
        );
        // One webhook delivery each, written by the transaction that finalised the payment. (A
        // second finalisation cannot happen at all: it is `UPDATE … WHERE status = 'pending'`.
        // That the gateway charged each payment once is not visible from here.)
        assert_eq!(
            db.count("SELECT count(*) AS n FROM (SELECT payment_id FROM webhook_deliveries GROUP BY payment_id HAVING count(*) > 1) x"),
            0,
            "a payment has more than one webhook delivery"
        );
        assert_eq!(
            db.count("SELECT count(*) AS n FROM webhook_deliveries"),
            accepted.len() as i64
        );
        eventually(limit, "every event to be published", || async {
            (db.count("SELECT count(*) AS n FROM outbox WHERE published_at IS NULL") == 0)
                .then_some(())
        })
        .await;
        let receiver = &self.receiver;
        eventually(limit, "every final payment's webhook to arrive", || async {
            let got: HashSet<String> = receiver
                .received()
                .iter()
                .filter_map(|r| r.json()["payment_id"].as_str().map(str::to_string))
                .collect();
            accepted.iter().all(|id| got.contains(id)).then_some(())
        })
        .await;
        for r in receiver.received() {
            let p = r.json();
            let id = p["payment_id"].as_str().unwrap_or_default();
            let status = db.count(&format!(
                "SELECT count(*) AS n FROM payments WHERE id = '{id}' AND status = '{}'",
                p["status"].as_str().unwrap_or_default()
            ));
            assert_eq!(status, 1, "the webhook of {id} reports the stored outcome");
        }
        assert_eq!(
            db.count("SELECT count(*) AS n FROM dead_letters"),
            dead,
            "dead letters"
        );
    }
}
