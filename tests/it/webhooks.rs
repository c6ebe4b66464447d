//! Webhook delivery: durable, retried on the configured schedule, recorded, cut at the timeout.

use std::sync::Arc;
use std::time::Duration;

use async_pay::gateway::simulated::SimulatedGateway;
use async_pay::processing::{Outcome, Processor};
use async_pay::roles::consume::{Disposition, Handled, handle_one};
use async_pay::roles::relay;
use async_pay::shutdown::Shutdown;
use serde_json::json;

use crate::helpers::*;
use crate::pipeline::{Roles, fast};
use crate::receiver::{Receiver, Reply};

/// Posts one payment whose webhook goes to `url`, publishes it, returns its id.
async fn pay(app: &TestApp, s: &async_pay::config::Settings, key: &str, url: &str) -> String {
    let r = app
        .post_payment(
            KEY_A,
            key,
            json!({"amount": "9.99", "currency": "RUB", "webhook_url": url}),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.text);
    relay::run_once(s).await.unwrap();
    r.json["payment_id"].as_str().unwrap().to_string()
}

fn delivery_status(app: &TestApp, id: &str, status: &str) -> i64 {
    app.db.count(&format!(
        "SELECT count(*) AS n FROM webhook_deliveries WHERE payment_id = '{id}' AND status = '{status}'"
    ))
}

/// Webhook POSTs made for a payment, as the database counts them: a sender claims a delivery
/// (counting the attempt) before every POST, and never claims one that is no longer pending. So
/// once its deliveries are delivered or failed, this is every POST there will ever be.
fn attempts_made(app: &TestApp, id: &str) -> i64 {
    app.db.count(&format!(
        "SELECT coalesce(sum(attempts), 0)::bigint AS n FROM webhook_deliveries WHERE payment_id = '{id}'"
    ))
}

/// Finalises a payment through a processor with no webhook sender running (as if the process
/// died right after the commit).
async fn finalise_with_no_sender(s: &async_pay::config::Settings, id: &str) {
    let p = Processor::new(
        s,
        async_pay::db::pool(&s.database).unwrap(),
        Arc::new(SimulatedGateway::new(&s.gateway)),
        Shutdown::new(),
    );
    let body = json!({"payment_id": id}).to_string();
    assert!(matches!(
        handle_one(&p, body.as_bytes(), 0, s.amqp.delivery_limit).await,
        Disposition::Ack(Handled::Processed(Outcome::Finalised(..)))
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_attempts_are_retried_on_the_schedule_and_recorded() {
    let db = TestDb::new().await;
    let (mut s, _broker) = fast(&db);
    // Two delays far enough apart that, jitter and polling included, each gap tells which one
    // was used.
    s.webhook.retry_delays = vec![Duration::from_millis(200), Duration::from_secs(1)];
    let app = TestApp::spawn_with(db, s.clone());
    let receiver = Receiver::start().await;
    receiver.script(&[Reply::Status(500), Reply::Status(503), Reply::Status(204)]);
    let mut roles = Roles::new();
    roles.consume(&s, Arc::new(SimulatedGateway::new(&s.gateway)));
    let id = pay(&app, &s, "sched", &receiver.url("/hooks/a")).await;

    let got = eventually(Duration::from_secs(10), "three attempts", || async {
        let r = receiver.received();
        (r.len() >= 3).then_some(r)
    })
    .await;
    eventually(
        Duration::from_secs(5),
        "the delivery to be marked delivered",
        || async { (delivery_status(&app, &id, "delivered") == 1).then_some(()) },
    )
    .await;
    assert_eq!(
        (attempts_made(&app, &id), receiver.received().len()),
        (3, 3),
        "three POSTs, and none will follow the success"
    );
    assert!(got.iter().all(|r| r.path == "/hooks/a"));
    // One delivery id across retries, so the merchant can deduplicate.
    assert!(
        got.iter()
            .all(|r| r.headers["webhook-id"] == got[0].headers["webhook-id"])
    );
    // The gaps follow retry_delays in order (200 ms, then 1 s), each at least its delay less
    // 20 % jitter; the second is the longer one.
    let gap1 = got[1].at - got[0].at;
    let gap2 = got[2].at - got[1].at;
    assert!(gap1 >= Duration::from_millis(160), "{gap1:?}");
    assert!(gap2 >= Duration::from_millis(800), "{gap2:?}");
    assert!(
        gap2 > gap1,
        "the second delay is the longer one: {gap1:?} then {gap2:?}"
    );

    let attempts = app.db.count(&format!(
        "SELECT count(*) AS n FROM webhook_attempts a JOIN webhook_deliveries d ON d.id = a.delivery_id \
         WHERE d.payment_id = '{id}' AND a.response_body IS NOT NULL AND a.duration_ms >= 0 \
         AND (a.status_code = 204 OR a.response_body = 'ok')"
    ));
    assert_eq!(attempts, 3);
    let codes = app.db.count(&format!(
        "SELECT sum(a.status_code * a.attempt)::bigint AS n FROM webhook_attempts a \
         JOIN webhook_deliveries d ON d.id = a.delivery_id WHERE d.payment_id = '{id}'"
    ));
    assert_eq!(
        codes,
        500 + 503 * 2 + 204 * 3,
        "attempt numbers and status codes are recorded"
    );
    roles.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn gone_stops_retrying_and_an_exhausted_schedule_fails() {
    let db = TestDb::new().await;
    let (s, _broker) = fast(&db);
    let app = TestApp::spawn_with(db, s.clone());
    let gone = Receiver::start().await;
    gone.set_default(Reply::Status(410));
    let broken = Receiver::start().await;
    broken.set_default(Reply::Status(500));
    let mut roles = Roles::new();
    roles.consume(&s, Arc::new(SimulatedGateway::new(&s.gateway)));
    let a = pay(&app, &s, "gone", &gone.url("/")).await;
    let b = pay(&app, &s, "broken", &broken.url("/")).await;
    eventually(
        Duration::from_secs(10),
        "both deliveries to fail",
        || async {
            (delivery_status(&app, &a, "failed") + delivery_status(&app, &b, "failed") == 2)
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        (attempts_made(&app, &a), gone.received().len()),
        (1, 1),
        "410 Gone is not retried"
    );
    assert_eq!(
        (attempts_made(&app, &b), broken.received().len()),
        (3, 3),
        "1 + len(retry_delays) attempts, then given up"
    );
    roles.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hung_endpoint_is_cut_at_the_timeout() {
    let db = TestDb::new().await;
    let (mut s, _broker) = fast(&db);
    s.webhook.timeout = Duration::from_millis(500);
    let app = TestApp::spawn_with(db, s.clone());
    let receiver = Receiver::start().await;
    receiver.script(&[Reply::Hang]);
    let mut roles = Roles::new();
    roles.consume(&s, Arc::new(SimulatedGateway::new(&s.gateway)));
    let id = pay(&app, &s, "hang", &receiver.url("/")).await;
    eventually(
        Duration::from_secs(10),
        "the retry to be delivered",
        || async { (delivery_status(&app, &id, "delivered") == 1).then_some(()) },
    )
    .await;
    let got = receiver.received();
    assert_eq!(got.len(), 2);
    let cut = app.db.count(&format!(
        "SELECT count(*) AS n FROM webhook_attempts a JOIN webhook_deliveries d ON d.id = a.delivery_id \
         WHERE d.payment_id = '{id}' AND a.attempt = 1 AND a.status_code IS NULL AND a.error IS NOT NULL \
         AND a.duration_ms BETWEEN 400 AND 3000"
    ));
    assert_eq!(
        cut, 1,
        "the first attempt was cut at about 500 ms and recorded as an error"
    );
    roles.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_webhook_due_when_the_process_stopped_is_delivered_after_restart() {
    let db = TestDb::new().await;
    let (s, _broker) = fast(&db);
    let app = TestApp::spawn_with(db, s.clone());
    let receiver = Receiver::start().await;
    let r = app
        .post_payment(
            KEY_A,
            "durable",
            json!({"amount": "1", "currency": "USD", "webhook_url": receiver.url("/")}),
        )
        .await;
    let id = r.json["payment_id"].as_str().unwrap().to_string();
    // Finalise without any sender running: the process "dies" right after the commit.
    finalise_with_no_sender(&s, &id).await;
    assert_eq!(
        (
            delivery_status(&app, &id, "pending"),
            attempts_made(&app, &id)
        ),
        (1, 0),
        "the intent to deliver was committed with the status, and nothing was sent yet"
    );

    // "Restart": a consumer process comes up and delivers it.
    let mut roles = Roles::new();
    roles.consume(&s, Arc::new(SimulatedGateway::new(&s.gateway)));
    let got = eventually(
        Duration::from_secs(10),
        "the webhook after restart",
        || async {
            let r = receiver.received();
            (!r.is_empty()).then_some(r)
        },
    )
    .await;
    assert_eq!(got[0].json()["payment_id"], id.as_str());
    eventually(Duration::from_secs(10), "the delivery recorded", || async {
        (delivery_status(&app, &id, "delivered") == 1).then_some(())
    })
    .await;
    assert_eq!(
        (attempts_made(&app, &id), receiver.received().len()),
        (1, 1),
        "sent once after the restart"
    );
    roles.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_payment_shows_its_webhook_and_every_attempt_and_can_resend() {
    let db = TestDb::new().await;
    let (s, _broker) = fast(&db);
    let app = TestApp::spawn_with(db, s.clone());
    let receiver = Receiver::start().await;
    receiver.set_default(Reply::Status(500));
    let mut roles = Roles::new();
    roles.consume(&s, Arc::new(SimulatedGateway::new(&s.gateway)));

    let plain = app
        .post_payment(KEY_A, "plain", json!({"amount": "1", "currency": "USD"}))
        .await;
    let plain_id = plain.json["payment_id"].as_str().unwrap().to_string();
    let id = pay(&app, &s, "visible", &receiver.url("/")).await;
    eventually(
        Duration::from_secs(10),
        "the schedule to be exhausted",
        || async { (delivery_status(&app, &id, "failed") == 1).then_some(()) },
    )
    .await;
    let w = app.get_payment(KEY_A, &id).await.json["webhook"].clone();
    assert_eq!(w["status"], "failed");
    assert_eq!(w["attempts"], 3);
    assert_eq!(w["last_status_code"], 500);
    assert!(w["last_attempt_at"].is_string());
    assert!(w["next_attempt_at"].is_null());
    eventually(
        Duration::from_secs(10),
        "the plain payment to be final",
        || async {
            (app.get_payment(KEY_A, &plain_id).await.json["status"] != "pending").then_some(())
        },
    )
    .await;
    assert_eq!(
        app.get_payment(KEY_A, &plain_id).await.json["webhook"]["status"],
        "none"
    );

    let list = request(
        "GET",
        &app.url(&format!("/api/v1/payments/{id}/webhook-attempts")),
        &[("X-API-Key", KEY_A)],
        None,
    )
    .await;
    assert_eq!(list.status, 200, "{}", list.text);
    let attempts = list.json["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 3);
    assert_eq!(
        attempts
            .iter()
            .map(|a| a["attempt"].as_i64().unwrap())
            .collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert!(
        attempts
            .iter()
            .all(|a| a["status_code"] == 500 && a["response_body"] == "ok")
    );
    let webhook_id = attempts[0]["webhook_id"].as_str().unwrap().to_string();
    // Merchant-scoped: B sees nothing of A's payment.
    let other = request(
        "GET",
        &app.url(&format!("/api/v1/payments/{id}/webhook-attempts")),
        &[("X-API-Key", KEY_B)],
        None,
    )
    .await;
    assert_eq!(other.status, 404);
    let other = request(
        "POST",
        &app.url(&format!("/api/v1/payments/{id}/webhook/resend")),
        &[("X-API-Key", KEY_B)],
        None,
    )
    .await;
    assert_eq!(other.status, 404);

    // The endpoint is back: resend delivers the same event, with the same webhook-id.
    receiver.set_default(Reply::Status(200));
    let r = request(
        "POST",
        &app.url(&format!("/api/v1/payments/{id}/webhook/resend")),
        &[("X-API-Key", KEY_A)],
        None,
    )
    .await;
    assert_eq!(r.status, 202, "{}", r.text);
    assert_eq!(r.json["webhook_id"], webhook_id.as_str());
    eventually(
        Duration::from_secs(10),
        "the resend to be delivered",
        || async {
            (app.get_payment(KEY_A, &id).await.json["webhook"]["status"] == "delivered")
                .then_some(())
        },
    )
    .await;
    let got = receiver.received();
    assert_eq!(got.len(), 4);
    assert_eq!(got[3].headers["webhook-id"], webhook_id);
    assert_eq!(got[3].body, got[0].body, "the same event");

    // Nothing to resend for a payment without webhook_url.
    let r = request(
        "POST",
        &app.url(&format!("/api/v1/payments/{plain_id}/webhook/resend")),
        &[("X-API-Key", KEY_A)],
        None,
    )
    .await;
    assert_eq!((r.status, r.code()), (409, "no_webhook_url"));
    roles.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn resend_of_a_pending_payment_is_refused() {
    let app = TestApp::spawn().await;
    let r = app
        .post_payment(
            KEY_A,
            "p",
            json!({"amount": "1", "currency": "USD", "webhook_url": "https://example.com/h"}),
        )
        .await;
    let id = r.json["payment_id"].as_str().unwrap();
    let r = request(
        "POST",
        &app.url(&format!("/api/v1/payments/{id}/webhook/resend")),
        &[("X-API-Key", KEY_A)],
        None,
    )
    .await;
    assert_eq!((r.status, r.code()), (409, "payment_not_final"));
    let r = request(
        "POST",
        &app.url("/api/v1/payments/not-a-uuid/webhook/resend"),
        &[("X-API-Key", KEY_A)],
        None,
    )
    .await;
    assert_eq!(r.status, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn signatures_verify_with_the_secret_only_and_rotation_signs_twice() {
    let db = TestDb::new().await;
    let (mut s, _broker) = fast(&db);
    let old = "whsec_5FXVJnDsZtZr1/Khk2JT33r5q9dF2GBAPID525tBOoU=";
    for m in s.merchants.iter_mut().filter(|m| m.name == "a") {
        m.previous_webhook_secrets = vec![async_pay::config::Secret::new(old)];
    }
    s.validate().unwrap();
    let app = TestApp::spawn_with(db, s.clone());
    let receiver = Receiver::start().await;
    let mut roles = Roles::new();
    roles.consume(&s, Arc::new(SimulatedGateway::new(&s.gateway)));
    pay(&app, &s, "sig", &receiver.url("/")).await;
    let got = eventually(Duration::from_secs(10), "the webhook", || async {
        let r = receiver.received();
        (!r.is_empty()).then_some(r)
    })
    .await;
    let w = &got[0];
    let ts: i64 = w.headers["webhook-timestamp"].parse().unwrap();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    assert!((now - ts).abs() < 60, "the timestamp is the attempt's time");
    let sigs: Vec<&str> = w.headers["webhook-signature"].split(' ').collect();
    assert_eq!(sigs.len(), 2, "current and previous secret during rotation");
    let key = |s: &str| async_pay::signing::secret_key(s).unwrap();
    let id = &w.headers["webhook-id"];
    assert_eq!(
        sigs[0],
        async_pay::signing::sign(&key(SECRET_A), id, ts, &w.body)
    );
    assert_eq!(
        sigs[1],
        async_pay::signing::sign(&key(old), id, ts, &w.body)
    );
    // Another secret, another body or another timestamp do not verify.
    let stranger = "whsec_dGhpcyBpcyBub3QgdGhlIHJpZ2h0IHNlY3JldCBhdCBhbGw=";
    assert!(!sigs.contains(&async_pay::signing::sign(&key(stranger), id, ts, &w.body).as_str()));
    assert!(
        !sigs.contains(&async_pay::signing::sign(&key(SECRET_A), id, ts + 1, &w.body).as_str())
    );
    assert!(!sigs.contains(&async_pay::signing::sign(&key(SECRET_A), id, ts, b"{}").as_str()));
    roles.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn private_webhook_targets_are_refused_at_creation() {
    let db = TestDb::new().await;
    let mut s = settings(&db.url);
    s.webhook.allow_private_targets = false;
    let app = TestApp::spawn_with(db, s);
    for (i, url) in [
        "http://127.0.0.1:8080/hook",
        "http://2130706433/",
        "http://0x7f.0.0.1/",
        "http://[::1]/",
        "http://[::ffff:127.0.0.1]/",
        "http://10.0.0.5/",
        "http://172.16.3.4/",
        "http://192.168.1.1/",
        "http://169.254.169.254/latest/meta-data/",
        "http://[fd00::1]/",
        "http://[fe80::1]/",
        "http://0.0.0.0/",
        "http://localhost/",
    ]
    .into_iter()
    .enumerate()
    {
        let r = app
            .post_payment(
                KEY_A,
                &format!("ssrf-{i}"),
                json!({"amount": "1", "currency": "RUB", "webhook_url": url}),
            )
            .await;
        assert_eq!(r.status, 422, "{url}: {}", r.text);
        assert_eq!(r.json["error"]["field"], "webhook_url");
    }
    let r = app
        .post_payment(
            KEY_A,
            "public",
            json!({"amount": "1", "currency": "RUB", "webhook_url": "https://93.184.216.34/hook"}),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.text);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_private_target_is_refused_again_at_delivery() {
    let db = TestDb::new().await;
    // The API let it in (as if DNS had said "public" then); the sender checks what it connects to.
    let (s, _broker) = fast(&db);
    let app = TestApp::spawn_with(db, s.clone());
    let receiver = Receiver::start().await;
    let mut guarded = s.clone();
    guarded.webhook.allow_private_targets = false;
    let mut roles = Roles::new();
    roles.consume(&guarded, Arc::new(SimulatedGateway::new(&s.gateway)));
    let id = pay(
        &app,
        &s,
        "rebind",
        &format!("http://localhost:{}/", receiver.addr.port()),
    )
    .await;
    eventually(Duration::from_secs(10), "the delivery to fail", || async {
        (delivery_status(&app, &id, "failed") == 1).then_some(())
    })
    .await;
    assert!(
        receiver.received().is_empty(),
        "nothing reached the private address"
    );
    let guarded_errors = app.db.count(&format!(
        "SELECT count(*) AS n FROM webhook_attempts a JOIN webhook_deliveries d ON d.id = a.delivery_id \
         WHERE d.payment_id = '{id}' AND a.error LIKE '%SSRF%'"
    ));
    assert_eq!(guarded_errors, 3);
    roles.stop().await;
}

/// Posts a payment with `url` as its webhook; returns the response.
async fn with_hook(app: &TestApp, key: &str, url: &str) -> Resp {
    app.post_payment(
        KEY_A,
        key,
        json!({"amount": "1", "currency": "RUB", "webhook_url": url}),
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn reserved_ranges_and_ports_outside_the_allow_list_are_refused_with_the_reason() {
    let db = TestDb::new().await;
    let mut s = settings(&db.url);
    s.webhook.allow_private_targets = false;
    let app = TestApp::spawn_with(db, s.clone());
    for (i, (url, why)) in [
        (
            "http://198.18.0.1/",
            "must not point to 198.18.0.0/15 (benchmarking, RFC 2544)",
        ),
        ("http://[64:ff9b:1::a00:1]/", "(local-use NAT64, RFC 8215)"),
        (
            "http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/",
            "(Teredo, RFC 4380)",
        ),
        (
            "http://[::ffff:0:a00:1]/",
            "(IPv4-translated (SIIT), RFC 2765)",
        ),
        ("http://[::ffff:c612:1]/", "(benchmarking, RFC 2544)"),
        (
            "https://203.0.113.9/",
            "(documentation (TEST-NET-3), RFC 5737)",
        ),
        ("http://[2001:db8::1]/", "(documentation, RFC 3849)"),
        (
            "https://93.184.216.34:22/",
            "must use one of the ports 80, 443, 8080, 8443 (not 22)",
        ),
        ("http://93.184.216.34:6379/", "(not 6379)"),
    ]
    .into_iter()
    .enumerate()
    {
        let r = with_hook(&app, &format!("refused-{i}"), url).await;
        assert_eq!(r.status, 422, "{url}: {}", r.text);
        assert_eq!(r.code(), "validation_failed", "{url}");
        assert_eq!(r.json["error"]["field"], "webhook_url", "{url}");
        let message = r.json["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(why), "{url}: {message}");
    }
    for (i, url) in [
        "https://93.184.216.34/hook",
        "http://93.184.216.34:8080/",
        "https://93.184.216.34:8443/",
    ]
    .into_iter()
    .enumerate()
    {
        let r = with_hook(&app, &format!("allowed-{i}"), url).await;
        assert_eq!(r.status, 202, "{url}: {}", r.text);
    }

    // The allow list is a setting.
    let db = TestDb::new().await;
    s.database.url = async_pay::config::Secret::new(db.url.as_str());
    s.webhook.allowed_ports = vec![9443];
    let custom = TestApp::spawn_with(db, s.clone());
    let r = with_hook(&custom, "custom-443", "https://93.184.216.34/").await;
    assert_eq!(r.status, 422, "{}", r.text);
    assert!(
        r.text.contains("must use one of the ports 9443 (not 443)"),
        "{}",
        r.text
    );
    let r = with_hook(&custom, "custom-9443", "https://93.184.216.34:9443/").await;
    assert_eq!(r.status, 202, "{}", r.text);

    // Development mode (private targets allowed) checks neither ranges nor ports.
    let db = TestDb::new().await;
    s.database.url = async_pay::config::Secret::new(db.url.as_str());
    s.webhook.allow_private_targets = true;
    let dev = TestApp::spawn_with(db, s);
    for (i, url) in ["http://198.18.0.1:22/", "http://127.0.0.1:5432/"]
        .into_iter()
        .enumerate()
    {
        let r = with_hook(&dev, &format!("dev-{i}"), url).await;
        assert_eq!(r.status, 202, "{url}: {}", r.text);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_port_outside_the_allow_list_is_refused_again_at_delivery() {
    let db = TestDb::new().await;
    // Accepted by an API in development mode (or before the allow list existed); the sender with
    // the guard on refuses to connect.
    let (s, _broker) = fast(&db);
    let app = TestApp::spawn_with(db, s.clone());
    let mut guarded = s.clone();
    guarded.webhook.allow_private_targets = false;
    let mut roles = Roles::new();
    roles.consume(&guarded, Arc::new(SimulatedGateway::new(&s.gateway)));
    let id = pay(&app, &s, "port", "http://93.184.216.34:22/").await;
    eventually(Duration::from_secs(15), "the delivery to fail", || async {
        (delivery_status(&app, &id, "failed") == 1).then_some(())
    })
    .await;
    let refused = app.db.count(&format!(
        "SELECT count(*) AS n FROM webhook_attempts a JOIN webhook_deliveries d ON d.id = a.delivery_id \
         WHERE d.payment_id = '{id}' AND a.error LIKE '%SSRF guard%(not 22)%' AND a.status_code IS NULL"
    ));
    assert_eq!(refused, 3, "every attempt refused before connecting");
    roles.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_endpoint_does_not_delay_other_merchants() {
    let db = TestDb::new().await;
    let (mut s, _broker) = fast(&db);
    s.webhook.timeout = Duration::from_secs(5);
    s.amqp.prefetch = 256;
    let app = TestApp::spawn_with(db, s.clone());
    let dead = Receiver::start().await;
    dead.set_default(Reply::Hang);
    let good = Receiver::start().await;
    let mut roles = Roles::new();
    roles
        .relay(&s)
        .consume(&s, Arc::new(SimulatedGateway::new(&s.gateway)));
    let mut ids = Vec::new();
    for i in 0..200 {
        let r = app
            .post_payment(
                KEY_A,
                &format!("dead-{i}"),
                json!({"amount": "1", "currency": "RUB", "webhook_url": dead.url("/")}),
            )
            .await;
        ids.push(r.json["payment_id"].as_str().unwrap().to_string());
    }
    eventually(
        Duration::from_secs(20),
        "the dead endpoint to be saturated",
        || async { (dead.received().len() >= s.webhook.per_host_concurrency).then_some(()) },
    )
    .await;
    // Now a payment of another merchant, whose endpoint works (another host name).
    let started = std::time::Instant::now();
    let r = app
        .post_payment(
            KEY_B,
            "alive",
            json!({"amount": "1", "currency": "RUB", "webhook_url": format!("http://localhost:{}/", good.addr.port())}),
        )
        .await;
    let good_id = r.json["payment_id"].as_str().unwrap().to_string();
    eventually(
        Duration::from_secs(4),
        "the good endpoint's webhook, while the dead one hangs",
        || async { (!good.received().is_empty()).then_some(()) },
    )
    .await;
    assert!(
        started.elapsed() < s.webhook.timeout,
        "delivered before any dead attempt timed out"
    );
    // While the good webhook was on its way, the dead host held at most its share of the
    // sender: attempts that began within one timeout before the good one arrived.
    let good_at = good.received()[0].at;
    let concurrent = dead
        .received()
        .iter()
        .filter(|r| r.at <= good_at && good_at.duration_since(r.at) < s.webhook.timeout)
        .count();
    assert!(
        concurrent <= s.webhook.per_host_concurrency,
        "the dead host holds at most its share ({concurrent})"
    );
    // And every payment was finalised regardless of its webhook.
    assert_eq!(
        app.db
            .count("SELECT count(*) AS n FROM payments WHERE status = 'pending'"),
        0,
        "payments do not wait for webhooks"
    );
    assert_ne!(
        app.get_payment(KEY_B, &good_id).await.json["status"],
        "pending"
    );
    roles.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_binary_response_body_is_recorded_and_the_delivery_completes() {
    let db = TestDb::new().await;
    let (s, _broker) = fast(&db);
    let app = TestApp::spawn_with(db, s.clone());
    let receiver = Receiver::start().await;
    // NUL and invalid UTF-8: PostgreSQL text refuses NUL, so it must be stored replaced.
    receiver.script(&[Reply::StatusBody(200, b"ok\0\xff\xfe bin")]);
    let mut roles = Roles::new();
    roles.consume(&s, Arc::new(SimulatedGateway::new(&s.gateway)));
    let id = pay(&app, &s, "binary", &receiver.url("/")).await;
    eventually(
        Duration::from_secs(10),
        "the delivery to be marked delivered",
        || async { (delivery_status(&app, &id, "delivered") == 1).then_some(()) },
    )
    .await;
    assert_eq!(
        (attempts_made(&app, &id), receiver.received().len()),
        (1, 1),
        "sent once, not again and again"
    );
    let stored = app.db.count(&format!(
        "SELECT count(*) AS n FROM webhook_attempts a JOIN webhook_deliveries d ON d.id = a.delivery_id \
         WHERE d.payment_id = '{id}' AND a.response_body LIKE 'ok%bin'"
    ));
    assert_eq!(stored, 1);
    roles.stop().await;
}

/// A payment finalised by a processor with no sender running, its delivery then marked failed
/// (the schedule exhausted): what a merchant resends. Returns the payment id.
async fn final_with_failed_webhook(
    app: &TestApp,
    s: &async_pay::config::Settings,
    key: &str,
) -> String {
    let r = app
        .post_payment(
            KEY_A,
            key,
            json!({"amount": "1", "currency": "USD", "webhook_url": "http://127.0.0.1:9/hook"}),
        )
        .await;
    let id = r.json["payment_id"].as_str().unwrap().to_string();
    finalise_with_no_sender(s, &id).await;
    app.db
        .exec(&format!(
            "UPDATE webhook_deliveries SET status = 'failed', attempts = 3, finished_at = now() \
             WHERE payment_id = '{id}'"
        ))
        .unwrap();
    id
}

#[tokio::test(flavor = "multi_thread")]
async fn racing_resends_of_one_payment_make_one_pending_delivery() {
    use diesel_async::{AsyncConnection, SimpleAsyncConnection};
    let db = TestDb::new().await;
    let (s, _broker) = fast(&db);
    let app = TestApp::spawn_with(db, s.clone());
    let id = final_with_failed_webhook(&app, &s, "race-resend").await;
    // Line the two resends up at the same point: a lock that lets them read but not write
    // deliveries, held until both are waiting on a lock.
    let mut gate = diesel_async::AsyncPgConnection::establish(&app.db.url)
        .await
        .unwrap();
    gate.batch_execute("BEGIN; LOCK TABLE webhook_deliveries IN SHARE ROW EXCLUSIVE MODE")
        .await
        .unwrap();
    let url = app.url(&format!("/api/v1/payments/{id}/webhook/resend"));
    let resends: Vec<_> = (0..2)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { request("POST", &url, &[("X-API-Key", KEY_A)], None).await })
        })
        .collect();
    eventually(
        Duration::from_secs(10),
        "both resends to wait on a lock",
        || async {
            let waiting = app.db.count(
                "SELECT count(*) AS n FROM pg_stat_activity \
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
            );
            (waiting == 2).then_some(())
        },
    )
    .await;
    gate.batch_execute("COMMIT").await.unwrap();
    let mut ids = std::collections::HashSet::new();
    for r in resends {
        let r = r.await.unwrap();
        assert_eq!(r.status, 202, "{}", r.text);
        ids.insert(r.json["delivery_id"].as_str().unwrap().to_string());
    }
    assert_eq!(
        ids.len(),
        1,
        "both answer the one pending delivery: {ids:?}"
    );
    assert_eq!(
        delivery_status(&app, &id, "pending"),
        1,
        "one new delivery, not one per request"
    );
    assert_eq!(delivery_status(&app, &id, "failed"), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_claim_is_renewed_while_its_attempt_runs_and_never_once_it_is_recorded() {
    use async_pay::db::webhooks as w;
    use diesel_async::AsyncConnection;
    let db = TestDb::new().await;
    let (s, _broker) = fast(&db);
    let app = TestApp::spawn_with(db, s.clone());
    let r = app
        .post_payment(
            KEY_A,
            "renew",
            json!({"amount": "1", "currency": "USD", "webhook_url": "http://127.0.0.1:9/hook"}),
        )
        .await;
    finalise_with_no_sender(&s, r.json["payment_id"].as_str().unwrap()).await;
    let mut c = diesel_async::AsyncPgConnection::establish(&app.db.url)
        .await
        .unwrap();
    let claimed = w::claim_due(&mut c, 10, Duration::from_secs(2), 8, &[], &[])
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    let d = &claimed[0];
    let minute = Duration::from_secs(60);
    let due_in = |app: &TestApp| {
        app.db.count(&format!(
            "SELECT extract(epoch FROM next_attempt_at - now())::bigint AS n \
             FROM webhook_deliveries WHERE id = '{}'",
            d.id
        ))
    };

    // While the attempt runs: pushed out by the lease, and the new lease end is what counts.
    let renewed = w::renew_claims(&mut c, &[d.id], &[d.attempts], &[d.next_attempt_at], minute)
        .await
        .unwrap();
    assert_eq!(renewed.len(), 1);
    assert!(due_in(&app) > 50, "renewed to about a minute from now");
    let stale = w::renew_claims(&mut c, &[d.id], &[d.attempts], &[d.next_attempt_at], minute)
        .await
        .unwrap();
    assert!(
        stale.is_empty(),
        "a lease end that is no longer in the row renews nothing"
    );

    // The attempt is recorded with a retry in 1 s: a heartbeat that comes after must not move
    // the retry out by a lease.
    let retry_at = time::OffsetDateTime::now_utc() + Duration::from_secs(1);
    w::record_attempt(
        &mut c,
        &w::Attempt {
            delivery_id: d.id,
            attempt: d.attempts,
            attempted_at: time::OffsetDateTime::now_utc(),
            duration_ms: 5,
            status_code: Some(500),
            error: None,
            response_body: Some("no".into()),
        },
        w::AfterAttempt::RetryAt(retry_at),
    )
    .await
    .unwrap();
    let late = w::renew_claims(
        &mut c,
        &[d.id],
        &[d.attempts],
        &[renewed[0].next_attempt_at],
        minute,
    )
    .await
    .unwrap();
    assert!(late.is_empty(), "a recorded attempt is not renewed");
    assert!(due_in(&app) <= 1, "the retry stays due in about 1 s");
}

#[tokio::test(flavor = "multi_thread")]
async fn no_more_than_webhook_concurrency_attempts_are_in_flight() {
    let db = TestDb::new().await;
    let (mut s, _broker) = fast(&db);
    s.webhook.concurrency = 4;
    // One host: only the global cap limits.
    s.webhook.per_host_concurrency = 100;
    s.webhook.timeout = Duration::from_secs(30);
    let app = TestApp::spawn_with(db, s.clone());
    let receiver = Receiver::start().await;
    receiver.set_default(Reply::Hold);
    // Twelve deliveries due at once before any sender runs.
    for i in 0..12 {
        let r = app
            .post_payment(
                KEY_A,
                &format!("cap-{i}"),
                json!({"amount": "1", "currency": "USD", "webhook_url": receiver.url("/")}),
            )
            .await;
        finalise_with_no_sender(&s, r.json["payment_id"].as_str().unwrap()).await;
    }
    let mut roles = Roles::new();
    roles.consume(&s, Arc::new(SimulatedGateway::new(&s.gateway)));
    eventually(Duration::from_secs(10), "the cap to be reached", || async {
        (receiver.max_open() >= 4).then_some(())
    })
    .await;
    // From now on every request is answered; the held ones are let go.
    receiver.set_default(Reply::Status(200));
    receiver.release_held();
    eventually(Duration::from_secs(20), "all twelve delivered", || async {
        (app.db
            .count("SELECT count(*) AS n FROM webhook_deliveries WHERE status = 'delivered'")
            == 12)
            .then_some(())
    })
    .await;
    assert_eq!(receiver.received().len(), 12);
    assert_eq!(
        receiver.max_open(),
        4,
        "never more than webhook.concurrency requests open at the receiver"
    );
    roles.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_resend_while_an_attempt_is_in_flight_sends_no_second_post() {
    let db = TestDb::new().await;
    let (s, _broker) = fast(&db);
    let app = TestApp::spawn_with(db, s.clone());
    let receiver = Receiver::start().await;
    // The first POST is held unanswered: its attempt is under way.
    receiver.script(&[Reply::Hold]);
    let mut roles = Roles::new();
    roles
        .relay(&s)
        .consume(&s, Arc::new(SimulatedGateway::new(&s.gateway)));
    let id = pay(&app, &s, "held", &receiver.url("/held")).await;
    eventually(
        Duration::from_secs(15),
        "the first attempt to be in flight",
        || async { (receiver.received().len() == 1).then_some(()) },
    )
    .await;
    let url = app.url(&format!("/api/v1/payments/{id}/webhook/resend"));
    let r = request("POST", &url, &[("X-API-Key", KEY_A)], None).await;
    assert_eq!(r.status, 202, "{}", r.text);
    // A later payment's webhook arriving means the sender has looked for due deliveries since
    // the resend: a delivery made due by it would have been claimed and POSTed by then.
    pay(&app, &s, "marker", &receiver.url("/marker")).await;
    eventually(Duration::from_secs(15), "the marker's webhook", || async {
        receiver
            .received()
            .iter()
            .any(|r| r.path == "/marker")
            .then_some(())
    })
    .await;
    let held = receiver
        .received()
        .iter()
        .filter(|r| r.path == "/held")
        .count();
    assert_eq!(held, 1, "a second POST beside the one in flight");
    assert_eq!(attempts_made(&app, &id), 1);
    receiver.release_held();
    eventually(
        Duration::from_secs(15),
        "the held attempt to be recorded",
        || async { (delivery_status(&app, &id, "delivered") == 1).then_some(()) },
    )
    .await;
    roles.stop().await;
}
