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
