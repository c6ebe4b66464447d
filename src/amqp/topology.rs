//! THE topology declarer: every exchange, queue, binding and argument of async-pay is declared
//! here and nowhere else. Declaring is idempotent, so every role calls [`declare`] at start and
//! after every reconnect. Declaring an existing queue with other arguments fails with 406
//! PRECONDITION_FAILED (logged by the channel callback): change arguments with a new queue name.

use amqprs::FieldTable;
use amqprs::channel::{
    Channel, ExchangeDeclareArguments, QueueBindArguments, QueueDeclareArguments,
};
use anyhow::Context;

use super::field_name;
use crate::config::AmqpSettings;

pub async fn declare(ch: &Channel, s: &AmqpSettings) -> anyhow::Result<()> {
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

    // Dead letters are kept until dlq-watch has recorded them in the database: a durable classic
    // queue without limits.
    ch.queue_declare(
        QueueDeclareArguments::new(&s.dead_letter_queue)
            .durable(true)
            .finish(),
    )
    .await
    .with_context(|| format!("cannot declare queue {}", s.dead_letter_queue))?;
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
    Ok(())
}
