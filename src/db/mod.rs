//! Database access: the connection pool, the embedded migrations, and one module per table.
//! Query functions take `&mut AsyncPgConnection` and return `QueryResult`; the caller owns the
//! transaction.

pub mod dead_letters;
pub mod outbox;
pub mod payments;
pub mod prepared;
pub mod schema;
pub mod types;
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

/// How PostgreSQL begins the primary message of each error in SQLSTATE classes 08 (connection
/// exception), 53 (insufficient resources) and 57P0x (operator intervention: shutdown, crash,
/// restart), with the codes they stand for. diesel-async reports these errors as
/// `DatabaseErrorKind::Unknown` and keeps the SQLSTATE to itself (diesel 2.3's
/// `DatabaseErrorInformation` has no accessor for it; diesel-rs/diesel#5232 proposes one), so the
/// message is all that is left: matched from its first character, so that a value a message
/// quotes (`invalid input syntax for type uuid: "connection…"`) can never match. Assumes the
/// server writes its messages in English (`lc_messages` C or en, the default); in another
/// language these count as bugs, and the next query on the dead connection as an outage.
const OUTAGE_MESSAGES: &[(&str, &str)] = &[
    // 57P01 admin_shutdown, 57P02 crash_shutdown, 57P05 idle_session_timeout (and 25P03, 08P01
    // when the server gives up on a session): the server ends the session.
    ("57P01 57P02 57P05", "terminating connection "),
    // 57P03 cannot_connect_now: starting up, shutting down, in recovery.
    ("57P03", "the database system is "),
    ("53300", "sorry, too many clients already"),
    ("53300", "remaining connection slots are reserved"),
    ("53300", "too many connections for "),
    ("53200", "out of memory"),
    ("53100", "could not extend file "),
];

/// True for errors that mean the connection or the server is gone or out of resources (wait and
/// retry), false for errors of the statement itself (a bug or bad data: retrying cannot help).
/// Decided by diesel's error kind, and for the errors diesel-async gives no kind by the
/// SQLSTATE's message ([`OUTAGE_MESSAGES`]); never by a word anywhere in the text.
pub fn is_connection_error(e: &DieselError) -> bool {
    let DieselError::DatabaseError(kind, info) = e else {
        return false;
    };
    match kind {
        // No answer from the server at all (diesel-async: an error without a SQLSTATE).
        DatabaseErrorKind::ClosedConnection | DatabaseErrorKind::UnableToSendCommand => true,
        // The statement's own fault, whatever the message says.
        DatabaseErrorKind::UniqueViolation
        | DatabaseErrorKind::ForeignKeyViolation
        | DatabaseErrorKind::NotNullViolation
        | DatabaseErrorKind::CheckViolation
        | DatabaseErrorKind::RestrictViolation
        | DatabaseErrorKind::ExclusionViolation
        | DatabaseErrorKind::SerializationFailure
        | DatabaseErrorKind::ReadOnlyTransaction => false,
        // An error the server sent whose SQLSTATE diesel-async did not map to a kind.
        _ => {
            let m = info.message();
            OUTAGE_MESSAGES
                .iter()
                .any(|(_, start)| m.starts_with(start))
        }
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

/// A dedicated connection, not pooled (`relay --once`, the `dlq` commands), opened
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

/// A duration as whole milliseconds for a `bigint` bind (`$n * interval '1 millisecond'`).
pub fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
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

    fn error(kind: DatabaseErrorKind, message: &str) -> DieselError {
        DieselError::DatabaseError(kind, Box::new(message.to_string()))
    }

    #[test]
    fn an_outage_is_recognised_by_kind_and_by_the_sqlstates_message() {
        for e in [
            error(DatabaseErrorKind::UnableToSendCommand, "connection closed"),
            error(
                DatabaseErrorKind::ClosedConnection,
                "server closed the connection",
            ),
            // diesel-async gives these kind Unknown; their SQLSTATE in the comment.
            // 57P01
            error(
                DatabaseErrorKind::Unknown,
                "terminating connection due to administrator command",
            ),
            // 57P02
            error(
                DatabaseErrorKind::Unknown,
                "terminating connection because of crash of another server process",
            ),
            // 57P03
            error(
                DatabaseErrorKind::Unknown,
                "the database system is starting up",
            ),
            error(
                DatabaseErrorKind::Unknown,
                "the database system is in recovery mode",
            ),
            // 57P05
            error(
                DatabaseErrorKind::Unknown,
                "terminating connection due to idle-session timeout",
            ),
            // 53300
            error(
                DatabaseErrorKind::Unknown,
                "sorry, too many clients already",
            ),
            error(
                DatabaseErrorKind::Unknown,
                "remaining connection slots are reserved for roles with the SUPERUSER attribute",
            ),
            // 53200, 53100
            error(DatabaseErrorKind::Unknown, "out of memory"),
            error(
                DatabaseErrorKind::Unknown,
                "could not extend file \"base/16384/16385\": No space left on device",
            ),
        ] {
            assert!(is_connection_error(&e), "{e}");
            assert!(DbError::from(e).is_unavailable());
        }
    }

    #[test]
    fn a_statement_error_is_never_an_outage_whatever_its_words() {
        for e in [
            // 22P02, quoting a value: the old rule ("contains 'connection'") called this an outage.
            error(
                DatabaseErrorKind::Unknown,
                "invalid input syntax for type uuid: \"connection refused\"",
            ),
            error(
                DatabaseErrorKind::Unknown,
                "relation \"the database system is starting up\" does not exist",
            ),
            error(
                DatabaseErrorKind::UniqueViolation,
                "terminating connection due to administrator command",
            ),
            error(DatabaseErrorKind::CheckViolation, "connection"),
            error(DatabaseErrorKind::SerializationFailure, "too many clients"),
            DieselError::NotFound,
            DieselError::RollbackTransaction,
        ] {
            assert!(!is_connection_error(&e), "{e}");
            assert!(!DbError::from(e).is_unavailable());
        }
    }

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
