//! idem's own state: checkpoints, runs with their counters, and record failures.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::{Context, StoreError};
use crate::normalize::RecordFailure;

/// The regular checkpoint's scope; replays use their own.
pub const MAIN_SCOPE: &str = "main";

/// Where a stream (or a replay) got to.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Checkpoint {
    /// The vendor's opaque cursor, kept across runs (`cursor` streams).
    pub cursor: Option<String>,
    /// The largest `updated_at` applied (`high_water_mark` streams).
    pub high_water_mark: Option<DateTime<Utc>>,
    /// Where an interrupted walk resumes; `None` when the last walk completed.
    pub resume: Option<Resume>,
}

/// The state of a walk in progress, committed with every page.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Resume {
    /// The run that started the walk.
    pub run_id: Uuid,
    /// Inclusive lower bound of the walk's window.
    pub from: Option<DateTime<Utc>>,
    /// Exclusive upper bound of the walk's window.
    pub to: Option<DateTime<Utc>>,
    /// The token of the next page to fetch.
    pub next_page: Option<String>,
    /// The largest `updated_at` applied so far in this walk.
    pub max_applied: Option<DateTime<Utc>>,
    /// Results read since the query (re)started, for vendors that cap a query.
    pub results_in_query: u64,
    /// When the walk started (the mark never passes it for unsorted vendors).
    pub started_at: Option<DateTime<Utc>>,
    /// Pages committed so far.
    pub pages: u64,
}

pub async fn load_checkpoint(
    pool: &PgPool,
    source_system: &str,
    stream: &str,
    partition: &str,
    scope: &str,
) -> Result<Checkpoint, StoreError> {
    let row: Option<CheckpointRow> = sqlx::query_as(
        "SELECT source_system, stream, partition, scope, cursor, high_water_mark, resume, updated_at FROM idem_checkpoints
         WHERE source_system = $1 AND stream = $2 AND partition = $3 AND scope = $4",
    )
    .bind(source_system)
    .bind(stream)
    .bind(partition)
    .bind(scope)
    .fetch_optional(pool)
    .await
    .context(|| format!("reading the checkpoint of {source_system}.{stream}"))?;
    let Some(row) = row else {
        return Ok(Checkpoint::default());
    };
    Ok(Checkpoint {
        cursor: row.cursor,
        high_water_mark: row.high_water_mark,
        resume: row
            .resume
            .and_then(|value| serde_json::from_value(value).ok()),
    })
}

/// A checkpoint row as stored, for `idem status` and `idem checkpoint show`.
#[derive(Debug, Clone, sqlx::FromRow, Serialize)]
pub struct CheckpointRow {
    pub source_system: String,
    pub stream: String,
    /// `""` for an unpartitioned stream.
    pub partition: String,
    pub scope: String,
    pub cursor: Option<String>,
    pub high_water_mark: Option<DateTime<Utc>>,
    pub resume: Option<Value>,
    pub updated_at: DateTime<Utc>,
}

/// Every checkpoint, or one stream's (all its scopes).
pub async fn list_checkpoints(
    pool: &PgPool,
    only: Option<(&str, &str)>,
) -> Result<Vec<CheckpointRow>, StoreError> {
    sqlx::query_as(
        "SELECT source_system, stream, partition, scope, cursor, high_water_mark, resume, updated_at FROM idem_checkpoints
         WHERE ($1::text IS NULL OR (source_system = $1 AND stream = $2)) ORDER BY 1, 2, 3, 4",
    )
    .bind(only.map(|o| o.0))
    .bind(only.map(|o| o.1))
    .fetch_all(pool)
    .await
    .context(|| "listing checkpoints".into())
}

/// Writes a checkpoint inside the page's transaction. The mark never moves backwards:
/// `GREATEST` keeps the stored one when it is larger.
pub async fn save_checkpoint(
    connection: &mut PgConnection,
    source_system: &str,
    stream: &str,
    partition: &str,
    scope: &str,
    checkpoint: &Checkpoint,
    run_id: Uuid,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO idem_checkpoints (source_system, stream, partition, scope, cursor, high_water_mark, resume, last_run_id, updated_at)
         VALUES ($1, $2, $8, $3, $4, $5, $6, $7, now())
         ON CONFLICT (source_system, stream, partition, scope) DO UPDATE SET
           cursor = EXCLUDED.cursor,
           high_water_mark = GREATEST(idem_checkpoints.high_water_mark, EXCLUDED.high_water_mark),
           resume = EXCLUDED.resume, last_run_id = EXCLUDED.last_run_id, updated_at = now()",
    )
    .bind(source_system)
    .bind(stream)
    .bind(scope)
    .bind(&checkpoint.cursor)
    .bind(checkpoint.high_water_mark)
    .bind(checkpoint.resume.as_ref().map(|r| serde_json::to_value(r).expect("serializes")))
    .bind(run_id)
    .bind(partition)
    .execute(connection)
    .await
    .context(|| format!("advancing the checkpoint of {source_system}.{stream}"))?;
    Ok(())
}

/// Sets or clears the regular checkpoint by hand (`idem checkpoint set/reset`): the one
/// place the mark may move backwards.
pub async fn overwrite_checkpoint(
    pool: &PgPool,
    source_system: &str,
    stream: &str,
    partition: &str,
    high_water_mark: Option<DateTime<Utc>>,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO idem_checkpoints (source_system, stream, partition, scope, high_water_mark)
         VALUES ($1, $2, $4, 'main', $3)
         ON CONFLICT (source_system, stream, partition, scope) DO UPDATE SET
           cursor = NULL, high_water_mark = EXCLUDED.high_water_mark, resume = NULL, updated_at = now()",
    )
    .bind(source_system)
    .bind(stream)
    .bind(high_water_mark)
    .bind(partition)
    .execute(pool)
    .await
    .context(|| format!("overwriting the checkpoint of {source_system}.{stream}"))?;
    Ok(())
}

/// Counters of a run (or of one page, added to the run's).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Counters {
    pub pages: u64,
    pub fetched: u64,
    pub inserted: u64,
    pub updated: u64,
    pub unchanged: u64,
    pub failed: u64,
    pub deleted: u64,
}

impl std::ops::AddAssign for Counters {
    fn add_assign(&mut self, other: Self) {
        self.pages += other.pages;
        self.fetched += other.fetched;
        self.inserted += other.inserted;
        self.updated += other.updated;
        self.unchanged += other.unchanged;
        self.failed += other.failed;
        self.deleted += other.deleted;
    }
}

/// Records a new run. Runs of the stream still marked `running` were interrupted (we
/// hold the stream's lock, so none is really running): they become `abandoned`.
pub async fn start_run(
    pool: &PgPool,
    source_system: &str,
    stream: &str,
    partition: &str,
    mode: &str,
    window: (Option<DateTime<Utc>>, Option<DateTime<Utc>>),
) -> Result<Uuid, StoreError> {
    let context = || format!("recording the start of a run of {source_system}.{stream}");
    sqlx::query(
        "UPDATE idem_runs SET status = 'abandoned', finished_at = now(), error = 'interrupted (process stopped)'
         WHERE source_system = $1 AND stream = $2 AND partition = $3 AND status = 'running'",
    )
    .bind(source_system)
    .bind(stream)
    .bind(partition)
    .execute(pool)
    .await
    .context(context)?;
    let id = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO idem_runs (id, source_system, stream, mode, window_from, window_to, status, instance, partition)
         VALUES ($1, $2, $3, $4, $5, $6, 'running', $7, $8)",
    )
    .bind(id)
    .bind(source_system)
    .bind(stream)
    .bind(mode)
    .bind(window.0)
    .bind(window.1)
    .bind(crate::identity::id())
    .bind(partition)
    .execute(pool)
    .await
    .context(context)?;
    Ok(id)
}

/// Adds one page's counters to its run, inside the page's transaction.
pub async fn add_counters(
    connection: &mut PgConnection,
    run_id: Uuid,
    c: &Counters,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE idem_runs SET pages = pages + $2, fetched = fetched + $3, inserted = inserted + $4,
           updated = updated + $5, unchanged = unchanged + $6, failed = failed + $7, deleted = deleted + $8
         WHERE id = $1",
    )
    .bind(run_id)
    .bind(c.pages as i64)
    .bind(c.fetched as i64)
    .bind(c.inserted as i64)
    .bind(c.updated as i64)
    .bind(c.unchanged as i64)
    .bind(c.failed as i64)
    .bind(c.deleted as i64)
    .execute(connection)
    .await
    .context(|| format!("updating the counters of run {run_id}"))?;
    Ok(())
}

pub async fn update_window(
    pool: &PgPool,
    run_id: Uuid,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
) -> Result<(), StoreError> {
    sqlx::query("UPDATE idem_runs SET window_from = $2, window_to = $3 WHERE id = $1")
        .bind(run_id)
        .bind(from)
        .bind(to)
        .execute(pool)
        .await
        .context(|| format!("recording the window of run {run_id}"))?;
    Ok(())
}

pub async fn finish_run(
    pool: &PgPool,
    run_id: Uuid,
    status: &str,
    error: Option<&str>,
) -> Result<(), StoreError> {
    // The error may quote a vendor's body: a NUL in it would make the run's end
    // unrecordable, leaving it `running`.
    sqlx::query("UPDATE idem_runs SET status = $2, error = $3, finished_at = now() WHERE id = $1")
        .bind(run_id)
        .bind(status)
        .bind(error.map(crate::values::sanitize_text))
        .execute(pool)
        .await
        .context(|| format!("recording the end of run {run_id}"))?;
    Ok(())
}

/// A recorded run, for `idem status`.
#[derive(Debug, Clone, sqlx::FromRow, Serialize)]
pub struct RunSummary {
    pub id: Uuid,
    pub source_system: String,
    pub stream: String,
    /// `""` for an unpartitioned stream.
    pub partition: String,
    pub mode: String,
    pub status: String,
    pub window_from: Option<DateTime<Utc>>,
    pub window_to: Option<DateTime<Utc>>,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub pages: i64,
    pub fetched: i64,
    pub inserted: i64,
    pub updated: i64,
    pub unchanged: i64,
    pub failed: i64,
    pub deleted: i64,
    pub error: Option<String>,
}

/// The latest `per_stream` runs of every stream, newest first within a stream.
/// The latest `per_stream` runs of every stream (or of `only` one), newest first: what
/// `idem status` and the console show.
pub async fn recent_runs(
    pool: &PgPool,
    only: Option<(&str, &str)>,
    per_stream: i64,
) -> Result<Vec<RunSummary>, StoreError> {
    sqlx::query_as(
        "SELECT id, source_system, stream, partition, mode, status, window_from, window_to, started_at, finished_at,
                pages, fetched, inserted, updated, unchanged, failed, deleted, error
         FROM (SELECT *, row_number() OVER (PARTITION BY source_system, stream, partition ORDER BY started_at DESC) AS n
               FROM idem_runs WHERE ($1::text IS NULL OR (source_system = $1 AND stream = $2))) r
         WHERE n <= $3 ORDER BY source_system, stream, partition, started_at DESC",
    )
    .bind(only.map(|o| o.0))
    .bind(only.map(|o| o.1))
    .bind(per_stream)
    .fetch_all(pool)
    .await
    .context(|| "listing recent runs".into())
}

/// Records failed records (attempts counted), inside the page's transaction.
pub async fn record_failures(
    connection: &mut PgConnection,
    source_system: &str,
    stream: &str,
    partition: &str,
    run_id: Uuid,
    failures: &[RecordFailure],
) -> Result<(), StoreError> {
    if failures.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO idem_failures (source_system, stream, partition, record_key, source_id, payload, error, last_run_id)
         SELECT $1, $2, $8, f.key, f.source_id, f.payload, f.error, $3
         FROM UNNEST($4::text[], $5::text[], $6::jsonb[], $7::text[]) AS f(key, source_id, payload, error)
         ON CONFLICT (source_system, stream, partition, record_key) DO UPDATE SET
           attempts = idem_failures.attempts + 1, payload = EXCLUDED.payload, error = EXCLUDED.error,
           source_id = EXCLUDED.source_id, last_failed_at = now(), last_run_id = EXCLUDED.last_run_id",
    )
    .bind(source_system)
    .bind(stream)
    .bind(run_id)
    .bind(failures.iter().map(|f| f.record_key.as_str()).collect::<Vec<_>>())
    .bind(failures.iter().map(|f| f.source_id.as_deref()).collect::<Vec<_>>())
    .bind(failures.iter().map(|f| f.payload.clone()).collect::<Vec<_>>())
    .bind(failures.iter().map(|f| f.error.as_str()).collect::<Vec<_>>())
    .bind(partition)
    .execute(connection)
    .await
    .context(|| format!("recording failed records of {source_system}.{stream}"))?;
    Ok(())
}

/// Removes failures whose records have now been stored.
pub async fn clear_failures(
    connection: &mut PgConnection,
    source_system: &str,
    stream: &str,
    partition: &str,
    keys: &[String],
) -> Result<u64, StoreError> {
    if keys.is_empty() {
        return Ok(0);
    }
    let done = sqlx::query("DELETE FROM idem_failures WHERE source_system = $1 AND stream = $2 AND partition = $4 AND record_key = ANY($3)")
        .bind(source_system)
        .bind(stream)
        .bind(keys)
        .bind(partition)
        .execute(connection)
        .await
        .context(|| format!("clearing resolved failures of {source_system}.{stream}"))?;
    Ok(done.rows_affected())
}

/// A stored failure, for retrying and for `idem status`.
#[derive(Debug, Clone, sqlx::FromRow, Serialize)]
pub struct StoredFailure {
    pub record_key: String,
    pub source_id: Option<String>,
    pub payload: Value,
    pub error: String,
    pub attempts: i32,
}

pub async fn failures_of(
    pool: &PgPool,
    source_system: &str,
    stream: &str,
    partition: &str,
) -> Result<Vec<StoredFailure>, StoreError> {
    sqlx::query_as(
        "SELECT record_key, source_id, payload, error, attempts FROM idem_failures
         WHERE source_system = $1 AND stream = $2 AND partition = $3 ORDER BY record_key",
    )
    .bind(source_system)
    .bind(stream)
    .bind(partition)
    .fetch_all(pool)
    .await
    .context(|| format!("reading failures of {source_system}.{stream}"))
}

/// Source ids with a stored failure in any of `streams` (the streams writing one table).
pub async fn failing_source_ids(
    pool: &PgPool,
    source_system: &str,
    streams: &[String],
) -> Result<Vec<String>, StoreError> {
    sqlx::query_scalar(
        "SELECT DISTINCT source_id FROM idem_failures
         WHERE source_system = $1 AND stream = ANY($2) AND source_id IS NOT NULL",
    )
    .bind(source_system)
    .bind(streams)
    .fetch_all(pool)
    .await
    .context(|| format!("reading failed records of {source_system}"))
}

/// Removes the failures of records now stored, by record identity: `streams` are all the
/// streams writing the record's table, so a failure is superseded whichever stream (or
/// run) stores the record later.
pub async fn clear_failures_of_records(
    connection: &mut PgConnection,
    source_system: &str,
    streams: &[String],
    source_ids: &[String],
) -> Result<u64, StoreError> {
    if source_ids.is_empty() {
        return Ok(0);
    }
    let done = sqlx::query(
        "DELETE FROM idem_failures WHERE source_system = $1 AND stream = ANY($2) AND source_id = ANY($3)",
    )
    .bind(source_system)
    .bind(streams)
    .bind(source_ids)
    .execute(connection)
    .await
    .context(|| format!("clearing resolved failures of {source_system}"))?;
    Ok(done.rows_affected())
}
