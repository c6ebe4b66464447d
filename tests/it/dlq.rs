//! `async-pay dlq list|replay`: dead letters are listed, replayed through the outbox, and the
//! replayed payment is finalised; replaying a final payment's message changes nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use async_pay::db::dead_letters;
use async_pay::gateway::{Answer, ChargeRequest, Gateway};
use async_pay::roles::dlq::{self, Replay};
use async_trait::async_trait;
use diesel_async::{AsyncConnection, AsyncPgConnection};
use serde_json::json;

use crate::helpers::*;
use crate::pipeline::{CountingGateway, Roles, fast};
use crate::receiver::Receiver;

/// A gateway client with a bug: every call panics while `failing` is set; then it approves.
/// (An unknown answer is not a failure: it is reconciled, never dead-lettered.)
struct SwitchGateway {
    failing: AtomicBool,
    calls: AtomicUsize,
}

impl SwitchGateway {
    fn call(&self) {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.failing.load(Ordering::SeqCst) {
            panic!("the gateway client has a bug");
        }
    }
}

#[async_trait]
impl Gateway for SwitchGateway {
    async fn charge(&self, _r: &ChargeRequest) -> Answer {
        self.call();
        Answer::Succeeded {
            charge_id: "ch_switch".into(),
        }
    }
    async fn status(&self, _id: uuid::Uuid) -> Answer {
        self.call();
        Answer::NotFound
    }
}

async fn connect(url: &str) -> AsyncPgConnection {
    AsyncPgConnection::establish(url).await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_letter_is_listed_replayed_and_its_payment_finalised() {
    let db = TestDb::new().await;
    let (mut s, _broker) = fast(&db);
    // The reconciliation sweep would settle the payment by itself; here the replay must.
    s.gateway.recheck_min = Duration::from_secs(3600);
    s.gateway.recheck_max = Duration::from_secs(3600);
    let app = TestApp::spawn_with(db, s.clone());
    let gateway = Arc::new(SwitchGateway {
        failing: AtomicBool::new(true),
        calls: AtomicUsize::new(0),
    });
    let mut roles = Roles::new();
    roles.relay(&s).consume(&s, gateway.clone()).dlq_watch(&s);
    let r = app
        .post_payment(KEY_A, "dlq-1", json!({"amount": "5", "currency": "USD"}))
        .await;
    let id = r.json["payment_id"].as_str().unwrap().to_string();
    eventually(Duration::from_secs(30), "the dead letter", || async {
        (app.db.count("SELECT count(*) AS n FROM dead_letters") == 1).then_some(())
    })
    .await;
    assert_eq!(app.get_payment(KEY_A, &id).await.json["status"], "pending");

    // Listed: the newest first, with payment, reason and count, not replayed.
    let mut conn = connect(&app.db.url).await;
    let rows = dead_letters::summaries(&mut conn, 10).await.unwrap();
    assert_eq!(rows.len(), 1);
    let dead = &rows[0];
    assert_eq!(dead.payment_id.map(|p| p.to_string()), Some(id.clone()));
    assert_eq!(dead.reason, "rejected");
    assert_eq!(dead.death_count, 1);
    assert!(dead.replayed_at.is_none());
    let table = dlq::table(&rows);
    assert!(table.contains(&id) && table.contains("rejected") && table.contains(" no"));

    // The gateway recovers; the replay goes through the outbox and the relay.
    gateway.failing.store(false, Ordering::SeqCst);
    let outcome = dlq::replay_one(&mut conn, dead.id).await.unwrap();
    let Replay::Replayed {
        outbox_id,
        payment_id,
    } = outcome
    else {
        panic!("not replayed: {outcome:?}");
    };
    assert_eq!(payment_id.map(|p| p.to_string()), Some(id.clone()));
    assert_eq!(
        app.db.count(&format!(
            "SELECT count(*) AS n FROM outbox WHERE id = {outbox_id} \
             AND event_type = 'payment.created' AND payload = jsonb_build_object('payment_id', '{id}')"
        )),
        1,
        "the outbox event carries the original body"
    );
    eventually(
        Duration::from_secs(15),
        "the payment to be final",
        || async {
            let p = app.get_payment(KEY_A, &id).await.json;
            (p["status"] != "pending").then_some(())
        },
    )
    .await;
    let p = app.get_payment(KEY_A, &id).await.json;
    assert_eq!(p["status"], "succeeded");
    assert!(p["processed_at"].is_string());

    // Marked replayed, once: a second replay does nothing.
    let rows = dead_letters::summaries(&mut conn, 10).await.unwrap();
    assert!(rows[0].replayed_at.is_some());
    assert!(matches!(
        dlq::replay_one(&mut conn, dead.id).await.unwrap(),
        Replay::AlreadyReplayed(_)
    ));
    assert_eq!(
        dlq::replay_one(&mut conn, dead.id + 1000).await.unwrap(),
        Replay::NotFound
    );
    assert_eq!(app.db.count("SELECT count(*) AS n FROM outbox"), 2);
    roles.stop().await;
    assert_eq!(app.db.count("SELECT count(*) AS n FROM dead_letters"), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn replaying_a_final_payments_dead_letter_changes_nothing() {
    let db = TestDb::new().await;
    let (s, broker) = fast(&db);
    let app = TestApp::spawn_with(db, s.clone());
    let receiver = Receiver::start().await;
    let gateway = CountingGateway::new(Duration::ZERO, false);
    let mut roles = Roles::new();
    roles.relay(&s).consume(&s, gateway.clone()).dlq_watch(&s);
    let r = app
        .post_payment(
            KEY_A,
            "dlq-final",
            json!({"amount": "5", "currency": "USD", "webhook_url": receiver.url("/hook")}),
        )
        .await;
    let id = r.json["payment_id"].as_str().unwrap().to_string();
    // Received is not yet recorded: wait until the payment shows its webhook delivered, so the
    // state compared at the end is the settled one.
    let final_state = eventually(Duration::from_secs(15), "the webhook delivered", || async {
        let p = app.get_payment(KEY_A, &id).await.json;
        (p["webhook"]["status"] == "delivered").then_some(p)
    })
    .await;
    assert_eq!(receiver.received().len(), 1);
    assert_eq!(final_state["status"], "succeeded");

    // A dead letter of this payment (say, from a delivery that died before it was final).
    app.db
        .exec(&format!(
            "INSERT INTO dead_letters (message_id, payment_id, reason, death_count, original_queue, body) \
             VALUES ('old-delivery', '{id}', 'delivery_limit', 4, 'payments.new', \
                     convert_to('{{\"payment_id\": \"{id}\"}}', 'UTF8'))"
        ))
        .unwrap();
    let mut conn = connect(&app.db.url).await;
    let rows = dead_letters::summaries(&mut conn, 10).await.unwrap();
    assert!(matches!(
        dlq::replay_one(&mut conn, rows[0].id).await.unwrap(),
        Replay::Replayed { .. }
    ));
    // The relay publishes the replay and the consumer takes it off the queue.
    eventually(
        Duration::from_secs(15),
        "the replay to be published and taken",
        || async {
            let unpublished = app
                .db
                .count("SELECT count(*) AS n FROM outbox WHERE published_at IS NULL");
            (unpublished == 0 && broker.depth(&s.amqp.queue).await == 0).then_some(())
        },
    )
    .await;
    // Stopping the consumer settles what it holds: a message still unfinished would go back to
    // the queue. Empty queues after the stop: the replay was acked, not handed back or
    // dead-lettered.
    roles.stop().await;
    assert_eq!(
        (
            broker.depth(&s.amqp.queue).await,
            broker.depth(&s.amqp.dead_letter_queue).await
        ),
        (0, 0),
        "the replay was acked"
    );
    assert_eq!(
        app.get_payment(KEY_A, &id).await.json,
        final_state,
        "status and processed_at unchanged"
    );
    assert_eq!(gateway.calls(), 1, "the gateway is not asked again");
    assert_eq!(
        app.db.count("SELECT count(*) AS n FROM webhook_deliveries"),
        1
    );
    assert_eq!(receiver.received().len(), 1, "no second webhook");
    assert_eq!(
        app.db.count("SELECT count(*) AS n FROM dead_letters"),
        1,
        "not dead-lettered again"
    );
    assert_eq!(
        app.db
            .count("SELECT count(*) AS n FROM outbox WHERE published_at IS NULL"),
        0
    );
}

fn cli(db: &TestDb, args: &[&str]) -> (Option<i32>, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_async-pay"))
        .args(args)
        .env("DATABASE_URL", &db.url)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dlq_commands_list_and_replay() {
    let db = TestDb::new().await;
    let (p1, p2) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    db.exec(&format!(
        "INSERT INTO dead_letters (message_id, payment_id, reason, death_count, body) VALUES \
         ('a', '{p1}', 'rejected', 1, convert_to('{{\"payment_id\": \"{p1}\"}}', 'UTF8')), \
         ('b', '{p2}', 'delivery_limit', 4, convert_to('{{\"payment_id\": \"{p2}\"}}', 'UTF8')), \
         ('c', NULL, 'rejected', 1, '\\xff00'::bytea)"
    ))
    .unwrap();
    let db = Arc::new(db);
    let run = |args: &'static [&'static str]| {
        let db = db.clone();
        async move {
            tokio::task::spawn_blocking(move || cli(&db, args))
                .await
                .unwrap()
        }
    };

    let (code, out, err) = run(&["dlq", "list", "--limit", "2"]).await;
    assert_eq!(code, Some(0), "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(lines[0].starts_with("ID") && lines[0].contains("REPLAYED"));
    assert!(
        lines[1].starts_with("3 ") && lines[2].starts_with("2 "),
        "newest first: {out}"
    );
    assert!(lines[2].contains(&p2.to_string()) && lines[2].contains("delivery_limit"));

    let (code, out, _) = run(&["dlq", "replay", "999"]).await;
    assert_eq!(code, Some(1));
    assert!(
        out.contains("dead letter 999: no such dead letter"),
        "{out}"
    );

    let (code, out, err) = run(&["dlq", "replay", "--all"]).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("dead letter 1: replayed as outbox event"),
        "{out}"
    );
    assert!(
        out.contains("dead letter 2: replayed as outbox event"),
        "{out}"
    );
    assert!(out.contains("dead letter 3: its body is not JSON"), "{out}");
    assert!(out.contains("replayed 2 dead letter(s)"), "{out}");
    assert_eq!(
        db.count("SELECT count(*) AS n FROM outbox WHERE event_type = 'payment.created' AND published_at IS NULL"),
        2
    );
    assert_eq!(
        db.count("SELECT count(*) AS n FROM dead_letters WHERE replayed_at IS NOT NULL"),
        2
    );

    let (code, out, _) = run(&["dlq", "replay", "1"]).await;
    assert_eq!(code, Some(0));
    assert!(out.contains("dead letter 1: already replayed at"), "{out}");
    let (code, _, _) = run(&["dlq", "replay", "3"]).await;
    assert_eq!(code, Some(1), "a body that is not JSON cannot be replayed");
    assert_eq!(db.count("SELECT count(*) AS n FROM outbox"), 2);

    let (_, out, _) = run(&["dlq", "list"]).await;
    assert_eq!(out.matches("yes, ").count(), 2, "{out}");
    // Neither an id nor --all: a usage error.
    let (code, _, err) = run(&["dlq", "replay"]).await;
    assert_eq!(code, Some(2), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn dlq_watch_records_a_dead_letter_delivered_twice_once() {
    let db = TestDb::new().await;
    let (s, broker) = fast(&db);
    let body = json!({"payment_id": uuid::Uuid::new_v4()})
        .to_string()
        .into_bytes();
    // The same dead letter twice (as after a dlq-watch that died between its insert and its
    // ack), then another one.
    crate::backstop::dead_letter(
        &broker,
        &[
            ("twice", body.clone()),
            ("twice", body.clone()),
            ("after", body),
        ],
    )
    .await;
    let mut roles = Roles::new();
    roles.dlq_watch(&s);
    // dlq-watch records one message at a time, in queue order: once the last is recorded, both
    // copies were handled.
    eventually(Duration::from_secs(15), "the last dead letter", || async {
        (db.count("SELECT count(*) AS n FROM dead_letters WHERE message_id = 'after'") == 1)
            .then_some(())
    })
    .await;
    roles.stop().await;
    assert_eq!(
        db.count("SELECT count(*) AS n FROM dead_letters WHERE message_id = 'twice'"),
        1,
        "one row for the message delivered twice"
    );
    assert_eq!(
        broker.depth(&s.amqp.dead_letter_queue).await,
        0,
        "and both copies acked"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn two_concurrent_replays_of_one_dead_letter_write_one_outbox_event() {
    use diesel_async::SimpleAsyncConnection;
    let db = TestDb::new().await;
    let p = uuid::Uuid::new_v4();
    db.exec(&format!(
        "INSERT INTO dead_letters (message_id, payment_id, reason, death_count, body) VALUES \
         ('a', '{p}', 'rejected', 1, convert_to('{{\"payment_id\": \"{p}\"}}', 'UTF8'))"
    ))
    .unwrap();
    // Hold the row until both commands wait on a lock, so they truly race.
    let mut gate = connect(&db.url).await;
    gate.batch_execute("BEGIN; SELECT * FROM dead_letters WHERE id = 1 FOR UPDATE")
        .await
        .unwrap();
    let replays: Vec<_> = (0..2)
        .map(|_| {
            tokio::process::Command::new(env!("CARGO_BIN_EXE_async-pay"))
                .args(["dlq", "replay", "1"])
                .env("DATABASE_URL", &db.url)
                .env("RUST_LOG", "warn")
                .kill_on_drop(true)
                .output()
        })
        .collect();
    let replays = tokio::spawn(futures_util::future::join_all(replays));
    eventually(
        Duration::from_secs(20),
        "both replays to wait on a lock",
        || async {
            let waiting = db.count(
                "SELECT count(*) AS n FROM pg_stat_activity \
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
            );
            (waiting == 2).then_some(())
        },
    )
    .await;
    gate.batch_execute("COMMIT").await.unwrap();
    let outs: Vec<String> = replays
        .await
        .unwrap()
        .into_iter()
        .map(|o| {
            let o = o.unwrap();
            assert_eq!(o.status.code(), Some(0), "{o:?}");
            String::from_utf8_lossy(&o.stdout).into_owned()
        })
        .collect();
    assert_eq!(
        db.count("SELECT count(*) AS n FROM outbox"),
        1,
        "one outbox event: {outs:?}"
    );
    assert_eq!(
        outs.iter()
            .filter(|o| o.contains("dead letter 1: replayed as outbox event"))
            .count(),
        1,
        "{outs:?}"
    );
    assert_eq!(
        outs.iter()
            .filter(|o| o.contains("dead letter 1: already replayed at"))
            .count(),
        1,
        "{outs:?}"
    );
}

/// Publishes one message straight to the test's dead-letter queue (as RabbitMQ would).
async fn publish_dead(
    publisher: &crate::broker::ConfirmedPublisher,
    s: &async_pay::config::Settings,
    props: amqprs::BasicProperties,
    body: Vec<u8>,
) {
    publisher
        .publish(
            &s.amqp.dead_letter_exchange,
            &s.amqp.dead_letter_queue,
            props,
            body,
        )
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_poison_dead_letter_does_not_stop_dlq_watch_recording() {
    let db = TestDb::new().await;
    let (s, broker) = fast(&db);
    // A rule that refuses one message id stands for anything else the database could refuse.
    db.exec(
        "ALTER TABLE dead_letters ADD CONSTRAINT refuses_one_id \
         CHECK (message_id <> 'refused-by-the-database')",
    )
    .unwrap();
    let (p1, p2, p3) = (
        uuid::Uuid::new_v4(),
        uuid::Uuid::new_v4(),
        uuid::Uuid::new_v4(),
    );
    let body = |p: uuid::Uuid| json!({"payment_id": p}).to_string().into_bytes();
    let conn = broker.connect().await;
    async_pay::amqp::topology::declare(&conn, &s.amqp)
        .await
        .unwrap();
    let ch = crate::broker::ConfirmedPublisher::open(&conn).await;
    // 1. NUL bytes in the message id and in a header: PostgreSQL text and jsonb refuse them.
    let mut headers = amqprs::FieldTable::new();
    headers.insert(
        "x-note".try_into().unwrap(),
        amqprs::FieldValue::S("a\0b".try_into().unwrap()),
    );
    let poison = amqprs::BasicProperties::default()
        .with_message_id("poison\0id")
        .with_headers(headers)
        .finish();
    publish_dead(&ch, &s, poison, body(p1)).await;
    // 2. A message the database refuses for a reason nobody foresaw.
    let refused = amqprs::BasicProperties::default()
        .with_message_id("refused-by-the-database")
        .finish();
    publish_dead(&ch, &s, refused, body(p2)).await;
    // 3. An ordinary dead letter behind them.
    let normal = amqprs::BasicProperties::default()
        .with_message_id("ordinary")
        .finish();
    publish_dead(&ch, &s, normal, body(p3)).await;
    ch.confirmed().await;
    let _ = conn.close().await;

    let mut roles = Roles::new();
    roles.dlq_watch(&s);
    eventually(
        Duration::from_secs(20),
        "the dead letter behind the poison ones",
        || async {
            (db.count("SELECT count(*) AS n FROM dead_letters WHERE message_id = 'ordinary'") == 1)
                .then_some(())
        },
    )
    .await;
    // The poison one is recorded with its NUL bytes escaped, the body as it was.
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) AS n FROM dead_letters WHERE message_id = 'poison\\0id' \
             AND payment_id = '{p1}' AND headers->>'x-note' = 'a\\0b' \
             AND body = convert_to('{}', 'UTF8')",
            String::from_utf8(body(p1)).unwrap()
        )),
        1,
        "the poison dead letter, escaped"
    );
    // The refused one is parked: its body and the database's reason are kept.
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) AS n FROM dead_letters WHERE reason = 'unrecordable' \
             AND payment_id = '{p2}' AND body = convert_to('{}', 'UTF8') \
             AND headers->>'unrecordable' LIKE '%refuses_one_id%' \
             AND headers->>'message_id' = 'refused-by-the-database'",
            String::from_utf8(body(p2)).unwrap()
        )),
        1,
        "the refused dead letter, parked"
    );
    assert_eq!(db.count("SELECT count(*) AS n FROM dead_letters"), 3);
    roles.stop().await;
    // Every one was acked: nothing comes back once the watcher's channel is closed.
    assert_eq!(broker.depth(&s.amqp.dead_letter_queue).await, 0);
}

/// A database that refuses every write for a while (a read-only primary after a failover, a
/// broken table) is the database's fault, not the message's: the dead letter waits unacked and
/// is recorded as itself once writes work again, never parked as "unrecordable".
#[tokio::test(flavor = "multi_thread")]
async fn a_database_refusing_every_write_delays_a_dead_letter_but_does_not_park_it() {
    let db = TestDb::new().await;
    let (s, broker) = fast(&db);
    db.exec("ALTER TABLE dead_letters ADD CONSTRAINT refuses_all CHECK (false) NOT VALID")
        .unwrap();
    let payment = uuid::Uuid::new_v4();
    crate::backstop::dead_letter(
        &broker,
        &[(
            "refused-for-a-while",
            json!({"payment_id": payment}).to_string().into_bytes(),
        )],
    )
    .await;
    let mut roles = Roles::new();
    roles.dlq_watch(&s);
    // Long enough for the first tries (and their backoff) to be refused.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(db.count("SELECT count(*) AS n FROM dead_letters"), 0);
    db.exec("ALTER TABLE dead_letters DROP CONSTRAINT refuses_all")
        .unwrap();
    eventually(Duration::from_secs(20), "the dead letter", || async {
        (db.count("SELECT count(*) AS n FROM dead_letters") > 0).then_some(())
    })
    .await;
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) AS n FROM dead_letters WHERE message_id = 'refused-for-a-while' \
             AND payment_id = '{payment}' AND reason <> 'unrecordable'"
        )),
        1,
        "recorded as itself"
    );
    assert_eq!(db.count("SELECT count(*) AS n FROM dead_letters"), 1);
    roles.stop().await;
}
