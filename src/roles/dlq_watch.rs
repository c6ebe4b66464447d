//! `async-pay dlq-watch`: makes the dead-letter queue visible, durable and queryable.
//!
//! Loop: consume `amqp.dead_letter_queue`; for each message write a `dead_letters` row (message
//! id, payment id, `x-death` reason and count, original queue, body, headers) and only then ack
//! it; log it at WARN, under the request id the message carries (`[req …]`, the POST's).
//! Recording is idempotent on the message id, so a redelivery after a crash between insert and
//! ack changes nothing. While the database is down the message stays unacked (and in the queue)
//! and the insert is retried with backoff; a lost broker connection is reopened with backoff.
//! Text the database cannot hold (a NUL byte in the message id or a header) is escaped; a row
//! the database refuses for any other reason is parked (body, payment id and the refusal, reason
//! `unrecordable`) and acked, so no dead letter blocks the ones behind it.

use amqprs::BasicProperties;
use sha2::{Digest, Sha256};

use crate::amqp::{self, consumer::Session, correlation};
use crate::config::Settings;
use crate::db::dead_letters::{self, NewDeadLetter};
use crate::db::{self, DbError, Pool};
use crate::domain::events::PaymentEvent;
use crate::logging;
use crate::shutdown::{MAX_BACKOFF, Reconnect, Shutdown, backoff};

/// Dead letters the broker hands over ahead of the one being recorded (they are recorded one at
/// a time, in order); they are rare, this only bounds a burst.
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

/// Reason written for a parked dead letter, next to the original reason in its headers.
const PARKED_REASON: &str = "unrecordable";

/// Records one dead letter. Waits out database outages; any other refusal parks it, so one
/// message can never hold up the ones behind it. A row written already (a redelivery after a
/// crash between insert and ack) is left as it is.
pub async fn record(
    pool: &Pool,
    props: Option<&BasicProperties>,
    body: &[u8],
    shutdown: &Shutdown,
) -> anyhow::Result<()> {
    let death = death_of(props);
    let headers = dead_letters::storable_json(
        props
            .and_then(|p| p.headers())
            .map(amqp::table_to_json)
            .unwrap_or_default(),
    );
    // Messages without an id (published by hand) get one derived from their content.
    let raw_id = props
        .and_then(|p| p.message_id().cloned())
        .unwrap_or_else(|| format!("sha256:{:x}", Sha256::digest(body)));
    let message_id = dead_letters::storable(&raw_id);
    let reason = dead_letters::storable(&death.reason);
    let queue = death.queue.as_deref().map(dead_letters::storable);
    let payment_id = serde_json::from_slice::<PaymentEvent>(body)
        .ok()
        .map(|e| e.payment_id);
    let payment = payment_id.map_or_else(|| "unknown".to_string(), |p| p.to_string());
    let row = NewDeadLetter {
        message_id: &message_id,
        payment_id,
        reason: &reason,
        death_count: death.count,
        original_queue: queue.as_deref(),
        body,
        headers: &headers,
    };
    let mut attempt = 0;
    loop {
        let refused = match insert(pool, &row, shutdown).await? {
            Ok(new) => {
                if new {
                    crate::metrics::dead_letter(&reason);
                    log::warn!(
                        "dead letter {message_id}: payment {payment}, reason {reason}, count {}, \
                         from {}",
                        death.count,
                        queue.as_deref().unwrap_or("?")
                    );
                }
                return Ok(());
            }
            Err(refused) => refused,
        };
        // Parked: only values no rule of the table can refuse (ASCII text, the body as bytes),
        // under an id derived from the original one, so a redelivery of the same message is a
        // duplicate.
        let why = format!("{refused:#}").escape_default().to_string();
        let parked_id = format!("{PARKED_REASON}:sha256:{:x}", Sha256::digest(&raw_id));
        let parked_headers = serde_json::json!({
            PARKED_REASON: why,
            "message_id": raw_id.escape_default().to_string(),
            "reason": death.reason.escape_default().to_string(),
        });
        let parked = NewDeadLetter {
            message_id: &parked_id,
            payment_id,
            reason: PARKED_REASON,
            death_count: death.count,
            original_queue: None,
            body,
            headers: &parked_headers,
        };
        match insert(pool, &parked, shutdown).await? {
            Ok(new) => {
                if new {
                    crate::metrics::dead_letter(&reason);
                    log::error!(
                        "dead letter {message_id}: the database refused it ({why}); parked as \
                         {parked_id} with its body, payment {payment}"
                    );
                }
                return Ok(());
            }
            // Even a row of plain values is refused: the database refuses every write (a
            // read-only primary, a broken table), not this message. Keep it unacked and try
            // the real row again, so it is not parked for what was the database's fault.
            Err(e) => {
                let wait = backoff(attempt, MAX_BACKOFF);
                attempt += 1;
                log::error!(
                    "dead letter {message_id}: cannot record it ({why}) nor park it ({e:#}); \
                     retrying in {wait:?}"
                );
                if shutdown.sleep(wait).await {
                    anyhow::bail!("shutting down before dead letter {message_id} was recorded");
                }
            }
        }
    }
}

/// Inserts a dead-letter row, waiting out database outages: `Ok(Ok(new))` once written (or
/// found), `Ok(Err(why))` when the database refuses it, `Err` when shutting down first.
async fn insert(
    pool: &Pool,
    row: &NewDeadLetter<'_>,
    shutdown: &Shutdown,
) -> anyhow::Result<Result<bool, anyhow::Error>> {
    let mut attempt = 0;
    loop {
        let result = async {
            let mut conn = db::conn(pool).await?;
            Ok::<_, DbError>(dead_letters::record(&mut conn, row).await?)
        }
        .await;
        match result {
            Ok(new) => return Ok(Ok(new)),
            Err(DbError::Other(e)) => return Ok(Err(e)),
            Err(DbError::Unavailable(why)) => {
                let wait = backoff(attempt, MAX_BACKOFF);
                attempt += 1;
                log::warn!(
                    "dead letter {}: database unavailable ({why}); retrying in {wait:?}",
                    row.message_id
                );
                if shutdown.sleep(wait).await {
                    anyhow::bail!(
                        "shutting down before dead letter {} was recorded",
                        row.message_id
                    );
                }
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
    let a = &settings.amqp;
    let mut session = Session::open(a, "dlq-watch", &a.dead_letter_queue, PREFETCH).await?;
    log::info!("watching dead-letter queue {}", a.dead_letter_queue);
    let result = loop {
        let d = match session.next(shutdown).await {
            Ok(Some(d)) => d,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        };
        *failures = 0;
        // Not recorded (shutting down): not acked, so the message stays in the queue and comes
        // back after reconnecting.
        // Logged under the request id of the POST that made the payment.
        let request_id = correlation::of_message(d.props.as_ref()).request_id;
        let recorded = logging::scope(
            request_id,
            record(pool, d.props.as_ref(), &d.body, shutdown),
        );
        if let Err(e) = recorded.await {
            break Err(e);
        }
        if let Err(e) = d.settle.ack().await {
            break Err(anyhow::Error::new(e).context("basic.ack failed"));
        }
    };
    session.close().await;
    result
}
