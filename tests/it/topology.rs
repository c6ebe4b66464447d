//! The dead-letter queue the topology declarer makes on the real RabbitMQ: a quorum queue (in a
//! cluster, a classic queue is unavailable while its one node is down), while one left classic
//! by an older version is still accepted.

use amqprs::FieldTable;
use amqprs::channel::{BasicPublishArguments, QueueDeclareArguments};
use async_pay::amqp::{self, topology};

use crate::broker::TestBroker;
use crate::helpers::*;

/// Declares `queue` (a queue without other arguments) on a fresh channel with `x-queue-type` =
/// `kind`: Ok only if the queue has that type (RabbitMQ refuses a declaration whose type differs
/// with 406).
async fn is_of_type(broker: &TestBroker, queue: &str, kind: &str) -> bool {
    let conn = broker.connect().await;
    let ch = conn.open_channel(None).await.unwrap();
    let mut args = FieldTable::new();
    args.insert(amqp::field_name("x-queue-type"), kind.into());
    let declared = ch
        .queue_declare(
            QueueDeclareArguments::new(queue)
                .durable(true)
                .arguments(args)
                .finish(),
        )
        .await
        .is_ok();
    let _ = conn.close().await;
    declared
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dead_letter_queue_is_a_quorum_queue() {
    let mut s = settings("postgres://unused");
    let broker = TestBroker::new(&mut s);
    let conn = broker.connect().await;
    topology::declare(&conn, &s.amqp).await.unwrap();
    // Twice: declaring is idempotent (every role does it after every reconnect).
    topology::declare(&conn, &s.amqp).await.unwrap();
    let _ = conn.close().await;
    let dead = &s.amqp.dead_letter_queue;
    assert!(is_of_type(&broker, dead, "quorum").await);
    assert!(!is_of_type(&broker, dead, "classic").await);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_classic_dead_letter_queue_left_by_an_older_version_keeps_working() {
    let mut s = settings("postgres://unused");
    let broker = TestBroker::new(&mut s);
    // What versions before the quorum dead-letter queue declared.
    let conn = broker.connect().await;
    let ch = conn.open_channel(None).await.unwrap();
    ch.queue_declare(
        QueueDeclareArguments::new(&s.amqp.dead_letter_queue)
            .durable(true)
            .finish(),
    )
    .await
    .unwrap();
    topology::declare(&conn, &s.amqp).await.unwrap();
    assert!(is_of_type(&broker, &s.amqp.dead_letter_queue, "classic").await);
    // Still bound: a dead letter published to the dead-letter exchange arrives.
    let ch = amqp::open_channel(&conn).await.unwrap();
    ch.basic_publish(
        amqprs::BasicProperties::default()
            .with_message_id("legacy")
            .finish(),
        b"{}".to_vec(),
        BasicPublishArguments::new(&s.amqp.dead_letter_exchange, &s.amqp.dead_letter_queue),
    )
    .await
    .unwrap();
    eventually(
        std::time::Duration::from_secs(10),
        "the dead letter in the classic queue",
        || async { (broker.depth(&s.amqp.dead_letter_queue).await == 1).then_some(()) },
    )
    .await;
    let _ = conn.close().await;
}
