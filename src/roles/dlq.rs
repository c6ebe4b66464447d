//! `async-pay dlq list|replay`: look at the dead letters `dlq-watch` recorded, and replay them.
//!
//! `list [--limit N]` prints the newest rows of `dead_letters` as a table. `replay <ID>...` or
//! `replay --all` republishes dead letters *through the outbox*: in one transaction it locks the
//! dead letter, inserts a `payment.created` outbox event carrying the original message body (and
//! its request id and traceparent headers, so the replay is logged under the POST's request id)
//! and sets `replayed_at`. So a replay is as durable as a new payment: once the command said
//! "replayed", the running relay (which polls the outbox every few milliseconds) or the next
//! `relay --once` publishes it, whatever crashes in between; and a dead letter is replayed at
//! most once (a replay that dies again becomes a new dead letter, with a new id, that can be
//! replayed in turn).
//!
//! Replaying a message whose payment is already final is harmless: the consumer finds the
//! payment final and acks the message without calling the gateway or writing anything.
//!
//! Exits non-zero when the database is unreachable or a named dead letter cannot be replayed
//! (unknown id, body that is not JSON); one that was already replayed is reported and skipped.

use anyhow::Context;
use diesel_async::{AsyncConnection, AsyncPgConnection};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::amqp::correlation;
use crate::config::Settings;
use crate::db::dead_letters::{self, DeadLetter, Summary};
use crate::db::{self, outbox};
use crate::domain::events::PAYMENT_CREATED;

/// Dead letters replayed per transaction by `--all`: bounded, so a large backlog does not hold
/// thousands of row locks in one transaction.
const REPLAY_BATCH: i64 = 100;

#[derive(Debug, Clone, clap::Subcommand)]
pub enum DlqCommand {
    /// Print the newest dead letters: id, payment id, reason, count, time, replayed.
    List {
        /// How many rows, newest first.
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(i64).range(1..=100_000))]
        limit: i64,
    },
    /// Republish dead letters through the outbox (the relay publishes them) and mark them
    /// replayed. Replaying a message whose payment is already final is harmless.
    Replay {
        /// Ids of the dead letters (the `ID` column of `dlq list`).
        #[arg(
            required_unless_present = "all",
            conflicts_with = "all",
            value_name = "ID"
        )]
        ids: Vec<i64>,
        /// Replay every dead letter not replayed yet.
        #[arg(long)]
        all: bool,
    },
}

/// What replaying one dead letter did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replay {
    /// Written to the outbox as event `outbox_id`, marked replayed.
    Replayed {
        outbox_id: i64,
        payment_id: Option<Uuid>,
    },
    /// Replayed before, at this time; nothing done.
    AlreadyReplayed(OffsetDateTime),
    /// No dead letter has this id.
    NotFound,
    /// The body is not JSON, so it cannot be an event the consumer reads; nothing done.
    NotJson,
}

impl Replay {
    /// True when the dead letter is (now or before) replayed.
    pub fn is_ok(&self) -> bool {
        matches!(self, Replay::Replayed { .. } | Replay::AlreadyReplayed(_))
    }
}

/// Replays one locked dead letter inside the caller's transaction.
async fn replay_locked(
    conn: &mut AsyncPgConnection,
    d: &DeadLetter,
) -> diesel::QueryResult<Replay> {
    if let Some(at) = d.replayed_at {
        return Ok(Replay::AlreadyReplayed(at));
    }
    let Ok(payload) = serde_json::from_slice::<serde_json::Value>(&d.body) else {
        return Ok(Replay::NotJson);
    };
    // The original message's request id and traceparent go on with the replay.
    let correlation = correlation::of_json(&d.headers);
    let outbox_id = outbox::insert(conn, PAYMENT_CREATED, &payload, &correlation).await?;
    dead_letters::mark_replayed(conn, d.id).await?;
    Ok(Replay::Replayed {
        outbox_id,
        payment_id: d.payment_id,
    })
}

/// Replays one dead letter: outbox event and `replayed_at` in one transaction.
pub async fn replay_one(conn: &mut AsyncPgConnection, id: i64) -> diesel::QueryResult<Replay> {
    conn.transaction::<_, diesel::result::Error, _>(async |c| {
        match dead_letters::lock(c, id).await? {
            Some(d) => replay_locked(c, &d).await,
            None => Ok(Replay::NotFound),
        }
    })
    .await
}

/// Replays every dead letter not replayed yet, oldest first, [`REPLAY_BATCH`] per transaction.
/// Returns what happened to each (by dead letter id); a body that is not JSON is skipped.
pub async fn replay_all(conn: &mut AsyncPgConnection) -> diesel::QueryResult<Vec<(i64, Replay)>> {
    let mut done = Vec::new();
    let mut after = 0;
    loop {
        let batch = conn
            .transaction::<_, diesel::result::Error, _>(async |c| {
                let rows = dead_letters::lock_unreplayed(c, after, REPLAY_BATCH).await?;
                let mut out = Vec::with_capacity(rows.len());
                for d in &rows {
                    out.push((d.id, replay_locked(c, d).await?));
                }
                Ok(out)
            })
            .await?;
        let Some((last, _)) = batch.last() else {
            break;
        };
        after = *last;
        let full = batch.len() as i64 == REPLAY_BATCH;
        done.extend(batch);
        if !full {
            break;
        }
    }
    Ok(done)
}

fn format_time(t: OffsetDateTime) -> String {
    let f = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second]Z");
    t.to_offset(time::UtcOffset::UTC)
        .format(&f)
        .unwrap_or_else(|_| t.to_string())
}

/// The `dlq list` table: one header line, one line per dead letter, columns padded to fit.
pub fn table(rows: &[Summary]) -> String {
    let header = [
        "ID",
        "PAYMENT",
        "REASON",
        "COUNT",
        "DEAD-LETTERED AT",
        "REPLAYED",
    ]
    .map(String::from);
    let mut lines = vec![header];
    for r in rows {
        lines.push([
            r.id.to_string(),
            r.payment_id
                .map(|p| p.to_string())
                .unwrap_or_else(|| "-".into()),
            r.reason.clone(),
            r.death_count.to_string(),
            format_time(r.dead_lettered_at),
            r.replayed_at
                .map(|t| format!("yes, {}", format_time(t)))
                .unwrap_or_else(|| "no".into()),
        ]);
    }
    let mut widths = [0usize; 6];
    for line in &lines {
        for (w, cell) in widths.iter_mut().zip(line) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for line in &lines {
        let cells: Vec<String> = line
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// One line per replayed (or skipped) dead letter.
pub fn describe(id: i64, r: &Replay) -> String {
    match r {
        Replay::Replayed {
            outbox_id,
            payment_id,
        } => format!(
            "dead letter {id}: replayed as outbox event {outbox_id} (payment {})",
            payment_id
                .map(|p| p.to_string())
                .unwrap_or_else(|| "unknown".into())
        ),
        Replay::AlreadyReplayed(at) => format!(
            "dead letter {id}: already replayed at {}; nothing done",
            format_time(*at)
        ),
        Replay::NotFound => format!("dead letter {id}: no such dead letter"),
        Replay::NotJson => {
            format!("dead letter {id}: its body is not JSON, so it cannot be replayed")
        }
    }
}

/// `async-pay dlq …`.
pub async fn run(settings: &Settings, cmd: DlqCommand) -> anyhow::Result<()> {
    let mut conn = db::connect(&settings.database).await?;
    match cmd {
        DlqCommand::List { limit } => {
            let rows = dead_letters::summaries(&mut conn, limit)
                .await
                .context("cannot read the dead letters")?;
            if rows.is_empty() {
                println!("no dead letters");
            } else {
                print!("{}", table(&rows));
            }
            Ok(())
        }
        DlqCommand::Replay { ids, all } => {
            let results = if all {
                replay_all(&mut conn)
                    .await
                    .context("cannot replay the dead letters")?
            } else {
                let mut out = Vec::with_capacity(ids.len());
                for id in ids {
                    let r = replay_one(&mut conn, id)
                        .await
                        .with_context(|| format!("cannot replay dead letter {id}"))?;
                    out.push((id, r));
                }
                out
            };
            for (id, r) in &results {
                println!("{}", describe(*id, r));
            }
            let replayed = results
                .iter()
                .filter(|(_, r)| matches!(r, Replay::Replayed { .. }))
                .count();
            println!(
                "replayed {replayed} dead letter(s); the relay publishes them \
                 (run `async-pay relay --once` if no relay is running)"
            );
            let failed = results.iter().filter(|(_, r)| !r.is_ok()).count();
            if failed > 0 && !all {
                anyhow::bail!("{failed} dead letter(s) could not be replayed");
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_pads_columns_and_shows_replay_state() {
        let t = time::macros::datetime!(2026-11-25 22:08:03.123 UTC);
        let rows = vec![
            Summary {
                id: 12,
                message_id: "m".into(),
                payment_id: Some(Uuid::nil()),
                reason: "rejected".into(),
                death_count: 1,
                dead_lettered_at: t,
                replayed_at: None,
            },
            Summary {
                id: 7,
                message_id: "n".into(),
                payment_id: None,
                reason: "delivery_limit".into(),
                death_count: 4,
                dead_lettered_at: t,
                replayed_at: Some(t),
            },
        ];
        let text = table(&rows);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("ID  PAYMENT"));
        assert!(lines[1].contains("00000000-0000-0000-0000-000000000000  rejected"));
        assert!(lines[1].ends_with("2026-11-25 22:08:03Z  no"));
        assert!(lines[2].starts_with("7   -"));
        assert!(lines[2].ends_with("yes, 2026-11-25 22:08:03Z"));
        // The columns line up.
        let at = |l: &str| l.find("REASON").or_else(|| l.find("rejected"));
        assert_eq!(at(lines[0]), at(lines[1]));
    }
}
