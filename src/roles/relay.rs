//! `async-pay relay [--once]`: moves outbox events to RabbitMQ.
//!
//! Loop: drain the outbox in batches ([`drain_once`]: lock a batch with SKIP LOCKED, publish
//! with confirms, mark only the confirmed rows published, commit; up to [`DRAINS_IN_FLIGHT`]
//! batches at once, on their own connections), paced by [`Pace`]: a full batch is followed at
//! once by the next, a batch with events by another look after `relay.poll_interval` (2 ms), and
//! each look that finds nothing doubles the wait up to `relay.idle_poll_interval` (50 ms). A look
//! is one indexed read of the partial index of unpublished rows, so nothing is put on the
//! writers' commit path: no trigger, no NOTIFY (a transaction that has called `pg_notify` takes
//! an instance-wide lock at commit, which held POSTs at 40 % of what PostgreSQL commits without
//! it; bench/README.md). Several relays can run at once; each row goes to one of them.
//!
//! Each event is logged once the broker has answered for it, on a line that names its payment and
//! the request id of the POST that wrote it (`[req …]`); the message carries that request id and
//! the client's `traceparent` as headers (`amqp::correlation`).
//!
//! On failure (database or broker down, channel closed, confirms missing) it logs, backs off
//! (1 s, 2 s, 4 s … 30 s), reconnects both sides and carries on; unconfirmed rows stay unpublished
//! and are sent again (a duplicate is possible, a loss is not).
//!
//! Beside the loop, its own task keeps the outbox small ([`housekeep`], every
//! [`HOUSEKEEPING_EVERY`]): published rows older than `relay.retention` are deleted in batches of
//! [`RETENTION_BATCH`], then the outbox is vacuumed, so its dead tuples stay bounded whatever the
//! server's autovacuum does.
//!
//! `--once` drains everything, keeps house once, prints the count and exits 0, or exits non-zero
//! with the reason when the database or the broker is unreachable: made for cron.

use std::time::Duration;

use diesel_async::{AsyncConnection, AsyncPgConnection};
use futures_util::StreamExt;

use crate::amqp::publisher::{Confirm, Outgoing, Publisher};
use crate::amqp::{self, correlation, topology};
use crate::config::Settings;
use crate::db;
use crate::db::outbox::{self, OutboxEvent};
use crate::domain::correlation::Correlation;
use crate::logging;
use crate::shutdown::{Reconnect, Shutdown};

/// The options of `async-pay relay`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Publish everything unpublished, print how many, exit (for cron); 1 when unreachable.
    #[arg(long)]
    pub once: bool,
}

/// Rows deleted per retention statement: small enough to never hold locks for long.
const RETENTION_BATCH: i64 = 1000;
/// How often [`housekeep`] runs. Every event leaves two dead tuples in the outbox (marked
/// published: an UPDATE that is never HOT; deleted after retention), which only a VACUUM makes
/// reusable. The server's autovacuum may be off (it is on the bench machine) and visits a
/// database at most once per `autovacuum_naptime` (1 min by default); vacuuming every 10 s bounds
/// the dead tuples to about 10 s of churn (10,000 rows at 1,000 events/s) at the price of one
/// VACUUM of the pages changed meanwhile.
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(10);

/// What one [`drain_once`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Drained {
    /// Rows locked for this batch.
    pub claimed: usize,
    /// Rows the broker confirmed, now marked published.
    pub published: usize,
}

/// Publishes one batch: locks up to `batch` unpublished rows, publishes them, waits for the
/// confirms and marks the confirmed ones published, all in one transaction; then logs a line per
/// event (after the commit, so nothing is logged as done that the database did not keep, and no
/// log write holds the rows' locks).
pub async fn drain_once(
    conn: &mut AsyncPgConnection,
    publisher: &Publisher,
    batch: u32,
) -> anyhow::Result<Drained> {
    let (rows, verdicts) = conn
        .transaction::<_, anyhow::Error, _>(async |c| {
            let rows = outbox::claim_unpublished(c, i64::from(batch)).await?;
            if rows.is_empty() {
                return Ok((rows, Vec::new()));
            }
            let messages: Vec<Outgoing> = rows
                .iter()
                .map(|r| Outgoing {
                    message_id: r.id.to_string(),
                    message_type: r.event_type.clone(),
                    body: serde_json::to_vec(&r.payload).unwrap_or_default(),
                    headers: correlation::headers(&Correlation {
                        request_id: r.request_id.clone(),
                        traceparent: r.traceparent.clone(),
                    }),
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
                log::warn!(
                    "{missing} of {} outbox events were not confirmed by RabbitMQ; they stay \
                 unpublished",
                    rows.len()
                );
            }
            Ok((rows, verdicts))
        })
        .await?;
    for (r, v) in rows.iter().zip(&verdicts) {
        log_event(r, *v);
    }
    Ok(Drained {
        claimed: rows.len(),
        published: verdicts.iter().filter(|v| **v == Confirm::Acked).count(),
    })
}

/// One line per event, under the request id of the POST that wrote it: what the broker said.
fn log_event(r: &OutboxEvent, verdict: Confirm) {
    let payment = r.payload["payment_id"].as_str().unwrap_or("-");
    logging::with_id(r.request_id.as_deref(), || match verdict {
        Confirm::Acked => log::info!(
            "outbox event {} ({} of payment {payment}) confirmed by RabbitMQ",
            r.id,
            r.event_type
        ),
        Confirm::NotSent => log::warn!(
            "outbox event {} ({} of payment {payment}) not confirmed by RabbitMQ; it stays \
             unpublished and is sent again",
            r.id,
            r.event_type
        ),
    });
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
    housekeep(&mut conn, settings.relay.retention).await;
    Ok(total)
}

/// The long-running relay, until `shutdown`.
pub async fn run(settings: Settings, shutdown: Shutdown) -> anyhow::Result<()> {
    let pool = db::pool(&settings.database)?;
    let housekeeping = tokio::spawn(housekeeping(
        pool.clone(),
        settings.relay.retention,
        shutdown.clone(),
    ));
    let mut reconnect = Reconnect::new("relay", &shutdown);
    while !shutdown.is_triggered() {
        match session(&settings, &pool, &shutdown, &mut reconnect.failures).await {
            Ok(()) => break,
            Err(e) if reconnect.after(&e).await => break,
            Err(_) => {}
        }
    }
    let _ = housekeeping.await;
    log::info!("relay stopped");
    Ok(())
}

/// [`housekeep`] at start and then every [`HOUSEKEEPING_EVERY`], on a pooled connection, until
/// `shutdown`. A task of its own, so a long delete or VACUUM never holds up publishing.
async fn housekeeping(pool: db::Pool, retention: Duration, shutdown: Shutdown) {
    loop {
        match db::conn(&pool).await {
            Ok(mut conn) => housekeep(&mut conn, retention).await,
            Err(e) => log::warn!("outbox housekeeping skipped: {e}"),
        }
        if shutdown.sleep(HOUSEKEEPING_EVERY).await {
            break;
        }
    }
}

/// Deletes published rows past `retention` ([`sweep`]), then vacuums the outbox. Failures are
/// logged and retried next time: nothing is lost by a late sweep, the table only grows meanwhile.
pub async fn housekeep(conn: &mut AsyncPgConnection, retention: Duration) {
    sweep(conn, retention).await;
    if let Err(e) = outbox::vacuum(conn).await {
        log::warn!("vacuuming the outbox failed: {e}");
    }
}

/// One connected stretch: drain, wait as [`Pace`] says, repeat; returns Err on any failure.
async fn session(
    settings: &Settings,
    pool: &db::Pool,
    shutdown: &Shutdown,
    failures: &mut u32,
) -> anyhow::Result<()> {
    let (amqp_conn, publisher) = open_publisher(settings).await?;
    log::info!(
        "relay connected; publishing to exchange {}",
        settings.amqp.exchange
    );
    let batch = settings.relay.batch_size;
    let mut pace = Pace::new(
        settings.relay.poll_interval,
        settings.relay.idle_poll_interval,
    );
    // Batches in flight, each in its own transaction on its own pooled connection.
    let mut drains = futures_util::stream::FuturesUnordered::new();
    // A drain is due: at start (whatever is waiting), after a full batch, or when the wait is over.
    let mut due = true;
    let result = loop {
        while due && drains.len() < DRAINS_IN_FLIGHT {
            due = false;
            drains.push(drain_pooled(pool, &publisher, batch));
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
                    due |= pace.after(d.claimed, batch);
                }
                Err(e) => break Err(e),
            },
            // A look that is due while both drains are busy starts when the first one finishes.
            _ = tokio::time::sleep(pace.wait()), if !due => due = true,
            _ = shutdown.wait() => break Ok(()),
        }
    };
    // Let the batches in flight finish (each waits at most amqp.confirm_timeout for its confirms):
    // what the broker confirmed is marked published, the rest stays unpublished.
    while drains.next().await.is_some() {}
    amqp::close(amqp_conn).await;
    result
}

/// When a relay looks at the outbox next. A look costs one indexed read of the partial index of
/// unpublished rows (no WAL, no lock anyone waits for); waiting costs latency. So: a full batch
/// means more is waiting (look again at once); a batch with events means events are flowing
/// (look again after `busy`, which gathers a few milliseconds of commits into one batch and one
/// commit of our own); an empty look doubles the wait up to `idle`, so an idle relay costs
/// PostgreSQL about 1 / `idle` empty reads a second, and the first event after a quiet spell
/// waits at most `idle`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pace {
    busy: Duration,
    idle: Duration,
    wait: Duration,
}

impl Pace {
    /// `busy` is `relay.poll_interval`, `idle` is `relay.idle_poll_interval` (at least `busy`).
    pub fn new(busy: Duration, idle: Duration) -> Pace {
        Pace {
            busy,
            idle: idle.max(busy),
            wait: busy,
        }
    }

    /// Records a drain that claimed `claimed` rows of at most `batch`; true: drain again at once.
    pub fn after(&mut self, claimed: usize, batch: u32) -> bool {
        if claimed == 0 {
            self.wait = (self.wait * 2).min(self.idle);
            return false;
        }
        self.wait = self.busy;
        claimed >= batch as usize
    }

    /// How long to wait before the next look.
    pub fn wait(&self) -> Duration {
        self.wait
    }
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
        log::debug!(
            "deleted {total} published outbox events older than {}",
            humantime::format_duration(retention)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_full_batch_drains_again_at_once() {
        let mut p = Pace::new(5 * MS, 50 * MS);
        assert!(p.after(500, 500));
        assert_eq!(p.wait(), 5 * MS);
    }

    #[test]
    fn events_keep_the_busy_pace_and_empty_looks_back_off_to_the_idle_pace() {
        let mut p = Pace::new(5 * MS, 50 * MS);
        assert!(!p.after(3, 500));
        assert_eq!(p.wait(), 5 * MS);
        let waits: Vec<_> = (0..6)
            .map(|_| {
                assert!(!p.after(0, 500));
                p.wait()
            })
            .collect();
        assert_eq!(
            waits,
            [10 * MS, 20 * MS, 40 * MS, 50 * MS, 50 * MS, 50 * MS]
        );
        // The first event after the quiet spell brings the busy pace back.
        assert!(!p.after(1, 500));
        assert_eq!(p.wait(), 5 * MS);
    }

    #[test]
    fn the_idle_pace_is_never_faster_than_the_busy_one() {
        let mut p = Pace::new(80 * MS, 50 * MS);
        p.after(0, 500);
        assert_eq!(p.wait(), 80 * MS);
    }
}
