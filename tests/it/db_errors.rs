//! Which database errors count as an outage (wait, answer 503, retry) and which as a bug, with
//! errors the real PostgreSQL sends.

use async_pay::db::DbError;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};

use crate::helpers::*;

async fn fails(c: &mut AsyncPgConnection, sql: &str) -> DbError {
    DbError::from(diesel::sql_query(sql).execute(c).await.unwrap_err())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_error_is_an_outage_by_what_happened_not_by_its_words() {
    let db = TestDb::new().await;
    let mut c = AsyncPgConnection::establish(&db.url).await.unwrap();
    // The query is wrong, whatever its message says: not an outage.
    for sql in [
        "SELECT 'connection refused'::uuid",
        "DO $$ BEGIN RAISE EXCEPTION 'connection lost'; END $$",
        "SELECT * FROM \"the database system is starting up\"",
        "SELECT * FROM no_such_connection_table",
    ] {
        let e = fails(&mut c, sql).await;
        assert!(!e.is_unavailable(), "{sql}: {e}");
    }
    // The server ends the session (SQLSTATE 57P01): an outage, and so is every later query on
    // the dead connection.
    let e = fails(&mut c, "SELECT pg_terminate_backend(pg_backend_pid())").await;
    assert!(e.is_unavailable(), "{e}");
    let e = fails(&mut c, "SELECT 1").await;
    assert!(e.is_unavailable(), "{e}");
}
