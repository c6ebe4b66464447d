//! THE topology declarer: every exchange, queue, binding and argument of async-pay is declared
//! here and nowhere else. Declaring is idempotent, so every role calls [`declare`] at start and
//! after every reconnect. Declaring an existing queue with other arguments fails with 406
//! PRECONDITION_FAILED (logged by the channel callback): change arguments with a new queue name.
//!
//! Both queues are quorum queues, so in a RabbitMQ cluster they are replicated and survive the
//! loss of a minority of the nodes. No `x-quorum-initial-group-size` is given, on purpose: the
//! broker's default already places a replica on every node of a 3-node cluster (RabbitMQ 3.10:
//! on every member; later versions: on three), and the argument is part of a queue's identity
//! (verified on 3.10: adding it to a queue declared without it is a 406), so setting it now
//! would stop every existing deployment from starting.

use std::time::Duration;

use amqprs::FieldTable;
use amqprs::channel::{
    Channel, ExchangeDeclareArguments, QueueBindArguments, QueueDeclareArguments,
};
use amqprs::connection::Connection;
use anyhow::Context;

use super::{field_name, open_channel};
use crate::config::AmqpSettings;

/// How long declaring may take: a healthy broker needs milliseconds; a node that hung after
/// accepting the connection never answers, and the role should reconnect to another.
const DECLARE_TIMEOUT: Duration = Duration::from_secs(10);

/// Declares everything on channels of its own (closed afterwards), so a refused declaration
/// cannot take the caller's channel with it.
pub async fn declare(conn: &Connection, s: &AmqpSettings) -> anyhow::Result<()> {
    tokio::time::timeout(DECLARE_TIMEOUT, declare_all(conn, s))
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "RabbitMQ did not answer declaring the topology within {DECLARE_TIMEOUT:?}"
            )
        })?
}

async fn declare_all(conn: &Connection, s: &AmqpSettings) -> anyhow::Result<()> {
    let ch = open_channel(conn).await?;
    exchanges(&ch, s).await?;
    work_queue(&ch, s).await?;
    let ch = match dead_letter_queue(&ch, s).await {
        Ok(()) => ch,
        Err(e) => legacy_dead_letter_queue(conn, s, e).await?,
    };
    ch.queue_bind(
        QueueBindArguments::new(
            &s.dead_letter_queue,
            &s.dead_letter_exchange,
            &s.dead_letter_queue,
        )
        .finish(),
    )
    .await
    .with_context(|| {
        format!(
            "cannot bind queue {} to {}",
            s.dead_letter_queue, s.dead_letter_exchange
        )
    })?;
    let _ = ch.close().await;
    Ok(())
}

async fn exchanges(ch: &Channel, s: &AmqpSettings) -> anyhow::Result<()> {
    // Both exchanges are durable so they survive a broker restart with their bindings.
    for exchange in [&s.exchange, &s.dead_letter_exchange] {
        ch.exchange_declare(
            ExchangeDeclareArguments::new(exchange, "direct")
                .durable(true)
                .finish(),
        )
        .await
        .with_context(|| format!("cannot declare exchange {exchange}"))?;
    }
    Ok(())
}

/// The queue the consumers read, bound to the payments exchange.
async fn work_queue(ch: &Channel, s: &AmqpSettings) -> anyhow::Result<()> {
    let mut args = FieldTable::new();
    // Quorum queue: replicated, and it counts deliveries per message (x-delivery-count), which
    // is what makes a delivery limit possible at all.
    args.insert(field_name("x-queue-type"), "quorum".into());
    // Poison-message backstop: after this many redeliveries the broker dead-letters the message
    // itself, even if every consumer dies while handling it.
    args.insert(
        field_name("x-delivery-limit"),
        amqprs::FieldValue::l(i64::from(s.delivery_limit)),
    );
    // Where rejected and over-limit messages go.
    args.insert(
        field_name("x-dead-letter-exchange"),
        s.dead_letter_exchange.as_str().into(),
    );
    args.insert(
        field_name("x-dead-letter-routing-key"),
        s.dead_letter_queue.as_str().into(),
    );
    // At-least-once dead-lettering: the message stays in this queue until the dead-letter queue
    // has confirmed it, so a dead letter is never dropped on the way (the default is at-most-once).
    args.insert(field_name("x-dead-letter-strategy"), "at-least-once".into());
    // Required by at-least-once dead-lettering: when the queue is full, refuse new publishes
    // (the relay sees a nack and retries) instead of dropping the oldest messages.
    args.insert(field_name("x-overflow"), "reject-publish".into());
    // Quorum queues must be durable.
    ch.queue_declare(
        QueueDeclareArguments::new(&s.queue)
            .durable(true)
            .arguments(args)
            .finish(),
    )
    .await
    .with_context(|| format!("cannot declare queue {}", s.queue))?;
    ch.queue_bind(QueueBindArguments::new(&s.queue, &s.exchange, &s.routing_key).finish())
        .await
        .with_context(|| format!("cannot bind queue {} to {}", s.queue, s.exchange))?;
    Ok(())
}

/// The dead-letter queue, where dead letters are kept until dlq-watch has recorded them in the
/// database: a quorum queue too, without limits (a classic queue lives on one node, and while
/// that node is down every role's declaration of it fails with 404, verified on 3.10). No
/// `x-delivery-limit`: dlq-watch never rejects a dead letter, and it waits out a database outage
/// holding the message rather than handing it back (RabbitMQ 4.0-4.2 apply a default limit of 20
/// acquisitions to a quorum queue without one).
async fn dead_letter_queue(ch: &Channel, s: &AmqpSettings) -> anyhow::Result<()> {
    let mut args = FieldTable::new();
    args.insert(field_name("x-queue-type"), "quorum".into());
    ch.queue_declare(
        QueueDeclareArguments::new(&s.dead_letter_queue)
            .durable(true)
            .arguments(args)
            .finish(),
    )
    .await
    .with_context(|| format!("cannot declare queue {}", s.dead_letter_queue))?;
    Ok(())
}

/// Versions before the cluster support declared the dead-letter queue as a classic queue, and a
/// queue cannot change its type. If it exists (a passive declaration on a fresh channel: the
/// refusal closed the other one), it is used as it is, with a warning; otherwise the refusal was
/// something else and is returned.
async fn legacy_dead_letter_queue(
    conn: &Connection,
    s: &AmqpSettings,
    refused: anyhow::Error,
) -> anyhow::Result<Channel> {
    let ch = open_channel(conn).await?;
    let exists = ch
        .queue_declare(
            QueueDeclareArguments::new(&s.dead_letter_queue)
                .passive(true)
                .finish(),
        )
        .await;
    if exists.is_err() {
        let _ = ch.close().await;
        return Err(refused);
    }
    log::warn!(
        "dead-letter queue {} exists with other arguments (a classic queue declared by an older \
         async-pay, say): it is used as it is, but a classic queue is unavailable while its node \
         is down. To make it a replicated quorum queue: once it is empty, stop dlq-watch, delete \
         the queue, and start the roles again",
        s.dead_letter_queue
    );
    Ok(ch)
}
