//! The event pipeline against the real PostgreSQL and RabbitMQ: relay, consumer, dead letters.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_pay::config::Settings;
use async_pay::gateway::simulated::SimulatedGateway;
use async_pay::gateway::{Answer, ChargeRequest, Gateway};
use async_pay::processing::{Outcome, Processor};
use async_pay::roles::consume::{Disposition, Handled, handle_one};
use async_pay::roles::relay;
use async_pay::shutdown::Shutdown;
use async_trait::async_trait;
use serde_json::json;

use crate::broker::TestBroker;
use crate::helpers::*;
use crate::proxy::Proxy;
use crate::receiver::Receiver;

/// Settings with short delays, for one test's database and broker names.
pub fn fast(db: &TestDb) -> (Settings, TestBroker) {
    let mut s = settings(&db.url);
    let broker = TestBroker::new(&mut s);
    s.gateway.min_delay = Duration::from_millis(5);
    s.gateway.max_delay = Duration::from_millis(30);
    // A claim lasts this plus 10 s.
    s.gateway.timeout = Duration::from_secs(3);
    s.consume.shutdown_timeout = Duration::from_secs(2);
    s.webhook.retry_delays = vec![Duration::from_millis(200), Duration::from_millis(400)];
    s.webhook.timeout = Duration::from_secs(2);
    s.webhook.poll_interval = Duration::from_millis(100);
    (s, broker)
}

/// Long-running roles started in this process, stopped (and awaited) on drop.
pub struct Roles {
    pub shutdown: Shutdown,
    handles: Vec<tokio::task::JoinHandle<()>>,
}

impl Roles {
    pub fn new() -> Roles {
        Roles {
            shutdown: Shutdown::new(),
            handles: Vec::new(),
        }
    }

    pub fn relay(&mut self, s: &Settings) -> &mut Self {
        let (s, sd) = (s.clone(), self.shutdown.clone());
        self.handles.push(tokio::spawn(
            async move { relay::run(s, sd).await.unwrap() },
        ));
        self
    }

    pub fn consume(&mut self, s: &Settings, gateway: Arc<dyn Gateway>) -> &mut Self {
        let (s, sd) = (s.clone(), self.shutdown.clone());
        self.handles.push(tokio::spawn(async move {
            async_pay::roles::consume::run_with(s, gateway, sd)
                .await
                .unwrap()
        }));
        self
    }

    pub fn dlq_watch(&mut self, s: &Settings) -> &mut Self {
        let (s, sd) = (s.clone(), self.shutdown.clone());
        self.handles.push(tokio::spawn(async move {
            async_pay::roles::dlq_watch::run(s, sd).await.unwrap()
        }));
        self
    }

    pub async fn stop(&mut self) {
        self.shutdown.trigger();
        for h in self.handles.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(10), h).await;
        }
    }
}

impl Drop for Roles {
    fn drop(&mut self) {
        self.shutdown.trigger();
    }
}

/// Approves every charge after a delay and counts the calls; answers `status` with what it
/// charged. With `panics`, every call panics instead (a gateway client with a bug).
pub struct CountingGateway {
    pub calls: AtomicUsize,
    pub statuses: AtomicUsize,
    pub delay: Duration,
    pub panics: bool,
    charged: Mutex<HashSet<uuid::Uuid>>,
    /// When each call (charge or status) came.
    pub times: Mutex<Vec<std::time::Instant>>,
}

impl CountingGateway {
    pub fn new(delay: Duration, panics: bool) -> Arc<CountingGateway> {
        Arc::new(CountingGateway {
            calls: AtomicUsize::new(0),
            statuses: AtomicUsize::new(0),
            delay,
            panics,
            charged: Mutex::new(HashSet::new()),
            times: Mutex::new(Vec::new()),
        })
    }
    /// Charge calls.
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl Gateway for CountingGateway {
    async fn charge(&self, r: &ChargeRequest) -> Answer {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.times.lock().unwrap().push(std::time::Instant::now());
        assert!(!self.panics, "the gateway client has a bug");
        tokio::time::sleep(self.delay).await;
        self.charged.lock().unwrap().insert(r.payment_id);
        Answer::Succeeded {
            charge_id: format!("ch_{}", r.payment_id.simple()),
        }
    }
    async fn status(&self, id: uuid::Uuid) -> Answer {
        self.statuses.fetch_add(1, Ordering::SeqCst);
        self.times.lock().unwrap().push(std::time::Instant::now());
        assert!(!self.panics, "the gateway client has a bug");
        if self.charged.lock().unwrap().contains(&id) {
            Answer::Succeeded {
                charge_id: format!("ch_{}", id.simple()),
            }
        } else {
            Answer::NotFound
        }
    }
}

async fn status_of(app: &TestApp, id: &str) -> serde_json::Value {
    app.get_payment(KEY_A, id).await.json
}

async fn wait_final(app: &TestApp, ids: &[String], limit: Duration) {
    for id in ids {
        eventually(limit, &format!("payment {id} to be final"), || async {
            let p = status_of(app, id).await;
            (p["status"] != "pending").then_some(())
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_posted_payment_is_finalised_once_and_its_webhook_signed() {
    let db = TestDb::new().await;
    let (s, _broker) = fast(&db);
    let app = TestApp::spawn_with(db, s.clone());
    let receiver = Receiver::start().await;
    let mut roles = Roles::new();
    roles
        .relay(&s)
        .consume(&s, Arc::new(SimulatedGateway::new(&s.gateway)))
        .dlq_watch(&s);

    let mut ids = Vec::new();
    for i in 0..20 {
        let r = app
            .post_payment(
                KEY_A,
                &format!("e2e-{i}"),
                json!({"amount": "12.34", "currency": "EUR", "metadata": {"n": i}, "webhook_url": receiver.url("/hook")}),
            )
            .await;
        assert_eq!(r.status, 202);
        ids.push(r.json["payment_id"].as_str().unwrap().to_string());
    }
    wait_final(&app, &ids, Duration::from_secs(20)).await;
    for id in &ids {
        let p = status_of(&app, id).await;
        assert!(p["status"] == "succeeded" || p["status"] == "failed");
        assert!(p["processed_at"].is_string());
    }
    assert_eq!(
        app.db
            .count("SELECT count(*) AS n FROM outbox WHERE published_at IS NULL"),
        0
    );

    // One webhook per payment, signed with merchant A's secret, same values as GET.
    let got = eventually(Duration::from_secs(10), "20 webhooks delivered", || async {
        let delivered = app
            .db
            .count("SELECT count(*) AS n FROM webhook_deliveries WHERE status = 'delivered'");
        (delivered == 20).then(|| receiver.received())
    })
    .await;
    // Every POST is claimed (counted) in the database first, and a delivered row is never
    // claimed again: these are all the POSTs there will be.
    assert_eq!(
        (
            app.db
                .count("SELECT coalesce(sum(attempts), 0)::bigint AS n FROM webhook_deliveries"),
            got.len()
        ),
        (20, 20),
        "exactly one delivery per payment"
    );
    let key = async_pay::signing::secret_key(SECRET_A).unwrap();
    for w in &got {
        let body = w.json();
        let id = body["payment_id"].as_str().unwrap();
        let p = status_of(&app, id).await;
        assert_eq!(body["status"], p["status"]);
        assert_eq!(body["processed_at"], p["processed_at"]);
        assert_eq!(body["amount"], "12.34");
        assert_eq!(
            body["type"],
            format!("payment.{}", p["status"].as_str().unwrap())
        );
        let ts: i64 = w.headers["webhook-timestamp"].parse().unwrap();
        let expected = async_pay::signing::sign(&key, &w.headers["webhook-id"], ts, &w.body);
        assert_eq!(w.headers["webhook-signature"], expected);
    }
    roles.stop().await;
    assert_eq!(app.db.count("SELECT count(*) AS n FROM dead_letters"), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn relay_once_publishes_everything_and_reports_the_count() {
    let db = TestDb::new().await;
    let (s, broker) = fast(&db);
    let app = TestApp::spawn_with(db, s.clone());
    for i in 0..30 {
        let r = app
            .post_payment(
                KEY_A,
                &format!("once-{i}"),
                json!({"amount": "1", "currency": "RUB"}),
            )
            .await;
        assert_eq!(r.status, 202);
    }
    // Declares the topology itself, then drains.
    assert_eq!(relay::run_once(&s).await.unwrap(), 30);
    assert_eq!(
        app.db
            .count("SELECT count(*) AS n FROM outbox WHERE published_at IS NULL"),
        0
    );
    assert_eq!(
        relay::run_once(&s).await.unwrap(),
        0,
        "nothing left the second time"
    );
    let msgs = broker.drain(&s.amqp.queue).await;
    assert_eq!(msgs.len(), 30);
    let ids: std::collections::HashSet<_> = msgs.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(ids.len(), 30, "message_id is the outbox id");
    let body: serde_json::Value = serde_json::from_slice(&msgs[0].1).unwrap();
    assert!(body["payment_id"].is_string());
}

#[tokio::test(flavor = "multi_thread")]
async fn relay_once_binary_fails_clearly_when_the_broker_is_unreachable() {
    let db = TestDb::new().await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_async-pay"))
        .args(["relay", "--once"])
        .env("DATABASE_URL", &db.url)
        .env("AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2f")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("RabbitMQ"), "{err}");
    assert!(
        !err.contains("guest:guest"),
        "the password is not printed: {err}"
    );
}

/// The relay's wake-up without NOTIFY: after a quiet spell its polling has backed off to
/// `relay.idle_poll_interval` (50 ms), and a payment posted then is still picked up at once.
/// Timed by the database's own clock, from the POST's `created_at` to the relay batch's
/// `published_at` (the start of the transaction that claimed it). Five quiet spells of 1 s; the median
/// must be within 100 ms (loose on purpose on this shared machine: it proves the wake-up works,
/// `just bench` measures how fast), and every event must be published within 2 s.
#[tokio::test(flavor = "multi_thread")]
async fn an_event_committed_while_the_relay_is_idle_is_published_within_100ms() {
    let db = TestDb::new().await;
    let (s, _broker) = fast(&db);
    let app = TestApp::spawn_with(db, s.clone());
    let mut roles = Roles::new();
    roles.relay(&s);
    let mut waits = Vec::new();
    for i in 0..5 {
        // A quiet spell: far longer than the backoff needs to reach the idle pace (2+4+…+32 ms).
        tokio::time::sleep(Duration::from_secs(1)).await;
        let r = app
            .post_payment(
                KEY_A,
                &format!("idle-{i}"),
                json!({"amount": "1", "currency": "RUB"}),
            )
            .await;
        assert_eq!(r.status, 202, "{}", r.text);
        let id = r.json["payment_id"].as_str().unwrap().to_string();
        // -1 until the relay has published it.
        let sql = format!(
            "SELECT coalesce(max((extract(epoch FROM published_at - created_at) * 1e6)::bigint), -1) \
             AS n FROM outbox WHERE payload->>'payment_id' = '{id}' AND published_at IS NOT NULL"
        );
        let db = &app.db;
        let micros = eventually(Duration::from_secs(2), "the event published", || {
            let n = db.count(&sql);
            async move { (n >= 0).then_some(n) }
        })
        .await;
        waits.push(Duration::from_micros(u64::try_from(micros).unwrap()));
    }
    roles.stop().await;
    waits.sort();
    eprintln!("commit to relay claim after a quiet spell: {waits:?}");
    assert!(
        waits[2] <= Duration::from_millis(100),
        "median wake-up {:?} (all: {waits:?})",
        waits[2]
    );
}

/// Publishing leaves a dead tuple per event (and retention another), and the server's autovacuum
/// may be off (it is on this machine): the relay vacuums the outbox itself, on its housekeeping
/// schedule (every 10 s), so the table does not grow with every event ever published.
#[tokio::test(flavor = "multi_thread")]
async fn the_relay_vacuums_the_outbox_after_publishing() {
    let db = TestDb::new().await;
    let (s, _broker) = fast(&db);
    db.exec(
        "INSERT INTO outbox (event_type, payload) \
         SELECT 'payment.created', jsonb_build_object('payment_id', gen_random_uuid()) FROM generate_series(1, 500)",
    )
    .unwrap();
    let mut roles = Roles::new();
    roles.relay(&s);
    eventually(Duration::from_secs(10), "the events published", || {
        let n = db.count("SELECT count(*) AS n FROM outbox WHERE published_at IS NULL");
        async move { (n == 0).then_some(()) }
    })
    .await;
    eventually(
        Duration::from_secs(25),
        "a VACUUM of the outbox after the events were published",
        || {
            let n = db.count(
                "SELECT count(*) AS n FROM pg_stat_user_tables WHERE relname = 'outbox' \
                 AND last_vacuum > (SELECT max(published_at) FROM outbox)",
            );
            async move { (n == 1).then_some(()) }
        },
    )
    .await;
    roles.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_relays_publish_each_row_once() {
    let db = TestDb::new().await;
    let (mut s, broker) = fast(&db);
    s.relay.batch_size = 50;
    db.exec(
        "INSERT INTO outbox (event_type, payload) \
         SELECT 'payment.created', jsonb_build_object('payment_id', gen_random_uuid()) FROM generate_series(1, 1000)",
    )
    .unwrap();
    let mut tasks = Vec::new();
    for _ in 0..2 {
        let (s, url) = (s.clone(), db.url.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn =
                <diesel_async::AsyncPgConnection as diesel_async::AsyncConnection>::establish(&url)
                    .await
                    .unwrap();
            let (_c, publisher) = relay::open_publisher(&s).await.unwrap();
            let mut mine = 0;
            loop {
                let d = relay::drain_once(&mut conn, &publisher, s.relay.batch_size)
                    .await
                    .unwrap();
                assert_eq!(d.claimed, d.published);
                if d.claimed == 0 {
                    break mine;
                }
                mine += d.published;
            }
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    assert_eq!(total, 1000);
    let msgs = broker.drain(&s.amqp.queue).await;
    let ids: std::collections::HashSet<_> = msgs.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(
        (msgs.len(), ids.len()),
        (1000, 1000),
        "each row published exactly once"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unroutable_publish_leaves_the_row_unpublished() {
    let db = TestDb::new().await;
    let (s, broker) = fast(&db);
    db.exec("INSERT INTO outbox (event_type, payload) VALUES ('payment.created', '{\"payment_id\": null}')").unwrap();
    // The topology exists, but this publisher's routing key matches no queue: basic.return.
    let conn = broker.connect().await;
    async_pay::amqp::topology::declare(&conn, &s.amqp)
        .await
        .unwrap();
    let publisher = async_pay::amqp::publisher::Publisher::open(
        &conn,
        &s.amqp.exchange,
        "no-such-route",
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let mut c =
        <diesel_async::AsyncPgConnection as diesel_async::AsyncConnection>::establish(&db.url)
            .await
            .unwrap();
    let d = relay::drain_once(&mut c, &publisher, 10).await.unwrap();
    assert_eq!((d.claimed, d.published), (1, 0));
    assert_eq!(
        db.count("SELECT count(*) AS n FROM outbox WHERE published_at IS NULL"),
        1
    );

    // A publisher whose exchange does not exist: the channel closes, nothing is marked.
    let gone = async_pay::amqp::publisher::Publisher::open(
        &conn,
        "no-such-exchange",
        "x",
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let d = relay::drain_once(&mut c, &gone, 10).await.unwrap();
    assert_eq!(
        (d.claimed, d.published),
        (1, 0),
        "the channel closed under the publish: claimed, not confirmed"
    );
    assert_eq!(
        db.count("SELECT count(*) AS n FROM outbox WHERE published_at IS NULL"),
        1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn duplicate_deliveries_and_racing_consumers_give_one_outcome() {
    let db = TestDb::new().await;
    let (s, _broker) = fast(&db);
    let app = TestApp::spawn_with(db, s.clone());
    let r = app
        .post_payment(KEY_A, "dup", json!({"amount": "5", "currency": "USD"}))
        .await;
    let id = r.json["payment_id"].as_str().unwrap().to_string();
    let gateway = CountingGateway::new(Duration::from_millis(300), false);
    let pool = async_pay::db::pool(&s.database).unwrap();
    // Two consumers (two processors) get the same message at the same time.
    let a = Processor::new(&s, pool.clone(), gateway.clone(), Shutdown::new());
    let b = Processor::new(&s, pool.clone(), gateway.clone(), Shutdown::new());
    let body = json!({"payment_id": id}).to_string().into_bytes();
    let limit = s.amqp.delivery_limit;
    let (ra, rb) = tokio::join!(
        handle_one(&a, &body, 0, limit),
        handle_one(&b, &body, 0, limit)
    );
    let outcomes = [ra, rb];
    let finalised = outcomes
        .iter()
        .filter(|d| {
            matches!(
                d,
                Disposition::Ack(Handled::Processed(Outcome::Finalised(..)))
            )
        })
        .count();
    let duplicate = outcomes
        .iter()
        .filter(|d| {
            matches!(
                d,
                Disposition::Ack(Handled::Processed(Outcome::AlreadyFinal(_)))
            )
        })
        .count();
    assert_eq!((finalised, duplicate), (1, 1), "{outcomes:?}");
    assert_eq!(gateway.calls(), 1, "the gateway is asked once");
    let first = status_of(&app, &id).await;
    assert_eq!(first["status"], "succeeded");

    // A late redelivery changes nothing, not even processed_at.
    assert!(matches!(
        handle_one(&a, &body, 1, limit).await,
        Disposition::Ack(Handled::Processed(Outcome::AlreadyFinal(_)))
    ));
    assert_eq!(status_of(&app, &id).await, first);
    assert_eq!(gateway.calls(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn poison_messages_are_acked_and_do_not_stop_the_consumer() {
    let db = TestDb::new().await;
    let (s, broker) = fast(&db);
    let app = TestApp::spawn_with(db, s.clone());
    let pool = async_pay::db::pool(&s.database).unwrap();
    let p = Processor::new(
        &s,
        pool,
        CountingGateway::new(Duration::ZERO, false),
        Shutdown::new(),
    );
    let limit = s.amqp.delivery_limit;
    assert_eq!(
        handle_one(&p, b"not json", 0, limit).await,
        Disposition::Ack(Handled::Malformed)
    );
    assert_eq!(
        handle_one(&p, b"{\"id\": 1}", 0, limit).await,
        Disposition::Ack(Handled::Malformed)
    );
    let unknown = uuid::Uuid::new_v4();
    let body = json!({"payment_id": unknown}).to_string();
    assert_eq!(
        handle_one(&p, body.as_bytes(), 0, limit).await,
        Disposition::Ack(Handled::Processed(Outcome::UnknownPayment(unknown)))
    );
    // A body over the size cap is not ours: dead-lettered at once, not held.
    let huge = vec![b'x'; async_pay::roles::consume::MAX_MESSAGE_BYTES + 1];
    assert!(matches!(
        handle_one(&p, &huge, 0, limit).await,
        Disposition::DeadLetter(_)
    ));

    // Through the real queue: poison first, then a real payment behind it.
    let mut roles = Roles::new();
    roles
        .consume(&s, Arc::new(SimulatedGateway::new(&s.gateway)))
        .dlq_watch(&s);
    let conn = broker.connect().await;
    async_pay::amqp::topology::declare(&conn, &s.amqp)
        .await
        .unwrap();
    let publisher = crate::broker::ConfirmedPublisher::open(&conn).await;
    for poison in [
        &b"garbage"[..],
        b"{}",
        body.as_bytes(),
        &vec![b'x'; 1 << 20],
    ] {
        publisher
            .publish(
                &s.amqp.exchange,
                &s.amqp.routing_key,
                amqprs::BasicProperties::default(),
                poison.to_vec(),
            )
            .await;
    }
    publisher.confirmed().await;
    let r = app
        .post_payment(
            KEY_A,
            "after-poison",
            json!({"amount": "5", "currency": "USD"}),
        )
        .await;
    let id = r.json["payment_id"].as_str().unwrap().to_string();
    assert_eq!(relay::run_once(&s).await.unwrap(), 1);
    wait_final(&app, std::slice::from_ref(&id), Duration::from_secs(10)).await;
    eventually(Duration::from_secs(5), "the queue to be empty", || async {
        (broker.depth(&s.amqp.queue).await == 0).then_some(())
    })
    .await;
    // The oversized one is dead-lettered (recorded by dlq-watch); the rest are acked.
    eventually(
        Duration::from_secs(10),
        "the oversized message's dead letter",
        || async { (app.db.count("SELECT count(*) AS n FROM dead_letters") > 0).then_some(()) },
    )
    .await;
    roles.stop().await;
    assert_eq!(
        app.db
            .count("SELECT count(*) AS n FROM dead_letters WHERE octet_length(body) = 1048576"),
        1,
        "only the oversized message is dead-lettered"
    );
    assert_eq!(app.db.count("SELECT count(*) AS n FROM dead_letters"), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_payment_that_keeps_failing_ends_in_dead_letters_after_the_delivery_limit() {
    let db = TestDb::new().await;
    let (mut s, broker) = fast(&db);
    // Keep the reconciliation sweep out of the count: here only deliveries retry.
    s.gateway.recheck_min = Duration::from_secs(3600);
    s.gateway.recheck_max = Duration::from_secs(3600);
    let app = TestApp::spawn_with(db, s.clone());
    let gateway = CountingGateway::new(Duration::ZERO, true);
    let mut roles = Roles::new();
    roles.relay(&s).consume(&s, gateway.clone()).dlq_watch(&s);
    let r = app
        .post_payment(KEY_A, "doomed", json!({"amount": "5", "currency": "USD"}))
        .await;
    let id = r.json["payment_id"].as_str().unwrap().to_string();
    let n = eventually(
        Duration::from_secs(30),
        "the dead letter to be recorded",
        || async {
            let n = app.db.count(&format!(
                "SELECT count(*) AS n FROM dead_letters WHERE payment_id = '{id}'"
            ));
            (n > 0).then_some(n)
        },
    )
    .await;
    assert_eq!(n, 1);
    // A gateway client that panics: the panic is contained, the message retried; the first
    // delivery charged, the later ones asked for the status first (a request may have left).
    assert_eq!(
        (gateway.calls(), gateway.statuses.load(Ordering::SeqCst)),
        (1, s.amqp.delivery_limit as usize - 1),
        "delivered delivery_limit times, then given up"
    );
    // Each retry came after the backoff: 1 s after the first failure, 2 s after the second
    // (lower bounds, which no slow machine can break).
    let times = gateway.times.lock().unwrap().clone();
    for (n, pair) in times.windows(2).enumerate() {
        let gap = pair[1] - pair[0];
        let least = Duration::from_millis(950 * (1 << n));
        assert!(
            gap >= least,
            "delivery {} came {gap:?} after the one before",
            n + 2
        );
    }
    assert_eq!(
        app.db.count(&format!(
            "SELECT count(*) AS n FROM dead_letters WHERE payment_id = '{id}' AND reason = 'rejected' \
             AND original_queue = '{}'",
            s.amqp.queue
        )),
        1
    );
    assert_eq!(
        status_of(&app, &id).await["status"],
        "pending",
        "kept for replay, not finalised"
    );
    roles.stop().await;
    assert_eq!(
        broker.depth(&s.amqp.dead_letter_queue).await,
        0,
        "acked once recorded"
    );
}

/// Never answers: the consumer holding a payment "hangs" at the gateway.
struct StuckGateway;

#[async_trait]
impl Gateway for StuckGateway {
    async fn charge(&self, _r: &ChargeRequest) -> Answer {
        std::future::pending().await
    }
    async fn status(&self, _id: uuid::Uuid) -> Answer {
        std::future::pending().await
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_payment_whose_consumer_vanished_is_finalised_by_another() {
    let db = TestDb::new().await;
    let (s, broker) = fast(&db);
    let app = TestApp::spawn_with(db, s.clone());
    // Consumer A reaches RabbitMQ and PostgreSQL through proxies we can cut, and hangs at the
    // gateway.
    let proxy = Proxy::start("127.0.0.1:5672".parse().unwrap()).await;
    let db_proxy = Proxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let mut sa = s.clone();
    sa.amqp.urls = vec![async_pay::config::Secret::new(format!(
        "amqp://guest:guest@127.0.0.1:{}/%2f",
        proxy.addr.port()
    ))];
    let mut db_url = url::Url::parse(&app.db.url).unwrap();
    db_url.set_port(Some(db_proxy.addr.port())).unwrap();
    sa.database.url = async_pay::config::Secret::new(db_url.as_str());
    let mut a = Roles::new();
    a.consume(&sa, Arc::new(StuckGateway));
    let r = app
        .post_payment(KEY_A, "orphan", json!({"amount": "5", "currency": "USD"}))
        .await;
    let id = r.json["payment_id"].as_str().unwrap().to_string();
    assert_eq!(relay::run_once(&s).await.unwrap(), 1);
    eventually(
        Duration::from_secs(10),
        "consumer A to claim the payment",
        || async {
            let n = app.db.count(&format!(
                "SELECT count(*) AS n FROM payments WHERE id = '{id}' AND claim_token IS NOT NULL"
            ));
            (n == 1).then_some(())
        },
    )
    .await;
    // A "dies": its connections go without an ack and without releasing its claim, which
    // stays until the lease ends.
    db_proxy.cut();
    proxy.cut();
    let cut_at = std::time::Instant::now();
    let gateway = CountingGateway::new(Duration::ZERO, false);
    let mut b = Roles::new();
    b.consume(&s, gateway.clone());
    let lease = async_pay::processing::lease_for(&s.gateway);
    wait_final(
        &app,
        std::slice::from_ref(&id),
        lease + Duration::from_secs(15),
    )
    .await;
    assert!(
        cut_at.elapsed() >= lease - Duration::from_secs(1),
        "B waited for A's claim to lapse"
    );
    assert_eq!(status_of(&app, &id).await["status"], "succeeded");
    assert_eq!(gateway.calls(), 1);
    b.stop().await;
    a.stop().await;
    assert_eq!(broker.depth(&s.amqp.queue).await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_relay_deletes_published_events_past_retention_only() {
    let db = TestDb::new().await;
    db.exec(
        "INSERT INTO outbox (event_type, payload, created_at, published_at) \
         SELECT 'payment.created', '{}', now() - interval '9 days', now() - interval '8 days' FROM generate_series(1, 2500); \
         INSERT INTO outbox (event_type, payload, published_at) VALUES ('payment.created', '{}', now()); \
         INSERT INTO outbox (event_type, payload, created_at) VALUES ('payment.created', '{}', now() - interval '30 days');",
    )
    .unwrap();
    let mut c =
        <diesel_async::AsyncPgConnection as diesel_async::AsyncConnection>::establish(&db.url)
            .await
            .unwrap();
    relay::sweep(&mut c, Duration::from_secs(7 * 24 * 3600)).await;
    assert_eq!(
        db.count("SELECT count(*) AS n FROM outbox"),
        2,
        "old published rows go, in batches"
    );
    assert_eq!(
        db.count("SELECT count(*) AS n FROM outbox WHERE published_at IS NULL"),
        1,
        "an unpublished row is never deleted"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn stopping_during_a_database_outage_hands_the_message_back_neither_retried_nor_dead_lettered()
 {
    let db = TestDb::new().await;
    let (mut s, broker) = fast(&db);
    let proxy = Proxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let mut url = url::Url::parse(&db.url).unwrap();
    url.set_port(Some(proxy.addr.port())).unwrap();
    s.database.url = async_pay::config::Secret::new(url.as_str());
    proxy.cut();
    // A message on its last allowed delivery: were the outage counted as a failure now, the
    // consumer would dead-letter it.
    let body = json!({"payment_id": uuid::Uuid::new_v4()}).to_string();
    crate::backstop::publish(&broker, "outage-at-last-delivery", body.into_bytes()).await;
    let crashing = Proxy::start("127.0.0.1:5672".parse().unwrap()).await;
    for _ in 1..s.amqp.delivery_limit {
        crate::backstop::take_and_die(&broker, &crashing, Duration::from_secs(5))
            .await
            .unwrap();
    }
    let mut roles = Roles::new();
    roles.consume(&s, CountingGateway::new(Duration::ZERO, false));
    eventually(
        Duration::from_secs(10),
        "the consumer to hold it",
        || async { (broker.depth(&s.amqp.queue).await == 0).then_some(()) },
    )
    .await;
    let tried = proxy.refused();
    eventually(
        Duration::from_secs(15),
        "the database to be tried again while the message is held",
        || async { (proxy.refused() >= tried + 2).then_some(()) },
    )
    .await;
    roles.stop().await;
    // Handed back: ready again, not dead-lettered, and the broker counted exactly one more
    // delivery (the hand-back itself; RabbitMQ counts every return) for the whole outage.
    eventually(
        Duration::from_secs(10),
        "the message back in the queue",
        || async { (broker.depth(&s.amqp.queue).await == 1).then_some(()) },
    )
    .await;
    assert_eq!(broker.depth(&s.amqp.dead_letter_queue).await, 0);
    assert_eq!(
        crate::backstop::get_one(&broker, &s.amqp.queue, true).await,
        Some((
            "outage-at-last-delivery".to_string(),
            Some(i64::from(s.amqp.delivery_limit))
        ))
    );
}
