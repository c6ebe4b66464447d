//! Test fixtures: a throwaway database per test, the API served in-process on port 0, and a
//! small blocking HTTP client.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use async_pay::config::{Secret, Settings};
use diesel::RunQueryDsl as _;
use diesel_async::AsyncPgConnection;
use diesel_async::async_connection_wrapper::AsyncConnectionWrapper;
use serde_json::Value;

type SyncPg = AsyncConnectionWrapper<AsyncPgConnection>;

/// The server's maintenance database; tests create and drop their own databases through it.
pub fn admin_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string())
}

pub fn url_for(db: &str) -> String {
    let mut u = url::Url::parse(&admin_url()).unwrap();
    u.set_path(&format!("/{db}"));
    u.to_string()
}

/// A database of its own, migrated, dropped (with its connections) when the value is dropped.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    pub async fn new() -> TestDb {
        let name = format!("ap_test_{}", uuid::Uuid::new_v4().simple());
        let url = url_for(&name);
        // `migrate` creates the database itself when it is missing.
        async_pay::db::migrate(&url).await.unwrap();
        TestDb { name, url }
    }

    /// Runs SQL statements on this database (from a blocking thread).
    pub fn exec(&self, sql: &str) -> Result<(), diesel::result::Error> {
        let url = self.url.clone();
        let sql = sql.to_string();
        std::thread::spawn(move || {
            let mut c = <SyncPg as diesel::Connection>::establish(&url).unwrap();
            diesel::connection::SimpleConnection::batch_execute(&mut c, &sql)
        })
        .join()
        .unwrap()
    }

    /// A single integer from a query such as `SELECT count(*) AS n FROM …` (column named `n`).
    pub fn count(&self, sql: &str) -> i64 {
        #[derive(diesel::QueryableByName)]
        struct N {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            n: i64,
        }
        let url = self.url.clone();
        let sql = sql.to_string();
        std::thread::spawn(move || {
            let mut c = <SyncPg as diesel::Connection>::establish(&url).unwrap();
            diesel::sql_query(sql).get_result::<N>(&mut c).unwrap().n
        })
        .join()
        .unwrap()
    }
}

impl TestDb {
    /// The text column `t` of every row of a query.
    pub fn texts(&self, sql: &str) -> Vec<String> {
        #[derive(diesel::QueryableByName)]
        struct T {
            #[diesel(sql_type = diesel::sql_types::Text)]
            t: String,
        }
        let url = self.url.clone();
        let sql = sql.to_string();
        std::thread::spawn(move || {
            let mut c = <SyncPg as diesel::Connection>::establish(&url).unwrap();
            diesel::sql_query(sql)
                .load::<T>(&mut c)
                .unwrap()
                .into_iter()
                .map(|r| r.t)
                .collect()
        })
        .join()
        .unwrap()
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            if let Ok(mut c) = <SyncPg as diesel::Connection>::establish(&admin_url()) {
                let _ =
                    diesel::sql_query(format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                        .execute(&mut c);
            }
        })
        .join();
    }
}

pub const KEY_A: &str = "key-merchant-a";
pub const KEY_A2: &str = "key-merchant-a-rotated";
pub const KEY_B: &str = "key-merchant-b";
pub const SECRET_A: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
pub const SECRET_B: &str = "whsec_5FXVJnDsZtZr1/Khk2JT33r5q9dF2GBAPID525tBOoU=";

/// Settings for a test: its own database, port 0, two merchants (A with two keys), small pool.
pub fn settings(db_url: &str) -> Settings {
    let mut s = Settings::load_from(None, Vec::new()).unwrap();
    s.server.bind = "127.0.0.1:0".into();
    s.server.workers = 2;
    s.server.shutdown_timeout = Duration::from_secs(1);
    s.database.url = Secret::new(db_url);
    s.database.pool_size = 4;
    s.database.acquire_timeout = Duration::from_millis(1500);
    s.database.query_timeout = Duration::from_secs(3);
    // Test webhook receivers listen on 127.0.0.1; the SSRF tests turn the guard back on.
    s.webhook.allow_private_targets = true;
    let m = |name: &str, key: &str, secret: &str| async_pay::config::MerchantSettings {
        name: name.into(),
        api_key: Secret::new(key),
        webhook_secret: Secret::new(secret),
        previous_webhook_secrets: Vec::new(),
    };
    s.merchants = vec![
        m("a", KEY_A, SECRET_A),
        m("a", KEY_A2, SECRET_A),
        m("b", KEY_B, SECRET_B),
    ];
    s.validate().unwrap();
    s
}

/// The API running in this process.
pub struct TestApp {
    pub addr: SocketAddr,
    pub db: TestDb,
}

impl TestApp {
    pub async fn spawn() -> TestApp {
        let db = TestDb::new().await;
        let s = settings(&db.url);
        Self::spawn_with(db, s)
    }

    pub fn spawn_with(db: TestDb, s: Settings) -> TestApp {
        let started = async_pay::roles::serve::start(&s).unwrap();
        tokio::spawn(started.server);
        TestApp {
            addr: started.addr,
            db,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub async fn post_payment(&self, key: &str, idem: &str, body: Value) -> Resp {
        request(
            "POST",
            &self.url("/api/v1/payments"),
            &[
                ("X-API-Key", key),
                ("Idempotency-Key", idem),
                ("Content-Type", "application/json"),
            ],
            Some(body.to_string().into_bytes()),
        )
        .await
    }

    pub async fn get_payment(&self, key: &str, id: &str) -> Resp {
        request(
            "GET",
            &self.url(&format!("/api/v1/payments/{id}")),
            &[("X-API-Key", key)],
            None,
        )
        .await
    }
}

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: HashMap<String, String>,
    pub text: String,
    pub json: Value,
}

impl Resp {
    /// The stable error code of an error response.
    pub fn code(&self) -> &str {
        self.json["error"]["code"].as_str().unwrap_or("")
    }
}

/// A blocking HTTP request on a blocking thread; status codes are values, never errors.
pub async fn request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<Vec<u8>>,
) -> Resp {
    let method = method.to_string();
    let url = url.to_string();
    let headers: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .into();
        let mut b = ureq::http::Request::builder()
            .method(method.as_str())
            .uri(&url);
        for (k, v) in &headers {
            b = b.header(k, v);
        }
        let mut resp = match body {
            Some(body) => agent.run(b.body(body).unwrap()),
            None => agent.run(b.body(()).unwrap()),
        }
        .unwrap();
        let status = resp.status().as_u16();
        let headers = resp
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
            .collect();
        let text = resp.body_mut().read_to_string().unwrap_or_default();
        let json = serde_json::from_str(&text).unwrap_or(Value::Null);
        Resp {
            status,
            headers,
            text,
            json,
        }
    })
    .await
    .unwrap()
}

/// A port free on 127.0.0.1 right now (for a process that binds it itself).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until `url` (a `/health`) answers 200; connection errors while the server starts count
/// as "not yet".
pub async fn wait_healthy(url: &str) {
    eventually(Duration::from_secs(30), "serve to be healthy", || {
        let url = url.to_string();
        async move {
            let ok = tokio::task::spawn_blocking(move || {
                let agent: ureq::Agent = ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .timeout_global(Some(Duration::from_secs(2)))
                    .build()
                    .into();
                agent
                    .get(&url)
                    .call()
                    .is_ok_and(|r| r.status().as_u16() == 200)
            })
            .await
            .unwrap();
            ok.then_some(())
        }
    })
    .await;
}

/// Polls `check` until it returns `Some`, or panics after `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {limit:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
