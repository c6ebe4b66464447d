//! `async-pay consume`: processes payment events, reconciles unknown gateway outcomes, and sends
//! webhooks.
//!
//! Loop: consume `amqp.queue` with manual acks and `amqp.prefetch` messages in flight, each in
//! its own task ([`handle_one`]) that hands the payment to [`Processor::process`] (claim, ask the
//! gateway, finalise once with the webhook row, or record an unknown outcome) and then settles
//! the message. Beside it run the reconciliation sweep ([`Processor::sweep`]: status checks of
//! payments whose outcome is unknown) and the webhook sender ([`crate::webhook::Sender`]); neither
//! holds up payment processing.
//!
//! Each message is handled under the request id it carries (`amqp::correlation`): the POST's,
//! named on every log line about it (`[req …]`); the sweep and the webhook sender take it from
//! the payment and the delivery row.
//!
//! Failures: a database outage is waited out inside the task (the message stays unacked and its
//! delivery count does not grow); an unknown gateway outcome is recorded in the payment and the
//! message acked (the sweep owns it from then on; it never counts toward `delivery_limit`); a
//! provider that refuses our configuration pauses every call (the messages wait, unsettled); an
//! unexpected error is retried with `basic.reject(requeue)` after a backoff, and on delivery
//! `amqp.delivery_limit` rejected without requeue, so it lands in the dead-letter queue. A
//! malformed or oversized message, or one for an unknown payment, is acked or dead-lettered (it
//! can never succeed). A lost broker connection is reopened with backoff; unacked messages are
//! redelivered and the claim makes that harmless. A task that panics still settles its message.
//!
//! SIGTERM/SIGINT: stop taking messages, give in-flight payments `consume.shutdown_timeout`; hand
//! the rest back. Gateway calls already under way are never cut: each ends within
//! `gateway.timeout` and its outcome is recorded before the process exits.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures_util::FutureExt;

use crate::amqp::consumer::{Delivery, Session, Settle};
use crate::amqp::correlation;
use crate::config::Settings;
use crate::db;
use crate::domain::events::PaymentEvent;
use crate::gateway::{self, Gateway};
use crate::logging;
use crate::processing::{Failure, Outcome, Processor, panic_message};
use crate::shutdown::{MAX_BACKOFF, Reconnect, Shutdown, backoff};
use crate::webhook;

/// Largest message body processed. A `payment.created` event is under 100 bytes; a bigger body
/// is not ours, and holding it for `amqp.prefetch` messages at once would cost memory for
/// nothing: it is dead-lettered at once (with the reason in the log), where `dlq list` shows it.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// What to tell the broker about a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// Done with it: processed, or impossible to process (malformed).
    Ack(Handled),
    /// Try again later: reject with requeue (counts toward the delivery limit).
    Retry(String),
    /// Give up: reject without requeue, so it goes to the dead-letter queue.
    DeadLetter(String),
    /// Leave it unsettled: closing the channel hands it back, at once and without a backoff
    /// (used when stopping). RabbitMQ counts the hand-back as one delivery toward the limit
    /// (seen on 3.10: `pipeline::stopping_during_a_database_outage_hands_the_message_back_…`).
    Release,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handled {
    Processed(Outcome),
    Malformed,
}

impl Disposition {
    /// The metric label of what became of the message.
    pub fn label(&self) -> &'static str {
        match self {
            Disposition::Ack(Handled::Processed(o)) => o.label(),
            Disposition::Ack(Handled::Malformed) => "malformed",
            Disposition::Retry(_) => "retry",
            Disposition::DeadLetter(_) => "dead_letter",
            Disposition::Release => "released",
        }
    }
}

/// Handles one message: `previous` is how often it was delivered before (0 the first time);
/// on delivery `limit` (`amqp.delivery_limit`) a failure dead-letters it.
pub async fn handle_one(
    processor: &Arc<Processor>,
    body: &[u8],
    previous: u32,
    limit: u32,
) -> Disposition {
    if body.len() > MAX_MESSAGE_BYTES {
        log::error!(
            "dead-lettering a message of {} bytes (over the {MAX_MESSAGE_BYTES}-byte limit): not a payment event",
            body.len()
        );
        return Disposition::DeadLetter(format!("message of {} bytes is too large", body.len()));
    }
    let Ok(event) = serde_json::from_slice::<PaymentEvent>(body) else {
        let shown = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
        log::warn!(
            "acking a malformed message ({} bytes): {shown:?}",
            body.len()
        );
        return Disposition::Ack(Handled::Malformed);
    };
    let id = event.payment_id;
    let delivery = previous + 1;
    match processor.process(id).await {
        Ok(outcome) => Disposition::Ack(Handled::Processed(outcome)),
        Err(Failure::ShuttingDown) => {
            log::info!("payment {id}: stopping before it was finished; handing the message back");
            Disposition::Release
        }
        Err(e) if delivery >= limit => {
            log::error!(
                "payment {id}: {e}; attempt {delivery} of {limit}, giving up: dead-lettering"
            );
            Disposition::DeadLetter(e.to_string())
        }
        Err(e) => {
            log::warn!("payment {id}: {e}; attempt {delivery} of {limit}, will retry");
            Disposition::Retry(e.to_string())
        }
    }
}

/// `async-pay consume` with the gateway `gateway.kind` names.
pub async fn run(settings: Settings, shutdown: Shutdown) -> anyhow::Result<()> {
    let gateway = gateway::from_settings(&settings.gateway)?;
    run_with(settings, gateway, shutdown).await
}

/// The consumer with any gateway, until `shutdown`.
pub async fn run_with(
    settings: Settings,
    gateway: Arc<dyn Gateway>,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let pool = db::pool(&settings.database)?;
    let processor = Processor::new(&settings, pool.clone(), gateway, shutdown.clone());
    let sender = Arc::new(webhook::Sender::new(
        &settings,
        pool,
        processor.webhook_wake(),
    )?);
    let sender_task = tokio::spawn(sender.run(shutdown.clone()));
    let sweep_task = tokio::spawn(processor.clone().sweep(
        settings.gateway.reconcile_interval,
        settings.gateway.stuck_after,
    ));

    let mut reconnect = Reconnect::new("consumer", &shutdown);
    while !shutdown.is_triggered() {
        match session(&settings, &processor, &shutdown, &mut reconnect.failures).await {
            Ok(()) => break,
            Err(e) if reconnect.after(&e).await => break,
            Err(_) => {}
        }
    }
    shutdown.trigger();
    let _ = sweep_task.await;
    // Calls under way end within gateway.timeout; their outcomes are written before we go.
    processor.wait_for_calls().await;
    let _ = sender_task.await;
    log::info!("consumer stopped");
    Ok(())
}

async fn session(
    settings: &Settings,
    processor: &Arc<Processor>,
    shutdown: &Shutdown,
    failures: &mut u32,
) -> anyhow::Result<()> {
    let a = &settings.amqp;
    let mut session = Session::open(a, "consume", &a.queue, a.prefetch).await?;
    log::info!(
        "consuming {} with up to {} payments in flight",
        a.queue,
        a.prefetch
    );
    let outcome = loop {
        let d = match session.next(shutdown).await {
            Ok(Some(d)) => d,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        };
        *failures = 0;
        // Every line about this message names the request id of the POST that made it.
        let request_id = correlation::of_message(d.props.as_ref()).request_id;
        let handler = handle_delivery(processor.clone(), d, a.delivery_limit);
        session.spawn(logging::scope(request_id, handler));
    };
    if outcome.is_ok() {
        // Stop taking messages, then let in-flight payments finish.
        let grace = settings.consume.shutdown_timeout;
        log::info!(
            "stopping: waiting up to {grace:?} for {} payments in flight",
            session.in_flight()
        );
        let left = session.drain(grace).await;
        if left > 0 {
            log::warn!(
                "{left} payments did not finish in time; their messages are handed back (gateway \
                 calls under way still finish and are recorded)"
            );
        }
    }
    // A task stopped here drops only its wait: a gateway call it started runs on in its own task
    // and records its outcome; the redelivered message then finds the payment final. Closing
    // returns every unacked message to the queue.
    session.close().await;
    outcome
}

/// One message's task: handles it (a panic becomes a retry), counts it, settles it.
async fn handle_delivery(processor: Arc<Processor>, d: Delivery, limit: u32) {
    let _in_flight = crate::metrics::consumer_in_flight();
    let started = std::time::Instant::now();
    let previous = d.previous_deliveries();
    let disposition = AssertUnwindSafe(handle_one(&processor, &d.body, previous, limit))
        .catch_unwind()
        .await
        .unwrap_or_else(|panic| {
            let why = panic_message(panic.as_ref());
            log::error!("a payment message task panicked ({why}); retrying the message");
            Disposition::Retry(format!("panicked: {why}"))
        });
    crate::metrics::message_handled(disposition.label(), previous, started.elapsed());
    settle(&d.settle, previous, disposition).await;
}

/// Tells the broker what became of a message. A failure here (channel gone) only means the
/// broker redelivers the message, which the claim makes harmless.
async fn settle(settle: &Settle, previous: u32, disposition: Disposition) {
    let result = match &disposition {
        Disposition::Ack(_) => settle.ack().await,
        Disposition::Retry(_) => {
            // Back off before handing it back, so a struggling dependency is not hammered.
            tokio::time::sleep(backoff(previous, MAX_BACKOFF)).await;
            settle.requeue().await
        }
        Disposition::DeadLetter(_) => settle.dead_letter().await,
        Disposition::Release => Ok(()),
    };
    if let Err(e) = result {
        log::warn!(
            "could not settle delivery {} ({disposition:?}): {e}; the broker will redeliver it",
            settle.tag()
        );
    }
}
