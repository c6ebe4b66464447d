//! One grep follows a payment: the request id of the POST that created it is on every log line
//! about it, in every role of the real binary (serve, relay, consume with its sweep and webhook
//! sender, dlq-watch), and the client's `traceparent` travels with its event.

use std::time::Duration;

use serde_json::json;

use crate::helpers::*;
use crate::psp::{self, Psp};
use crate::stack::Stack;

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// The log lines of every process of `role` in the stack.
fn log_of(s: &Stack, role: &str) -> Vec<String> {
    let mut lines = Vec::new();
    for e in std::fs::read_dir(&s.logs).unwrap().flatten() {
        if e.file_name()
            .to_string_lossy()
            .ends_with(&format!("-{role}.log"))
        {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            lines.extend(text.lines().map(str::to_string));
        }
    }
    lines
}

/// Every line of `lines` that names `payment` carries `[req <request_id>]`, and there is one.
fn every_line_about(lines: &[String], payment: &str, request_id: &str, role: &str) {
    let tag = format!("[req {request_id}]");
    let about: Vec<&String> = lines.iter().filter(|l| l.contains(payment)).collect();
    assert!(!about.is_empty(), "{role} logged nothing about {payment}");
    for l in about {
        assert!(
            l.contains(&tag),
            "{role}: a line about {payment} without {tag}:\n{l}"
        );
    }
}

/// Some line of `lines` carries `[req <request_id>]` and contains every one of `words`.
fn has_line(lines: &[String], request_id: &str, words: &[&str], role: &str) {
    let tag = format!("[req {request_id}]");
    assert!(
        lines
            .iter()
            .any(|l| l.contains(&tag) && words.iter().all(|w| l.contains(w))),
        "{role}: no line with {tag} and {words:?} in:\n{}",
        lines.join("\n")
    );
}

async fn post(s: &Stack, key: &str, headers: &[(&str, &str)]) -> String {
    let mut all = vec![
        ("X-API-Key", KEY_A),
        ("Idempotency-Key", key),
        ("Content-Type", "application/json"),
    ];
    all.extend_from_slice(headers);
    let body = json!({"amount": "3.00", "currency": "EUR", "webhook_url": s.receiver.url("/hook")});
    let r = request(
        "POST",
        &s.url("/api/v1/payments"),
        &all,
        Some(body.to_string().into_bytes()),
    )
    .await;
    assert_eq!(r.status, 202, "{}", r.text);
    r.json["payment_id"].as_str().unwrap().to_string()
}

/// Waits until the payment is final and its webhook arrived.
async fn wait_final_and_delivered(s: &Stack, id: &str) {
    eventually(
        Duration::from_secs(30),
        "the payment final and its webhook delivered",
        || async {
            let done = s.db.count(&format!(
                "SELECT count(*) AS n FROM payments p JOIN webhook_deliveries d \
                 ON d.payment_id = p.id WHERE p.id = '{id}' AND p.status <> 'pending' \
                 AND d.status = 'delivered'"
            ));
            (done == 1).then_some(())
        },
    )
    .await;
}

/// A payment whose first message the consumer dead-letters, replayed with `dlq replay`, and a
/// second payment beside it: each one's lines name its own request id in all four roles.
#[tokio::test(flavor = "multi_thread")]
async fn one_grep_follows_a_payment_through_every_role_and_a_replay() {
    // Dead-letter at the first failure rather than after retries with backoff.
    let mut s = Stack::new(&[("ASYNC_PAY__AMQP__DELIVERY_LIMIT", "1")]).await;
    // A database error that is not an outage: the consumer cannot claim the payment whose key
    // is "doomed" and dead-letters its message, which dlq-watch records.
    s.db.exec(
        "CREATE FUNCTION refuse_doomed() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
           IF OLD.idempotency_key = 'doomed' THEN RAISE EXCEPTION 'refused by the test'; END IF; \
           RETURN NEW; END $$; \
         CREATE TRIGGER refuse_doomed BEFORE UPDATE ON payments \
           FOR EACH ROW EXECUTE FUNCTION refuse_doomed();",
    )
    .unwrap();
    for role in ["serve", "relay", "consume", "dlq-watch"] {
        s.start(role);
    }
    s.wait_healthy().await;
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..12];
    let (rid, other_rid) = (format!("follow-{suffix}"), format!("other-{suffix}"));
    let id = post(
        &s,
        "doomed",
        &[("X-Request-Id", &rid), ("traceparent", TRACEPARENT)],
    )
    .await;
    // An uppercase traceparent is not a valid one: not kept.
    let bad_traceparent = TRACEPARENT.to_uppercase();
    let other = post(
        &s,
        "other",
        &[
            ("X-Request-Id", &other_rid),
            ("traceparent", &bad_traceparent),
        ],
    )
    .await;

    let db = &s.db;
    eventually(Duration::from_secs(30), "the dead letter", || async {
        let n = db.count(&format!(
            "SELECT count(*) AS n FROM dead_letters WHERE payment_id = '{id}'"
        ));
        (n == 1).then_some(())
    })
    .await;
    // The message carried the request id and the traceparent (dlq-watch keeps its headers).
    assert_eq!(
        db.texts(&format!(
            "SELECT coalesce(headers->>'request-id', '(none)') || ' ' || \
                    coalesce(headers->>'traceparent', '(none)') AS t \
             FROM dead_letters WHERE payment_id = '{id}'"
        )),
        vec![format!("{rid} {TRACEPARENT}")]
    );

    // Replayed once the database lets it through: the replay carries them on.
    db.exec("DROP TRIGGER refuse_doomed ON payments").unwrap();
    let out = s.run(&["dlq", "replay", "--all"]);
    assert!(out.status.success(), "{out:?}");
    wait_final_and_delivered(&s, &id).await;
    wait_final_and_delivered(&s, &other).await;
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) AS n FROM outbox WHERE payload->>'payment_id' = '{id}' \
             AND request_id = '{rid}' AND traceparent = '{TRACEPARENT}'"
        )),
        2,
        "the event and its replay keep the request id and the traceparent"
    );
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) AS n FROM outbox WHERE payload->>'payment_id' = '{other}' \
             AND request_id = '{other_rid}' AND traceparent IS NULL"
        )),
        1,
        "an invalid traceparent is not kept"
    );
    // GET shows nothing new.
    let got = request(
        "GET",
        &s.url(&format!("/api/v1/payments/{id}")),
        &[("X-API-Key", KEY_A)],
        None,
    )
    .await;
    assert_eq!(got.status, 200);
    assert!(
        !got.text.contains(&rid) && !got.text.contains("traceparent"),
        "{}",
        got.text
    );

    // One grep per payment, in every role.
    let (serve, relay) = (log_of(&s, "serve"), log_of(&s, "relay"));
    let (consume, dlq_watch) = (log_of(&s, "consume"), log_of(&s, "dlq-watch"));
    has_line(&serve, &rid, &[&id, "created"], "serve");
    has_line(&serve, &other_rid, &[&other, "created"], "serve");
    for (payment, request_id) in [(&id, &rid), (&other, &other_rid)] {
        every_line_about(&relay, payment, request_id, "relay");
        every_line_about(&consume, payment, request_id, "consume");
        has_line(
            &relay,
            request_id,
            &[payment, "confirmed by RabbitMQ"],
            "relay",
        );
        let status = db.texts(&format!(
            "SELECT status AS t FROM payments WHERE id = '{payment}'"
        ));
        let finalised = format!("payment {payment} {}", status[0]);
        has_line(&consume, request_id, &[&finalised], "consume");
        has_line(
            &consume,
            request_id,
            &["webhook", payment, "delivered"],
            "consume",
        );
    }
    // The first publish and the replay's.
    let published = relay
        .iter()
        .filter(|l| l.contains(&format!("[req {rid}]")) && l.contains("confirmed by RabbitMQ"))
        .count();
    assert_eq!(published, 2, "{}", relay.join("\n"));
    has_line(
        &consume,
        &rid,
        &[&id, "refused by the test", "dead-lettering"],
        "consume",
    );
    every_line_about(&dlq_watch, &id, &rid, "dlq-watch");
    has_line(
        &dlq_watch,
        &rid,
        &["dead letter", &id, "rejected"],
        "dlq-watch",
    );
}

/// The reconciliation sweep has no message: it takes the request id from the payment.
#[tokio::test(flavor = "multi_thread")]
async fn the_sweep_logs_a_payment_under_its_request_id() {
    let psp = Psp::start((Duration::from_millis(10), Duration::from_millis(50)));
    // "processing" at first: the outcome is unknown and the sweep asks until it is final.
    psp.set_default(psp::Script::Processing(Duration::from_secs(2)));
    let mut s = Stack::new(&[
        ("ASYNC_PAY__GATEWAY__KIND", "http"),
        ("ASYNC_PAY__GATEWAY__URL", &psp.url()),
        ("ASYNC_PAY__GATEWAY__API_KEY", psp::API_KEY),
        ("ASYNC_PAY__GATEWAY__RECHECK_MIN", "300ms"),
        ("ASYNC_PAY__GATEWAY__RECHECK_MAX", "1s"),
        ("ASYNC_PAY__GATEWAY__RECONCILE_INTERVAL", "200ms"),
    ])
    .await;
    for role in ["serve", "relay", "consume"] {
        s.start(role);
    }
    s.wait_healthy().await;
    let rid = format!("swept-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let id = post(&s, "swept", &[("X-Request-Id", &rid)]).await;
    wait_final_and_delivered(&s, &id).await;
    let consume = log_of(&s, "consume");
    every_line_about(&consume, &id, &rid, "consume");
    has_line(
        &consume,
        &rid,
        &[
            &id,
            "gateway state was unknown",
            "the provider's status: succeeded",
        ],
        "consume",
    );
}

/// The database refuses what `domain::correlation` refuses, whoever writes the row.
#[tokio::test(flavor = "multi_thread")]
async fn the_database_refuses_an_odd_request_id_or_traceparent() {
    let db = TestDb::new().await;
    let outbox = |request_id: &str, traceparent: &str| {
        db.exec(&format!(
            "INSERT INTO outbox (event_type, payload, request_id, traceparent) \
             VALUES ('payment.created', '{{}}', {request_id}, {traceparent})"
        ))
    };
    outbox("'req-1'", &format!("'{TRACEPARENT}'")).unwrap();
    outbox("NULL", "NULL").unwrap();
    let zeros = format!("'00-{}-00f067aa0ba902b7-01'", "0".repeat(32));
    for (request_id, traceparent) in [
        ("''", "NULL"),
        ("'has space'", "NULL"),
        ("E'new\\nline'", "NULL"),
        ("repeat('r', 129)", "NULL"),
        ("NULL", "'garbage'"),
        ("NULL", &format!("'{}'", TRACEPARENT.to_uppercase())),
        ("NULL", &zeros),
    ] {
        assert!(
            outbox(request_id, traceparent).is_err(),
            "{request_id} / {traceparent} must be refused"
        );
    }
    let payment = |key: &str, request_id: &str| {
        db.exec(&format!(
            "INSERT INTO payments (id, merchant, amount, currency, metadata, idempotency_key, \
                                   request_fingerprint, request_id) \
             VALUES ('{}', 'm', 1.00, 'RUB', '{{}}', '{key}', decode(repeat('00', 32), 'hex'), \
                     {request_id})",
            uuid::Uuid::new_v4()
        ))
    };
    payment("p1", "'req-1'").unwrap();
    assert!(payment("p2", "'has space'").is_err());
    let delivery = |request_id: &str| {
        db.exec(&format!(
            "INSERT INTO webhook_deliveries (id, message_id, payment_id, merchant, event_type, \
                                             url, host, payload, request_id) \
             SELECT gen_random_uuid(), 'msg', id, 'm', 'payment.succeeded', 'http://h/', 'h', \
                    '{{}}', {request_id} FROM payments"
        ))
    };
    delivery("'req-1'").unwrap();
    assert!(delivery("repeat('r', 129)").is_err());
}
