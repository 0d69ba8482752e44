//! Postgres: the pool, migrations, the per-stream lock, and (in submodules) destination
//! tables, checkpoints, runs and record failures.

pub mod bootstrap;
pub mod child_queue;
pub mod grants;
pub mod session;
pub mod state;
pub mod table;

use std::time::Duration;

use sqlx::postgres::{PgPoolOptions, PgSslMode};
use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;

pub use session::{SessionSettings, Target};

use crate::schema::connector::qualified;

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
    #[error(
        "idem's tables need migrations this role may not apply ({source}): run `idem migrate` once as a role with CREATE on the schema (the schema's owner), then run again"
    )]
    MigrateNeedsOwner { source: sqlx::migrate::MigrateError },
    #[error(
        "table {table} does not match its connector, so no page was written: {changes} (or change the connector back)"
    )]
    SchemaDrift { table: String, changes: String },
    #[error(
        "this run no longer owns {source_system}.{stream}: the connection holding its lock was lost and another run (or `idem checkpoint`) took the stream over; this run commits nothing more"
    )]
    LostOwnership {
        source_system: String,
        stream: String,
    },
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

/// Where a database URL points, without its password (`user:password@` or `?password=`).
pub fn describe_url(url: &str) -> String {
    crate::redact::register_url(url);
    match url::Url::parse(url) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                let _ = parsed.set_password(Some("***"));
            }
            crate::redact::url(parsed.as_ref())
        }
        Err(_) => "<unparsable DATABASE_URL>".to_string(),
    }
}

/// Opens a pool. Two connections are enough for one run (the page writer and the
/// dispatcher); more only help several streams at once.
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool, StoreError> {
    connect_with(url, max_connections, &SessionSettings::default()).await
}

/// How many sessions a pool opens at once when it is created: what one run uses (its
/// stream lock, its queries, its page writers), so that they are opened side by side
/// instead of one after another as the run first needs each (~10 ms apiece: a no-change
/// run's largest cost).
const WARM_SESSIONS: u32 = 4;

/// Opens a pool whose sessions carry `settings`' name and timeouts. One session is
/// opened on its own so that a failure is reported with its real cause (the pool would
/// retry a refused connection until its timeout and report only the timeout); the pool's
/// first sessions open at the same time.
pub async fn connect_with(
    url: &str,
    max_connections: u32,
    settings: &SessionSettings,
) -> Result<PgPool, StoreError> {
    let target = Target::parse(url)?;
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
        .connect_lazy_with(target.options(&settings.application_name));
    let warming = tokio::spawn({
        let pool = pool.clone();
        async move {
            let sessions = futures_util::future::join_all(
                (0..WARM_SESSIONS.min(max_connections)).map(|_| pool.acquire()),
            )
            .await;
            // Dropped here: back into the pool, idle.
            sessions
                .into_iter()
                .try_for_each(|session| session.map(drop))
        }
    });
    // A refused probe answers at once; the pool's own sessions would keep retrying until
    // `acquire_timeout`, so they are not waited for then.
    let mut probe = match target.open(settings).await {
        Ok(probe) => probe,
        Err(err) => {
            warming.abort();
            return Err(err);
        }
    };
    warn_if_clear_text(&target, &mut probe).await;
    let _ = probe.close().await;
    match warming.await {
        Ok(Ok(())) => Ok(pool),
        Ok(Err(source)) => Err(target.connect_error(&source)),
        Err(join) => Err(StoreError::Connect {
            target: target.describe(),
            cause: format!("opening the pool's first sessions: {join}"),
            hint: String::new(),
        }),
    }
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
///
/// When every one is already applied, nothing is run: sqlx's migrator starts with
/// `CREATE TABLE IF NOT EXISTS _sqlx_migrations`, which Postgres refuses to a role without
/// `CREATE` on the schema even when the table exists, and a least-privilege role (README,
/// "Grants") only reads that table.
pub async fn migrate(pool: &PgPool) -> Result<(), StoreError> {
    let migrator = sqlx::migrate!("./migrations");
    if all_applied(pool, &migrator).await {
        return Ok(());
    }
    match migrator.run(pool).await {
        Ok(()) => Ok(()),
        // SQLSTATE 42501: insufficient privilege.
        Err(source)
            if matches!(&source, sqlx::migrate::MigrateError::Execute(sqlx::Error::Database(e))
                if e.code().as_deref() == Some("42501")) =>
        {
            Err(StoreError::MigrateNeedsOwner { source })
        }
        Err(source) => Err(source.into()),
    }
}

/// Whether `_sqlx_migrations` records exactly the migrations of `migrator` as applied, with
/// the same checksums. Anything else (no table, a failed or changed migration, one this
/// binary does not know because a newer idem applied it) is left to the migrator, which
/// applies it or says what is wrong.
async fn all_applied(pool: &PgPool, migrator: &sqlx::migrate::Migrator) -> bool {
    let applied: Vec<(i64, Vec<u8>)> =
        match sqlx::query_as("SELECT version, checksum FROM _sqlx_migrations WHERE success")
            .fetch_all(pool)
            .await
        {
            Ok(applied) => applied,
            Err(_) => return false,
        };
    let known: Vec<_> = migrator
        .iter()
        .filter(|m| !m.migration_type.is_down_migration())
        .collect();
    applied.len() == known.len()
        && known.iter().all(|m| {
            applied
                .iter()
                .any(|(version, checksum)| *version == m.version && checksum[..] == m.checksum[..])
        })
}

/// The class half of idem's two-key advisory locks (`pg_try_advisory_lock(int4, int4)`):
/// "idem" in ASCII. Two-key locks never collide with one-key (bigint) locks, and this class
/// keeps idem's keys apart from an application's own two-key locks in the same database.
pub const LOCK_CLASS: i32 = 0x6964_656d;

/// The per-stream lock: a session advisory lock on a connection of its own, so that a
/// crashed process releases it when its connection drops, plus a claim on the stream's
/// owner row. The lock keeps a second run from starting; the claim fences the commits:
/// if the lock's connection dies and another run takes over, [`verify_owner`] fails
/// inside this run's next page transaction.
pub struct StreamLock {
    connection: PgConnection,
    source_system: String,
    stream: String,
    partition: String,
    owner: Uuid,
}

impl StreamLock {
    /// Takes the lock of `source_system.stream` (of one partition of it; `""` for an
    /// unpartitioned stream) and claims it for a new owner id, or `None` at once if
    /// another run has the lock.
    pub async fn try_acquire(
        url: &str,
        source_system: &str,
        stream: &str,
        partition: &str,
    ) -> Result<Option<StreamLock>, StoreError> {
        let name = qualified(stream, partition);
        // Its own session name: it stays open (idle, holding the lock) for the whole run.
        let connection = Target::parse(url)?
            .open(&SessionSettings::default().named(format!("idem {source_system}.{name} lock")))
            .await?;
        Self::try_acquire_on(connection, source_system, stream, partition).await
    }

    /// [`StreamLock::try_acquire`] on an idle session taken out of `pool` for good
    /// (detached: the pool may open another in its place), renamed for the lock. A run's
    /// pool has its first sessions open already, so the run does not wait for a connect of
    /// its own. With no idle session (a busy `serve`) it opens one with the pool's
    /// options, as a connection of its own: the lock never waits for the pool.
    pub async fn try_acquire_from(
        pool: &PgPool,
        source_system: &str,
        stream: &str,
        partition: &str,
    ) -> Result<Option<StreamLock>, StoreError> {
        let name = qualified(stream, partition);
        let mut connection = match pool.try_acquire() {
            Some(idle) => idle.detach(),
            None => PgConnection::connect_with(&pool.connect_options())
                .await
                .context(|| {
                    format!("opening the session for the lock of {source_system}.{name}")
                })?,
        };
        sqlx::query("SELECT set_config('application_name', $1, false)")
            .bind(format!("idem {source_system}.{name} lock"))
            .execute(&mut connection)
            .await
            .context(|| format!("naming the session for the lock of {source_system}.{name}"))?;
        Self::try_acquire_on(connection, source_system, stream, partition).await
    }

    async fn try_acquire_on(
        mut connection: PgConnection,
        source_system: &str,
        stream: &str,
        partition: &str,
    ) -> Result<Option<StreamLock>, StoreError> {
        let name = qualified(stream, partition);
        let acquired: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, hashtext($2))")
            .bind(LOCK_CLASS)
            .bind(lock_key(source_system, stream, partition))
            .fetch_one(&mut connection)
            .await
            .context(|| format!("taking the lock of {source_system}.{name}"))?;
        if !acquired {
            let _ = connection.close().await;
            return Ok(None);
        }
        let owner = Uuid::new_v4();
        // Waits for a page transaction of a previous owner still in flight (it holds the
        // row FOR SHARE): that page commits whole before the stream changes hands.
        sqlx::query(
            "INSERT INTO idem_stream_owners (source_system, stream, partition, owner) VALUES ($1, $2, $4, $3)
             ON CONFLICT (source_system, stream, partition) DO UPDATE SET owner = EXCLUDED.owner, claimed_at = now()",
        )
        .bind(source_system)
        .bind(stream)
        .bind(owner)
        .bind(partition)
        .execute(&mut connection)
        .await
        .context(|| format!("claiming {source_system}.{name} for this run"))?;
        Ok(Some(StreamLock {
            connection,
            source_system: source_system.to_string(),
            stream: stream.to_string(),
            partition: partition.to_string(),
            owner,
        }))
    }

    /// The id this holder claimed the stream with; page transactions check it.
    pub fn owner(&self) -> Uuid {
        self.owner
    }

    /// Releases the lock (closing the connection would too).
    pub async fn release(mut self) {
        let _ = sqlx::query("SELECT pg_advisory_unlock($1, hashtext($2))")
            .bind(LOCK_CLASS)
            .bind(lock_key(&self.source_system, &self.stream, &self.partition))
            .execute(&mut self.connection)
            .await;
        let _ = self.connection.close().await;
    }
}

/// Whether some session holds the stream's lock right now (the same key as
/// [`StreamLock`]). Read from `pg_locks`, never by trying the lock: a probe
/// that took it for an instant could make a real run give up.
pub async fn stream_lock_held(
    pool: &PgPool,
    source_system: &str,
    stream: &str,
    partition: &str,
) -> Result<bool, StoreError> {
    // The two-key form shows as classid = key 1, objid = key 2 (as unsigned), objsubid = 2.
    // Advisory locks are per database: another database on the server (another idem, or a
    // test) may hold the same key.
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_locks l WHERE l.locktype = 'advisory' AND l.granted
           AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
           AND l.objsubid = 2 AND l.classid::bigint = ($1::bigint & 4294967295)
           AND l.objid::bigint = (hashtext($2)::bigint & 4294967295))",
    )
    .bind(LOCK_CLASS)
    .bind(lock_key(source_system, stream, partition))
    .fetch_one(pool)
    .await
    .context(|| format!("checking whether {source_system}.{stream} is running"))
}

/// The text the stream lock's second key hashes. A partition locks on its own key, so
/// two partitions of a stream run at once; an unpartitioned stream keeps its old key.
pub fn lock_key(source_system: &str, stream: &str, partition: &str) -> String {
    format!("idem:{source_system}.{}", qualified(stream, partition))
}

/// Fails unless `owner` still owns the stream. Called first in every transaction of a
/// walk: the row stays locked FOR SHARE until that transaction ends, so a takeover waits
/// for it, and a transaction that starts after a takeover sees the new owner and aborts.
pub async fn verify_owner(
    connection: &mut PgConnection,
    source_system: &str,
    stream: &str,
    partition: &str,
    owner: Uuid,
) -> Result<(), StoreError> {
    let current: Option<Uuid> = sqlx::query_scalar(
        "SELECT owner FROM idem_stream_owners WHERE source_system = $1 AND stream = $2 AND partition = $3 FOR SHARE",
    )
    .bind(source_system)
    .bind(stream)
    .bind(partition)
    .fetch_optional(&mut *connection)
    .await
    .context(|| format!("checking that this run still owns {source_system}.{stream}"))?;
    if current == Some(owner) {
        Ok(())
    } else {
        Err(StoreError::LostOwnership {
            source_system: source_system.to_string(),
            stream: qualified(stream, partition),
        })
    }
}
