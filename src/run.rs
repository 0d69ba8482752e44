//! One stream run, regular or replay: fetch pages (overlapped with writing), and commit
//! each page's rows, failures, counters and checkpoint in one transaction.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgPool;
use tokio::sync::mpsc;
use tracing::{Instrument, info, info_span, warn};
use uuid::Uuid;

use crate::connector::{
    Connector, IncrementalSpec, Page, PageRequest, Source, SourceError, StreamSpec,
};
use crate::failpoint::crash_point;
use crate::http::{HttpSource, VendorClient};
use crate::ledger;
use crate::normalize::{Normalizer, RecordFailure, Row};
use crate::store::state::{self, Checkpoint, Counters, MAIN_SCOPE, Resume};
use crate::store::table::{Compare, DestinationTable};
use crate::store::{Context, StoreError, StreamLock};

/// Pages fetched ahead of the writer: enough to keep both the network and Postgres busy,
/// few enough that memory stays flat whatever the stream's size.
const PAGES_IN_FLIGHT: usize = 2;

/// What kind of run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Continue from the stream's checkpoint.
    Regular,
    /// Re-read `[from, to)` with its own resume point; the regular checkpoint is untouched.
    Replay {
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        /// Names the replay's resume point: the same arguments resume the same replay
        /// (for `--since 7d` the window of the interrupted replay is kept).
        label: String,
        /// Discard the replay's resume point and start the window again.
        restart: bool,
    },
}

/// How to run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub mode: Mode,
    /// Fetch and compare, write nothing.
    pub dry_run: bool,
    /// When this turns true the run stops after the page it is writing; the next run
    /// resumes after it (graceful shutdown of `idem serve`).
    pub stop: Option<tokio::sync::watch::Receiver<bool>>,
}

impl RunOptions {
    pub fn new(mode: Mode, dry_run: bool) -> Self {
        Self {
            mode,
            dry_run,
            stop: None,
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Every record stored.
    Succeeded,
    /// Finished, but some records failed (they are in the failures table).
    Partial,
    /// Stopped by an error; committed pages stay and the next run resumes after them.
    Failed,
}

/// The outcome of one run, as reported to the user.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunReport {
    pub source_system: String,
    pub stream: String,
    pub run_id: Option<Uuid>,
    pub mode: &'static str,
    pub dry_run: bool,
    pub status: RunStatus,
    pub counters: Counters,
    pub skipped_outside_window: u64,
    pub duration_ms: u64,
    pub error: Option<String>,
}

/// Why a run did not start (or could not record its end).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(
        "another run of {source_system}.{stream} is in progress (it holds the stream's lock); nothing was written"
    )]
    Locked {
        source_system: String,
        stream: String,
    },
    #[error("unknown stream '{stream}' in connector {source_system}")]
    UnknownStream {
        source_system: String,
        stream: String,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Runs streams one after another through the declarative HTTP source, sharing one
/// [`VendorClient`] per vendor so its rate limit and OAuth2 token hold across streams.
#[derive(Default)]
pub struct StreamRunner {
    clients: Vec<(String, Arc<VendorClient>)>,
}

impl StreamRunner {
    pub async fn run(
        &mut self,
        pool: &PgPool,
        database_url: &str,
        connector: &Connector,
        stream: &str,
        options: &RunOptions,
    ) -> Result<RunReport, RunError> {
        let spec = connector
            .stream(stream)
            .ok_or_else(|| RunError::UnknownStream {
                source_system: connector.spec.source_system.clone(),
                stream: stream.to_string(),
            })?;
        let name = &connector.spec.source_system;
        let client = match self.clients.iter().find(|(n, _)| n == name) {
            Some((_, client)) => client.clone(),
            None => {
                let client = VendorClient::new(connector.clone());
                self.clients.push((name.clone(), client.clone()));
                client
            }
        };
        let source = HttpSource::new(client, spec.clone());
        run_stream(pool, database_url, connector, stream, source, options).await
    }
}

/// Runs one stream of `connector`, reading pages from `source`.
pub async fn run_stream<S: Source + 'static>(
    pool: &PgPool,
    database_url: &str,
    connector: &Connector,
    stream_name: &str,
    source: S,
    options: &RunOptions,
) -> Result<RunReport, RunError> {
    let source_system = connector.spec.source_system.clone();
    let stream = connector
        .stream(stream_name)
        .ok_or_else(|| RunError::UnknownStream {
            source_system: source_system.clone(),
            stream: stream_name.to_string(),
        })?;
    let span = info_span!("run", source_system = %source_system, stream = %stream_name, run_id = tracing::field::Empty);
    async move {
        let lock = if options.dry_run {
            None
        } else {
            Some(
                StreamLock::try_acquire(database_url, &source_system, stream_name)
                    .await?
                    .ok_or_else(|| RunError::Locked {
                        source_system: source_system.clone(),
                        stream: stream_name.to_string(),
                    })?,
            )
        };
        let result = Walk::prepare(pool, &source_system, stream_name, stream, options)
            .await?
            .execute(source)
            .await;
        if let Some(lock) = lock {
            lock.release().await;
        }
        result
    }
    .instrument(span)
    .await
}

/// One walk's fixed inputs and running state.
struct Walk<'a> {
    pool: &'a PgPool,
    source_system: &'a str,
    stream_name: &'a str,
    stream: &'a StreamSpec,
    options: &'a RunOptions,
    table: DestinationTable,
    table_exists: bool,
    normalizer: Normalizer,
    scope: String,
    checkpoint: Checkpoint,
    resume: Resume,
    resumed: bool,
    run_id: Uuid,
    /// Records outside a replay's window are skipped when the vendor cannot filter.
    filter_window: Option<(DateTime<Utc>, DateTime<Utc>)>,
    failing_keys: HashSet<String>,
    counters: Counters,
    skipped_outside_window: u64,
    seen_ids: Option<Vec<String>>,
    last_token: Option<String>,
}

impl<'a> Walk<'a> {
    async fn prepare(
        pool: &'a PgPool,
        source_system: &'a str,
        stream_name: &'a str,
        stream: &'a StreamSpec,
        options: &'a RunOptions,
    ) -> Result<Walk<'a>, RunError> {
        let table = DestinationTable::new(&stream.table, &stream.columns);
        let table_exists = if options.dry_run {
            sqlx::query_scalar::<_, bool>("SELECT to_regclass($1) IS NOT NULL")
                .bind(format!("\"{}\"", stream.table))
                .fetch_one(pool)
                .await
                .context(|| "looking for the destination table".into())?
        } else {
            table.ensure(pool).await?;
            true
        };
        let scope = match &options.mode {
            Mode::Regular => MAIN_SCOPE.to_string(),
            Mode::Replay { label, .. } => format!("replay:{label}"),
        };
        let mut checkpoint =
            state::load_checkpoint(pool, source_system, stream_name, &scope).await?;
        if let Mode::Replay { restart: true, .. } = options.mode {
            checkpoint.resume = None;
        }
        let now = Utc::now();
        let (resume, resumed) = match checkpoint.resume.clone() {
            Some(resume) => (resume, true),
            None => {
                let (from, to) = match (&options.mode, &stream.incremental) {
                    (Mode::Replay { from, to, .. }, _) => (Some(*from), Some(*to)),
                    (Mode::Regular, IncrementalSpec::HighWaterMark { overlap, .. }) => (
                        checkpoint
                            .high_water_mark
                            .map(|mark| mark - overlap.as_chrono()),
                        None,
                    ),
                    _ => (None, None),
                };
                let next_page = match (&options.mode, &stream.incremental) {
                    (Mode::Regular, IncrementalSpec::Cursor) => checkpoint.cursor.clone(),
                    _ => None,
                };
                (
                    Resume {
                        from,
                        to,
                        next_page,
                        started_at: Some(now),
                        ..Resume::default()
                    },
                    false,
                )
            }
        };
        let filter_window = match &options.mode {
            Mode::Regular => None,
            Mode::Replay { .. } => {
                let vendor_filters = matches!(
                    &stream.incremental,
                    IncrementalSpec::HighWaterMark {
                        param: Some(_),
                        param_to: Some(_),
                        ..
                    }
                );
                let window = resume.from.zip(resume.to);
                if let (false, Some((from, to))) = (vendor_filters, window) {
                    warn!(
                        "the vendor cannot filter this stream by a window: walking the whole list and skipping records outside [{from}, {to})"
                    );
                }
                window.filter(|_| !vendor_filters)
            }
        };
        let mode_name = match options.mode {
            Mode::Regular => "run",
            Mode::Replay { .. } => "replay",
        };
        let run_id = if options.dry_run {
            Uuid::nil()
        } else {
            state::start_run(
                pool,
                source_system,
                stream_name,
                mode_name,
                (resume.from, resume.to),
            )
            .await?
        };
        tracing::Span::current().record("run_id", tracing::field::display(run_id));
        if resumed {
            info!(page_token = ?resume.next_page, pages_done = resume.pages, "resuming an interrupted walk after its last committed page");
        }
        let failing_keys = if options.dry_run {
            HashSet::new()
        } else {
            state::failures_of(pool, source_system, stream_name)
                .await?
                .into_iter()
                .map(|f| f.record_key)
                .collect()
        };
        let seen_ids = matches!(
            stream.incremental,
            IncrementalSpec::Full { mark_deleted: true }
        )
        .then(|| (!resumed && options.mode == Mode::Regular).then(Vec::new))
        .flatten();
        Ok(Walk {
            pool,
            source_system,
            stream_name,
            stream,
            options,
            normalizer: Normalizer::new(stream),
            table,
            table_exists,
            scope,
            checkpoint,
            resume,
            resumed,
            run_id,
            filter_window,
            failing_keys,
            counters: Counters::default(),
            skipped_outside_window: 0,
            seen_ids,
            last_token: None,
        })
    }

    async fn execute<S: Source + 'static>(mut self, source: S) -> Result<RunReport, RunError> {
        let started = Instant::now();
        if !self.options.dry_run && self.options.mode == Mode::Regular {
            self.retry_stored_failures().await?;
        }
        let (pages_tx, mut pages_rx) =
            mpsc::channel::<Result<Fetched, SourceError>>(PAGES_IN_FLIGHT);
        let fetcher = tokio::spawn(
            fetch_pages(
                source,
                self.first_request(),
                self.query_cap(),
                self.resume.results_in_query,
                self.updated_pointer(),
                pages_tx,
            )
            .instrument(tracing::Span::current()),
        );
        let mut failure: Option<String> = None;
        let mut stop = self.options.stop.clone();
        // Where the time goes: waiting for the vendor, or writing to Postgres.
        let (mut waiting, mut writing) = (std::time::Duration::ZERO, std::time::Duration::ZERO);
        loop {
            let wait_started = Instant::now();
            let message = match &mut stop {
                Some(stop) if *stop.borrow() => None,
                Some(stop) => tokio::select! {
                    message = pages_rx.recv() => message,
                    _ = stop.changed() => None,
                },
                None => pages_rx.recv().await,
            };
            let Some(message) = message else {
                if stop.as_ref().is_some_and(|s| *s.borrow()) {
                    failure = Some(
                        "stopped by shutdown; the next run resumes after the last committed page"
                            .into(),
                    );
                }
                break;
            };
            waiting += wait_started.elapsed();
            match message {
                Ok(fetched) => {
                    let write_started = Instant::now();
                    let committed = self.commit_page(fetched).await;
                    writing += write_started.elapsed();
                    if let Err(err) = committed {
                        failure = Some(error_chain(&err));
                        break;
                    }
                }
                Err(err) => {
                    failure = Some(err.to_string());
                    break;
                }
            }
        }
        drop(pages_rx);
        fetcher.abort();
        if failure.is_none() && !self.options.dry_run {
            if let Err(err) = self.complete().await {
                failure = Some(error_chain(&err));
            }
        }
        let status = match (&failure, self.counters.failed) {
            (Some(_), _) => RunStatus::Failed,
            (None, 0) => RunStatus::Succeeded,
            (None, _) => RunStatus::Partial,
        };
        if !self.options.dry_run {
            let name = match status {
                RunStatus::Succeeded => "succeeded",
                RunStatus::Partial => "partial",
                RunStatus::Failed => "failed",
            };
            state::finish_run(self.pool, self.run_id, name, failure.as_deref()).await?;
            crash_point("run_after_finish", 1);
        }
        let duration = started.elapsed();
        let c = &self.counters;
        let per_second = c.fetched as f64 / duration.as_secs_f64().max(1e-3);
        if let Some(error) = &failure {
            tracing::error!(error = %error, pages = c.pages, fetched = c.fetched, "run failed; committed pages stay and the next run resumes after them");
        }
        info!(
            status = ?status, dry_run = self.options.dry_run, pages = c.pages, fetched = c.fetched, inserted = c.inserted,
            updated = c.updated, unchanged = c.unchanged, failed = c.failed, deleted = c.deleted,
            duration_ms = duration.as_millis() as u64, records_per_sec = per_second.round() as u64,
            waiting_for_vendor_ms = waiting.as_millis() as u64, writing_ms = writing.as_millis() as u64,
            "run finished"
        );
        Ok(RunReport {
            source_system: self.source_system.to_string(),
            stream: self.stream_name.to_string(),
            run_id: (!self.options.dry_run).then_some(self.run_id),
            mode: match self.options.mode {
                Mode::Regular => "run",
                Mode::Replay { .. } => "replay",
            },
            dry_run: self.options.dry_run,
            status,
            counters: self.counters,
            skipped_outside_window: self.skipped_outside_window,
            duration_ms: duration.as_millis() as u64,
            error: failure,
        })
    }

    fn first_request(&self) -> PageRequest {
        let vendor_window = self.filter_window.is_none();
        PageRequest {
            token: self.resume.next_page.clone(),
            from: if vendor_window {
                self.resume.from
            } else {
                None
            },
            to: if vendor_window { self.resume.to } else { None },
        }
    }

    fn query_cap(&self) -> Option<u64> {
        match &self.stream.incremental {
            IncrementalSpec::HighWaterMark {
                max_results_per_query,
                ..
            } => *max_results_per_query,
            _ => None,
        }
    }

    fn updated_pointer(&self) -> Option<(String, crate::connector::TimeFormat)> {
        self.stream
            .updated_at
            .as_ref()
            .map(|u| (u.pointer.clone(), u.format.clone()))
    }

    fn sorted(&self) -> bool {
        matches!(
            self.stream.incremental,
            IncrementalSpec::HighWaterMark { sorted: true, .. }
        )
    }

    /// Stored failures are normalized again first: a fixed mapping clears them even when
    /// the vendor does not send the record again.
    async fn retry_stored_failures(&mut self) -> Result<(), StoreError> {
        let stored = state::failures_of(self.pool, self.source_system, self.stream_name).await?;
        if stored.is_empty() {
            return Ok(());
        }
        let (rows, _still_failing) =
            self.normalize(stored.into_iter().map(|f| f.payload).collect());
        if rows.is_empty() {
            return Ok(());
        }
        let mut tx = self
            .pool
            .begin()
            .await
            .context(|| "starting a transaction".into())?;
        let written = self
            .table
            .write_page(
                &mut tx,
                self.source_system,
                self.run_id,
                &rows,
                Compare::Hash,
                false,
            )
            .await?;
        let keys: Vec<String> = rows.iter().map(|r| r.source_id.clone()).collect();
        state::clear_failures(&mut tx, self.source_system, self.stream_name, &keys).await?;
        let counters = Counters {
            inserted: written.inserted,
            updated: written.updated,
            unchanged: written.unchanged,
            ..Counters::default()
        };
        state::add_counters(&mut tx, self.run_id, &counters).await?;
        tx.commit()
            .await
            .context(|| "committing retried failures".into())?;
        for key in &keys {
            self.failing_keys.remove(key);
        }
        self.counters += counters;
        info!(
            cleared = keys.len(),
            "stored failures now normalize and were written"
        );
        Ok(())
    }

    fn normalize(&mut self, records: Vec<Value>) -> (Vec<Row>, Vec<RecordFailure>) {
        let mut rows: Vec<Row> = Vec::with_capacity(records.len());
        let mut failures = Vec::new();
        let mut position: HashMap<String, usize> = HashMap::new();
        for record in records {
            match self.normalizer.normalize(record) {
                Ok(row) => {
                    if let (Some((from, to)), Some(updated)) = (self.filter_window, row.updated_at)
                    {
                        if updated < from || updated >= to {
                            self.skipped_outside_window += 1;
                            continue;
                        }
                    }
                    // A record twice in one page: the later copy wins, and one statement
                    // never touches a row twice.
                    match position.get(&row.source_id) {
                        Some(&index) => rows[index] = row,
                        None => {
                            position.insert(row.source_id.clone(), rows.len());
                            rows.push(row);
                        }
                    }
                }
                Err(failure) => {
                    let _span = info_span!(
                        "record",
                        source_id = failure.source_id.as_deref().unwrap_or("")
                    )
                    .entered();
                    warn!(record_key = %failure.record_key, error = %failure.error, "record failed; it goes to the failures table and is retried next run");
                    failures.push(failure);
                }
            }
        }
        (rows, failures)
    }

    async fn commit_page(&mut self, fetched_page: Fetched) -> Result<(), StoreError> {
        let Fetched {
            token,
            page,
            next,
            results_in_query,
        } = fetched_page;
        let fetched = page.records.len() as u64;
        let (rows, failures) = self.normalize(page.records);
        let page_number = self.resume.pages + 1;
        let compare = match self.options.mode {
            Mode::Regular => Compare::Hash,
            Mode::Replay { .. } => Compare::Content,
        };
        let mut tx = self
            .pool
            .begin()
            .await
            .context(|| "starting a page transaction".into())?;
        let written = if self.table_exists {
            self.table
                .write_page(
                    &mut tx,
                    self.source_system,
                    self.run_id,
                    &rows,
                    compare,
                    self.options.dry_run,
                )
                .await?
        } else {
            crate::store::table::WriteCounts {
                inserted: rows.len() as u64,
                ..Default::default()
            }
        };
        let counters = Counters {
            pages: 1,
            fetched,
            inserted: written.inserted,
            updated: written.updated,
            unchanged: written.unchanged,
            failed: failures.len() as u64,
            deleted: 0,
        };
        let max_in_page = rows.iter().filter_map(|r| r.updated_at).max();
        self.resume.max_applied = self.resume.max_applied.max(max_in_page);
        self.resume.pages = page_number;
        self.resume.results_in_query = results_in_query;
        self.resume.next_page = next.as_ref().and_then(|n| n.token.clone());
        if let Some(next) = &next {
            if self.filter_window.is_none() {
                self.resume.from = next.from;
            }
        }
        if page.next.is_some() || token.is_some() {
            self.last_token = page.next.clone().or(token);
        }
        if !self.options.dry_run {
            state::record_failures(
                &mut tx,
                self.source_system,
                self.stream_name,
                self.run_id,
                &failures,
            )
            .await?;
            let resolved: Vec<String> = rows
                .iter()
                .filter(|r| self.failing_keys.contains(&r.source_id))
                .map(|r| r.source_id.clone())
                .collect();
            state::clear_failures(&mut tx, self.source_system, self.stream_name, &resolved).await?;
            state::add_counters(&mut tx, self.run_id, &counters).await?;
            if written.inserted + written.updated > 0 {
                let ids: Vec<&str> = rows.iter().map(|r| r.source_id.as_str()).collect();
                ledger::rules::enqueue(
                    &mut tx,
                    self.source_system,
                    self.stream_name,
                    self.stream,
                    Some(&ids),
                )
                .await?;
            }
            let mut checkpoint = self.checkpoint.clone();
            if self.sorted() && self.scope == MAIN_SCOPE {
                checkpoint.high_water_mark =
                    checkpoint.high_water_mark.max(self.resume.max_applied);
            }
            checkpoint.resume = Some(Resume {
                run_id: self.run_id,
                ..self.resume.clone()
            });
            state::save_checkpoint(
                &mut tx,
                self.source_system,
                self.stream_name,
                &self.scope,
                &checkpoint,
                self.run_id,
            )
            .await?;
            crash_point("page_before_commit", page_number);
            tx.commit().await.context(|| "committing a page".into())?;
            crash_point("page_after_commit", page_number);
            for key in &resolved {
                self.failing_keys.remove(key);
            }
            self.checkpoint = checkpoint;
        }
        if let Some(seen) = &mut self.seen_ids {
            seen.extend(rows.iter().map(|r| r.source_id.clone()));
        }
        self.counters += counters;
        tracing::debug!(
            page = page_number,
            fetched,
            inserted = written.inserted,
            updated = written.updated,
            unchanged = written.unchanged,
            failed = counters.failed,
            "page committed"
        );
        if page_number % 50 == 0 {
            info!(
                pages = page_number,
                fetched = self.counters.fetched,
                "progress"
            );
        }
        Ok(())
    }

    /// The walk is complete: clear the resume point, advance the mark or cursor, mark
    /// deletions, and evaluate the reminder rules over the whole table.
    async fn complete(&mut self) -> Result<(), StoreError> {
        let mut tx = self
            .pool
            .begin()
            .await
            .context(|| "starting the final transaction".into())?;
        if self.scope == MAIN_SCOPE {
            let mut checkpoint = self.checkpoint.clone();
            match &self.stream.incremental {
                IncrementalSpec::HighWaterMark { sorted, .. } => {
                    // An unsorted vendor may change a record behind our position while we
                    // walk; such a change is stamped after the walk started, so the mark
                    // never passes that instant.
                    let mark = if *sorted {
                        self.resume.max_applied
                    } else {
                        self.resume
                            .max_applied
                            .min(self.resume.started_at.or(self.resume.max_applied))
                    };
                    checkpoint.high_water_mark = checkpoint.high_water_mark.max(mark);
                }
                IncrementalSpec::Cursor => {
                    if self.last_token.is_some() {
                        checkpoint.cursor = self.last_token.clone();
                    }
                }
                IncrementalSpec::Full { .. } => {}
            }
            checkpoint.resume = None;
            state::save_checkpoint(
                &mut tx,
                self.source_system,
                self.stream_name,
                &self.scope,
                &checkpoint,
                self.run_id,
            )
            .await?;
            self.checkpoint = checkpoint;
        } else {
            // A finished replay needs no resume point; the next one with the same window
            // starts afresh.
            sqlx::query("DELETE FROM idem_checkpoints WHERE source_system = $1 AND stream = $2 AND scope = $3")
                .bind(self.source_system)
                .bind(self.stream_name)
                .bind(&self.scope)
                .execute(&mut *tx)
                .await
                .context(|| "clearing the replay's resume point".into())?;
        }
        if let Some(seen) = self.seen_ids.take() {
            let deleted = self
                .table
                .mark_deleted(&mut tx, self.source_system, &seen)
                .await?;
            let counters = Counters {
                deleted,
                ..Counters::default()
            };
            state::add_counters(&mut tx, self.run_id, &counters).await?;
            self.counters += counters;
        } else if matches!(
            self.stream.incremental,
            IncrementalSpec::Full { mark_deleted: true }
        ) && self.resumed
        {
            info!(
                "this walk resumed an interrupted one, so it cannot tell which records disappeared: no deletions marked this time"
            );
        }
        ledger::rules::enqueue(
            &mut tx,
            self.source_system,
            self.stream_name,
            self.stream,
            None,
        )
        .await?;
        crash_point("walk_end_before_commit", 1);
        tx.commit()
            .await
            .context(|| "committing the end of the walk".into())?;
        crash_point("walk_end_after_commit", 1);
        Ok(())
    }
}

/// Fetches pages one after another and hands them to the writer. A vendor that caps the
/// results of one query gets the query restarted from the largest `updated_at` read.
async fn fetch_pages<S: Source>(
    mut source: S,
    mut request: PageRequest,
    query_cap: Option<u64>,
    mut results_in_query: u64,
    updated: Option<(String, crate::connector::TimeFormat)>,
    pages: mpsc::Sender<Result<Fetched, SourceError>>,
) {
    let mut max_updated: Option<DateTime<Utc>> = None;
    loop {
        let result = source.fetch_page(&request).await;
        let page = match result {
            Ok(page) => page,
            Err(err) => {
                let _ = pages.send(Err(err)).await;
                return;
            }
        };
        let token = request.token.clone();
        let page_len = page.records.len() as u64;
        results_in_query += page_len;
        if let Some((pointer, format)) = &updated {
            for record in &page.records {
                if let Some(time) = record
                    .pointer(pointer)
                    .and_then(|v| crate::normalize::parse_time(v, format).ok())
                {
                    max_updated = max_updated.max(Some(time));
                }
            }
        }
        let next = page.next.clone().map(|next| {
            let capped = query_cap.is_some_and(|cap| results_in_query + page_len > cap);
            if capped && max_updated.is_some() {
                info!(results_in_query, restart_from = ?max_updated, "the vendor caps results per query: restarting the query from the largest updated_at read");
                results_in_query = 0;
                PageRequest { token: None, from: max_updated, to: request.to }
            } else {
                PageRequest { token: Some(next), ..request.clone() }
            }
        });
        let fetched = Fetched {
            token,
            page,
            next: next.clone(),
            results_in_query,
        };
        if pages.send(Ok(fetched)).await.is_err() {
            return;
        }
        match next {
            Some(next) => request = next,
            None => return,
        }
    }
}

/// One fetched page, with the request that fetches the page after it.
struct Fetched {
    token: Option<String>,
    page: Page,
    next: Option<PageRequest>,
    results_in_query: u64,
}

/// An error and its sources, on one line.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(inner) = source {
        let inner_text = inner.to_string();
        if !text.contains(&inner_text) {
            text = format!("{text}: {inner_text}");
        }
        source = inner.source();
    }
    text
}
