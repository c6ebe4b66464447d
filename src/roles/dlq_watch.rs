//! `async-pay dlq-watch`: makes the dead-letter queue visible, durable and queryable.
//!
//! Loop: consume `amqp.dead_letter_queue`; for each message write a `dead_letters` row (message
//! id, payment id, `x-death` reason and count, original queue, body, headers) and only then ack
//! it; log it at WARN. Recording is idempotent on the message id, so a redelivery after a crash
//! between insert and ack changes nothing. While the database is down the message stays unacked
//! (and in the queue) and the insert is retried with backoff; a lost broker connection is
//! reopened with backoff.

use amqprs::BasicProperties;
use amqprs::channel::{BasicAckArguments, BasicConsumeArguments, BasicQosArguments};
use anyhow::Context;
use sha2::{Digest, Sha256};

use crate::amqp::{self, topology};
use crate::config::Settings;
use crate::db::dead_letters::{self, NewDeadLetter};
use crate::db::{self, DbError, Pool};
use crate::roles::consume::PaymentEvent;
use crate::shutdown::{MAX_BACKOFF, Reconnect, Shutdown, backoff};

/// Dead letters recorded concurrently; they are rare, this only bounds a burst.
const PREFETCH: u16 = 32;

/// What the `x-death` header says about a dead letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Death {
    pub reason: String,
    pub count: i64,
    pub queue: Option<String>,
}

/// Reads the newest `x-death` entry (falling back to `x-first-death-*`).
pub fn death_of(props: Option<&BasicProperties>) -> Death {
    let headers = props.and_then(|p| p.headers());
    let json = headers.map(amqp::table_to_json).unwrap_or_default();
    let first = json["x-death"]
        .as_array()
        .and_then(|a| a.first())
        .cloned()
        .unwrap_or_default();
    Death {
        reason: first["reason"]
            .as_str()
            .or(json["x-first-death-reason"].as_str())
            .unwrap_or("unknown")
            .to_string(),
        count: first["count"].as_i64().unwrap_or(1),
        queue: first["queue"]
            .as_str()
            .or(json["x-first-death-queue"].as_str())
            .map(str::to_string),
    }
}

/// Records one dead letter; true if it was new. Waits out database outages.
pub async fn record(
    pool: &Pool,
    props: Option<&BasicProperties>,
    body: &[u8],
    shutdown: &Shutdown,
) -> anyhow::Result<bool> {
    let death = death_of(props);
    let headers = props
        .and_then(|p| p.headers())
        .map(amqp::table_to_json)
        .unwrap_or_default();
    // Messages without an id (published by hand) get one derived from their content.
    let message_id = props
        .and_then(|p| p.message_id().cloned())
        .unwrap_or_else(|| format!("sha256:{:x}", Sha256::digest(body)));
    let payment_id = serde_json::from_slice::<PaymentEvent>(body)
        .ok()
        .map(|e| e.payment_id);
    let row = NewDeadLetter {
        message_id: &message_id,
        payment_id,
        reason: &death.reason,
        death_count: death.count,
        original_queue: death.queue.as_deref(),
        body,
        headers: &headers,
    };
    let mut attempt = 0;
    loop {
        let result = async {
            let mut conn = db::conn(pool).await?;
            Ok::<_, DbError>(dead_letters::record(&mut conn, &row).await?)
        }
        .await;
        match result {
            Ok(new) => {
                if new {
                    crate::metrics::dead_letter(&death.reason);
                    log::warn!(
                        "dead letter {message_id}: payment {}, reason {}, count {}, from {}",
                        payment_id
                            .map(|p| p.to_string())
                            .unwrap_or_else(|| "unknown".into()),
                        death.reason,
                        death.count,
                        death.queue.as_deref().unwrap_or("?")
                    );
                }
                return Ok(new);
            }
            Err(DbError::Unavailable(why)) => {
                let wait = backoff(attempt, MAX_BACKOFF);
                attempt += 1;
                log::warn!(
                    "dead letter {message_id}: database unavailable ({why}); retrying in {wait:?}"
                );
                if shutdown.sleep(wait).await {
                    anyhow::bail!("shutting down before dead letter {message_id} was recorded");
                }
            }
            Err(DbError::Other(e)) => {
                return Err(e.context(format!("cannot record dead letter {message_id}")));
            }
        }
    }
}

pub async fn run(settings: Settings, shutdown: Shutdown) -> anyhow::Result<()> {
    let pool = db::pool(&settings.database)?;
    let mut reconnect = Reconnect::new("dlq-watch", &shutdown);
    while !shutdown.is_triggered() {
        match session(&settings, &pool, &shutdown, &mut reconnect.failures).await {
            Ok(()) => break,
            Err(e) if reconnect.after(&e).await => break,
            Err(_) => {}
        }
    }
    log::info!("dlq-watch stopped");
    Ok(())
}

async fn session(
    settings: &Settings,
    pool: &Pool,
    shutdown: &Shutdown,
    failures: &mut u32,
) -> anyhow::Result<()> {
    let conn = amqp::connect(&settings.amqp, "dlq-watch").await?;
    topology::declare(&conn, &settings.amqp).await?;
    let ch = amqp::open_channel(&conn).await?;
    ch.basic_qos(BasicQosArguments::new(0, PREFETCH, false))
        .await
        .context("basic.qos failed")?;
    let (_, mut rx) = ch
        .basic_consume_rx(
            BasicConsumeArguments::new(&settings.amqp.dead_letter_queue, "")
                .manual_ack(true)
                .finish(),
        )
        .await
        .context("basic.consume failed")?;
    log::info!(
        "watching dead-letter queue {}",
        settings.amqp.dead_letter_queue
    );
    let result = loop {
        tokio::select! {
            msg = rx.recv() => {
                let Some(msg) = msg else { break Err(anyhow::anyhow!("the broker connection was lost")) };
                *failures = 0;
                let (Some(deliver), Some(body)) = (msg.deliver, msg.content) else { continue };
                match record(pool, msg.basic_properties.as_ref(), &body, shutdown).await {
                    Ok(_) => {
                        ch.basic_ack(BasicAckArguments::new(deliver.delivery_tag(), false))
                            .await
                            .context("basic.ack failed")?;
                    }
                    // Not acked: the message stays in the queue and comes back after reconnecting.
                    Err(e) => break Err(e),
                }
            }
            _ = shutdown.wait() => break Ok(()),
        }
    };
    amqp::close(conn).await;
    result
}
