//! `async-pay consume`: processes payment events and sends webhooks.
//!
//! Loop: consume `amqp.queue` with manual acks and `amqp.prefetch` messages in flight, each in
//! its own task ([`Processor::handle_one`]): claim the payment (a lease in the database), ask the
//! gateway, finalise it once (`UPDATE … WHERE status = 'pending' AND claim_token = mine`) together
//! with its webhook delivery row, then ack. Beside it runs the webhook sender
//! ([`crate::webhook::Sender`]), which never holds up payment processing.
//!
//! Failures: a database outage is waited out inside the task (the message stays unacked and its
//! delivery count does not grow); a gateway error or an unexpected error is retried with
//! `basic.reject(requeue)` after a backoff, and on delivery `amqp.delivery_limit` rejected
//! without requeue, so it lands in the dead-letter queue. A malformed message or one for an
//! unknown payment is logged and acked (it can never succeed). A lost broker connection is
//! reopened with backoff; unacked messages are redelivered and the claim makes that harmless.
//!
//! SIGTERM/SIGINT: stop taking messages, give in-flight payments `consume.shutdown_timeout`,
//! release the claims of the rest (they are redelivered at once elsewhere), close.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use amqprs::channel::{
    BasicAckArguments, BasicCancelArguments, BasicConsumeArguments, BasicQosArguments,
    BasicRejectArguments, Channel,
};
use anyhow::Context;
use diesel_async::AsyncConnection;
use serde::Deserialize;
use tokio::task::JoinSet;
use uuid::Uuid;

use crate::amqp::{self, topology};
use crate::config::Settings;
use crate::db::payments::{self as payments_db, Payment};
use crate::db::{self, DbError, Pool};
use crate::domain::{self, PaymentStatus};
use crate::gateway::{Gateway, GatewayError, SimulatedGateway};
use crate::shutdown::{MAX_BACKOFF, Reconnect, Shutdown, backoff};
use crate::webhook;

/// Longest a waiting duplicate sleeps before looking at a claimed payment again.
const CLAIM_RECHECK: Duration = Duration::from_secs(2);

/// The message body the relay publishes for `payment.created`.
#[derive(Debug, Deserialize)]
pub struct PaymentEvent {
    pub payment_id: Uuid,
}

/// What to tell the broker about a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// Done with it: finalised now, already final, or impossible (malformed, unknown payment).
    Ack(Handled),
    /// Try again later: reject with requeue (counts toward the delivery limit).
    Retry(String),
    /// Give up: reject without requeue, so it goes to the dead-letter queue.
    DeadLetter(String),
    /// Leave it unsettled: closing the channel hands it back without counting a delivery
    /// (used when stopping).
    Release,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handled {
    Finalised(Uuid, PaymentStatus),
    AlreadyFinal(Uuid),
    UnknownPayment(Uuid),
    Malformed,
}

/// Why processing a payment did not finish.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error(transparent)]
    Gateway(#[from] GatewayError),
    #[error("database error: {0}")]
    Db(anyhow::Error),
    /// Stopped before it could finish (SIGTERM while waiting): not the message's fault.
    #[error("shutting down")]
    ShuttingDown,
    /// Our claim lapsed and the payment is still pending (the other holder gave up too).
    #[error("lost the claim while the payment is still pending")]
    LostClaim,
}

/// Payment processing, independent of RabbitMQ: tests drive [`Processor::handle_one`] directly.
pub struct Processor {
    pool: Pool,
    gateway: Arc<dyn Gateway>,
    delivery_limit: u32,
    lease: Duration,
    /// Claim tokens of payments being processed now, released on shutdown.
    active: Mutex<HashSet<(Uuid, Uuid)>>,
    /// Wakes the webhook sender when a delivery was just written.
    webhook_wake: Arc<tokio::sync::Notify>,
    shutdown: Shutdown,
}

impl Processor {
    pub fn new(
        settings: &Settings,
        pool: Pool,
        gateway: Arc<dyn Gateway>,
        shutdown: Shutdown,
    ) -> Self {
        Processor {
            pool,
            gateway,
            delivery_limit: settings.amqp.delivery_limit,
            lease: lease_for(settings),
            active: Mutex::new(HashSet::new()),
            webhook_wake: Arc::new(tokio::sync::Notify::new()),
            shutdown,
        }
    }

    pub fn webhook_wake(&self) -> Arc<tokio::sync::Notify> {
        self.webhook_wake.clone()
    }

    /// Handles one message: `previous` is how often it was delivered before (0 the first time).
    pub async fn handle_one(&self, body: &[u8], previous: u32) -> Disposition {
        let delivery = previous + 1;
        let Ok(event) = serde_json::from_slice::<PaymentEvent>(body) else {
            let shown = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
            log::warn!(
                "acking a malformed message ({} bytes): {shown:?}",
                body.len()
            );
            return Disposition::Ack(Handled::Malformed);
        };
        let id = event.payment_id;
        match self.process(id).await {
            Ok(h) => Disposition::Ack(h),
            Err(Failure::ShuttingDown) => {
                log::info!(
                    "payment {id}: stopping before it was finished; handing the message back"
                );
                Disposition::Release
            }
            Err(e) if delivery >= self.delivery_limit => {
                log::error!(
                    "payment {id}: {e}; attempt {delivery} of {}, giving up: dead-lettering",
                    self.delivery_limit
                );
                Disposition::DeadLetter(e.to_string())
            }
            Err(e) => {
                log::warn!(
                    "payment {id}: {e}; attempt {delivery} of {}, will retry",
                    self.delivery_limit
                );
                Disposition::Retry(e.to_string())
            }
        }
    }

    /// Runs `work` (which takes its own pooled connection), waiting out database outages with
    /// backoff instead of failing: an outage is not the message's fault. Other errors are
    /// returned.
    async fn db<T, F, Fut>(&self, what: &str, id: Uuid, mut work: F) -> Result<T, Failure>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, DbError>>,
    {
        let mut attempt = 0;
        loop {
            match work().await {
                Ok(v) => return Ok(v),
                Err(DbError::Unavailable(why)) => {
                    let wait = backoff(attempt, MAX_BACKOFF);
                    attempt += 1;
                    log::warn!(
                        "payment {id}: database unavailable while trying to {what} ({why}); retrying in {wait:?}"
                    );
                    if self.shutdown.sleep(wait).await {
                        return Err(Failure::ShuttingDown);
                    }
                }
                Err(DbError::Other(e)) => {
                    return Err(Failure::Db(e.context(format!("cannot {what}"))));
                }
            }
        }
    }

    async fn process(&self, id: Uuid) -> Result<Handled, Failure> {
        let token = Uuid::new_v4();
        let lease = self.lease;
        let pool = &self.pool;
        let payment: Payment = loop {
            let claimed = self
                .db("claim the payment", id, || async {
                    let mut c = db::conn(pool).await?;
                    Ok(payments_db::claim(&mut c, id, token, lease).await?)
                })
                .await?;
            if let Some(p) = claimed {
                break p;
            }
            let state = self
                .db("read the payment", id, || async {
                    let mut c = db::conn(pool).await?;
                    Ok(payments_db::claim_state(&mut c, id).await?)
                })
                .await?;
            match state {
                None => {
                    log::warn!("payment {id}: no such payment; acking the message");
                    return Ok(Handled::UnknownPayment(id));
                }
                Some(s) if s.status != "pending" => {
                    log::info!(
                        "payment {id}: already {}; acking the duplicate message",
                        s.status
                    );
                    return Ok(Handled::AlreadyFinal(id));
                }
                Some(s) => {
                    // Another consumer holds it (a duplicate delivery, or one that died and
                    // whose claim has not lapsed yet): look again when its claim may be over.
                    let left = Duration::from_millis(s.claim_left_ms.unwrap_or(0).max(50) as u64);
                    log::debug!("payment {id}: claimed elsewhere for {left:?} more; waiting");
                    if self.shutdown.sleep(left.min(CLAIM_RECHECK)).await {
                        return Err(Failure::ShuttingDown);
                    }
                }
            }
        };
        self.track(id, token, true);
        let result = self.charge_and_finalise(&payment, token).await;
        self.track(id, token, false);
        result
    }

    async fn charge_and_finalise(
        &self,
        payment: &Payment,
        token: Uuid,
    ) -> Result<Handled, Failure> {
        let id = payment.id;
        let pool = &self.pool;
        let status = match self.gateway.charge(payment).await {
            Ok(s) => s,
            Err(e) => {
                // Let the retry claim it at once instead of after the lease.
                let _ = self
                    .db("release the claim", id, || async {
                        let mut c = db::conn(pool).await?;
                        Ok(payments_db::release_claims(&mut c, &[(id, token)]).await?)
                    })
                    .await;
                return Err(e.into());
            }
        };
        let finalised = self
            .db("finalise the payment", id, || async {
                let mut c = db::conn(pool).await?;
                Ok(c.transaction::<_, diesel::result::Error, _>(async |tx| {
                    let Some(p) = payments_db::finalise(tx, id, token, status).await? else {
                        return Ok(None);
                    };
                    webhook::schedule(tx, &p, None).await?;
                    Ok(Some(p))
                })
                .await?)
            })
            .await?;
        match finalised {
            Some(p) => {
                log::info!(
                    "payment {id} {status} ({} {}, merchant {})",
                    domain::format_amount(p.amount),
                    p.currency,
                    p.merchant
                );
                if p.webhook_url.is_some() {
                    self.webhook_wake.notify_one();
                }
                Ok(Handled::Finalised(id, status))
            }
            None => {
                // Our claim lapsed and someone else took the payment over. If they finalised it,
                // their outcome stands; if it is still pending, try again later.
                let state = self
                    .db("read the payment", id, || async {
                        let mut c = db::conn(pool).await?;
                        Ok(payments_db::claim_state(&mut c, id).await?)
                    })
                    .await?;
                if state.is_some_and(|s| s.status == "pending") {
                    return Err(Failure::LostClaim);
                }
                log::warn!(
                    "payment {id}: lost the claim before finalising; the other consumer's outcome stands"
                );
                Ok(Handled::AlreadyFinal(id))
            }
        }
    }

    fn track(&self, id: Uuid, token: Uuid, active: bool) {
        let mut set = self.active.lock().unwrap_or_else(|e| e.into_inner());
        if active {
            set.insert((id, token));
        } else {
            set.remove(&(id, token));
        }
    }

    /// Releases the claims of payments still in flight (shutdown), so they are redelivered and
    /// processed at once elsewhere instead of after their lease.
    pub async fn release_active(&self) {
        let tokens: Vec<(Uuid, Uuid)> = self
            .active
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .collect();
        if tokens.is_empty() {
            return;
        }
        match db::conn(&self.pool).await {
            Ok(mut c) => match payments_db::release_claims(&mut c, &tokens).await {
                Ok(n) => log::info!("released {n} unfinished payment claims"),
                Err(e) => log::warn!(
                    "could not release {} claims ({e}); they lapse by themselves",
                    tokens.len()
                ),
            },
            Err(e) => log::warn!(
                "could not release {} claims ({e}); they lapse by themselves",
                tokens.len()
            ),
        }
    }
}

/// How long a claim lasts: long enough for the slowest gateway answer, with room to spare. A
/// consumer that dies leaves its payments to others after at most this long.
pub fn lease_for(settings: &Settings) -> Duration {
    settings.gateway.max_delay * 2 + Duration::from_secs(5)
}

/// `async-pay consume` with the simulated gateway.
pub async fn run(settings: Settings, shutdown: Shutdown) -> anyhow::Result<()> {
    let gateway = Arc::new(SimulatedGateway::new(&settings.gateway));
    run_with(settings, gateway, shutdown).await
}

/// The consumer with any gateway, until `shutdown`.
pub async fn run_with(
    settings: Settings,
    gateway: Arc<dyn Gateway>,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let pool = db::pool(&settings.database)?;
    let processor = Arc::new(Processor::new(
        &settings,
        pool.clone(),
        gateway,
        shutdown.clone(),
    ));
    let sender = Arc::new(webhook::Sender::new(
        &settings,
        pool,
        processor.webhook_wake(),
    )?);
    let sender_task = tokio::spawn(sender.run(shutdown.clone()));

    let mut reconnect = Reconnect::new("consumer", &shutdown);
    while !shutdown.is_triggered() {
        match session(&settings, &processor, &shutdown, &mut reconnect.failures).await {
            Ok(()) => break,
            Err(e) if reconnect.after(&e).await => break,
            Err(_) => {}
        }
    }
    shutdown.trigger();
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
    let conn = amqp::connect(&settings.amqp, "consume").await?;
    topology::declare(&conn, &settings.amqp).await?;
    let ch = amqp::open_channel(&conn).await?;
    ch.basic_qos(BasicQosArguments::new(0, settings.amqp.prefetch, false))
        .await
        .context("basic.qos failed")?;
    let tag = format!("async-pay-consume-{}", Uuid::new_v4().simple());
    let (tag, mut rx) = ch
        .basic_consume_rx(
            BasicConsumeArguments::new(&settings.amqp.queue, &tag)
                .manual_ack(true)
                .finish(),
        )
        .await
        .context("basic.consume failed")?;
    log::info!(
        "consuming {} with up to {} payments in flight",
        settings.amqp.queue,
        settings.amqp.prefetch
    );
    let mut tasks = JoinSet::new();
    let outcome = loop {
        tokio::select! {
            msg = rx.recv() => {
                let Some(msg) = msg else { break Err(anyhow::anyhow!("the broker connection was lost")) };
                *failures = 0;
                let (Some(deliver), Some(body)) = (msg.deliver, msg.content) else { continue };
                let previous = amqp::previous_deliveries(msg.basic_properties.as_ref());
                let (p, ch2) = (processor.clone(), ch.clone());
                tasks.spawn(async move {
                    let _in_flight = crate::metrics::consumer_in_flight();
                    let started = std::time::Instant::now();
                    let disposition = p.handle_one(&body, previous).await;
                    crate::metrics::message_handled(&disposition, previous, started.elapsed());
                    settle(&ch2, deliver.delivery_tag(), previous, disposition).await;
                });
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            _ = shutdown.wait() => break Ok(()),
        }
    };
    if outcome.is_ok() {
        // Stop taking messages, then let in-flight payments finish.
        let _ = ch.basic_cancel(BasicCancelArguments::new(&tag)).await;
        let grace = settings.consume.shutdown_timeout;
        log::info!(
            "stopping: waiting up to {grace:?} for {} payments in flight",
            tasks.len()
        );
        let drained =
            tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            log::warn!(
                "{} payments did not finish in time; they are released and redelivered",
                tasks.len()
            );
        }
    }
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    processor.release_active().await;
    // Closing returns every unacked message to the queue.
    let _ = ch.close().await;
    let _ = conn.close().await;
    outcome
}

/// Tells the broker what became of a message. A failure here (channel gone) only means the
/// broker redelivers the message, which the claim makes harmless.
async fn settle(ch: &Channel, tag: u64, previous: u32, disposition: Disposition) {
    let result = match &disposition {
        Disposition::Ack(_) => ch.basic_ack(BasicAckArguments::new(tag, false)).await,
        Disposition::Retry(_) => {
            // Back off before handing it back, so a struggling dependency is not hammered.
            tokio::time::sleep(backoff(previous, MAX_BACKOFF)).await;
            ch.basic_reject(BasicRejectArguments::new(tag, true)).await
        }
        Disposition::DeadLetter(_) => ch.basic_reject(BasicRejectArguments::new(tag, false)).await,
        Disposition::Release => Ok(()),
    };
    if let Err(e) = result {
        log::warn!(
            "could not settle delivery {tag} ({disposition:?}): {e}; the broker will redeliver it"
        );
    }
}
