//! The broker's own guarantees, tested against RabbitMQ itself: the queue's `x-delivery-limit`
//! dead-letters a message that kills its consumer every time, and a message handed back by a
//! consumer that stops counts as a delivery.

use std::time::Duration;

use amqprs::BasicProperties;
use amqprs::channel::{BasicConsumeArguments, BasicQosArguments};
use serde_json::json;

use crate::broker::TestBroker;
use crate::helpers::*;
use crate::pipeline::{Roles, fast};
use crate::proxy::Proxy;

/// Publishes messages (message id, body) to `exchange` with `routing_key`, the topology declared
/// first.
async fn publish_to(
    broker: &TestBroker,
    exchange: &str,
    routing_key: &str,
    messages: &[(&str, Vec<u8>)],
) {
    let conn = broker.connect().await;
    let publisher = crate::broker::ConfirmedPublisher::open(&conn).await;
    async_pay::amqp::topology::declare(&conn, &broker.settings)
        .await
        .unwrap();
    for (id, body) in messages {
        publisher
            .publish(
                exchange,
                routing_key,
                BasicProperties::default().with_message_id(id).finish(),
                body.clone(),
            )
            .await;
    }
    publisher.confirmed().await;
    let _ = conn.close().await;
}

/// Publishes one message with this id and body on the payments exchange, as the relay does.
pub async fn publish(broker: &TestBroker, message_id: &str, body: Vec<u8>) {
    let s = &broker.settings;
    publish_to(broker, &s.exchange, &s.routing_key, &[(message_id, body)]).await;
}

/// Puts messages straight on the dead-letter exchange, as RabbitMQ does when it gives up.
pub async fn dead_letter(broker: &TestBroker, messages: &[(&str, Vec<u8>)]) {
    let s = &broker.settings;
    publish_to(
        broker,
        &s.dead_letter_exchange,
        &s.dead_letter_queue,
        messages,
    )
    .await;
}

/// A consumer that "crashes" on its message: it connects through `proxy`, takes one message
/// without acking it, and its connection drops (as when the process dies). Returns the
/// message's `x-delivery-count` (None on the first delivery), or `Err(())` when no message came
/// within `wait`.
pub async fn take_and_die(
    broker: &TestBroker,
    proxy: &Proxy,
    wait: Duration,
) -> Result<Option<i64>, ()> {
    let mut s = broker.settings.clone();
    s.urls = vec![async_pay::config::Secret::new(format!(
        "amqp://guest:guest@127.0.0.1:{}/%2f",
        proxy.addr.port()
    ))];
    proxy.restore();
    let conn = async_pay::amqp::connect(&s, "test-crashing-consumer")
        .await
        .unwrap();
    let ch = conn.open_channel(None).await.unwrap();
    ch.basic_qos(BasicQosArguments::new(0, 1, false))
        .await
        .unwrap();
    let (_, mut rx) = ch
        .basic_consume_rx(
            BasicConsumeArguments::new(&s.queue, "")
                .manual_ack(true)
                .finish(),
        )
        .await
        .unwrap();
    let got = tokio::time::timeout(wait, rx.recv()).await;
    // The process "dies": its TCP connection goes away, nothing acked, nothing closed cleanly.
    proxy.cut();
    drop(conn);
    match got {
        Ok(Some(msg)) => Ok(msg
            .basic_properties
            .as_ref()
            .and_then(|p| p.headers())
            .and_then(|h| h.get(&async_pay::amqp::field_name("x-delivery-count")))
            .and_then(async_pay::amqp::field_as_i64)),
        _ => Err(()),
    }
}

/// Reads the next ready message of `queue`: its message id and `x-delivery-count` (None on a
/// message never delivered before); None if the queue is empty. With `take` the message is
/// acked (gone); without, it is handed back (which RabbitMQ counts as one more delivery).
pub async fn get_one(
    broker: &TestBroker,
    queue: &str,
    take: bool,
) -> Option<(String, Option<i64>)> {
    let conn = broker.connect().await;
    let ch = conn.open_channel(None).await.unwrap();
    let got = ch
        .basic_get(
            amqprs::channel::BasicGetArguments::new(queue)
                .no_ack(take)
                .finish(),
        )
        .await
        .unwrap();
    let _ = conn.close().await;
    let (_, props, _) = got?;
    let count = props
        .headers()
        .and_then(|h| h.get(&async_pay::amqp::field_name("x-delivery-count")))
        .and_then(async_pay::amqp::field_as_i64);
    Some((props.message_id().cloned().unwrap_or_default(), count))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_whose_consumer_dies_every_time_is_dead_lettered_by_the_delivery_limit() {
    let db = TestDb::new().await;
    let (s, broker) = fast(&db);
    let proxy = Proxy::start("127.0.0.1:5672".parse().unwrap()).await;
    let payment = uuid::Uuid::new_v4();
    publish(
        &broker,
        "crash-every-time",
        json!({"payment_id": payment}).to_string().into_bytes(),
    )
    .await;

    // The consumer dies on the message again and again; RabbitMQ counts each return.
    let mut counts = Vec::new();
    loop {
        match take_and_die(&broker, &proxy, Duration::from_secs(5)).await {
            Ok(count) => counts.push(count),
            Err(()) => break,
        }
        assert!(
            counts.len() <= s.amqp.delivery_limit as usize + 1,
            "the broker kept redelivering past its limit: {counts:?}"
        );
    }
    let limit = i64::from(s.amqp.delivery_limit);
    let expected: Vec<Option<i64>> = std::iter::once(None).chain((1..=limit).map(Some)).collect();
    assert_eq!(
        counts, expected,
        "delivered delivery_limit + 1 times, each return counted"
    );
    assert_eq!(broker.depth(&s.amqp.queue).await, 0);

    // It went to the dead-letter queue with reason delivery_limit; dlq-watch records it.
    let mut roles = Roles::new();
    roles.dlq_watch(&s);
    eventually(
        Duration::from_secs(15),
        "the dead letter to be recorded",
        || async {
            (db.count(&format!(
                "SELECT count(*) AS n FROM dead_letters WHERE message_id = 'crash-every-time' \
                 AND payment_id = '{payment}' AND reason = 'delivery_limit' \
                 AND original_queue = '{}'",
                s.amqp.queue
            )) == 1)
                .then_some(())
        },
    )
    .await;
    roles.stop().await;
}
