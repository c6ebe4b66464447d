//! The HTTP API against a real database: creation, idempotency, validation, errors, recovery.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::helpers::*;
use crate::proxy::Proxy;

fn body() -> Value {
    json!({
        "amount": "100.50",
        "currency": "RUB",
        "description": "Order #123",
        "metadata": {"order_id": "123"},
        "webhook_url": "https://example.com/webhook"
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn create_answers_202_and_get_returns_the_full_payment() {
    let app = TestApp::spawn().await;
    let r = app.post_payment(KEY_A, "order-1", body()).await;
    assert_eq!(r.status, 202, "{}", r.text);
    let id = r.json["payment_id"].as_str().unwrap().to_string();
    assert_eq!(r.json["status"], "pending");
    assert_eq!(r.headers["location"], format!("/api/v1/payments/{id}"));
    let created = r.json["created_at"].as_str().unwrap();
    time::OffsetDateTime::parse(created, &time::format_description::well_known::Rfc3339).unwrap();

    let g = app.get_payment(KEY_A, &id).await;
    assert_eq!(g.status, 200, "{}", g.text);
    assert_eq!(
        g.json,
        json!({
            "id": id,
            "amount": "100.50",
            "currency": "RUB",
            "description": "Order #123",
            "metadata": {"order_id": "123"},
            "status": "pending",
            "idempotency_key": "order-1",
            "webhook_url": "https://example.com/webhook",
            "created_at": created,
            "processed_at": null,
            "charge_id": null,
            "failure_code": null,
            "failure_message": null,
            "webhook": {"status": "pending", "attempts": 0, "last_attempt_at": null,
                        "last_status_code": null, "next_attempt_at": null},
        })
    );
    // The other key of the same merchant (rotation) sees it too.
    assert_eq!(app.get_payment(KEY_A2, &id).await.status, 200);

    // The event was written with it.
    let events = app.db.count(&format!(
        "SELECT count(*) AS n FROM outbox WHERE event_type = 'payment.created' \
         AND payload->>'payment_id' = '{id}' AND published_at IS NULL"
    ));
    assert_eq!(events, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn every_response_carries_a_request_id() {
    let app = TestApp::spawn().await;
    let given = request(
        "GET",
        &app.url("/health"),
        &[("X-Request-Id", "trace-42")],
        None,
    )
    .await;
    assert_eq!(
        given.headers["x-request-id"], "trace-42",
        "the client's id is echoed"
    );
    let made = app.post_payment(KEY_A, "rid", body()).await;
    let id = &made.headers["x-request-id"];
    assert_eq!(id.len(), 32, "a fresh id is made when none was sent: {id}");
    let odd = request(
        "GET",
        &app.url("/nope"),
        &[("X-Request-Id", "has space")],
        None,
    )
    .await;
    assert_ne!(
        odd.headers["x-request-id"], "has space",
        "an unusable id is replaced"
    );
    assert_eq!(odd.status, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn amounts_keep_every_digit_whether_string_or_number() {
    let app = TestApp::spawn().await;
    // Amounts as raw JSON text: a number literal must not pass through f64 anywhere.
    for (i, (amount, shown)) in [
        ("1234567890123456.78", "1234567890123456.78"),
        ("\"9999999999999999.99\"", "9999999999999999.99"),
        ("100.5", "100.50"),
        ("\"0.01\"", "0.01"),
        ("7", "7.00"),
        ("7.10e1", "71.00"),
    ]
    .into_iter()
    .enumerate()
    {
        let r = request(
            "POST",
            &app.url("/api/v1/payments"),
            &[
                ("X-API-Key", KEY_A),
                ("Idempotency-Key", &format!("amt-{i}")),
            ],
            Some(format!(r#"{{"amount": {amount}, "currency": "USD"}}"#).into_bytes()),
        )
        .await;
        assert_eq!(r.status, 202, "{}", r.text);
        let g = app
            .get_payment(KEY_A, r.json["payment_id"].as_str().unwrap())
            .await;
        assert_eq!(g.json["amount"], shown);
        assert_eq!(
            g.json["metadata"],
            json!({}),
            "metadata defaults to an empty object"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn same_key_same_meaning_replays_the_payment_without_a_second_row_or_event() {
    let app = TestApp::spawn().await;
    let first = app.post_payment(KEY_A, "idem-1", body()).await;
    assert_eq!(first.status, 202);
    // The same request written differently: number amount, trailing slash, reordered keys.
    let same = json!({
        "webhook_url": "https://EXAMPLE.com/webhook",
        "metadata": {"order_id": "123"},
        "currency": "RUB",
        "amount": 100.5,
        "description": "Order #123"
    });
    let again = app.post_payment(KEY_A2, "idem-1", same).await;
    assert_eq!(again.status, 202, "{}", again.text);
    assert_eq!(again.json["payment_id"], first.json["payment_id"]);
    assert_eq!(again.json["created_at"], first.json["created_at"]);
    assert_eq!(
        again.headers.get("idempotent-replayed").map(String::as_str),
        Some("true")
    );
    assert_eq!(app.db.count("SELECT count(*) AS n FROM payments"), 1);
    assert_eq!(app.db.count("SELECT count(*) AS n FROM outbox"), 1);

    let host_only = app
        .post_payment(
            KEY_A,
            "idem-2",
            json!({"amount": "5", "currency": "EUR", "webhook_url": "https://example.com"}),
        )
        .await;
    let with_slash = app
        .post_payment(
            KEY_A,
            "idem-2",
            json!({"amount": "5.00", "currency": "EUR", "webhook_url": "https://example.com/"}),
        )
        .await;
    assert_eq!(with_slash.status, 202);
    assert_eq!(host_only.json["payment_id"], with_slash.json["payment_id"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn metadata_numbers_keep_their_value_in_any_spelling() {
    let app = TestApp::spawn().await;
    // serde_json keeps the text of each number (arbitrary_precision), so this is what is sent.
    let sent: Value = serde_json::from_str(
        r#"{"amount": "1", "currency": "RUB",
            "metadata": {"k": 1e3, "big": -4.6258100558555635e+228, "small": 2.50E-1, "z": -0}}"#,
    )
    .unwrap();
    let first = app.post_payment(KEY_A, "idem-num", sent).await;
    assert_eq!(first.status, 202, "{}", first.text);
    let id = first.json["payment_id"].as_str().unwrap();
    let got = app.get_payment(KEY_A, id).await;
    let meta = &got.json["metadata"];
    assert_eq!(meta["k"].to_string(), "1000");
    assert_eq!(
        meta["big"].to_string(),
        format!("-46258100558555635{}", "0".repeat(212)),
        "every digit kept, never through a float"
    );
    assert_eq!(meta["small"].to_string(), "0.250");
    assert_eq!(meta["z"].to_string(), "0");

    // A retry that sends the numbers as GET printed them is the same request, not a conflict.
    let mut again = got.json.clone();
    let again = json!({"amount": again["amount"].take(), "currency": "RUB", "metadata": meta});
    let replay = app.post_payment(KEY_A, "idem-num", again).await;
    assert_eq!(replay.status, 202, "{}", replay.text);
    assert_eq!(replay.json["payment_id"], first.json["payment_id"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn same_key_with_another_body_is_a_conflict() {
    let app = TestApp::spawn().await;
    assert_eq!(app.post_payment(KEY_A, "idem-x", body()).await.status, 202);
    let mut other = body();
    other["amount"] = json!("100.51");
    let r = app.post_payment(KEY_A, "idem-x", other).await;
    assert_eq!(r.status, 409, "{}", r.text);
    assert_eq!(r.code(), "idempotency_key_reused");
    assert_eq!(app.db.count("SELECT count(*) AS n FROM payments"), 1);
    assert_eq!(app.db.count("SELECT count(*) AS n FROM outbox"), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn idempotency_keys_are_scoped_per_merchant() {
    let app = TestApp::spawn().await;
    let a = app.post_payment(KEY_A, "shared-key", body()).await;
    let mut other = body();
    other["amount"] = json!("1.00");
    let b = app.post_payment(KEY_B, "shared-key", other).await;
    assert_eq!((a.status, b.status), (202, 202));
    assert_ne!(a.json["payment_id"], b.json["payment_id"]);
    // Neither merchant can read the other's payment.
    assert_eq!(
        app.get_payment(KEY_B, a.json["payment_id"].as_str().unwrap())
            .await
            .status,
        404
    );
    assert_eq!(
        app.get_payment(KEY_A, b.json["payment_id"].as_str().unwrap())
            .await
            .status,
        404
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn twenty_racing_requests_with_one_key_make_one_payment_and_one_event() {
    let app = TestApp::spawn().await;
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let url = app.url("/api/v1/payments");
        tasks.push(tokio::spawn(async move {
            request(
                "POST",
                &url,
                &[
                    ("X-API-Key", KEY_A),
                    ("Idempotency-Key", "race"),
                    ("Content-Type", "application/json"),
                ],
                Some(body().to_string().into_bytes()),
            )
            .await
        }));
    }
    let mut ids = std::collections::HashSet::new();
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 202, "{}", r.text);
        ids.insert(r.json["payment_id"].as_str().unwrap().to_string());
    }
    assert_eq!(ids.len(), 1, "every racer answers the same payment");
    assert_eq!(app.db.count("SELECT count(*) AS n FROM payments"), 1);
    assert_eq!(app.db.count("SELECT count(*) AS n FROM outbox"), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_fields_answer_422_naming_the_field() {
    let app = TestApp::spawn().await;
    let base = json!({"amount": "1.00", "currency": "RUB"});
    let with = |k: &str, v: Value| {
        let mut b = base.clone();
        b[k] = v;
        b
    };
    let cases = vec![
        (with("amount", json!("0")), "amount"),
        (with("amount", json!(-5)), "amount"),
        (with("amount", json!("1.001")), "amount"),
        (with("amount", json!("12345678901234567")), "amount"),
        (with("amount", json!("abc")), "amount"),
        (json!({"currency": "RUB"}), "amount"),
        (with("currency", json!("GBP")), "currency"),
        (with("currency", json!("rub")), "currency"),
        (with("surprise", json!(1)), "surprise"),
        (with("metadata", json!("text")), "metadata"),
        (
            with("metadata", json!({"k": "x".repeat(16 * 1024)})),
            "metadata",
        ),
        (with("description", json!("d".repeat(1001))), "description"),
        (with("description", json!(12)), "description"),
        (
            with("webhook_url", json!("ftp://example.com/")),
            "webhook_url",
        ),
        (
            with("webhook_url", json!("example.com/hook")),
            "webhook_url",
        ),
        (
            with(
                "webhook_url",
                json!(format!("https://example.com/{}", "a".repeat(2040))),
            ),
            "webhook_url",
        ),
    ];
    for (i, (b, field)) in cases.into_iter().enumerate() {
        let r = app.post_payment(KEY_A, &format!("v-{i}"), b.clone()).await;
        assert_eq!(r.status, 422, "{b}: {}", r.text);
        assert_eq!(r.code(), "validation_failed");
        assert_eq!(r.json["error"]["field"], field, "{b}");
    }
    assert_eq!(app.db.count("SELECT count(*) AS n FROM payments"), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_requests_answer_4xx_json() {
    let app = TestApp::spawn().await;
    let url = app.url("/api/v1/payments");
    let json_ct = ("Content-Type", "application/json");
    let post = |headers: Vec<(&'static str, String)>, body: &'static str| {
        let url = url.clone();
        async move {
            let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            request("POST", &url, &h, Some(body.as_bytes().to_vec())).await
        }
    };
    let good = r#"{"amount": "1", "currency": "RUB"}"#;
    let key = |k: &str| ("X-API-Key", k.to_string());
    let idem = |k: &str| ("Idempotency-Key", k.to_string());
    let ct = (json_ct.0, json_ct.1.to_string());

    let r = post(
        vec![key(KEY_A), idem("m1"), ct.clone()],
        r#"{"amount": "1", "#,
    )
    .await;
    assert_eq!((r.status, r.code()), (400, "malformed_json"), "{}", r.text);
    let r = post(vec![key(KEY_A), ct.clone()], good).await;
    assert_eq!((r.status, r.code()), (400, "missing_idempotency_key"));
    let r = post(vec![key(KEY_A), idem(""), ct.clone()], good).await;
    assert_eq!((r.status, r.code()), (400, "missing_idempotency_key"));
    let r = post(vec![key(KEY_A), idem(&"k".repeat(256)), ct.clone()], good).await;
    assert_eq!((r.status, r.code()), (400, "invalid_idempotency_key"));
    assert_eq!(
        post(vec![key(KEY_A), idem(&"k".repeat(255)), ct.clone()], good)
            .await
            .status,
        202
    );
    let r = post(vec![idem("m2"), ct.clone()], good).await;
    assert_eq!((r.status, r.code()), (401, "unauthorized"));
    let r = post(vec![key("wrong"), idem("m2"), ct.clone()], good).await;
    assert_eq!((r.status, r.code()), (401, "unauthorized"));
    let r = post(
        vec![key(&format!("{KEY_A}x")), idem("m2"), ct.clone()],
        good,
    )
    .await;
    assert_eq!(r.status, 401);
    let r = post(
        vec![
            key(KEY_A),
            idem("m3"),
            ("Content-Type", "text/plain".into()),
        ],
        good,
    )
    .await;
    assert_eq!((r.status, r.code()), (415, "unsupported_media_type"));

    // Unknown route, wrong method, bad and foreign ids: JSON, never HTML or empty.
    let r = request("GET", &app.url("/nope"), &[], None).await;
    assert_eq!((r.status, r.code()), (404, "not_found"));
    let r = request("DELETE", &app.url("/api/v1/payments"), &[key_pair()], None).await;
    assert_eq!((r.status, r.code()), (405, "method_not_allowed"));
    let r = app.get_payment(KEY_A, "not-a-uuid").await;
    assert_eq!((r.status, r.code()), (404, "not_found"));
    let r = app
        .get_payment(KEY_A, &uuid::Uuid::new_v4().to_string())
        .await;
    assert_eq!((r.status, r.code()), (404, "not_found"));
    let r = request(
        "GET",
        &app.url(&format!("/api/v1/payments/{}", uuid::Uuid::new_v4())),
        &[],
        None,
    )
    .await;
    assert_eq!((r.status, r.code()), (401, "unauthorized"));
}

fn key_pair() -> (&'static str, &'static str) {
    ("X-API-Key", KEY_A)
}

/// Sends raw bytes and returns what the server wrote back before closing or within a second.
fn raw_exchange(addr: std::net::SocketAddr, head: &str, body_bytes: usize) -> (String, Duration) {
    let start = Instant::now();
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    if body_bytes > 0 {
        let _ = s.write_all(&vec![b' '; body_bytes]);
    }
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf).unwrap_or(0);
    (
        String::from_utf8_lossy(&buf[..n]).to_string(),
        start.elapsed(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn bodies_over_the_limit_are_refused_before_they_are_read() {
    let app = TestApp::spawn().await;
    let addr = app.addr;
    // Declares 10 MiB but sends none of it: the 413 must come back without waiting for the body.
    let head = format!(
        "POST /api/v1/payments HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY_A}\r\nIdempotency-Key: big\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        10 * 1024 * 1024
    );
    let (resp, took) = tokio::task::spawn_blocking(move || raw_exchange(addr, &head, 0))
        .await
        .unwrap();
    assert!(resp.starts_with("HTTP/1.1 413"), "{resp}");
    assert!(resp.contains("payload_too_large"), "{resp}");
    assert!(took < Duration::from_secs(3));

    // Chunked, without a declared length: cut off once past the limit.
    let chunk = "a".repeat(40 * 1024);
    let head = format!(
        "POST /api/v1/payments HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY_A}\r\nIdempotency-Key: big2\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{chunk}\r\n{:x}\r\n{chunk}\r\n0\r\n\r\n",
        chunk.len(),
        chunk.len()
    );
    let (resp, _) = tokio::task::spawn_blocking(move || raw_exchange(addr, &head, 0))
        .await
        .unwrap();
    assert!(resp.starts_with("HTTP/1.1 413"), "{resp}");
    assert_eq!(app.db.count("SELECT count(*) AS n FROM payments"), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn payment_and_event_are_written_together_or_not_at_all() {
    let app = TestApp::spawn().await;
    // Make every outbox insert fail: the payment must not be stored without its event.
    app.db
        .exec(
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN RAISE EXCEPTION 'outbox refused by test'; END $$; \
             CREATE TRIGGER refuse BEFORE INSERT ON outbox FOR EACH ROW EXECUTE FUNCTION refuse();",
        )
        .unwrap();
    let r = app.post_payment(KEY_A, "atomic", body()).await;
    assert_eq!(r.status, 500, "{}", r.text);
    assert_eq!(r.code(), "internal_error");
    assert!(
        !r.text.contains("outbox refused"),
        "the cause is logged, not sent"
    );
    assert_eq!(app.db.count("SELECT count(*) AS n FROM payments"), 0);

    app.db.exec("DROP TRIGGER refuse ON outbox").unwrap();
    let r = app.post_payment(KEY_A, "atomic", body()).await;
    assert_eq!(r.status, 202, "the key was not burnt by the failed attempt");
    assert_eq!(app.db.count("SELECT count(*) AS n FROM payments"), 1);
    assert_eq!(app.db.count("SELECT count(*) AS n FROM outbox"), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn database_outage_answers_503_quickly_and_recovers_by_itself() {
    let db = TestDb::new().await;
    let proxy = Proxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let mut proxied = url::Url::parse(&db.url).unwrap();
    proxied.set_port(Some(proxy.addr.port())).unwrap();
    let s = settings(proxied.as_str());
    let deadline = s.database.acquire_timeout + s.database.query_timeout;
    let app = TestApp::spawn_with(db, s);

    assert_eq!(
        request("GET", &app.url("/health"), &[], None).await.json,
        json!({"status": "ok", "database": "ok"})
    );
    assert_eq!(app.post_payment(KEY_A, "before", body()).await.status, 202);

    proxy.cut();
    let started = Instant::now();
    let r = app.post_payment(KEY_A, "during", body()).await;
    assert_eq!(r.status, 503, "{}", r.text);
    assert_eq!(r.code(), "database_unavailable");
    assert!(
        started.elapsed() < deadline + Duration::from_secs(1),
        "took {:?}",
        started.elapsed()
    );
    let h = request("GET", &app.url("/health"), &[], None).await;
    assert_eq!(h.status, 503);
    assert_eq!(h.json["database"], "unreachable");
    let g = app
        .get_payment(KEY_A, &uuid::Uuid::new_v4().to_string())
        .await;
    assert_eq!(g.status, 503);

    proxy.restore();
    let r = eventually(Duration::from_secs(10), "the API to recover", || async {
        let r = app.post_payment(KEY_A, "after", body()).await;
        (r.status == 202).then_some(r)
    })
    .await;
    assert_eq!(r.json["status"], "pending");
    assert_eq!(
        request("GET", &app.url("/health"), &[], None).await.status,
        200
    );
    assert_eq!(
        app.db.count("SELECT count(*) AS n FROM payments"),
        2,
        "before + after, nothing half-written"
    );
}
