//! Fault injection on the real binary: each scenario breaks something on purpose and then
//! counts that nothing accepted was lost (see `Stack::assert_nothing_lost`).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use crate::helpers::*;
use crate::receiver::{Receiver, Reply};
use crate::stack::{DB_PASSWORD, Stack};

#[tokio::test(flavor = "multi_thread")]
async fn rabbitmq_unreachable_for_30s_while_2000_payments_are_posted() {
    let mut s = Stack::new(&[]).await;
    for role in ["serve", "relay", "consume", "dlq-watch"] {
        s.start(role);
    }
    s.wait_healthy().await;
    let cut = Instant::now();
    s.mq.cut();
    let (accepted, statuses) = {
        let s = &s;
        tokio::task::block_in_place(|| s.pay_many("mq-down", 2000, 8))
    };
    assert!(
        statuses.iter().all(|c| *c == 202),
        "the API keeps answering 202 without RabbitMQ"
    );
    assert_eq!(accepted.len(), 2000);
    assert_eq!(
        s.db.count("SELECT count(*) AS n FROM outbox WHERE published_at IS NULL"),
        2000,
        "the outbox holds every event while the broker is away"
    );
    if let Some(rest) = Duration::from_secs(30).checked_sub(cut.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    s.mq.restore();
    // Relay and consumers reconnect by themselves (backoff is at most 30 s).
    s.assert_nothing_lost(&accepted, 0, Duration::from_secs(90))
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_unreachable_for_10s_under_load() {
    let mut s = Stack::new(&[]).await;
    for role in ["serve", "relay", "consume", "dlq-watch"] {
        s.start(role);
    }
    s.wait_healthy().await;
    let deadline = Duration::from_secs(1) + Duration::from_secs(2) + Duration::from_millis(1500);
    let (before, _) = tokio::task::block_in_place(|| s.pay_many("pg-before", 100, 4));
    s.pg.cut();
    let outage = Instant::now();
    let mut accepted = before;
    let mut answered_503 = 0;
    let mut i = 0;
    while outage.elapsed() < Duration::from_secs(10) {
        let started = Instant::now();
        let r = request(
            "POST",
            &s.url("/api/v1/payments"),
            &[
                ("X-API-Key", KEY_A),
                ("Idempotency-Key", &format!("pg-during-{i}")),
            ],
            Some(br#"{"amount": "2", "currency": "RUB"}"#.to_vec()),
        )
        .await;
        i += 1;
        assert!(
            started.elapsed() < deadline,
            "answered within acquire + query timeout: {:?}",
            started.elapsed()
        );
        match r.status {
            503 => {
                assert_eq!(r.code(), "database_unavailable", "{}", r.text);
                answered_503 += 1;
            }
            202 => accepted.push(r.json["payment_id"].as_str().unwrap().to_string()),
            other => panic!("never a {other} during an outage: {}", r.text),
        }
    }
    assert!(answered_503 > 0, "the outage was seen");
    s.pg.restore();
    let (after, statuses) = {
        let s = &s;
        eventually(Duration::from_secs(20), "the API to recover", || async {
            let (st, _) = s.pay("pg-probe").await;
            (st == 202).then_some(())
        })
        .await;
        tokio::task::block_in_place(|| s.pay_many("pg-after", 100, 4))
    };
    assert!(statuses.iter().all(|c| *c == 202));
    accepted.extend(after);
    let probe =
        s.db.count("SELECT count(*) AS n FROM payments WHERE idempotency_key = 'pg-probe'");
    assert_eq!(probe, 1);
    let mut all = accepted.clone();
    all.extend(probe_ids(&s));
    // Every role recovered without a restart: everything accepted is final and notified.
    s.assert_nothing_lost(&all, 0, Duration::from_secs(90))
        .await;
}

/// Ids of the `pg-probe` payment (posted while waiting for recovery).
fn probe_ids(s: &Stack) -> Vec<String> {
    let url = s.db.url.clone();
    std::thread::spawn(move || {
        use diesel::RunQueryDsl;
        #[derive(diesel::QueryableByName)]
        struct R {
            #[diesel(sql_type = diesel::sql_types::Text)]
            id: String,
        }
        let mut c = <diesel_async::async_connection_wrapper::AsyncConnectionWrapper<
            diesel_async::AsyncPgConnection,
        > as diesel::Connection>::establish(&url)
        .unwrap();
        diesel::sql_query("SELECT id::text AS id FROM payments WHERE idempotency_key = 'pg-probe'")
            .load::<R>(&mut c)
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect()
    })
    .join()
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn consume_killed_with_200_payments_in_flight() {
    let mut s = Stack::new(&[
        // Long enough that claims pile up even on a loaded machine.
        ("ASYNC_PAY__GATEWAY__MIN_DELAY", "4s"),
        ("ASYNC_PAY__GATEWAY__MAX_DELAY", "6s"),
        ("ASYNC_PAY__AMQP__PREFETCH", "500"),
    ])
    .await;
    for role in ["serve", "relay", "dlq-watch"] {
        s.start(role);
    }
    s.wait_healthy().await;
    // Queue all 200 first, then start the consumer: it takes them all at once.
    let (accepted, _) = tokio::task::block_in_place(|| s.pay_many("kill-consume", 200, 4));
    assert_eq!(accepted.len(), 200);
    s.wait_published(Duration::from_secs(30)).await;
    let consumer = s.start("consume");
    eventually(
        Duration::from_secs(30),
        "most payments to be in flight",
        || async {
            (s.db
                .count("SELECT count(*) AS n FROM payments WHERE claim_token IS NOT NULL")
                >= 50)
                .then_some(())
        },
    )
    .await;
    s.proc(consumer).kill9();
    let left =
        s.db.count("SELECT count(*) AS n FROM payments WHERE status = 'pending'");
    assert!(left > 0, "killed mid-flight");
    s.start("consume");
    s.assert_nothing_lost(&accepted, 0, Duration::from_secs(60))
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn relay_killed_mid_batch_then_restarted_publishes_every_event() {
    let mut s = Stack::new(&[("ASYNC_PAY__RELAY__BATCH_SIZE", "50")]).await;
    s.db.exec(
        "INSERT INTO outbox (event_type, payload) \
         SELECT 'payment.created', jsonb_build_object('payment_id', gen_random_uuid()) FROM generate_series(1, 6000)",
    )
    .unwrap();
    let relay = s.start("relay");
    eventually(
        Duration::from_secs(20),
        "the relay to be mid-way",
        || async {
            (s.db
                .count("SELECT count(*) AS n FROM outbox WHERE published_at IS NOT NULL")
                > 0)
            .then_some(())
        },
    )
    .await;
    s.proc(relay).kill9();
    let published =
        s.db.count("SELECT count(*) AS n FROM outbox WHERE published_at IS NOT NULL");
    assert!(
        published < 6000,
        "killed before the end ({published} published)"
    );
    s.start("relay");
    s.wait_published(Duration::from_secs(60)).await;
    let msgs = s.broker.drain(&s.broker.settings.queue).await;
    let ids: std::collections::HashSet<i64> =
        msgs.iter().filter_map(|(id, _)| id.parse().ok()).collect();
    let expected: std::collections::HashSet<i64> = (1..=6000).collect();
    assert!(
        expected.is_subset(&ids),
        "every event reached the queue ({} of 6000)",
        expected.intersection(&ids).count()
    );
    assert!(msgs.len() >= 6000, "duplicates are allowed, losses are not");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_under_load_exits_in_time_and_loses_nothing() {
    let mut s = Stack::new(&[
        ("ASYNC_PAY__GATEWAY__MIN_DELAY", "200ms"),
        ("ASYNC_PAY__GATEWAY__MAX_DELAY", "800ms"),
    ])
    .await;
    let serve = s.start("serve");
    let relay = s.start("relay");
    let consume = s.start("consume");
    s.start("dlq-watch");
    s.wait_healthy().await;
    let (mut accepted, _) = tokio::task::block_in_place(|| s.pay_many("term-1", 300, 4));
    // Stop each role while work is in flight; each must exit within its shutdown timeout.
    for (i, limit) in [(consume, 3), (relay, 1), (serve, 3)] {
        let took = s
            .proc(i)
            .term(Duration::from_secs(limit) + Duration::from_secs(3));
        let role = s.proc(i).role.clone();
        assert!(
            took.is_some(),
            "{role} did not exit within {limit}s + 3s after SIGTERM"
        );
    }
    assert!(!s.proc(serve).is_running());
    s.start("serve");
    s.start("relay");
    s.start("consume");
    s.wait_healthy().await;
    let (more, _) = tokio::task::block_in_place(|| s.pay_many("term-2", 50, 2));
    accepted.extend(more);
    s.assert_nothing_lost(&accepted, 0, Duration::from_secs(60))
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn webhook_endpoint_down_for_the_first_part_of_the_schedule() {
    // The receiver's port, closed for now: attempts fail with "connection refused".
    let port = free_port();
    let mut s = Stack::new(&[]).await;
    s.receiver = Receiver::start_on("127.0.0.1:0").await; // replaced below
    let url = format!("http://127.0.0.1:{port}/hook");
    for role in ["serve", "relay", "consume", "dlq-watch"] {
        s.start(role);
    }
    s.wait_healthy().await;
    let mut accepted = Vec::new();
    for i in 0..50 {
        let r = request(
            "POST",
            &s.url("/api/v1/payments"),
            &[
                ("X-API-Key", KEY_A),
                ("Idempotency-Key", &format!("down-{i}")),
            ],
            Some(
                serde_json::json!({"amount": "3", "currency": "USD", "webhook_url": url})
                    .to_string()
                    .into_bytes(),
            ),
        )
        .await;
        accepted.push(r.json["payment_id"].as_str().unwrap().to_string());
    }
    // "The first part of the schedule": the first two attempts of every webhook failed.
    eventually(
        Duration::from_secs(20),
        "two failed attempts of each webhook",
        || async {
            (s.db.count(
                "SELECT count(*) AS n FROM webhook_attempts WHERE attempt = 2 AND error IS NOT NULL",
            ) == 50)
                .then_some(())
        },
    )
    .await;
    // The endpoint comes back on the same port.
    s.receiver = Receiver::start_on(&format!("127.0.0.1:{port}")).await;
    s.assert_nothing_lost(&accepted, 0, Duration::from_secs(30))
        .await;
    let got = s.receiver.received();
    let mut per_id = std::collections::HashMap::new();
    for r in &got {
        *per_id.entry(r.headers["webhook-id"].clone()).or_insert(0) += 1;
    }
    assert_eq!(per_id.len(), 50);
    assert!(
        per_id.values().all(|n| *n == 1),
        "once per delivery id once it succeeded"
    );
    assert_eq!(
        s.db.count("SELECT count(*) AS n FROM webhook_deliveries WHERE status = 'delivered'"),
        50
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn poison_messages_on_the_real_binary_never_loop_or_stop_it() {
    let mut s = Stack::new(&[]).await;
    for role in ["serve", "relay", "dlq-watch"] {
        s.start(role);
    }
    let consumer = s.start("consume");
    s.wait_healthy().await;
    let conn = s.broker.connect().await;
    async_pay::amqp::topology::declare(&conn, &s.broker.settings)
        .await
        .unwrap();
    let publisher = crate::broker::ConfirmedPublisher::open(&conn).await;
    let unknown = serde_json::json!({"payment_id": uuid::Uuid::new_v4()}).to_string();
    for body in [
        b"\x00\xffnot json".to_vec(),
        b"{\"no\": \"id\"}".to_vec(),
        unknown.into_bytes(),
        vec![b'['; 2 << 20],
    ] {
        publisher
            .publish(
                &s.broker.settings.exchange,
                &s.broker.settings.routing_key,
                amqprs::BasicProperties::default(),
                body,
            )
            .await;
    }
    publisher.confirmed().await;
    let _ = conn.close().await;
    let (accepted, _) = tokio::task::block_in_place(|| s.pay_many("after-poison", 20, 2));
    // Only the oversized body is dead-lettered (over the consumer's size cap); the others are
    // acked.
    s.assert_nothing_lost(&accepted, 1, Duration::from_secs(30))
        .await;
    eventually(Duration::from_secs(10), "the queue to drain", || async {
        (s.broker.depth(&s.broker.settings.queue).await == 0).then_some(())
    })
    .await;
    assert!(s.proc(consumer).is_running(), "the consumer survived");
}

#[tokio::test(flavor = "multi_thread")]
async fn secrets_never_appear_in_the_logs_of_a_full_run() {
    let mut s = Stack::new(&[("RUST_LOG", "debug")]).await;
    for role in ["serve", "relay", "consume", "dlq-watch"] {
        s.start(role);
    }
    s.wait_healthy().await;
    let (accepted, _) = tokio::task::block_in_place(|| s.pay_many("logs", 20, 2));
    // Some failures too: a wrong key.
    request(
        "GET",
        &s.url("/api/v1/payments"),
        &[("X-API-Key", "wrong-key-value")],
        None,
    )
    .await;
    // A request id reaches every log line of its request, the handler's own included.
    let traced = request(
        "POST",
        &s.url("/api/v1/payments"),
        &[
            ("X-API-Key", KEY_A),
            ("Idempotency-Key", "traced"),
            ("X-Request-Id", "trace-me-7"),
        ],
        Some(
            serde_json::json!({"amount": "1", "currency": "RUB", "webhook_url": s.receiver.url("/hook")})
                .to_string()
                .into_bytes(),
        ),
    )
    .await;
    let traced_id = traced.json["payment_id"].as_str().unwrap().to_string();
    let logs_now = s.all_logs();
    assert!(
        logs_now.lines().any(|l| l.contains("[req trace-me-7]")
            && l.contains(&traced_id)
            && l.contains("created")),
        "the handler's log line carries the request id"
    );
    assert!(
        logs_now
            .lines()
            .any(|l| l.contains("req=trace-me-7") && l.contains(" 202 ")),
        "so does the access log"
    );
    let mut accepted = accepted;
    accepted.push(traced_id);
    s.assert_nothing_lost(&accepted, 0, Duration::from_secs(30))
        .await;
    let logs = s.all_logs();
    assert!(logs.contains("payment"), "the logs were captured");
    for secret in [
        KEY_A,
        KEY_A2,
        KEY_B,
        SECRET_A,
        SECRET_B,
        DB_PASSWORD,
        "wrong-key-value",
    ] {
        assert!(
            !logs.contains(secret),
            "a secret reached the logs: {}…",
            &secret[..6]
        );
    }
    let b64 = SECRET_A.trim_start_matches("whsec_");
    assert!(!logs.contains(b64));
}

#[tokio::test(flavor = "multi_thread")]
async fn webhooks_in_flight_when_consume_is_killed_are_sent_again_within_the_timeout() {
    let timeout = Duration::from_secs(3);
    let mut s = Stack::new(&[("ASYNC_PAY__WEBHOOK__TIMEOUT", "3s")]).await;
    // Every attempt hangs at the receiver until the sender gives up on it.
    s.receiver.set_default(Reply::Hang);
    for role in ["serve", "relay"] {
        s.start(role);
    }
    let consumer = s.start("consume");
    s.wait_healthy().await;
    let (accepted, _) = tokio::task::block_in_place(|| s.pay_many("hung", 20, 2));
    assert_eq!(accepted.len(), 20);
    eventually(
        Duration::from_secs(30),
        "an attempt of every webhook to hang at the receiver",
        || async {
            let ids: HashSet<String> = s
                .receiver
                .received()
                .iter()
                .map(|r| r.headers["webhook-id"].clone())
                .collect();
            (ids.len() == 20).then_some(())
        },
    )
    .await;
    // The sender dies with all 20 attempts in flight; the endpoint answers from now on.
    s.proc(consumer).kill9();
    let killed = Instant::now();
    s.receiver.set_default(Reply::Status(200));
    let before = s.receiver.received().len();
    s.start("consume");
    eventually(
        timeout + Duration::from_secs(10),
        "every webhook to be sent again by the new consumer",
        || async {
            let again: HashSet<String> = s.receiver.received()[before..]
                .iter()
                .map(|r| r.headers["webhook-id"].clone())
                .collect();
            (again.len() == 20).then_some(())
        },
    )
    .await;
    eprintln!("sent again {:?} after the kill", killed.elapsed());
    s.assert_nothing_lost(&accepted, 0, Duration::from_secs(30))
        .await;
    assert_eq!(
        s.db.count("SELECT count(*) AS n FROM webhook_deliveries WHERE status = 'delivered'"),
        20,
        "each delivery id arrived and was recorded"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_database_outage_is_waited_out_without_growing_the_delivery_count() {
    let mut s = Stack::new(&[]).await;
    s.start("serve");
    s.start("relay");
    s.wait_healthy().await;
    let (status, id) = s.pay("outage").await;
    assert_eq!(status, 202);
    let id = id.unwrap();
    s.wait_published(Duration::from_secs(20)).await;
    s.pg.cut();
    let consumer = s.start("consume");
    // The consumer takes the message and keeps trying to claim the payment: four tries are
    // 1 + 2 + 4 s of backoff, long enough for a consumer that requeued on each failure to have
    // used up the delivery limit (3) and dead-lettered it.
    eventually(
        Duration::from_secs(30),
        "four tries to claim the payment",
        || async {
            let tries = s
                .all_logs()
                .lines()
                .filter(|l| {
                    l.contains(&id)
                        && l.contains("database unavailable while trying to claim the payment")
                })
                .count();
            (tries >= 4).then_some(())
        },
    )
    .await;
    assert_eq!(
        s.broker.depth(&s.broker.settings.queue).await,
        0,
        "held by the consumer all along"
    );
    // The consumer dies; what the broker counted is on the message it hands back.
    s.proc(consumer).kill9();
    eventually(Duration::from_secs(10), "the message back", || async {
        (s.broker.depth(&s.broker.settings.queue).await == 1).then_some(())
    })
    .await;
    let (_, count) = crate::backstop::get_one(&s.broker, &s.broker.settings.queue, false)
        .await
        .unwrap();
    assert_eq!(
        count,
        Some(1),
        "one delivery counted: the kill's hand-back; the outage added none"
    );
    assert_eq!(
        s.broker.depth(&s.broker.settings.dead_letter_queue).await,
        0
    );
    // Once the database is back, a new consumer finishes it (reading it counted a delivery too:
    // this one is the third, still within the limit).
    s.pg.restore();
    s.start("consume");
    s.assert_nothing_lost(&[id], 0, Duration::from_secs(30))
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn relay_once_exits_1_when_the_database_is_unreachable() {
    let db = TestDb::new().await;
    let pg = crate::proxy::Proxy::start("127.0.0.1:5432".parse().unwrap()).await;
    pg.cut();
    let mut through_cut_proxy = url::Url::parse(&db.url).unwrap();
    through_cut_proxy.set_port(Some(pg.addr.port())).unwrap();
    through_cut_proxy.set_password(Some(DB_PASSWORD)).unwrap();
    // Nothing listens on port 1; the cut proxy accepts and drops at once.
    for url in [
        format!("postgres://postgres:{DB_PASSWORD}@127.0.0.1:1/x"),
        through_cut_proxy.to_string(),
    ] {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_async-pay"))
            .args(["relay", "--once"])
            .env("DATABASE_URL", &url)
            .env("RUST_LOG", "warn")
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(Duration::from_secs(60), out)
            .await
            .expect("relay --once ends by itself")
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{url}: {err}");
        assert!(err.contains("database"), "{err}");
        assert!(
            !err.contains(DB_PASSWORD),
            "the password is not printed: {err}"
        );
        assert!(
            String::from_utf8_lossy(&out.stdout).is_empty(),
            "no 'published' line"
        );
    }
}
