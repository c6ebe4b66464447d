//! The `outbox` table: events written in the same transaction as the business change, moved to
//! RabbitMQ by the relay.

use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use time::OffsetDateTime;

use super::prepared;
use super::schema::outbox;
use crate::domain::correlation::Correlation;

#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = outbox, check_for_backend(diesel::pg::Pg))]
pub struct OutboxEvent {
    pub id: i64,
    pub event_type: String,
    pub payload: serde_json::Value,
    pub created_at: OffsetDateTime,
    pub published_at: Option<OffsetDateTime>,
    /// What ties the event to the request that caused it: published as message headers.
    pub request_id: Option<String>,
    pub traceparent: Option<String>,
}

/// Number of events not yet published.
pub async fn count_unpublished(conn: &mut AsyncPgConnection) -> QueryResult<i64> {
    outbox::table
        .filter(outbox::published_at.is_null())
        .count()
        .get_result(conn)
        .await
}

/// Locks up to `limit` unpublished events, oldest first, skipping rows another relay holds.
/// Call inside a transaction; the locks last until it ends.
pub async fn claim_unpublished(
    conn: &mut AsyncPgConnection,
    limit: i64,
) -> QueryResult<Vec<OutboxEvent>> {
    outbox::table
        .filter(outbox::published_at.is_null())
        .order(outbox::id)
        .limit(limit)
        .for_update()
        .skip_locked()
        .select(OutboxEvent::as_select())
        .load(conn)
        .await
}

/// Marks events published now. Hand-written rather than `diesel::update`, whose statements
/// diesel never caches as prepared: this runs once per relayed batch.
pub async fn mark_published(conn: &mut AsyncPgConnection, ids: &[i64]) -> QueryResult<usize> {
    prepared::sql_query("UPDATE outbox SET published_at = now() WHERE id = ANY($1)")
        .bind::<diesel::sql_types::Array<diesel::sql_types::BigInt>, _>(ids)
        .execute(conn)
        .await
}

/// Deletes up to `limit` events published before `cutoff`, oldest first, through
/// `outbox_published_at_idx` (so the rows that are kept are never read). Planned per call on
/// purpose (`diesel::sql_query`, not `prepared`): it runs once a minute, and the generic plan of
/// a prepared one, not knowing `limit`, is a hash join over a sequential scan of the whole table.
pub async fn delete_published_before(
    conn: &mut AsyncPgConnection,
    cutoff: OffsetDateTime,
    limit: i64,
) -> QueryResult<usize> {
    diesel::sql_query(
        "DELETE FROM outbox WHERE id IN ( \
             SELECT id FROM outbox WHERE published_at IS NOT NULL AND published_at < $1 \
             ORDER BY published_at LIMIT $2 FOR UPDATE SKIP LOCKED)",
    )
    .bind::<diesel::sql_types::Timestamptz, _>(cutoff)
    .bind::<diesel::sql_types::BigInt, _>(limit)
    .execute(conn)
    .await
}

/// Vacuums the outbox, so the space of published and deleted rows is reused instead of the table
/// growing. `SKIP_LOCKED`: when another relay's VACUUM holds the table, that one is enough. A
/// statement of its own (VACUUM cannot run in a transaction), sent as a simple query.
pub async fn vacuum(conn: &mut AsyncPgConnection) -> QueryResult<()> {
    use diesel_async::SimpleAsyncConnection;
    conn.batch_execute("VACUUM (SKIP_LOCKED) outbox").await
}

/// Writes an event; it is published after the caller's transaction commits.
pub async fn insert(
    conn: &mut AsyncPgConnection,
    event_type: &str,
    payload: &serde_json::Value,
    correlation: &Correlation,
) -> QueryResult<i64> {
    diesel::insert_into(outbox::table)
        .values((
            outbox::event_type.eq(event_type),
            outbox::payload.eq(payload),
            outbox::request_id.eq(correlation.request_id.as_deref()),
            outbox::traceparent.eq(correlation.traceparent.as_deref()),
        ))
        .returning(outbox::id)
        .get_result(conn)
        .await
}

/// The unpublished backlog: how many events, and how old the oldest is (measured by the
/// database's clock, so the relay's and the scraper's clocks do not matter). Reads only the
/// partial index of unpublished rows.
pub async fn backlog(
    conn: &mut AsyncPgConnection,
) -> QueryResult<(i64, Option<std::time::Duration>)> {
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
        #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Double>)]
        age: Option<f64>,
    }
    let row: Row = prepared::sql_query(
        "SELECT count(*) AS n, EXTRACT(EPOCH FROM now() - min(created_at))::float8 AS age \
         FROM outbox WHERE published_at IS NULL",
    )
    .get_result(conn)
    .await?;
    let age = row
        .age
        .and_then(|s| std::time::Duration::try_from_secs_f64(s.max(0.0)).ok());
    Ok((row.n, age))
}

/// Reads the outbox backlog into the gauges; false (and the gauges left out of the scrape) when
/// the database does not answer in time.
pub async fn record_backlog(pool: &super::Pool, limit: std::time::Duration) -> bool {
    let read = super::with_timeout(limit, async {
        let mut conn = super::conn(pool).await?;
        Ok(backlog(&mut conn).await?)
    })
    .await;
    match read {
        Ok((n, age)) => {
            crate::metrics::outbox_backlog(n, age);
            true
        }
        Err(e) => {
            log::warn!("metrics: cannot read the outbox backlog ({e}); left out of this scrape");
            false
        }
    }
}
