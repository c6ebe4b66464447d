//! What `serve` checks before it answers anything, on the real binary: the published demo API
//! key only on a loopback address, and a database that exists (only `migrate` creates one).

use std::process::Stdio;
use std::time::Duration;

use serde_json::json;

use crate::helpers::*;

/// The demo merchant's key, as config.example.toml and the README publish it.
const DEMO_KEY: &str = "secret-api-key";

/// `async-pay serve` with the built-in defaults but for the database and the bind address.
fn serve(db_url: &str, bind: &str) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_async-pay"));
    c.arg("serve")
        .env_remove("ASYNC_PAY_CONFIG")
        .env_remove("ASYNC_PAY__MERCHANTS")
        .env("DATABASE_URL", db_url)
        .env("ASYNC_PAY__SERVER__BIND", bind)
        .env("ASYNC_PAY__SERVER__WORKERS", "1")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    c
}

/// Runs a `serve` that must stop by itself; returns (success, stderr). Panics if it keeps
/// running.
async fn must_exit(mut cmd: tokio::process::Command) -> (bool, String) {
    let child = cmd.spawn().unwrap();
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("serve kept running instead of refusing to start")
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn healthy(port: u16) {
    wait_healthy(&format!("http://127.0.0.1:{port}/health")).await;
}

async fn post(port: u16, key: &str, idem: &str) -> Resp {
    request(
        "POST",
        &format!("http://127.0.0.1:{port}/api/v1/payments"),
        &[
            ("X-API-Key", key),
            ("Idempotency-Key", idem),
            ("Content-Type", "application/json"),
        ],
        Some(
            json!({"amount": "1.00", "currency": "EUR"})
                .to_string()
                .into_bytes(),
        ),
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_refuses_the_published_demo_key_on_a_public_address() {
    let db = TestDb::new().await;
    let (ok, err) = must_exit(serve(&db.url, "0.0.0.0:0")).await;
    assert!(!ok, "{err}");
    for needed in [
        "refusing to serve on 0.0.0.0:",
        "merchant demo uses the API key published in config.example.toml",
        "loopback",
        "ASYNC_PAY__MERCHANTS",
        "config file (--config PATH or ASYNC_PAY_CONFIG)",
    ] {
        assert!(err.contains(needed), "missing {needed:?} in: {err}");
    }
    assert!(
        !err.contains(DEMO_KEY),
        "the key itself is not printed: {err}"
    );
    assert_eq!(db.count("SELECT count(*) AS n FROM payments"), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_accepts_the_demo_key_on_loopback_and_own_merchants_anywhere() {
    let db = TestDb::new().await;
    let port = free_port();
    let mut child = serve(&db.url, &format!("127.0.0.1:{port}"))
        .spawn()
        .unwrap();
    healthy(port).await;
    assert_eq!(post(port, DEMO_KEY, "demo-1").await.status, 202);
    child.kill().await.unwrap();

    // On every interface with merchants of its own: it starts, and the demo key is unknown.
    let port = free_port();
    let mut cmd = serve(&db.url, &format!("0.0.0.0:{port}"));
    cmd.env(
        "ASYNC_PAY__MERCHANTS",
        format!(r#"[{{name = "shop", api_key = "{KEY_A}", webhook_secret = "{SECRET_A}"}}]"#),
    );
    let mut child = cmd.spawn().unwrap();
    healthy(port).await;
    assert_eq!(post(port, KEY_A, "own-1").await.status, 202);
    assert_eq!(post(port, DEMO_KEY, "demo-2").await.status, 401);
    child.kill().await.unwrap();
}

/// Whether the server has a database of this name (asked through the maintenance database).
fn database_exists(name: &str) -> bool {
    #[derive(diesel::QueryableByName)]
    struct N {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    type SyncPg = diesel_async::async_connection_wrapper::AsyncConnectionWrapper<
        diesel_async::AsyncPgConnection,
    >;
    let name = name.to_string();
    std::thread::spawn(move || {
        use diesel::RunQueryDsl;
        let mut c = <SyncPg as diesel::Connection>::establish(&admin_url()).unwrap();
        diesel::sql_query("SELECT count(*) AS n FROM pg_database WHERE datname = $1")
            .bind::<diesel::sql_types::Text, _>(name)
            .get_result::<N>(&mut c)
            .unwrap()
            .n
            == 1
    })
    .join()
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_does_not_create_a_missing_database_migrate_does() {
    let name = format!("ap_test_{}", uuid::Uuid::new_v4().simple());
    // Dropped at the end, also if a broken serve created it.
    let guard = TestDb {
        name: name.clone(),
        url: url_for(&name),
    };
    let mut url = url::Url::parse(&guard.url).unwrap();
    url.set_password(Some("hunter2")).unwrap();
    let url = url.to_string();

    let (ok, err) = must_exit(serve(&url, "127.0.0.1:0")).await;
    assert!(!ok, "{err}");
    let missing = format!("database \"{name}\" does not exist");
    for needed in [missing.as_str(), ":***@", "run `async-pay migrate`"] {
        assert!(err.contains(needed), "missing {needed:?} in: {err}");
    }
    assert!(!err.contains("hunter2"), "the password is redacted: {err}");
    assert!(!database_exists(&name), "serve created the database");

    // What the message says to do works: `migrate` creates it, then serve starts.
    let migrate = tokio::process::Command::new(env!("CARGO_BIN_EXE_async-pay"))
        .arg("migrate")
        .env_remove("ASYNC_PAY_CONFIG")
        .env("DATABASE_URL", &url)
        .output()
        .await
        .unwrap();
    assert!(
        migrate.status.success(),
        "{}",
        String::from_utf8_lossy(&migrate.stderr)
    );
    assert!(database_exists(&name));
    let port = free_port();
    let mut child = serve(&url, &format!("127.0.0.1:{port}")).spawn().unwrap();
    healthy(port).await;
    child.kill().await.unwrap();
    drop(guard);
}
