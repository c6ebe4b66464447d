//! `async-pay relay [--once]`: moves outbox events to RabbitMQ.
//!
//! Loop: LISTEN on `outbox_inserted` (before the first query, so no wake-up is missed), drain
//! the outbox in batches ([`drain_once`]: lock a batch with SKIP LOCKED, publish with confirms,
//! mark only the confirmed rows published, commit; up to [`DRAINS_IN_FLIGHT`] batches at once,
//! on their own connections), then sleep until a NOTIFY or `relay.poll_interval`. Several relays
//! can run at once; each row goes to one of them.
//!
//! On failure (database or broker down, channel closed, confirms missing) it logs, backs off
//! (1 s, 2 s, 4 s … 30 s), reconnects both sides and carries on; unconfirmed rows stay unpublished
//! and are sent again (a duplicate is possible, a loss is not). Published rows older than
//! `relay.retention` are deleted in batches of [`RETENTION_BATCH`].
//!
//! `--once` drains everything, prints the count and exits 0, or exits non-zero with the reason
//! when the database or the broker is unreachable: made for cron.

use std::time::Duration;

use anyhow::Context;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use futures_util::StreamExt;

use crate::amqp::publisher::{Confirm, Outgoing, Publisher};
use crate::amqp::{self, topology};
use crate::config::Settings;
use crate::db::{self, outbox};
use crate::shutdown::{Reconnect, Shutdown};

/// NOTIFY channel written by the `outbox_notify` trigger.
pub const CHANNEL: &str = "outbox_inserted";
/// Rows deleted per retention statement: small enough to never hold locks for long.
const RETENTION_BATCH: i64 = 1000;
/// How often the retention sweep runs.
const RETENTION_EVERY: Duration = Duration::from_secs(60);

/// What one [`drain_once`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Drained {
    /// Rows locked for this batch.
    pub claimed: usize,
    /// Rows the broker confirmed, now marked published.
    pub published: usize,
}

/// Publishes one batch: locks up to `batch` unpublished rows, publishes them, waits for the
/// confirms and marks the confirmed ones published, all in one transaction.
pub async fn drain_once(
    conn: &mut AsyncPgConnection,
    publisher: &Publisher,
    batch: u32,
) -> anyhow::Result<Drained> {
    conn.transaction::<_, anyhow::Error, _>(async |c| {
        let rows = outbox::claim_unpublished(c, i64::from(batch)).await?;
        if rows.is_empty() {
            return Ok(Drained::default());
        }
        let messages: Vec<Outgoing> = rows
            .iter()
            .map(|r| Outgoing {
                message_id: r.id.to_string(),
                message_type: r.event_type.clone(),
                body: serde_json::to_vec(&r.payload).unwrap_or_default(),
            })
            .collect();
        let sent_at = std::time::Instant::now();
        let verdicts = publisher
            .publish_batch(&messages)
            .await
            .inspect_err(|_| crate::metrics::relay_batch(0, rows.len(), sent_at.elapsed()))?;
        let confirmed: Vec<i64> = rows
            .iter()
            .zip(&verdicts)
            .filter(|(_, v)| **v == Confirm::Acked)
            .map(|(r, _)| r.id)
            .collect();
        if !confirmed.is_empty() {
            outbox::mark_published(c, &confirmed).await?;
        }
        let missing = rows.len() - confirmed.len();
        crate::metrics::relay_batch(confirmed.len(), missing, sent_at.elapsed());
        if missing > 0 {
            log::warn!("{missing} of {} outbox events were not confirmed by RabbitMQ; they stay unpublished", rows.len());
        }
        log::debug!("published outbox events {}..={}", rows[0].id, rows[rows.len() - 1].id);
        Ok(Drained { claimed: rows.len(), published: confirmed.len() })
    })
    .await
}

/// Connects to the broker, declares the topology and opens a confirming publisher.
pub async fn open_publisher(
    settings: &Settings,
) -> anyhow::Result<(amqprs::connection::Connection, Publisher)> {
    let conn = amqp::connect(&settings.amqp, "relay").await?;
    topology::declare(&conn, &settings.amqp).await?;
    let publisher = Publisher::open(
        &conn,
        &settings.amqp.exchange,
        &settings.amqp.routing_key,
        settings.amqp.confirm_timeout,
    )
    .await?;
    Ok((conn, publisher))
}

/// `relay --once`: publishes everything unpublished, returns how many rows.
pub async fn run_once(settings: &Settings) -> anyhow::Result<usize> {
    let mut conn = db::connect(&settings.database).await?;
    let (amqp_conn, publisher) = open_publisher(settings).await?;
    let mut total = 0;
    loop {
        let d = drain_once(&mut conn, &publisher, settings.relay.batch_size).await?;
        total += d.published;
        if d.claimed == 0 {
            break;
        }
        if d.published < d.claimed {
            anyhow::bail!(
                "RabbitMQ did not confirm {} events (published {total} before that)",
                d.claimed - d.published
            );
        }
    }
    amqp::close(amqp_conn).await;
    Ok(total)
}

/// The long-running relay, until `shutdown`.
pub async fn run(settings: Settings, shutdown: Shutdown) -> anyhow::Result<()> {
    let pool = db::pool(&settings.database)?;
    let mut last_sweep: Option<tokio::time::Instant> = None;
    let mut reconnect = Reconnect::new("relay", &shutdown);
    while !shutdown.is_triggered() {
        match session(
            &settings,
            &pool,
            &shutdown,
            &mut last_sweep,
            &mut reconnect.failures,
        )
        .await
        {
            Ok(()) => break,
            Err(e) if reconnect.after(&e).await => break,
            Err(_) => {}
        }
    }
    log::info!("relay stopped");
    Ok(())
}

/// One connected stretch: LISTEN, drain, wait, repeat; returns Err on any failure.
async fn session(
    settings: &Settings,
    pool: &db::Pool,
    shutdown: &Shutdown,
    last_sweep: &mut Option<tokio::time::Instant>,
    failures: &mut u32,
) -> anyhow::Result<()> {
    let mut listener = db::connect(&settings.database).await?;
    diesel::sql_query(format!("LISTEN {CHANNEL}"))
        .execute(&mut listener)
        .await
        .context("LISTEN failed")?;
    let (amqp_conn, publisher) = open_publisher(settings).await?;
    log::info!(
        "relay connected; publishing to exchange {}",
        settings.amqp.exchange
    );
    let mut notifications = std::pin::pin!(listener.notifications_stream());
    let batch = settings.relay.batch_size;
    // Batches in flight, each in its own transaction on its own pooled connection.
    let mut drains = futures_util::stream::FuturesUnordered::new();
    // A drain is due: at start (whatever is waiting), after a NOTIFY, a poll tick or a full batch.
    let mut due = true;
    let result = loop {
        while due && drains.len() < DRAINS_IN_FLIGHT {
            due = false;
            drains.push(drain_pooled(pool, &publisher, batch));
        }
        if drains.is_empty() && last_sweep.is_none_or(|t| t.elapsed() >= RETENTION_EVERY) {
            *last_sweep = Some(tokio::time::Instant::now());
            match db::conn(pool).await {
                Ok(mut conn) => sweep(&mut conn, settings.relay.retention).await,
                Err(e) => break Err(e.into()),
            }
        }
        if !publisher.is_open() {
            break Err(anyhow::anyhow!("the publishing channel closed"));
        }
        tokio::select! {
            Some(d) = drains.next(), if !drains.is_empty() => match d {
                Ok(d) if d.published < d.claimed => {
                    break Err(anyhow::anyhow!("RabbitMQ did not confirm {} events", d.claimed - d.published));
                }
                Ok(d) => {
                    *failures = 0;
                    // A full batch: more may be waiting.
                    due |= d.claimed >= batch as usize;
                }
                Err(e) => break Err(e),
            },
            n = notifications.next() => match n {
                // Every committed insert notifies, and one drain serves them all: take the ones
                // already queued now instead of running an empty drain for each of them.
                Some(Ok(_)) => {
                    due = true;
                    if let Err(e) = skip_queued(notifications.as_mut()) { break Err(e) }
                }
                // The stream must not be polled after it ended: reconnect instead.
                Some(Err(e)) => break Err(anyhow::Error::new(e).context("lost the LISTEN connection")),
                None => break Err(anyhow::anyhow!("the LISTEN connection ended")),
            },
            _ = tokio::time::sleep(settings.relay.poll_interval) => due = true,
            _ = shutdown.wait() => break Ok(()),
        }
    };
    // Let the batches in flight finish (each waits at most amqp.confirm_timeout for its confirms):
    // what the broker confirmed is marked published, the rest stays unpublished.
    while drains.next().await.is_some() {}
    amqp::close(amqp_conn).await;
    result
}

/// Batches a relay has in flight at once. While one waits for its confirms and its commit, the
/// next one already locks and publishes what was committed meanwhile, so an event waits for
/// about one batch instead of up to two; more would only split the work into smaller batches.
const DRAINS_IN_FLIGHT: usize = 2;

/// [`drain_once`] on a connection of its own from the pool.
async fn drain_pooled(
    pool: &db::Pool,
    publisher: &Publisher,
    batch: u32,
) -> anyhow::Result<Drained> {
    let mut conn = db::conn(pool).await?;
    drain_once(&mut conn, publisher, batch).await
}

/// Most notifications taken at once by [`skip_queued`]; a bound only, the queue is never this long.
const MAX_SKIPPED: usize = 100_000;

/// Takes the notifications that are already queued, without waiting for more. An error means the
/// LISTEN connection failed or ended: the stream must not be polled again, the caller reconnects.
fn skip_queued<S>(mut notifications: std::pin::Pin<&mut S>) -> anyhow::Result<()>
where
    S: futures_util::Stream<Item = diesel::QueryResult<diesel::pg::PgNotification>>,
{
    use futures_util::FutureExt;
    for _ in 0..MAX_SKIPPED {
        match notifications.next().now_or_never() {
            None => break,
            Some(Some(Ok(_))) => {}
            Some(Some(Err(e))) => {
                return Err(anyhow::Error::new(e).context("lost the LISTEN connection"));
            }
            Some(None) => return Err(anyhow::anyhow!("the LISTEN connection ended")),
        }
    }
    Ok(())
}

/// Deletes published rows past the retention period, a batch at a time.
pub async fn sweep(conn: &mut AsyncPgConnection, retention: Duration) {
    let cutoff = time::OffsetDateTime::now_utc() - retention;
    let mut total = 0;
    loop {
        match outbox::delete_published_before(conn, cutoff, RETENTION_BATCH).await {
            Ok(n) => {
                total += n;
                if n < RETENTION_BATCH as usize {
                    break;
                }
            }
            Err(e) => {
                log::warn!("outbox retention sweep failed: {e}");
                break;
            }
        }
    }
    if total > 0 {
        log::info!(
            "deleted {total} published outbox events older than {}",
            humantime::format_duration(retention)
        );
    }
}
