//! Database access: the connection pool, the embedded migrations, and one module per table.
//! Query functions take `&mut AsyncPgConnection` and return `QueryResult`; the caller owns the
//! transaction.

pub mod dead_letters;
pub mod outbox;
pub mod payments;
pub mod prepared;
pub mod schema;
pub mod webhooks;

use std::future::Future;
use std::time::Duration;

use anyhow::Context;
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel_async::AsyncPgConnection;
use diesel_async::async_connection_wrapper::AsyncConnectionWrapper;
use diesel_async::pooled_connection::deadpool::{Object, Pool as DeadPool, PoolError};
use diesel_async::pooled_connection::{
    AsyncDieselConnectionManager, ManagerConfig, RecyclingMethod,
};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};

use crate::config::{DatabaseSettings, redact_url};

pub type Pool = DeadPool<AsyncPgConnection>;
pub type PooledConn = Object<AsyncPgConnection>;

pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

/// Key of the advisory lock that serialises concurrent migration runs (several `serve`
/// processes starting at once). Any constant works; this one spells "apay".
const MIGRATION_LOCK_KEY: i64 = 0x6170_6179;

/// A database failure as the callers need to see it: is it worth retrying (the database is
/// unreachable, overloaded or restarting), or is it a bug?
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

impl DbError {
    pub fn is_unavailable(&self) -> bool {
        matches!(self, DbError::Unavailable(_))
    }
}

impl From<DieselError> for DbError {
    fn from(e: DieselError) -> Self {
        if is_connection_error(&e) {
            DbError::Unavailable(e.to_string())
        } else {
            DbError::Other(e.into())
        }
    }
}

impl From<PoolError> for DbError {
    fn from(e: PoolError) -> Self {
        // Every pool error means "no usable connection right now": timeout waiting for a free
        // one, or the database refused/failed to open a new one.
        DbError::Unavailable(e.to_string())
    }
}

/// True for errors that mean the connection or the server is gone, not that the query is wrong.
pub fn is_connection_error(e: &DieselError) -> bool {
    match e {
        DieselError::DatabaseError(DatabaseErrorKind::ClosedConnection, _)
        | DieselError::DatabaseError(DatabaseErrorKind::UnableToSendCommand, _) => true,
        DieselError::DatabaseError(DatabaseErrorKind::Unknown, info) => {
            // SQLSTATE classes 08 (connection), 53 (resources) and 57P0x (shutdown, restart)
            // reach us only as text.
            let m = info.message();
            [
                "terminating connection",
                "the database system is",
                "too many clients",
                "remaining connection slots",
                "connection",
                "server closed",
            ]
            .iter()
            .any(|needle| m.contains(needle))
        }
        _ => false,
    }
}

/// Builds the pool. Nothing is connected yet: connections open on first use, so a role starts
/// even while the database is down and recovers when it comes back.
pub fn pool(settings: &DatabaseSettings) -> anyhow::Result<Pool> {
    let mut config = ManagerConfig::default();
    // Fast: no `SELECT 1` round trip before every checkout. A connection the server closed fails
    // its next query, is classified as unavailable (503 / retry) and is dropped as broken.
    config.recycling_method = RecyclingMethod::Fast;
    let manager = AsyncDieselConnectionManager::<AsyncPgConnection>::new_with_config(
        settings.url.expose(),
        config,
    );
    let t = Some(settings.acquire_timeout);
    DeadPool::builder(manager)
        .max_size(settings.pool_size)
        // Without these a saturated or unreachable database makes callers wait forever.
        .wait_timeout(t)
        .create_timeout(t)
        .recycle_timeout(t)
        .runtime(deadpool::Runtime::Tokio1)
        .build()
        .context("cannot build the database pool")
}

/// A dedicated connection, not pooled (LISTEN, `relay --once`, the `dlq` commands), opened
/// within `acquire_timeout` (at least 5 s) so an unreachable host fails instead of hanging.
pub async fn connect(settings: &DatabaseSettings) -> anyhow::Result<AsyncPgConnection> {
    use diesel_async::AsyncConnection;
    let url = settings.url.expose();
    let limit = settings.acquire_timeout.max(Duration::from_secs(5));
    tokio::time::timeout(limit, AsyncPgConnection::establish(url))
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "no answer from the database at {} within {limit:?}",
                redact_url(url)
            )
        })?
        .with_context(|| format!("cannot connect to the database at {}", redact_url(url)))
}

/// Takes a connection from the pool.
pub async fn conn(pool: &Pool) -> Result<PooledConn, DbError> {
    Ok(pool.get().await?)
}

/// Runs one unit of database work with a deadline, so a stalled server cannot hang the caller.
pub async fn with_timeout<T, F>(limit: Duration, work: F) -> Result<T, DbError>
where
    F: Future<Output = Result<T, DbError>>,
{
    match tokio::time::timeout(limit, work).await {
        Ok(r) => r,
        Err(_) => Err(DbError::Unavailable(format!("no answer within {limit:?}"))),
    }
}

/// What to do when the database named in the URL does not exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IfMissing {
    /// Create it (`async-pay migrate`, the tests).
    Create,
    /// Fail, saying so (`serve`: a typo in the URL must not start a new, empty database).
    Fail,
}

/// Applies the embedded migrations that are not yet applied; returns their names. Safe to run
/// from several processes at once (they take turns on an advisory lock).
pub async fn migrate(url: &str) -> anyhow::Result<Vec<String>> {
    run_migrations(url, IfMissing::Create).await
}

/// Like [`migrate`], but a missing database is an error that names it and says to run
/// `async-pay migrate`.
pub async fn migrate_existing(url: &str) -> anyhow::Result<Vec<String>> {
    run_migrations(url, IfMissing::Fail).await
}

async fn run_migrations(url: &str, if_missing: IfMissing) -> anyhow::Result<Vec<String>> {
    let url = url.to_string();
    tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<String>> {
        use diesel::RunQueryDsl;
        type Wrapper = AsyncConnectionWrapper<AsyncPgConnection>;
        let mut conn = match <Wrapper as diesel::Connection>::establish(&url) {
            Ok(c) => c,
            Err(e) if is_missing_database(&e.to_string(), &url) => match if_missing {
                IfMissing::Create => {
                    create_database(&url)?;
                    <Wrapper as diesel::Connection>::establish(&url)
                        .with_context(|| format!("cannot connect to {}", redact_url(&url)))?
                }
                // The callers name the (redacted) URL in their context.
                IfMissing::Fail => anyhow::bail!(
                    "database {:?} does not exist; check the database URL (DATABASE_URL or \
                     database.url), or run `async-pay migrate` to create it and apply the \
                     migrations",
                    database_name(&url).unwrap_or_default()
                ),
            },
            Err(e) => {
                return Err(anyhow::Error::new(e)
                    .context(format!("cannot connect to {}", redact_url(&url))));
            }
        };
        diesel::sql_query(format!("SELECT pg_advisory_lock({MIGRATION_LOCK_KEY})"))
            .execute(&mut conn)
            .context("cannot take the migration lock")?;
        let result = conn
            .run_pending_migrations(MIGRATIONS)
            .map(|v| v.iter().map(ToString::to_string).collect::<Vec<_>>())
            .map_err(|e| anyhow::anyhow!("migration failed: {e}"));
        let _ = diesel::sql_query(format!("SELECT pg_advisory_unlock({MIGRATION_LOCK_KEY})"))
            .execute(&mut conn);
        result
    })
    .await
    .context("the migration task panicked")?
}

/// Creates the database named in `url` through the server's `postgres` database, so that a
/// fresh machine needs no manual `createdb` (the role must be allowed to create databases).
fn create_database(url: &str) -> anyhow::Result<()> {
    use diesel::RunQueryDsl;
    let mut parsed = url::Url::parse(url).context("the database URL is not a valid URL")?;
    let name = database_name(url).unwrap_or_default();
    if name.is_empty() || name.contains('"') {
        anyhow::bail!("cannot create a database named {name:?}");
    }
    parsed.set_path("/postgres");
    let mut admin = <AsyncConnectionWrapper<AsyncPgConnection> as diesel::Connection>::establish(
        parsed.as_str(),
    )
    .with_context(|| {
        format!(
            "database {name:?} does not exist and the server's \"postgres\" database is unreachable"
        )
    })?;
    match diesel::sql_query(format!("CREATE DATABASE \"{name}\"")).execute(&mut admin) {
        Ok(_) => {
            log::info!("created database {name:?}");
            Ok(())
        }
        // Another process created it at the same moment.
        Err(e) if e.to_string().contains("already exists") => Ok(()),
        Err(e) => Err(anyhow::Error::new(e).context(format!("cannot create database {name:?}"))),
    }
}

/// The database a connection URL names (its path, percent-decoded).
fn database_name(url: &str) -> Option<String> {
    let parsed = url::Url::parse(url).ok()?;
    let path = parsed.path().trim_start_matches('/');
    Some(
        percent_encoding::percent_decode_str(path)
            .decode_utf8_lossy()
            .into_owned(),
    )
}

/// True when a connection failed because the URL's database does not exist (PostgreSQL says
/// `database "name" does not exist`; a missing role says `role … does not exist` and is not it).
fn is_missing_database(error: &str, url: &str) -> bool {
    database_name(url)
        .is_some_and(|name| error.contains(&format!("database \"{name}\" does not exist")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_database_is_told_from_a_missing_role() {
        let url = "postgres://u:pw@h:5432/async%20pay";
        assert_eq!(database_name(url).as_deref(), Some("async pay"));
        assert!(is_missing_database(
            "FATAL: database \"async pay\" does not exist",
            url
        ));
        assert!(!is_missing_database(
            "FATAL: role \"u\" does not exist",
            url
        ));
    }
}
