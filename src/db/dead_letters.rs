//! The `dead_letters` table: every message that reached the dead-letter queue.

use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use time::OffsetDateTime;
use uuid::Uuid;

use super::schema::dead_letters;

#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = dead_letters, check_for_backend(diesel::pg::Pg))]
pub struct DeadLetter {
    pub id: i64,
    pub message_id: String,
    pub payment_id: Option<Uuid>,
    pub reason: String,
    pub death_count: i64,
    pub original_queue: Option<String>,
    pub body: Vec<u8>,
    pub headers: serde_json::Value,
    pub dead_lettered_at: OffsetDateTime,
    pub replayed_at: Option<OffsetDateTime>,
}

#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = dead_letters)]
pub struct NewDeadLetter<'a> {
    pub message_id: &'a str,
    pub payment_id: Option<Uuid>,
    pub reason: &'a str,
    pub death_count: i64,
    pub original_queue: Option<&'a str>,
    pub body: &'a [u8],
    pub headers: &'a serde_json::Value,
}

/// Text from a dead letter in a form PostgreSQL stores: `text` and `jsonb` refuse the NUL
/// character, so it is written `\0`, and `\` is written `\\` so that two different message ids
/// never become one (the message id is the key that makes recording idempotent). Message ids
/// the relay publishes are UUIDs and stay as they are.
pub fn storable(s: &str) -> String {
    if !s.contains(['\0', '\\']) {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\0' => out.push_str("\\0"),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out
}

/// [`storable`] applied to every string and key of a JSON value (the headers).
pub fn storable_json(v: serde_json::Value) -> serde_json::Value {
    use serde_json::Value as J;
    match v {
        J::String(s) => J::String(storable(&s)),
        J::Array(a) => J::Array(a.into_iter().map(storable_json).collect()),
        J::Object(o) => J::Object(
            o.into_iter()
                .map(|(k, v)| (storable(&k), storable_json(v)))
                .collect(),
        ),
        other => other,
    }
}

/// Records a dead letter once per message id; returns whether it was new.
pub async fn record(conn: &mut AsyncPgConnection, d: &NewDeadLetter<'_>) -> QueryResult<bool> {
    let n = diesel::insert_into(dead_letters::table)
        .values(d)
        .on_conflict(dead_letters::message_id)
        .do_nothing()
        .execute(conn)
        .await?;
    Ok(n == 1)
}

pub async fn list(conn: &mut AsyncPgConnection, limit: i64) -> QueryResult<Vec<DeadLetter>> {
    dead_letters::table
        .order(dead_letters::id.desc())
        .limit(limit)
        .select(DeadLetter::as_select())
        .load(conn)
        .await
}

/// A dead letter without its body and headers: what `async-pay dlq list` shows.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = dead_letters, check_for_backend(diesel::pg::Pg))]
pub struct Summary {
    pub id: i64,
    pub message_id: String,
    pub payment_id: Option<Uuid>,
    pub reason: String,
    pub death_count: i64,
    pub dead_lettered_at: OffsetDateTime,
    pub replayed_at: Option<OffsetDateTime>,
}

/// The newest `limit` dead letters, newest first, without bodies.
pub async fn summaries(conn: &mut AsyncPgConnection, limit: i64) -> QueryResult<Vec<Summary>> {
    dead_letters::table
        .order(dead_letters::id.desc())
        .limit(limit)
        .select(Summary::as_select())
        .load(conn)
        .await
}

/// Locks one dead letter until the end of the caller's transaction (a concurrent replay of the
/// same row waits, then sees it replayed).
pub async fn lock(conn: &mut AsyncPgConnection, id: i64) -> QueryResult<Option<DeadLetter>> {
    dead_letters::table
        .find(id)
        .for_update()
        .select(DeadLetter::as_select())
        .first(conn)
        .await
        .optional()
}

/// Locks up to `limit` dead letters not replayed yet with an id above `after`, oldest first,
/// skipping rows a concurrent replay holds.
pub async fn lock_unreplayed(
    conn: &mut AsyncPgConnection,
    after: i64,
    limit: i64,
) -> QueryResult<Vec<DeadLetter>> {
    dead_letters::table
        .filter(dead_letters::replayed_at.is_null())
        .filter(dead_letters::id.gt(after))
        .order(dead_letters::id)
        .limit(limit)
        .for_update()
        .skip_locked()
        .select(DeadLetter::as_select())
        .load(conn)
        .await
}

/// Marks a dead letter replayed now; returns the time written. Call in the transaction that
/// wrote its outbox event.
pub async fn mark_replayed(conn: &mut AsyncPgConnection, id: i64) -> QueryResult<OffsetDateTime> {
    diesel::update(dead_letters::table.find(id))
        .set(dead_letters::replayed_at.eq(diesel::dsl::now))
        .returning(dead_letters::replayed_at.assume_not_null())
        .get_result(conn)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_and_backslash_are_escaped_and_distinct_ids_stay_distinct() {
        assert_eq!(storable("019ab7c2-31c4"), "019ab7c2-31c4");
        assert_eq!(storable("a\0b"), "a\\0b");
        assert_eq!(storable("a\\0b"), "a\\\\0b");
        assert_ne!(storable("a\0b"), storable("a\\0b"));
        let v = serde_json::json!({"k\0": ["x\0", 1, {"y": "\0"}]});
        assert_eq!(
            storable_json(v),
            serde_json::json!({"k\\0": ["x\\0", 1, {"y": "\\0"}]})
        );
    }
}
