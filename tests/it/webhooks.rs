//! Webhook delivery: durable, retried on the configured schedule, recorded, cut at the timeout.

use std::sync::Arc;
use std::time::Duration;

use async_pay::gateway::SimulatedGateway;
use async_pay::roles::consume::{Disposition, Handled, Processor};
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

#[tokio::test(flavor = "multi_thread")]
async fn failed_attempts_are_retried_on_the_schedule_and_recorded() {
    let db = TestDb::new().await;
    let (s, _broker) = fast(&db);
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
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.received().len(), 3, "no attempt after success");
    assert!(got.iter().all(|r| r.path == "/hooks/a"));
    // One delivery id across retries, so the merchant can deduplicate.
    assert!(
        got.iter()
            .all(|r| r.headers["webhook-id"] == got[0].headers["webhook-id"])
    );
    // The gaps follow retry_delays (200ms, 400ms) with at most 20 % jitter either way.
    let gap1 = got[1].at - got[0].at;
    let gap2 = got[2].at - got[1].at;
    assert!(gap1 >= Duration::from_millis(160), "{gap1:?}");
    assert!(gap2 >= Duration::from_millis(320), "{gap2:?}");
    assert!(
        gap2 > gap1 / 2,
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
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(gone.received().len(), 1, "410 Gone is not retried");
    assert_eq!(
        broken.received().len(),
        3,
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
    let pool = async_pay::db::pool(&s.database).unwrap();
    let p = Processor::new(
        &s,
        pool,
        Arc::new(SimulatedGateway::new(&s.gateway)),
        Shutdown::new(),
    );
    let body = json!({"payment_id": id}).to_string();
    assert!(matches!(
        p.handle_one(body.as_bytes(), 0).await,
        Disposition::Ack(Handled::Finalised(..))
    ));
    drop(p);
    assert_eq!(
        delivery_status(&app, &id, "pending"),
        1,
        "the intent to deliver was committed with the status"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(receiver.received().is_empty());

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
    roles.stop().await;
}
