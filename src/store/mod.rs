//! Postgres: the pool, migrations, the per-stream lock, and (in submodules) destination
//! tables, checkpoints, runs and record failures.

pub mod grants;
pub mod session;
pub mod state;
pub mod table;

use std::time::Duration;

use sqlx::postgres::{PgPoolOptions, PgSslMode};
use sqlx::{Connection, PgConnection, PgPool};

pub use session::{SessionSettings, Target};

/// A storage failure, with what was being done.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Said once: where, the root cause, and what to try (no repeated chain).
    #[error("cannot connect to Postgres at {target}: {cause}.{hint}")]
    Connect {
        target: String,
        cause: String,
        hint: String,
    },
    /// A schema change could not get its lock in time; nothing was fetched or written.
    #[error("{0}")]
    SchemaLocked(Box<table::LockedOut>),
    /// The destination table lacks what the connector needs and `ddl = "never"`.
    #[error(
        "table {table} needs a schema change and [database] ddl = \"never\": run as a role that may alter it:\n  {}\nthen run idem again (`idem migrate --tables` run as that role does it; or set ddl = \"auto\")",
        statements.join(";\n  ")
    )]
    SchemaChangeNotAllowed {
        table: String,
        statements: Vec<String>,
    },
    #[error("applying migrations failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
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
    connect_with(url, max_connections, &SessionSettings::default()).await
}

/// Opens a pool whose sessions carry `settings`' name and timeouts. One session is
/// opened first on its own so that a failure is reported with its real cause (the pool
/// would retry a refused connection until its timeout and report only the timeout).
pub async fn connect_with(
    url: &str,
    max_connections: u32,
    settings: &SessionSettings,
) -> Result<PgPool, StoreError> {
    let target = Target::parse(url)?;
    let mut probe = target.open(settings).await?;
    warn_if_clear_text(&target, &mut probe).await;
    let _ = probe.close().await;
    let limits = settings.clone();
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        // A ping before every page transaction costs a round trip per page; a dead
        // connection fails the page anyway, and the run resumes after the last commit.
        .test_before_acquire(false)
        .after_connect(move |connection, _| {
            let limits = limits.clone();
            Box::pin(async move { session::apply_limits(connection, &limits).await })
        })
        .connect_with(target.options(&settings.application_name))
        .await
        .map_err(|source| target.connect_error(&source))?;
    Ok(pool)
}

/// `prefer` and `allow` fall back to clear text silently; over a network that is worth
/// a loud line, since passwords and records then cross it readable.
async fn warn_if_clear_text(target: &Target, connection: &mut PgConnection) {
    if target.loopback || !matches!(target.ssl_mode, PgSslMode::Prefer | PgSslMode::Allow) {
        return;
    }
    let encrypted: bool =
        sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .fetch_one(&mut *connection)
            .await
            .unwrap_or(false);
    if !encrypted {
        tracing::warn!(
            "the connection to Postgres at {} is NOT encrypted (sslmode={} fell back to clear text): passwords and records cross the network readable; use sslmode=verify-full",
            target.describe(),
            session::ssl_mode_name(target.ssl_mode)
        );
    }
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
        // Its own session name: it stays open (idle, holding the lock) for the whole run.
        let mut connection = Target::parse(url)?
            .open(&SessionSettings::default().named(format!("idem {source_system}.{stream} lock")))
            .await?;
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
