//! Property-based tests: whatever bytes and headers arrive, the parser never panics and the API
//! never answers 5xx; whatever it accepts reads back unchanged.

use std::time::Duration;

use async_pay::api::idempotency::canonical_json;
use async_pay::api::payments::PaymentRequest;
use proptest::prelude::*;
use serde_json::{Value, json};

use crate::helpers::*;

/// JSON values of any shape, a few levels deep, including NUL characters and huge numbers.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        "[0-9]{1,30}(\\.[0-9]{0,5})?".prop_map(|s| serde_json::from_str(&s).unwrap_or(Value::Null)),
        ".{0,40}".prop_map(Value::String),
        "\\PC{0,20}\u{0}?".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(".{0,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Bodies that are mostly payment-shaped, with every field sometimes wrong.
fn payment_body() -> impl Strategy<Value = Value> {
    let amount = prop_oneof![
        2 => "[0-9]{1,18}(\\.[0-9]{1,3})?".prop_map(Value::String),
        2 => (1u64..10_000_000).prop_map(|n| json!(n)),
        1 => any_json(),
    ];
    let currency = prop_oneof![
        Just(json!("RUB")),
        Just(json!("USD")),
        Just(json!("EUR")),
        any_json()
    ];
    let description = prop_oneof![
        Just(Value::Null),
        ".{0,50}".prop_map(Value::String),
        any_json()
    ];
    let metadata = prop_oneof![Just(json!({})), any_json()];
    let url = prop_oneof![
        Just(Value::Null),
        "https?://[a-z]{1,10}\\.(com|org)(/[a-z0-9]{0,8}){0,3}".prop_map(Value::String),
        ".{0,30}".prop_map(Value::String),
    ];
    (
        amount,
        currency,
        description,
        metadata,
        url,
        prop::bool::weighted(0.1),
        ".{0,6}",
    )
        .prop_map(|(a, c, d, m, u, extra, k)| {
            let mut o = serde_json::Map::new();
            o.insert("amount".into(), a);
            o.insert("currency".into(), c);
            o.insert("description".into(), d);
            o.insert("metadata".into(), m);
            o.insert("webhook_url".into(), u);
            if extra {
                o.insert(k, json!(1));
            }
            Value::Object(o)
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn the_parser_never_panics_on_any_bytes(body in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = PaymentRequest::parse(&body);
    }

    #[test]
    fn accepted_requests_are_stable_under_reparsing(body in payment_body()) {
        let bytes = body.to_string().into_bytes();
        if let Ok(req) = PaymentRequest::parse(&bytes) {
            // What was accepted, written back out, parses to the same request and fingerprint.
            let again = json!({
                "amount": async_pay::domain::format_amount(req.amount),
                "currency": req.currency,
                "description": req.description,
                "metadata": req.metadata,
                "webhook_url": req.webhook_url,
            });
            let req2 = PaymentRequest::parse(again.to_string().as_bytes()).unwrap();
            prop_assert_eq!(&req2, &req);
            prop_assert_eq!(req2.fingerprint(), req.fingerprint());
        }
    }
}

/// One HTTP exchange with arbitrary header bytes, from a blocking thread.
fn raw_post(addr: std::net::SocketAddr, key: &[u8], idem: &[u8], body: &[u8]) -> (u16, Value) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut req = Vec::new();
    req.extend_from_slice(
        b"POST /api/v1/payments HTTP/1.1\r\nHost: t\r\nConnection: close\r\nX-API-Key: ",
    );
    req.extend_from_slice(key);
    req.extend_from_slice(b"\r\nIdempotency-Key: ");
    req.extend_from_slice(idem);
    req.extend_from_slice(
        format!(
            "\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    req.extend_from_slice(body);
    s.write_all(&req).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    let status = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let json = text
        .split_once("\r\n\r\n")
        .and_then(|(_, b)| serde_json::from_str(b).ok())
        .unwrap_or(Value::Null);
    (status, json)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_api_never_answers_5xx_and_round_trips_what_it_accepts() {
    // Generous database deadlines: this test is about bad input, and a loaded CI machine must
    // not turn slow answers into 503s.
    let db = TestDb::new().await;
    let mut s = settings(&db.url);
    s.database.acquire_timeout = Duration::from_secs(20);
    s.database.query_timeout = Duration::from_secs(20);
    let app = TestApp::spawn_with(db, s);
    let addr = app.addr;
    let url = app.url("");
    tokio::task::spawn_blocking(move || {
        let header_bytes = prop::collection::vec(
            prop_oneof![0x20u8..0x7f, 0x80u8..=0xff, Just(b'\t')],
            0..300,
        );
        let key = prop_oneof![3 => Just(KEY_A.as_bytes().to_vec()), 1 => header_bytes.clone()];
        let idem =
            prop_oneof![3 => "[A-Za-z0-9-]{1,40}".prop_map(String::into_bytes), 1 => header_bytes];
        let body = prop_oneof![
            payment_body().prop_map(|v| v.to_string().into_bytes()),
            prop::collection::vec(any::<u8>(), 0..256),
        ];
        let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
            cases: 150,
            ..ProptestConfig::default()
        });
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let accepted_count = std::cell::Cell::new(0);
        runner
            .run(&(key, idem, body), |(key, idem, body)| {
                let (status, json) = raw_post(addr, &key, &idem, &body);
                // 400 with an empty body is actix's own answer to a header it cannot parse.
                prop_assert!(
                    status != 0 && status < 500,
                    "status {} for body {:?}",
                    status,
                    String::from_utf8_lossy(&body)
                );
                if status >= 400 && json != Value::Null {
                    prop_assert!(json["error"]["code"].is_string(), "error body {}", json);
                }
                if status == 202 {
                    accepted_count.set(accepted_count.get() + 1);
                    let id = json["payment_id"].as_str().unwrap().to_string();
                    let sent: Value = serde_json::from_slice(&body).unwrap();
                    let accepted = PaymentRequest::parse(&body).unwrap();
                    let got: Value = serde_json::from_str(
                        &agent
                            .get(format!("{url}/api/v1/payments/{id}"))
                            .header("X-API-Key", KEY_A)
                            .call()
                            .unwrap()
                            .body_mut()
                            .read_to_string()
                            .unwrap(),
                    )
                    .unwrap();
                    prop_assert_eq!(
                        &got["amount"],
                        &json!(async_pay::domain::format_amount(accepted.amount))
                    );
                    prop_assert_eq!(&got["currency"], &sent["currency"]);
                    prop_assert_eq!(&got["description"], &json!(accepted.description));
                    // jsonb keeps every number exactly but may respell it (`1e3` comes back as
                    // `1000`): the metadata must mean the same, byte-equal text is not promised.
                    prop_assert_eq!(
                        canonical_json(&got["metadata"]),
                        canonical_json(&accepted.metadata)
                    );
                    prop_assert_eq!(&got["webhook_url"], &json!(accepted.webhook_url));
                }
                Ok(())
            })
            .unwrap();
        assert!(
            accepted_count.get() > 0,
            "some generated requests must be valid, or the round trip went untested"
        );
    })
    .await
    .unwrap();
}
