//! Destination tables: idempotent DDL from the connector's columns, and the set-based
//! page upsert that writes only new and changed rows.

use std::collections::HashMap;
use std::time::Duration;

use sqlx::{PgConnection, PgPool, Row as _};
use uuid::Uuid;

use super::{Context, StoreError};
use crate::normalize::Row;
use crate::schema::connector::ColumnSpec;
pub use crate::schema::settings::DdlPolicy;

/// How a page decides that a stored row is unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compare {
    /// The stored content hash equals the new one: cheap, for regular runs.
    Hash,
    /// The stored `data` and typed columns equal the new ones: catches drift made on our
    /// side (a row edited by hand), for replays.
    Content,
}

/// Counts of one page's write.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct WriteCounts {
    pub inserted: u64,
    pub updated: u64,
    pub unchanged: u64,
    /// The ids of the rows inserted or updated (their children are owed); in a dry run,
    /// of the rows that would be.
    pub changed: Vec<String>,
}

/// A destination table and the statements that write it, built once per run.
pub struct DestinationTable {
    pub name: String,
    columns: Vec<ColumnSpec>,
    classify_hash_sql: String,
    classify_content_sql: String,
    upsert_sql: String,
    rehash_sql: String,
    /// What the mapping contributes to a hash, to recompute a legacy one.
    fingerprint: Vec<u8>,
    ddl: DdlPolicy,
    /// Columns kept under a btree index besides the key: `last_changed_at` (a walk's end
    /// looks only at rows written since its last pass) and the columns reminder rules test
    /// with `older_than` (rows that crossed the threshold since). Without them everything
    /// still works, by reading the whole table at every walk's end.
    indexed: Vec<String>,
}

/// A session holding a lock on a table that a schema change needs.
#[derive(Debug, Clone)]
pub struct Blocker {
    pub pid: i32,
    pub application_name: String,
    /// e.g. `idle in transaction`.
    pub state: String,
    /// Since its transaction (or query) started.
    pub running_for: Option<Duration>,
    /// The start of its current or last query.
    pub query: String,
}

/// A schema change that could not get its lock: what, for how long, and who holds it.
#[derive(Debug, Clone)]
pub struct LockedOut {
    pub table: String,
    pub statement: String,
    pub attempts: u32,
    pub lock_timeout: Duration,
    pub blockers: Vec<Blocker>,
}

impl std::fmt::Display for LockedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "table {}: the schema change could not get its lock ({} attempts, lock_timeout {}ms each); nothing was fetched or written",
            self.table,
            self.attempts,
            self.lock_timeout.as_millis()
        )?;
        if self.blockers.is_empty() {
            write!(f, ". The sessions that held it have ended; run idem again")?;
        } else {
            write!(f, ". Held by:")?;
            for b in &self.blockers {
                write!(
                    f,
                    "\n  pid {} (application '{}', {}{}): {}",
                    b.pid,
                    b.application_name,
                    if b.state.is_empty() {
                        "state unknown"
                    } else {
                        &b.state
                    },
                    b.running_for
                        .map_or(String::new(), |d| format!(", for {}s", d.as_secs())),
                    b.query
                )?;
            }
            let pids: Vec<String> = self.blockers.iter().map(|b| b.pid.to_string()).collect();
            write!(
                f,
                "\nLet those transactions finish (or end them: SELECT pg_terminate_backend(pid) for pid {}), then run idem again; or apply the change yourself at a quiet moment:\n  {}",
                pids.join(", "),
                self.statement
            )?;
        }
        Ok(())
    }
}

fn sqlstate(err: &sqlx::Error) -> Option<String> {
    match err {
        sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()),
        _ => None,
    }
}

/// `{table}_{column}_idx`, shortened with a hash of the whole when longer than the 63
/// bytes Postgres keeps of a name: two long names cut to one prefix would otherwise be the
/// same index to `IF NOT EXISTS`.
fn index_name(table: &str, column: &str) -> String {
    const MAX: usize = 63;
    let full = format!("{table}_{column}_idx");
    if full.len() <= MAX {
        return full;
    }
    let hash = xxhash_rust::xxh3::xxh3_64(full.as_bytes()) as u32;
    let mut cut = MAX - 9;
    while !full.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}_{hash:08x}", &full[..cut])
}

fn quote(identifier: &str) -> String {
    format!("\"{}\"", identifier.replace('"', "\"\""))
}

impl DestinationTable {
    pub fn new(name: &str, columns: &[ColumnSpec]) -> Self {
        let table = quote(name);
        let typed: Vec<String> = columns.iter().map(|c| quote(&c.name)).collect();
        let args_from = |first: usize| -> String {
            (0..columns.len())
                .map(|i| format!(", ${}::text[]", i + first))
                .collect()
        };
        let column_aliases: String = (0..columns.len()).map(|i| format!(", c{i}")).collect();
        let casts: String = columns
            .iter()
            .enumerate()
            .map(|(i, c)| format!(", u.c{i}::{}", c.column_type.sql()))
            .collect();
        let insert_columns: String = typed.iter().map(|c| format!(", {c}")).collect();
        let updates: String = typed
            .iter()
            .map(|c| format!(", {c} = EXCLUDED.{c}"))
            .collect();
        let upsert_sql = format!(
            "INSERT INTO {table} (source_system, source_id, source_updated_at, data, content_hash, last_run_id{insert_columns})
             SELECT $1, u.source_id, u.updated_at, u.data::jsonb, u.hash, $2{casts}
             FROM UNNEST($3::text[], $4::timestamptz[], $5::text[], $6::bytea[]{upsert_args}) AS u(source_id, updated_at, data, hash{column_aliases})
             ON CONFLICT (source_system, source_id) DO UPDATE SET
               source_updated_at = EXCLUDED.source_updated_at, data = EXCLUDED.data,
               content_hash = EXCLUDED.content_hash, last_run_id = EXCLUDED.last_run_id,
               last_changed_at = now(), deleted_at = NULL{updates}
             WHERE {table}.source_updated_at IS NULL OR EXCLUDED.source_updated_at IS NULL
                OR EXCLUDED.source_updated_at >= {table}.source_updated_at
             RETURNING source_id",
            upsert_args = args_from(7)
        );
        let classify_hash_sql = format!(
            "SELECT t.source_id, t.content_hash = u.hash AND t.deleted_at IS NULL AS same,
                    t.source_updated_at > u.updated_at AS stored_is_newer,
                    CASE WHEN octet_length(t.content_hash) = 16 AND t.deleted_at IS NULL
                         THEN t.content_hash END AS legacy_hash
             FROM UNNEST($2::text[], $3::bytea[], $4::timestamptz[]) AS u(source_id, hash, updated_at)
             JOIN {table} t ON t.source_system = $1 AND t.source_id = u.source_id"
        );
        let same_columns: String = columns
            .iter()
            .enumerate()
            .map(|(i, c)| {
                format!(
                    " AND t.{} IS NOT DISTINCT FROM u.c{i}::{}",
                    quote(&c.name),
                    c.column_type.sql()
                )
            })
            .collect();
        // A legacy hash (see `normalize::HASH_VERSION`) found equal the old way gets the
        // new one; no other column moves, since nothing about the record changed.
        let rehash_sql = format!(
            "UPDATE {table} t SET content_hash = u.hash
             FROM UNNEST($2::text[], $3::bytea[], $4::bytea[]) AS u(source_id, hash, old)
             WHERE t.source_system = $1 AND t.source_id = u.source_id AND t.content_hash = u.old"
        );
        let classify_content_sql = format!(
            "SELECT t.source_id, (t.content_hash = u.hash OR octet_length(t.content_hash) = 16)
                    AND t.deleted_at IS NULL AND t.data = u.data::jsonb{same_columns} AS same,
                    t.source_updated_at > u.updated_at AS stored_is_newer
             FROM UNNEST($2::text[], $3::bytea[], $4::timestamptz[], $5::text[]{content_args}) AS u(source_id, hash, updated_at, data{column_aliases})
             JOIN {table} t ON t.source_system = $1 AND t.source_id = u.source_id",
            content_args = args_from(6)
        );
        Self {
            name: name.to_string(),
            columns: columns.to_vec(),
            classify_hash_sql,
            classify_content_sql,
            upsert_sql,
            rehash_sql,
            fingerprint: crate::normalize::mapping_fingerprint(columns),
            ddl: DdlPolicy::default(),
            indexed: vec!["last_changed_at".to_string()],
        }
    }

    /// Also keeps an index on each of these typed columns (see `indexed`); names that are
    /// not typed columns of the table are ignored.
    pub fn with_indexes(mut self, columns: impl IntoIterator<Item = String>) -> Self {
        for column in columns {
            if self.columns.iter().any(|c| c.name == column) && !self.indexed.contains(&column) {
                self.indexed.push(column);
            }
        }
        self
    }

    /// How this table's schema changes are made (default: allowed, short lock timeout).
    pub fn with_ddl(mut self, ddl: DdlPolicy) -> Self {
        self.ddl = ddl;
        self
    }

    /// Creates the table if missing and adds missing typed columns. Idempotent, and
    /// without any lock when nothing is missing: the catalog is read first, and DDL
    /// (which takes an ACCESS EXCLUSIVE lock even for `ADD COLUMN IF NOT EXISTS`) runs
    /// only for what is missing, under a short `lock_timeout`.
    pub async fn ensure(&self, pool: &PgPool) -> Result<(), StoreError> {
        let statements = self.missing_ddl(pool).await?;
        if !statements.is_empty() {
            if !self.ddl.allow {
                return Err(StoreError::SchemaChangeNotAllowed {
                    table: self.name.clone(),
                    statements,
                });
            }
            for statement in &statements {
                self.execute_ddl(pool, statement).await?;
            }
        }
        self.check_column_types(pool).await?;
        self.ensure_indexes(pool).await
    }

    /// Builds the missing indexes, if schema changes are allowed. An index only saves
    /// reading, so one that cannot be built (its lock is taken, the role does not own the
    /// table, `ddl = "never"`) is a warning naming the statement, never a failed run.
    async fn ensure_indexes(&self, pool: &PgPool) -> Result<(), StoreError> {
        let statements = self.missing_indexes(pool).await?;
        for statement in &statements {
            if !self.ddl.allow {
                tracing::warn!(
                    table = %self.name,
                    "the table lacks an index that lets each walk's end skip unchanged rows, and ddl = \"never\" leaves it to the table's owner; until it is built every walk reads the whole table at its end: {statement}"
                );
                continue;
            }
            if let Err(err) = self.execute_ddl(pool, statement).await {
                tracing::warn!(
                    table = %self.name,
                    "could not build an index (the next run tries again; until then each walk's end reads the whole table): {statement}: {}",
                    crate::errors::error_chain(&err)
                );
            }
        }
        Ok(())
    }

    /// Runs `ANALYZE` on the table when it never had statistics and the caller just wrote
    /// over 1,000 rows (`written`), or when more than half of it (and over 1,000 rows)
    /// changed since they were taken (Postgres counts writes with a delay of up to 10 s,
    /// hence the caller's own count for a first import). Autovacuum does this at a
    /// tenth, when it runs; where it is off (or has not come round after a first import)
    /// the planner guesses, and for a walk's end it guessed a read of every key (34 ms
    /// instead of 0.1 ms on 200,000 invoices). Statistics only steer plans, so a failure
    /// (a role that does not own the table gets a warning from Postgres) is logged, not
    /// returned. Returns whether it analyzed.
    pub async fn refresh_statistics_if_stale(&self, pool: &PgPool, written: u64) -> bool {
        let stale: Result<Option<bool>, sqlx::Error> = sqlx::query_scalar(
            "SELECT (last_analyze IS NULL AND last_autoanalyze IS NULL AND $2 > 1000)
                    OR n_mod_since_analyze > GREATEST(1000, n_live_tup / 2)
             FROM pg_stat_user_tables WHERE relid = to_regclass($1)",
        )
        .bind(quote(&self.name))
        .bind(i64::try_from(written).unwrap_or(i64::MAX))
        .fetch_optional(pool)
        .await
        .map(Option::flatten);
        let outcome = match stale {
            // One statement, so `lock_timeout` holds for the ANALYZE alone: it waits for a
            // VACUUM or another ANALYZE of the table, never long at a walk's end.
            Ok(Some(true)) => sqlx::raw_sql(&format!(
                "SET lock_timeout = '1s'; ANALYZE {}; RESET lock_timeout",
                quote(&self.name)
            ))
            .execute(pool)
            .await
            .map(|_| true),
            Ok(_) => Ok(false),
            Err(err) => Err(err),
        };
        outcome.unwrap_or_else(|err| {
            tracing::warn!(
                table = %self.name,
                "could not refresh the table's statistics (plans may read more than they need): {}",
                crate::errors::error_chain(&err)
            );
            false
        })
    }

    /// `CREATE INDEX` statements for the indexed columns that lead no valid index of the
    /// table yet (an index the owner made on such a column counts).
    pub async fn missing_indexes(&self, pool: &PgPool) -> Result<Vec<String>, StoreError> {
        let leading: Vec<String> = sqlx::query_scalar(
            "SELECT a.attname::text FROM pg_index i
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
             WHERE i.indrelid = to_regclass($1) AND i.indisvalid",
        )
        .bind(quote(&self.name))
        .fetch_all(pool)
        .await
        .context(|| format!("reading the indexes of table {}", self.name))?;
        Ok(self
            .indexed
            .iter()
            .filter(|column| !leading.contains(column))
            .map(|column| {
                format!(
                    "CREATE INDEX IF NOT EXISTS {} ON {} ({})",
                    quote(&index_name(&self.name, column)),
                    quote(&self.name),
                    quote(column)
                )
            })
            .collect())
    }

    /// The typed columns the table has now, by name, with their SQL types; `None` when
    /// the table does not exist.
    pub async fn catalog_columns(
        &self,
        pool: &PgPool,
    ) -> Result<Option<HashMap<String, String>>, StoreError> {
        let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(quote(&self.name))
            .fetch_one(pool)
            .await
            .context(|| format!("looking up table {} in the catalog", self.name))?;
        if !exists {
            return Ok(None);
        }
        let columns: Vec<(String, String)> = sqlx::query_as(
            "SELECT attname::text, format_type(atttypid, atttypmod)
             FROM pg_attribute
             WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped",
        )
        .bind(quote(&self.name))
        .fetch_all(pool)
        .await
        .context(|| format!("reading the columns of table {}", self.name))?;
        Ok(Some(columns.into_iter().collect()))
    }

    /// The statements that would bring the table to the connector's shape (none when it
    /// already has it).
    pub async fn missing_ddl(&self, pool: &PgPool) -> Result<Vec<String>, StoreError> {
        let table = quote(&self.name);
        let Some(existing) = self.catalog_columns(pool).await? else {
            return Ok(vec![self.create_sql(pool).await?]);
        };
        let additions: Vec<String> = self
            .columns
            .iter()
            .filter(|c| !existing.contains_key(&c.name))
            .map(|c| {
                format!(
                    "ADD COLUMN IF NOT EXISTS {} {}",
                    quote(&c.name),
                    c.column_type.sql()
                )
            })
            .collect();
        if additions.is_empty() {
            return Ok(Vec::new());
        }
        // One statement, so the table's lock is taken once for all new columns.
        Ok(vec![format!(
            "ALTER TABLE {table} {}",
            additions.join(", ")
        )])
    }

    async fn create_sql(&self, pool: &PgPool) -> Result<String, StoreError> {
        let lz4: bool = sqlx::query_scalar(
            "SELECT COALESCE(bool_or('lz4' = ANY(enumvals)), false) FROM pg_settings WHERE name = 'default_toast_compression'",
        )
        .fetch_one(pool)
        .await
        .context(|| "checking for lz4 support".into())?;
        // lz4 makes jsonb compression several times cheaper, which is where Postgres
        // spends its time on wide records.
        let compression = if lz4 { " COMPRESSION lz4" } else { "" };
        let typed: String = self
            .columns
            .iter()
            .map(|c| {
                format!(
                    ",\n                {} {}",
                    quote(&c.name),
                    c.column_type.sql()
                )
            })
            .collect();
        Ok(format!(
            "CREATE TABLE IF NOT EXISTS {} (
                source_system     text NOT NULL,
                source_id         text NOT NULL,
                data              jsonb{compression} NOT NULL,
                content_hash      bytea NOT NULL,
                source_updated_at timestamptz,
                first_seen_at     timestamptz NOT NULL DEFAULT now(),
                last_changed_at   timestamptz NOT NULL DEFAULT now(),
                last_run_id       uuid,
                deleted_at        timestamptz,
                CONSTRAINT {} UNIQUE (source_system, source_id){typed}
            )",
            quote(&self.name),
            quote(&format!("{}_source_key", self.name))
        ))
    }

    /// Runs one DDL statement in a transaction of its own under `lock_timeout`, a few
    /// times with backoff. While it waits for its lock every reader of the table queues
    /// behind it, so each wait is short; between attempts the readers go through.
    async fn execute_ddl(&self, pool: &PgPool, statement: &str) -> Result<(), StoreError> {
        let attempts = self.ddl.attempts.max(1);
        let mut backoff = Duration::from_millis(200);
        for attempt in 1..=attempts {
            let mut tx = pool
                .begin()
                .await
                .context(|| format!("starting a schema change of table {}", self.name))?;
            sqlx::query("SELECT set_config('lock_timeout', $1, true)")
                .bind(format!("{}ms", self.ddl.lock_timeout.as_millis().max(1)))
                .execute(&mut *tx)
                .await
                .context(|| "setting lock_timeout".into())?;
            let result = match sqlx::query(statement).execute(&mut *tx).await {
                Ok(_) => tx.commit().await,
                Err(err) => Err(err),
            };
            match result {
                Ok(()) => {
                    tracing::info!(table = %self.name, "schema change applied: {statement}");
                    return Ok(());
                }
                Err(err) if sqlstate(&err).as_deref() == Some("55P03") => {
                    tracing::warn!(
                        table = %self.name,
                        attempt,
                        "a schema change could not get its lock within {:?}",
                        self.ddl.lock_timeout
                    );
                    if attempt < attempts {
                        tokio::time::sleep(backoff).await;
                        backoff *= 2;
                    }
                }
                // Two processes creating the same table at once: the loser sees a
                // duplicate in the catalog; the next attempt finds the table there.
                Err(err) if sqlstate(&err).as_deref() == Some("23505") && attempt < attempts => {}
                Err(err) => {
                    return Err(err)
                        .context(|| format!("changing the schema of table {}", self.name));
                }
            }
        }
        Err(StoreError::SchemaLocked(Box::new(LockedOut {
            table: self.name.clone(),
            statement: statement.to_string(),
            attempts,
            lock_timeout: self.ddl.lock_timeout,
            blockers: self.lock_holders(pool).await,
        })))
    }

    /// The sessions holding a lock on the table: each of them conflicts with the ACCESS
    /// EXCLUSIVE lock DDL needs. Best effort: an error here must not hide the lock error.
    async fn lock_holders(&self, pool: &PgPool) -> Vec<Blocker> {
        sqlx::query_as::<_, (i32, String, Option<String>, Option<f64>, String)>(
            "SELECT a.pid, COALESCE(a.application_name, ''), a.state,
                    EXTRACT(EPOCH FROM now() - COALESCE(a.xact_start, a.query_start))::float8,
                    left(regexp_replace(COALESCE(a.query, ''), '\\s+', ' ', 'g'), 120)
             FROM pg_stat_activity a
             WHERE a.pid IN (SELECT l.pid FROM pg_locks l
                             WHERE l.relation = to_regclass($1) AND l.granted
                               AND l.pid <> pg_backend_pid())
             ORDER BY a.xact_start NULLS LAST",
        )
        .bind(quote(&self.name))
        .fetch_all(pool)
        .await
        .unwrap_or_default()
        .into_iter()
        .map(|(pid, application_name, state, seconds, query)| Blocker {
            pid,
            application_name,
            state: state.unwrap_or_default(),
            running_for: seconds.map(|s| Duration::from_secs_f64(s.max(0.0))),
            query,
        })
        .collect()
    }

    /// Compares the typed columns' types in Postgres with the connector's. `ADD COLUMN IF
    /// NOT EXISTS` leaves a column whose declared type changed as it was, and every later
    /// upsert would fail (or cast silently): the run stops first and says how to migrate.
    /// idem does not run the ALTER itself: it rewrites the table under an exclusive lock,
    /// and whether the old values convert is the user's call.
    pub async fn check_column_types(&self, pool: &PgPool) -> Result<(), StoreError> {
        let names: Vec<&str> = self.columns.iter().map(|c| c.name.as_str()).collect();
        let declared: Vec<&str> = self.columns.iter().map(|c| c.column_type.sql()).collect();
        let drift: Vec<(String, String, String)> = sqlx::query_as(
            "SELECT c.name, format_type(a.atttypid, a.atttypmod), c.declared::regtype::text
             FROM unnest($2::text[], $3::text[]) WITH ORDINALITY AS c(name, declared, n)
             JOIN pg_attribute a ON a.attrelid = to_regclass($1) AND a.attname = c.name
                                 AND a.attnum > 0 AND NOT a.attisdropped
             WHERE a.atttypid <> c.declared::regtype
             ORDER BY c.n",
        )
        .bind(quote(&self.name))
        .bind(&names)
        .bind(&declared)
        .fetch_all(pool)
        .await
        .context(|| {
            format!(
                "comparing the columns of table {} with the connector",
                self.name
            )
        })?;
        if drift.is_empty() {
            return Ok(());
        }
        let table = quote(&self.name);
        let changes = drift
            .iter()
            .map(|(column, stored, wanted)| {
                let column_sql = quote(column);
                format!(
                    "column {column} is {stored} in Postgres but the connector declares {wanted}; to migrate: ALTER TABLE {table} ALTER COLUMN {column_sql} TYPE {wanted} USING {column_sql}::{wanted};"
                )
            })
            .collect::<Vec<_>>()
            .join(" ");
        Err(StoreError::SchemaDrift {
            table: self.name.clone(),
            changes,
        })
    }

    /// Upserts one page's rows (already de-duplicated by source id): one statement to
    /// find what is new or changed, one to write only those. Unchanged rows are not
    /// touched at all: no row version, no lock, no WAL.
    ///
    /// The rows written carry `run_id` in `last_run_id`, and the walk's final rule pass
    /// skips them (`ledger::rules::Scope::WalkEnd`): every caller must match the returned
    /// `changed` rows against the stream's rules in the same transaction.
    pub async fn write_page(
        &self,
        connection: &mut PgConnection,
        source_system: &str,
        run_id: Uuid,
        rows: &[Row],
        compare: Compare,
        dry_run: bool,
    ) -> Result<WriteCounts, StoreError> {
        if rows.is_empty() {
            return Ok(WriteCounts::default());
        }
        let ids: Vec<&str> = rows.iter().map(|r| r.source_id.as_str()).collect();
        let hashes: Vec<&[u8]> = rows.iter().map(|r| r.hash.as_slice()).collect();
        let versions: Vec<Option<chrono::DateTime<chrono::Utc>>> =
            rows.iter().map(|r| r.updated_at).collect();
        // Rows stored with a legacy hash and unchanged: (id, new hash, old hash).
        let mut rehash: Vec<(&str, &[u8], Vec<u8>)> = Vec::new();
        let mut by_id: HashMap<&str, &Row> = HashMap::new();
        let existing: HashMap<String, bool> = match compare {
            Compare::Hash => sqlx::query(&self.classify_hash_sql)
                .bind(source_system)
                .bind(&ids)
                .bind(&hashes)
                .bind(&versions),
            Compare::Content => {
                let data: Vec<&str> = rows.iter().map(|r| r.data.as_str()).collect();
                let mut query = sqlx::query(&self.classify_content_sql)
                    .bind(source_system)
                    .bind(&ids)
                    .bind(&hashes)
                    .bind(&versions)
                    .bind(data);
                for index in 0..self.columns.len() {
                    query = query.bind(
                        rows.iter()
                            .map(|r| r.values[index].clone())
                            .collect::<Vec<_>>(),
                    );
                }
                query
            }
        }
        .fetch_all(&mut *connection)
        .await
        .context(|| format!("comparing a page with table {}", self.name))?
        .into_iter()
        .map(|row| {
            // An older version than the stored one is not written: to the caller it is
            // unchanged (the table already holds something newer). Skipping it here keeps
            // the row unlocked; the upsert's WHERE guards against a concurrent writer.
            let id = row.get::<String, _>(0);
            let same = row.get::<Option<bool>, _>(1).unwrap_or(false);
            let stored_is_newer = row.get::<Option<bool>, _>(2).unwrap_or(false);
            let legacy = match compare {
                Compare::Hash if !same && !stored_is_newer => row.get::<Option<Vec<u8>>, _>(3),
                _ => None,
            };
            let Some(old) = legacy else {
                return (id, same || stored_is_newer);
            };
            if by_id.is_empty() {
                by_id = rows.iter().map(|r| (r.source_id.as_str(), r)).collect();
            }
            let unchanged = by_id.get(id.as_str()).is_some_and(|new| {
                let equal = crate::normalize::legacy_hash(&self.fingerprint, &new.data).as_ref()
                    == Some(&old);
                if equal {
                    rehash.push((new.source_id.as_str(), new.hash.as_slice(), old));
                }
                equal
            });
            (id, unchanged)
        })
        .collect();
        if !rehash.is_empty() && !dry_run {
            sqlx::query(&self.rehash_sql)
                .bind(source_system)
                .bind(rehash.iter().map(|r| r.0).collect::<Vec<_>>())
                .bind(rehash.iter().map(|r| r.1).collect::<Vec<_>>())
                .bind(rehash.iter().map(|r| r.2.as_slice()).collect::<Vec<_>>())
                .execute(&mut *connection)
                .await
                .context(|| format!("updating legacy content hashes in table {}", self.name))?;
        }

        let mut counts = WriteCounts::default();
        let to_write: Vec<&Row> = rows
            .iter()
            .filter(|row| match existing.get(&row.source_id) {
                Some(true) => {
                    counts.unchanged += 1;
                    false
                }
                Some(false) => {
                    counts.updated += 1;
                    true
                }
                None => {
                    counts.inserted += 1;
                    true
                }
            })
            .collect();
        if to_write.is_empty() || dry_run {
            counts.changed = to_write.iter().map(|r| r.source_id.clone()).collect();
            return Ok(counts);
        }
        let mut query = sqlx::query(&self.upsert_sql)
            .bind(source_system)
            .bind(run_id)
            .bind(
                to_write
                    .iter()
                    .map(|r| r.source_id.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(to_write.iter().map(|r| r.updated_at).collect::<Vec<_>>())
            .bind(to_write.iter().map(|r| r.data.as_str()).collect::<Vec<_>>())
            .bind(
                to_write
                    .iter()
                    .map(|r| r.hash.as_slice())
                    .collect::<Vec<_>>(),
            );
        for index in 0..self.columns.len() {
            query = query.bind(
                to_write
                    .iter()
                    .map(|r| r.values[index].clone())
                    .collect::<Vec<_>>(),
            );
        }
        // What the upsert returns, not what it was given: a row a concurrent writer has
        // meanwhile stored in a newer version is left as it is, and is not owed anything.
        counts.changed = query
            .fetch_all(&mut *connection)
            .await
            .context(|| format!("upserting a page into table {}", self.name))?
            .into_iter()
            .map(|row| row.get::<String, _>(0))
            .collect();
        Ok(counts)
    }

    /// Marks rows that a completed full walk did not see as deleted at the vendor.
    pub async fn mark_deleted(
        &self,
        connection: &mut PgConnection,
        source_system: &str,
        seen: &[String],
    ) -> Result<u64, StoreError> {
        let sql = format!(
            "UPDATE {} SET deleted_at = now(), last_changed_at = now()
             WHERE source_system = $1 AND deleted_at IS NULL AND NOT (source_id = ANY($2))",
            quote(&self.name)
        );
        let done = sqlx::query(&sql)
            .bind(source_system)
            .bind(seen)
            .execute(connection)
            .await
            .context(|| format!("marking deleted rows of {}", self.name))?;
        Ok(done.rows_affected())
    }
}

#[cfg(test)]
mod tests {
    use super::index_name;

    #[test]
    fn index_names_fit_postgres_and_stay_apart_when_cut() {
        assert_eq!(
            index_name("demo_invoices", "due_date"),
            "demo_invoices_due_date_idx"
        );
        let long = "a_destination_table_whose_name_is_as_long_as_postgres_allows_it_";
        let first = index_name(long, "last_changed_at");
        let second = index_name(long, "due_date");
        assert!(first.len() <= 63 && second.len() <= 63, "{first} {second}");
        assert_ne!(first, second);
        // A cut never splits a character.
        let accented = index_name(&"é".repeat(40), "due_date");
        assert!(accented.len() <= 63, "{accented}");
    }
}
