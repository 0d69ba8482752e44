//! Postgres: the pool, migrations, the per-stream lock, and (in submodules) destination
//! tables, checkpoints, runs and record failures.

pub mod state;
pub mod table;

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};

/// A storage failure, with what was being done.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot connect to Postgres at {target}: {source}")]
    Connect {
        target: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("applying migrations failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error(
        "table {table} does not match its connector, so no page was written: {changes} (or change the connector back)"
    )]
    SchemaDrift { table: String, changes: String },
    #[error("{context}: {source}")]
    Query {
        context: String,
        #[source]
        source: sqlx::Error,
    },
}

/// Adds what was being done to a sqlx error.
pub trait Context<T> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T, StoreError>;
}

impl<T> Context<T> for Result<T, sqlx::Error> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T, StoreError> {
        self.map_err(|source| StoreError::Query {
            context: context(),
            source,
        })
    }
}

/// Where a database URL points, without its password.
pub fn describe_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                let _ = parsed.set_password(Some("***"));
            }
            parsed.to_string()
        }
        Err(_) => "<unparsable DATABASE_URL>".to_string(),
    }
}

/// Opens a pool. Two connections are enough for one run (the page writer and the
/// dispatcher); more only help several streams at once.
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool, StoreError> {
    let options: PgConnectOptions = url.parse().map_err(|source| StoreError::Connect {
        target: describe_url(url),
        source,
    })?;
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        // A ping before every page transaction costs a round trip per page; a dead
        // connection fails the page anyway, and the run resumes after the last commit.
        .test_before_acquire(false)
        .connect_with(options)
        .await
        .map_err(|source| StoreError::Connect {
            target: describe_url(url),
            source,
        })
}

/// Applies idem's embedded migrations (idempotent).
pub async fn migrate(pool: &PgPool) -> Result<(), StoreError> {
    sqlx::migrate!("./migrations").run(pool).await?;
    Ok(())
}

/// The per-stream lock: a session advisory lock on a connection of its own, so that a
/// crashed process releases it when its connection drops.
pub struct StreamLock {
    connection: PgConnection,
    key: String,
}

impl StreamLock {
    /// Takes the lock of `source_system.stream`, or `None` at once if another run has it.
    pub async fn try_acquire(
        url: &str,
        source_system: &str,
        stream: &str,
    ) -> Result<Option<StreamLock>, StoreError> {
        let mut connection =
            PgConnection::connect(url)
                .await
                .map_err(|source| StoreError::Connect {
                    target: describe_url(url),
                    source,
                })?;
        let key = format!("idem:{source_system}.{stream}");
        let acquired: bool =
            sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtextextended($1, 0))")
                .bind(&key)
                .fetch_one(&mut connection)
                .await
                .context(|| format!("taking the lock of {source_system}.{stream}"))?;
        Ok(acquired.then_some(StreamLock { connection, key }))
    }

    /// Releases the lock (closing the connection would too).
    pub async fn release(mut self) {
        let _ = sqlx::query("SELECT pg_advisory_unlock(hashtextextended($1, 0))")
            .bind(&self.key)
            .execute(&mut self.connection)
            .await;
        let _ = self.connection.close().await;
    }
}
