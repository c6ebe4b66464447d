//! The HTTP gateway connector against a real payment provider on localhost ([`Psp`]), with the
//! real binary, one process per role. Each scenario breaks the provider (or the consumer) in one
//! of the ways that cost merchants money, and ends with the same count
//! ([`assert_provider_agrees`]): every payment final with exactly the outcome the provider
//! recorded, at most one charge executed per payment and per idempotency key, nothing pending
//! or unpublished, no dead letters, every webhook delivered and saying what the provider said.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::helpers::*;
use crate::proxy::Proxy;
use crate::psp::{self, Psp};
use crate::stack::Stack;

/// A stack whose consumers charge through `psp_url` with the HTTP connector.
async fn stack(psp_url: &str, timeout: &str, extra: &[(&str, &str)]) -> Stack {
    let mut env = vec![
        ("ASYNC_PAY__GATEWAY__KIND", "http"),
        ("ASYNC_PAY__GATEWAY__URL", psp_url),
        ("ASYNC_PAY__GATEWAY__API_KEY", psp::API_KEY),
        ("ASYNC_PAY__GATEWAY__TIMEOUT", timeout),
        ("ASYNC_PAY__GATEWAY__RECHECK_MIN", "300ms"),
        ("ASYNC_PAY__GATEWAY__RECHECK_MAX", "3s"),
        ("ASYNC_PAY__GATEWAY__RECONCILE_INTERVAL", "200ms"),
    ];
    env.extend_from_slice(extra);
    Stack::new(&env).await
}

/// The end-of-scenario count (see the module comment).
async fn assert_provider_agrees(s: &Stack, psp: &Psp, accepted: &[String], limit: Duration) {
    s.assert_nothing_lost(accepted, 0, limit).await;
    let (per_payment, per_key) = psp.max_executions();
    assert!(
        per_payment <= 1 && per_key <= 1,
        "a payment was charged {per_payment} times, a key {per_key} times"
    );
    // Every charge request, retries included, carried the payment id as its key.
    let mut rejected = std::collections::HashSet::new();
    for (method, _, key, _, body, _) in psp.requests() {
        if method == "POST" {
            let id = body["payment_id"].as_str().unwrap_or_default().to_string();
            assert_eq!(key.as_deref(), Some(id.as_str()), "the key of a charge");
            if body["metadata"]["psp"] == "reject" {
                rejected.insert(id);
            }
        }
    }
    let rows = s.db.texts(
        "SELECT id::text || '|' || status || '|' || coalesce(charge_id, '-') || '|' || \
                coalesce(failure_code, '-') AS t FROM payments",
    );
    assert_eq!(rows.len(), accepted.len());
    for row in rows {
        let f: Vec<&str> = row.split('|').collect();
        let (id, status, charge_id, code) = (f[0], f[1], f[2], f[3]);
        match psp.charge(id) {
            Some(c) if c.succeeded => {
                assert_eq!(
                    (status, charge_id),
                    ("succeeded", c.charge_id.as_str()),
                    "{id}"
                );
            }
            Some(_) => assert_eq!((status, code), ("failed", "insufficient_funds"), "{id}"),
            // Never charged: only a request the provider refused outright.
            None => {
                assert!(rejected.contains(id), "{id} is final but was never charged");
                assert_eq!((status, code), ("failed", "gateway_rejected"), "{id}");
            }
        }
    }
    // The webhook says what GET says.
    for r in s.receiver.received() {
        let w = r.json();
        let id = w["payment_id"].as_str().unwrap();
        let stored = s.db.texts(&format!(
            "SELECT coalesce(charge_id, '-') || '|' || coalesce(failure_code, '-') AS t \
             FROM payments WHERE id = '{id}'"
        ));
        let said = format!(
            "{}|{}",
            w["charge_id"].as_str().unwrap_or("-"),
            w["failure_code"].as_str().unwrap_or("-")
        );
        assert_eq!(stored, vec![said], "webhook of {id}");
    }
}

fn start_pipeline(s: &mut Stack) {
    for role in ["serve", "relay", "consume", "dlq-watch"] {
        s.start(role);
    }
}

/// Metadata that picks the provider's script for payment `i`: succeed, decline, reject.
fn mixed(i: usize) -> Option<serde_json::Value> {
    let script = ["succeed", "decline", "reject"][i % 3];
    Some(json!({"psp": script, "n": i}))
}

#[tokio::test(flavor = "multi_thread")]
async fn payments_are_charged_declined_or_rejected_once_with_the_contracts_request() {
    let psp = Psp::start((Duration::from_millis(10), Duration::from_millis(50)));
    let mut s = stack(&psp.url(), "5s", &[]).await;
    start_pipeline(&mut s);
    s.wait_healthy().await;
    let (accepted, _) = tokio::task::block_in_place(|| s.pay_many_with("http", 30, 3, mixed));
    assert_eq!(accepted.len(), 30);
    assert_provider_agrees(&s, &psp, &accepted, Duration::from_secs(30)).await;

    // The contract's request: key = payment id, the API key as bearer token, the payment.
    for (method, path, key, auth, body, _) in psp.requests() {
        assert_eq!((method.as_str(), path.as_str()), ("POST", "/v1/charges"));
        assert_eq!(auth.as_deref(), Some("Bearer psp-test-key"));
        let id = body["payment_id"].as_str().unwrap();
        assert_eq!(key.as_deref(), Some(id));
        assert!(accepted.iter().any(|a| a == id));
        assert_eq!(body["merchant"], "a");
        assert_eq!(body["amount"], "1.00");
        assert_eq!(body["currency"], "USD");
        assert!(body["description"].is_null());
        assert!(body["metadata"]["psp"].is_string());
    }
    assert_eq!(psp.charge_requests(), 30, "one request per payment");

    // GET tells the merchant why a payment failed, and the provider's charge id.
    let by_script = |n: usize| accepted[n].clone();
    let ok = s.db.texts(&format!(
        "SELECT status || charge_id AS t FROM payments WHERE id = '{}'",
        by_script(0)
    ));
    assert!(ok[0].starts_with("succeededch_"), "{ok:?}");
    let get = |id: String| {
        let url = s.url(&format!("/api/v1/payments/{id}"));
        async move {
            request("GET", &url, &[("X-API-Key", KEY_A)], None)
                .await
                .json
        }
    };
    let declined = get(by_script(1)).await;
    assert_eq!(declined["status"], "failed");
    assert_eq!(declined["failure_code"], "insufficient_funds");
    assert_eq!(
        declined["failure_message"],
        "The card has insufficient funds."
    );
    assert!(declined["charge_id"].is_null());
    let rejected = get(by_script(2)).await;
    assert_eq!(rejected["failure_code"], "gateway_rejected");
    assert!(
        rejected["failure_message"]
            .as_str()
            .unwrap()
            .contains("currency not enabled"),
        "{rejected}"
    );
    let succeeded = get(by_script(0)).await;
    assert!(succeeded["failure_code"].is_null() && succeeded["failure_message"].is_null());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_charge_answered_after_the_timeout_is_reconciled_not_charged_again() {
    let psp = Psp::start((Duration::from_millis(10), Duration::from_millis(50)));
    // The provider charges at once and answers after 8 s; the consumer waits 2 s.
    psp.set_default(psp::Script::ChargeThenSlow(Duration::from_secs(8)));
    let mut s = stack(&psp.url(), "2s", &[]).await;
    start_pipeline(&mut s);
    s.wait_healthy().await;
    let (accepted, _) = tokio::task::block_in_place(|| s.pay_many("slow", 20, 2));
    assert_provider_agrees(&s, &psp, &accepted, Duration::from_secs(40)).await;
    let asked = psp.status_requests();
    assert!(
        asked >= 20,
        "each unknown outcome was asked about: {asked} status calls"
    );
    assert!(
        s.all_logs().contains("the provider's answer is unknown"),
        "the unknown outcome is logged"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_500_after_the_charge_or_before_it_is_reconciled_and_charged_once() {
    let psp = Psp::start((Duration::from_millis(10), Duration::from_millis(50)));
    let mut s = stack(&psp.url(), "5s", &[]).await;
    start_pipeline(&mut s);
    s.wait_healthy().await;
    // Half charge then answer 500 (status says succeeded); half fail before charging (status
    // says "not found", so the same key is charged again).
    let (accepted, _) = tokio::task::block_in_place(|| {
        s.pay_many_with("500", 20, 2, |i| {
            let script = ["charge_then_500", "fail_before_charge"][i % 2];
            Some(json!({ "psp": script }))
        })
    });
    assert_provider_agrees(&s, &psp, &accepted, Duration::from_secs(40)).await;
    let posts = psp.charge_requests();
    assert_eq!(
        posts, 30,
        "20 first requests + 10 charged again after 'not found'"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn processing_answers_are_asked_about_until_final() {
    let psp = Psp::start((Duration::from_millis(10), Duration::from_millis(50)));
    // Processing until the test says otherwise.
    psp.set_default(psp::Script::Processing(Duration::from_secs(3600)));
    let mut s = stack(&psp.url(), "5s", &[]).await;
    start_pipeline(&mut s);
    s.wait_healthy().await;
    let (accepted, _) = tokio::task::block_in_place(|| s.pay_many("processing", 10, 2));
    // Asked about again and again, still processing: pending here, not failed, not charged
    // again.
    eventually(
        Duration::from_secs(30),
        "each payment asked about twice",
        || async {
            let asked = psp.status_requests();
            (asked >= 20).then_some(())
        },
    )
    .await;
    assert_eq!(
        s.db.count(
            "SELECT count(*) AS n FROM payments WHERE status = 'pending' \
             AND gateway_state = 'unknown' AND gateway_reason = 'processing'"
        ),
        10
    );
    psp.complete_all();
    assert_provider_agrees(&s, &psp, &accepted, Duration::from_secs(40)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_provider_down_for_20s_loses_nothing_and_charges_once() {
    let psp = Psp::start((Duration::from_millis(100), Duration::from_millis(400)));
    let proxy = Proxy::start(psp.addr).await;
    let mut s = stack(&format!("http://{}", proxy.addr), "3s", &[]).await;
    start_pipeline(&mut s);
    s.wait_healthy().await;
    let (mut accepted, _) = tokio::task::block_in_place(|| s.pay_many("before", 30, 2));
    // Connections refused (and those open cut) for 20 s, while payments keep coming.
    proxy.cut();
    let down = Instant::now();
    let (during, _) = tokio::task::block_in_place(|| s.pay_many("during", 60, 2));
    accepted.extend(during);
    eventually(
        Duration::from_secs(20),
        "unknown outcomes while the provider is down",
        || async {
            (s.db
                .count("SELECT count(*) AS n FROM payments WHERE gateway_state = 'unknown'")
                > 0)
            .then_some(())
        },
    )
    .await;
    if let Some(rest) = Duration::from_secs(20).checked_sub(down.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    assert_eq!(
        s.db.count("SELECT count(*) AS n FROM payments WHERE status = 'failed'"),
        0,
        "an outage fails no payment"
    );
    proxy.restore();
    assert_provider_agrees(&s, &psp, &accepted, Duration::from_secs(60)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn consume_killed_with_200_payments_at_the_provider() {
    let psp = Psp::start((Duration::from_secs(2), Duration::from_secs(4)));
    let mut s = stack(&psp.url(), "6s", &[("ASYNC_PAY__AMQP__PREFETCH", "500")]).await;
    for role in ["serve", "relay", "dlq-watch"] {
        s.start(role);
    }
    let consumer = s.start("consume");
    s.wait_healthy().await;
    let (accepted, _) = tokio::task::block_in_place(|| s.pay_many("kill", 200, 4));
    eventually(
        Duration::from_secs(30),
        "150 charges in flight at the provider",
        || async { (psp.in_progress() >= 150).then_some(()) },
    )
    .await;
    s.proc(consumer).kill9();
    let charged_before_kill = psp.charge_requests();
    s.start("consume");
    assert_provider_agrees(&s, &psp, &accepted, Duration::from_secs(90)).await;
    // The new consumer asked before charging what the killed one had sent.
    let statuses = psp.status_requests();
    assert!(
        statuses >= 150,
        "{statuses} status calls for {charged_before_kill} charges cut by the kill"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_consumers_broker_connection_cut_3_times_with_calls_in_flight() {
    // 50 calls of 2-3 s at a time: about 15 s of work, so each cut finds calls in flight. A
    // timeout far above the latency: here no call should end unknown because it was slow.
    let psp = Psp::start((Duration::from_secs(2), Duration::from_secs(3)));
    let mut s = stack(&psp.url(), "20s", &[("ASYNC_PAY__AMQP__PREFETCH", "50")]).await;
    start_pipeline(&mut s);
    s.wait_healthy().await;
    let (accepted, _) = tokio::task::block_in_place(|| s.pay_many("mq-cut", 300, 3));
    for n in 1..=3 {
        // Connected again (session n), with calls of this session in flight.
        eventually(
            Duration::from_secs(30),
            "a session with calls in flight",
            || async {
                let sessions = s.all_logs().matches("payments in flight").count();
                (sessions >= n && psp.in_progress() >= 10).then_some(())
            },
        )
        .await;
        s.mq.cut();
        tokio::time::sleep(Duration::from_millis(300)).await;
        s.mq.restore();
        eprintln!("broker connection cut {n} with calls in flight");
    }
    assert_provider_agrees(&s, &psp, &accepted, Duration::from_secs(90)).await;
    // Every answer awaited when a connection dropped was still recorded: no payment was left
    // `charging`, so none had to be asked about again.
    let asked = psp.status_requests();
    assert_eq!(asked, 0, "status calls after the cuts");
    let logs = s.all_logs();
    assert!(
        logs.matches("the broker connection was lost").count() >= 3,
        "the consumer lost its connection three times"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn reconcile_finalises_a_payment_whose_message_was_dead_lettered_after_the_charge() {
    let psp = Psp::start((Duration::from_millis(10), Duration::from_millis(50)));
    // The provider charges at once and answers after 60 s: the consumer dies before that.
    psp.set_default(psp::Script::ChargeThenSlow(Duration::from_secs(60)));
    let mut s = stack(&psp.url(), "8s", &[]).await;
    for role in ["serve", "relay", "dlq-watch"] {
        s.start(role);
    }
    let consumer = s.start("consume");
    s.wait_healthy().await;
    let (status, id) = s.pay("orphan").await;
    assert_eq!(status, 202);
    let id = id.unwrap();
    eventually(
        Duration::from_secs(10),
        "the provider to charge",
        || async { psp.charge(&id).map(|_| ()) },
    )
    .await;
    s.proc(consumer).kill9();
    // The redelivered message then runs out of deliveries (an operator, a crash loop):
    // dead-lettered while the provider holds the charge.
    let conn = s.broker.connect().await;
    let ch = async_pay::amqp::open_channel(&conn).await.unwrap();
    let got = eventually(
        Duration::from_secs(10),
        "the message back in the queue",
        || async {
            ch.basic_get(amqprs::channel::BasicGetArguments::new(
                &s.broker.settings.queue,
            ))
            .await
            .unwrap()
        },
    )
    .await;
    ch.basic_reject(amqprs::channel::BasicRejectArguments::new(
        got.0.delivery_tag(),
        false,
    ))
    .await
    .unwrap();
    let _ = conn.close().await;
    eventually(
        Duration::from_secs(10),
        "dlq-watch to record it",
        || async { (s.db.count("SELECT count(*) AS n FROM dead_letters") == 1).then_some(()) },
    )
    .await;
    // While the dead consumer's claim runs (18 s), there is nothing to do yet.
    let early = s.run(&["reconcile"]);
    assert!(early.status.success(), "{early:?}");
    let still_claimed = s.db.count(&format!(
        "SELECT count(*) AS n FROM payments WHERE id = '{id}' AND claimed_until > now()"
    )) == 1;
    if still_claimed {
        assert!(
            String::from_utf8_lossy(&early.stdout).contains("checked 0 payment(s)"),
            "{early:?}"
        );
    }
    eventually(Duration::from_secs(30), "the claim to lapse", || async {
        (s.db.count(&format!(
            "SELECT count(*) AS n FROM payments WHERE id = '{id}' AND next_check_at <= now()"
        )) == 1)
            .then_some(())
    })
    .await;
    let out = s.run(&["reconcile"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        stdout.contains("checked 1 payment(s) with the provider: 1 succeeded"),
        "{stdout}"
    );
    let charge = psp.charge(&id).unwrap();
    assert_eq!(
        s.db.texts(&format!(
            "SELECT status || ' ' || charge_id AS t FROM payments WHERE id = '{id}'"
        )),
        vec![format!("succeeded {}", charge.charge_id)]
    );
    assert_eq!(psp.executions(&id), 1);
    // Its webhook goes out with the next consumer; the dead letter stays on record.
    s.start("consume");
    eventually(Duration::from_secs(20), "the webhook", || async {
        (s.receiver.received().len() == 1).then_some(())
    })
    .await;
    assert_eq!(psp.executions(&id), 1);
    assert_eq!(s.db.count("SELECT count(*) AS n FROM dead_letters"), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_provider_refusing_our_key_pauses_processing_and_fails_nothing() {
    let psp = Psp::start((Duration::from_millis(10), Duration::from_millis(50)));
    psp.refuse_all(true);
    let metrics_port = free_port();
    let bind = format!("127.0.0.1:{metrics_port}");
    // At debug level: the API key must not appear even there.
    let mut s = stack(&psp.url(), "5s", &[("RUST_LOG", "debug")]).await;
    for role in ["serve", "relay", "dlq-watch"] {
        s.start(role);
    }
    s.env
        .push(("ASYNC_PAY__METRICS__BIND".into(), bind.clone()));
    s.start("consume");
    s.wait_healthy().await;
    let (accepted, _) = tokio::task::block_in_place(|| s.pay_many("refused", 10, 2));
    let metrics_url = format!("http://{bind}/metrics");
    let m = eventually(Duration::from_secs(20), "the pause to show", || async {
        let m = request("GET", &metrics_url, &[], None).await.text;
        (m.contains("async_pay_gateway_paused 1")
            && s.all_logs()
                .contains("payment gateway refuses our configuration"))
        .then_some(m)
    })
    .await;
    let refused = r#"async_pay_gateway_calls_total{operation="charge",outcome="unauthorized"}"#;
    assert!(crate::metrics::value(&m, refused) >= 1.0, "{m}");
    // One refusal pauses every call; probes follow, one at a time, further and further apart
    // (1 s, then 2 s, then 4 s: lower bounds, which a slow machine cannot break).
    let probes = eventually(Duration::from_secs(30), "three probes", || async {
        let times: Vec<std::time::Instant> = psp.requests().iter().map(|r| r.5).collect();
        let first = *times.first()?;
        let later: Vec<_> = times
            .into_iter()
            .filter(|t| *t >= first + Duration::from_millis(500))
            .collect();
        (later.len() >= 3).then_some(later)
    })
    .await;
    for (n, pair) in probes[..3].windows(2).enumerate() {
        let gap = pair[1] - pair[0];
        let least = Duration::from_millis(1900 * (1 << n));
        assert!(
            gap >= least,
            "probe {} came {gap:?} after the one before",
            n + 2
        );
    }
    // No payment failed, nothing dead-lettered.
    assert_eq!(
        s.db.count("SELECT count(*) AS n FROM payments WHERE status <> 'pending'"),
        0
    );
    assert_eq!(s.db.count("SELECT count(*) AS n FROM dead_letters"), 0);
    assert!(psp.charge(&accepted[0]).is_none());
    // The operator fixes the key (here: the provider accepts it again): everything goes through.
    psp.refuse_all(false);
    assert_provider_agrees(&s, &psp, &accepted, Duration::from_secs(40)).await;
    let m = request("GET", &metrics_url, &[], None).await.text;
    assert!(m.contains("async_pay_gateway_paused 0"), "{m}");
    assert!(
        !s.all_logs().contains(psp::API_KEY),
        "the API key is never logged"
    );
}
