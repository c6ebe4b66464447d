//! Metrics, scraped over HTTP like Prometheus does: `serve`'s `/metrics`, and the exporter the
//! other roles run on `metrics.bind`. Assertions compare a scrape before and after the actions,
//! so they hold however many tests share the process's registry. Also the `healthcheck`
//! subcommand that the container image uses.

use std::sync::Arc;
use std::time::Duration;

use async_pay::gateway::simulated::SimulatedGateway;
use serde_json::json;

use crate::helpers::*;
use crate::pipeline::{Roles, fast};
use crate::receiver::Receiver;

/// The value of one series (`name{labels}` exactly as exposed) in a text exposition; 0 if absent.
pub fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// True if the exposition has a sample whose series starts with `prefix`.
fn has(text: &str, prefix: &str) -> bool {
    text.lines().any(|l| l.starts_with(prefix))
}

pub async fn scrape(url: &str) -> String {
    let r = request("GET", url, &[], None).await;
    assert_eq!(r.status, 200, "{url}: {}", r.text);
    assert!(
        r.headers["content-type"].starts_with("text/plain; version=0.0.4"),
        "{:?}",
        r.headers
    );
    r.text
}

fn http(method: &str, route: &str, status: u16) -> String {
    format!(
        r#"async_pay_http_requests_total{{method="{method}",route="{route}",status="{status}"}}"#
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_exposes_http_metrics_by_route_pattern_and_the_outbox_backlog() {
    let app = TestApp::spawn().await;
    let before = scrape(&app.url("/metrics")).await;

    let body = json!({"amount": "10.00", "currency": "EUR"});
    let first = app.post_payment(KEY_A, "m-1", body.clone()).await;
    assert_eq!(first.status, 202);
    assert_eq!(app.post_payment(KEY_A, "m-1", body).await.status, 202);
    let other = json!({"amount": "11.00", "currency": "EUR"});
    assert_eq!(app.post_payment(KEY_A, "m-1", other).await.status, 409);
    let id = first.json["payment_id"].as_str().unwrap().to_string();
    assert_eq!(app.get_payment(KEY_A, &id).await.status, 200);
    let unknown = uuid::Uuid::new_v4().to_string();
    assert_eq!(app.get_payment(KEY_A, &unknown).await.status, 404);
    let nowhere = request("GET", &app.url("/no/such/path"), &[], None).await;
    assert_eq!(nowhere.status, 404);

    let after = scrape(&app.url("/metrics")).await;
    let delta = |series: &str| value(&after, series) - value(&before, series);
    assert_eq!(delta(&http("POST", "/api/v1/payments", 202)), 2.0);
    assert_eq!(delta(&http("POST", "/api/v1/payments", 409)), 1.0);
    // Both GETs count under the route pattern, never under the raw path.
    assert_eq!(delta(&http("GET", "/api/v1/payments/{id}", 200)), 1.0);
    assert_eq!(delta(&http("GET", "/api/v1/payments/{id}", 404)), 1.0);
    assert_eq!(delta(&http("GET", "unmatched", 404)), 1.0);
    assert!(!after.contains(&id) && !after.contains(&unknown) && !after.contains("/no/such"));
    // The first scrape itself is counted by the time of the second.
    assert!(value(&after, &http("GET", "/metrics", 200)) >= 1.0);

    // Latency histogram: as many observations as requests, plausible durations.
    let hist = r#"async_pay_http_request_duration_seconds_count{method="POST",route="/api/v1/payments",status="202"}"#;
    assert_eq!(delta(hist), 2.0);
    let sum = r#"async_pay_http_request_duration_seconds_sum{method="POST",route="/api/v1/payments",status="202"}"#;
    let took = delta(sum);
    assert!(took > 0.0 && took < 10.0, "{took}");
    let inf = r#"async_pay_http_request_duration_seconds_bucket{method="POST",route="/api/v1/payments",status="202",le="+Inf"}"#;
    assert_eq!(delta(inf), 2.0);

    // Payment outcomes are exposed from the start (at 0 before the first payment).
    for result in ["created", "replayed", "conflicted"] {
        assert!(
            has(
                &after,
                &format!(r#"async_pay_payments_total{{result="{result}"}}"#)
            ),
            "{result}"
        );
    }

    // The outbox backlog, read from the database at scrape time: one payment, no relay.
    assert_eq!(value(&after, "async_pay_outbox_unpublished"), 1.0);
    let age = value(&after, "async_pay_outbox_oldest_unpublished_age_seconds");
    assert!((0.0..60.0).contains(&age), "{age}");
}

/// Needs the recording calls in src/api/payments.rs and src/webhook.rs (`metrics::payment_*`,
/// `metrics::webhook_attempt`), which belong to the files of another change of issue 5.
#[tokio::test(flavor = "multi_thread")]
async fn payment_and_webhook_outcomes_are_counted() {
    let db = TestDb::new().await;
    let (s, _broker) = fast(&db);
    let app = TestApp::spawn_with(db, s.clone());
    let receiver = Receiver::start().await;
    let before = scrape(&app.url("/metrics")).await;

    let body = json!({"amount": "10.00", "currency": "EUR", "webhook_url": receiver.url("/hook")});
    let first = app.post_payment(KEY_A, "o-1", body.clone()).await;
    assert_eq!(first.status, 202);
    assert_eq!(app.post_payment(KEY_A, "o-1", body).await.status, 202);
    let other = json!({"amount": "11.00", "currency": "EUR"});
    assert_eq!(app.post_payment(KEY_A, "o-1", other).await.status, 409);

    let mut roles = Roles::new();
    roles
        .relay(&s)
        .consume(&s, Arc::new(SimulatedGateway::new(&s.gateway)));
    eventually(Duration::from_secs(20), "the webhook", || async {
        (!receiver.received().is_empty()).then_some(())
    })
    .await;
    roles.stop().await;

    let after = scrape(&app.url("/metrics")).await;
    let delta = |series: &str| value(&after, series) - value(&before, series);
    assert_eq!(delta(r#"async_pay_payments_total{result="created"}"#), 1.0);
    assert_eq!(delta(r#"async_pay_payments_total{result="replayed"}"#), 1.0);
    assert_eq!(
        delta(r#"async_pay_payments_total{result="conflicted"}"#),
        1.0
    );
    assert_eq!(
        delta(r#"async_pay_webhook_attempts_total{result="delivered"}"#),
        1.0
    );
    assert_eq!(
        delta("async_pay_webhook_attempt_duration_seconds_count"),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_role_serves_its_metrics_on_its_own_address() {
    let db = TestDb::new().await;
    let (s, broker) = fast(&db);
    let app = TestApp::spawn_with(db, s.clone());
    // What `relay` runs when `metrics.bind` is set: an exporter that also reads the outbox.
    let pool = async_pay::db::pool(&s.database).unwrap();
    let exporter = async_pay::roles::exporter::serve("127.0.0.1:0", Some(pool))
        .unwrap()
        .expect("a non-empty bind starts the exporter");
    assert!(
        async_pay::roles::exporter::serve("", None)
            .unwrap()
            .is_none(),
        "an empty bind means off"
    );
    let url = format!("http://{}/metrics", exporter.addr);
    let before = scrape(&url).await;

    let mut roles = Roles::new();
    roles
        .relay(&s)
        .consume(&s, Arc::new(SimulatedGateway::new(&s.gateway)))
        .dlq_watch(&s);
    let mut ids = Vec::new();
    for i in 0..3 {
        let r = app
            .post_payment(
                KEY_A,
                &format!("role-{i}"),
                json!({"amount": "1", "currency": "RUB"}),
            )
            .await;
        ids.push(r.json["payment_id"].as_str().unwrap().to_string());
    }
    // A message dead-lettered by hand: dlq-watch records it (no x-death header: reason unknown).
    crate::backstop::dead_letter(
        &broker,
        &[(
            "dead-by-hand",
            json!({"payment_id": uuid::Uuid::new_v4()})
                .to_string()
                .into_bytes(),
        )],
    )
    .await;
    eventually(Duration::from_secs(20), "3 final payments", || async {
        let n = app.db.count(
            "SELECT count(*) AS n FROM payments WHERE status <> 'pending' \
             AND processed_at IS NOT NULL",
        );
        (n == 3).then_some(())
    })
    .await;
    eventually(Duration::from_secs(10), "the dead letter", || async {
        (app.db.count("SELECT count(*) AS n FROM dead_letters") == 1).then_some(())
    })
    .await;

    // The consumer acks after finalising; the in-flight gauge drops once the ack is sent.
    let after = eventually(Duration::from_secs(5), "nothing in flight", || async {
        let t = scrape(&url).await;
        (value(&t, "async_pay_consumer_in_flight") == 0.0).then_some(t)
    })
    .await;
    let delta = |series: &str| value(&after, series) - value(&before, series);
    assert_eq!(
        delta(r#"async_pay_relay_messages_total{result="confirmed"}"#),
        3.0
    );
    assert_eq!(
        delta(r#"async_pay_relay_messages_total{result="not_confirmed"}"#),
        0.0
    );
    let batches = delta("async_pay_relay_confirm_seconds_count");
    assert!((1.0..=3.0).contains(&batches), "{batches}");
    let confirm = delta("async_pay_relay_confirm_seconds_sum");
    assert!(confirm > 0.0 && confirm < 5.0, "{confirm}");
    let finalised = delta(r#"async_pay_consumer_messages_total{outcome="succeeded"}"#)
        + delta(r#"async_pay_consumer_messages_total{outcome="failed"}"#);
    assert_eq!(finalised, 3.0);
    assert_eq!(delta("async_pay_consumer_processing_seconds_count"), 3.0);
    let processing = delta("async_pay_consumer_processing_seconds_sum");
    assert!(processing > 0.0 && processing < 10.0, "{processing}");
    assert!(has(&after, "async_pay_consumer_redeliveries_total"));
    assert_eq!(
        delta(r#"async_pay_dead_letters_total{reason="unknown"}"#),
        1.0
    );
    // This exporter was given a pool, so it reports the outbox: all published.
    assert_eq!(value(&after, "async_pay_outbox_unpublished"), 0.0);
    assert_eq!(
        value(&after, "async_pay_outbox_oldest_unpublished_age_seconds"),
        0.0
    );

    let health = request(
        "GET",
        &format!("http://{}/health", exporter.addr),
        &[],
        None,
    )
    .await;
    assert_eq!(health.status, 200);
    roles.stop().await;
    let addr = exporter.addr;
    exporter.stop().await;
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "stopped exporter"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_healthcheck_command_exits_by_the_health_answer() {
    let app = TestApp::spawn().await;
    let run = |url: String| {
        std::process::Command::new(env!("CARGO_BIN_EXE_async-pay"))
            .args(["healthcheck", "--timeout", "2s", "--url", &url])
            .output()
            .unwrap()
    };
    let url = app.url("/health");
    let ok = tokio::task::spawn_blocking(move || run(url)).await.unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("healthy"));

    // Nothing listens on port 1.
    let down = tokio::task::spawn_blocking(move || run("http://127.0.0.1:1/health".into()))
        .await
        .unwrap();
    assert_eq!(down.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&down.stderr).contains("unhealthy"));

    // An API whose database is unreachable answers 503: unhealthy.
    let db = TestDb::new().await;
    let mut s = settings(&db.url);
    s.database.url = async_pay::config::Secret::new("postgres://postgres@127.0.0.1:1/nowhere");
    s.database.acquire_timeout = Duration::from_millis(300);
    s.database.query_timeout = Duration::from_millis(300);
    let sick = TestApp::spawn_with(db, s);
    let url = sick.url("/health");
    let out = tokio::task::spawn_blocking(move || run(url)).await.unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("HTTP 503"));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_binary_serves_role_metrics_on_metrics_bind_and_stops_on_sigterm() {
    let db = TestDb::new().await;
    let (s, broker) = fast(&db);
    let port = free_port();
    let a = &s.amqp;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_async-pay"))
        .arg("dlq-watch")
        .env("DATABASE_URL", &db.url)
        .env("ASYNC_PAY__METRICS__BIND", format!("127.0.0.1:{port}"))
        .env("ASYNC_PAY__AMQP__EXCHANGE", &a.exchange)
        .env("ASYNC_PAY__AMQP__QUEUE", &a.queue)
        .env("ASYNC_PAY__AMQP__ROUTING_KEY", &a.routing_key)
        .env(
            "ASYNC_PAY__AMQP__DEAD_LETTER_EXCHANGE",
            &a.dead_letter_exchange,
        )
        .env("ASYNC_PAY__AMQP__DEAD_LETTER_QUEUE", &a.dead_letter_queue)
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}/metrics");
    eventually(Duration::from_secs(10), "the metrics endpoint", || async {
        std::net::TcpStream::connect(("127.0.0.1", port))
            .is_ok()
            .then_some(())
    })
    .await;
    // The process's own work shows: dlq-watch records a dead letter and counts it.
    crate::backstop::dead_letter(
        &broker,
        &[(
            "dead-by-hand",
            json!({"payment_id": uuid::Uuid::new_v4()})
                .to_string()
                .into_bytes(),
        )],
    )
    .await;
    let series = r#"async_pay_dead_letters_total{reason="unknown"}"#;
    let text = eventually(
        Duration::from_secs(10),
        "the dead letter counted",
        || async {
            let t = scrape(&url).await;
            (value(&t, series) == 1.0).then_some(t)
        },
    )
    .await;
    assert_eq!(db.count("SELECT count(*) AS n FROM dead_letters"), 1);
    assert!(
        !text.contains("async_pay_outbox_unpublished"),
        "only the relay's endpoint reports the outbox"
    );

    let pid = child.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("dlq-watch stops on SIGTERM")
        .unwrap();
    assert!(status.success(), "{status}");
}
