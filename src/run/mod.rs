//! One stream run, regular or replay: fetch pages (overlapped with writing), and commit
//! each page's rows, failures, counters and checkpoint in one transaction.

pub mod children;

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
    Connector, IncrementalSpec, Page, PageRequest, PaginationSpec, Source, SourceError, StreamSpec,
};
pub use crate::errors::error_chain;
use crate::failpoint::crash_point;
use crate::http::{HttpSource, VendorClient};
use crate::ledger;
use crate::normalize::{Normalizer, RecordFailure, Row};
use crate::store::state::{self, Checkpoint, Counters, MAIN_SCOPE, Resume};
use crate::store::table::{Compare, DestinationTable};
use crate::store::{Context, StoreError, StreamLock};
use crate::writer::{Batching, PageWork, PageWriter, WriteTarget};

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
    /// Whether and how destination tables' schema may change (`[database]` settings).
    pub ddl: crate::store::table::DdlPolicy,
    /// Receives the run's counters after every committed page (a terminal progress bar
    /// watches it); `None` costs nothing.
    pub progress: Option<tokio::sync::watch::Sender<Counters>>,
    /// How pages are grouped into transactions and how many connections write them.
    pub batching: Batching,
}

impl RunOptions {
    pub fn new(mode: Mode, dry_run: bool) -> Self {
        Self {
            mode,
            dry_run,
            stop: None,
            ddl: Default::default(),
            progress: None,
            batching: Batching::default(),
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
    /// Stopped by a shutdown (`idem serve` got SIGTERM); the next run resumes after the
    /// last committed page. A deploy, not a failure.
    Interrupted,
}

/// The outcome of one run, as reported to the user.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunReport {
    pub source_system: String,
    pub stream: String,
    /// The partition walked; absent for an unpartitioned stream.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partition: Option<String>,
    pub run_id: Option<Uuid>,
    pub mode: &'static str,
    pub dry_run: bool,
    pub status: RunStatus,
    pub counters: Counters,
    pub skipped_outside_window: u64,
    pub duration_ms: u64,
    pub error: Option<String>,
    /// The runs of this stream's child streams that followed it (owed children walked).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub children: Vec<RunReport>,
}

/// The more severe of two run outcomes (for a partitioned stream's summed report).
fn worse(a: RunStatus, b: RunStatus) -> RunStatus {
    let rank = |s| match s {
        RunStatus::Succeeded => 0,
        RunStatus::Partial => 1,
        RunStatus::Interrupted => 2,
        RunStatus::Failed => 3,
    };
    if rank(b) > rank(a) { b } else { a }
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
/// Clones share the clients: the workers of `idem serve` each hold one.
#[derive(Default, Clone)]
pub struct StreamRunner {
    clients: Vec<(String, Arc<VendorClient>)>,
}

impl StreamRunner {
    /// The client of `connector`'s vendor, made on first use.
    pub fn client(&mut self, connector: &Connector) -> Arc<VendorClient> {
        let name = &connector.spec.source_system;
        match self.clients.iter().find(|(n, _)| n == name) {
            Some((_, client)) => client.clone(),
            None => {
                let client = VendorClient::new(connector.clone());
                self.clients.push((name.clone(), client.clone()));
                client
            }
        }
    }

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
        let partitions = connector.partitions(stream);
        if let [only] = partitions.as_slice() {
            let spec = spec.clone();
            return self
                .run_one(pool, database_url, connector, stream, &spec, only, options)
                .await;
        }
        // A scheduled or console run walks every partition, one after another; the report
        // adds them up and keeps the worst status and the first error. A partition whose
        // lock another run holds is left to that run; the others still go.
        let mut total: Option<RunReport> = None;
        let mut locked = None;
        for partition in &partitions {
            let report = match self
                .run_one(
                    pool,
                    database_url,
                    connector,
                    stream,
                    spec,
                    partition,
                    options,
                )
                .await
            {
                Ok(report) => report,
                Err(err @ RunError::Locked { .. }) => {
                    info!(partition = %partition, "{err}; the other partitions still run");
                    locked = Some(err);
                    continue;
                }
                Err(err) => return Err(err),
            };
            total = Some(match total {
                None => RunReport {
                    partition: None,
                    ..report
                },
                Some(mut sum) => {
                    sum.counters += report.counters;
                    sum.skipped_outside_window += report.skipped_outside_window;
                    sum.duration_ms += report.duration_ms;
                    sum.status = worse(sum.status, report.status);
                    sum.error = sum.error.or(report.error);
                    sum
                }
            });
        }
        match (total, locked) {
            (Some(total), _) => Ok(total),
            (None, Some(locked)) => Err(locked),
            (None, None) => unreachable!("a partitioned stream has at least one partition"),
        }
    }

    /// Runs one partition of `stream` (`""` when it has none) through the HTTP source.
    #[allow(clippy::too_many_arguments)]
    pub async fn run_one(
        &mut self,
        pool: &PgPool,
        database_url: &str,
        connector: &Connector,
        stream: &str,
        spec: &StreamSpec,
        partition: &str,
        options: &RunOptions,
    ) -> Result<RunReport, RunError> {
        let client = self.client(connector);
        // A child stream is walked through its parents: on its own, a run walks the
        // children still owed (by an interrupted run, or a parent run that was locked out).
        if spec.parent.is_some() {
            return children::drain(pool, database_url, client, connector, stream, options).await;
        }
        let children = children::children_of(connector, stream);
        // Children an interrupted run left owed come first: they were owed before anything
        // this run finds.
        let mut earlier = Vec::new();
        if !options.dry_run {
            for (child, _) in &children {
                earlier.extend(
                    self.drain_child(pool, database_url, connector, child, options)
                        .await,
                );
            }
        }
        let source = HttpSource::new(
            client,
            crate::connector::partition::for_partition(spec, partition),
        );
        let mut report = run_partition(
            pool,
            database_url,
            connector,
            stream,
            partition,
            source,
            options,
        )
        .await?;
        report.children = earlier;
        if options.dry_run {
            return Ok(report);
        }
        // Whatever the parent walk's outcome, the children its committed pages owe are
        // walked now.
        for (child, _) in &children {
            let walked = self
                .drain_child(pool, database_url, connector, child, options)
                .await;
            report.children.extend(walked);
        }
        Ok(report)
    }

    /// Walks the children owed to `child`; a report only when some were owed. A lock held
    /// by another process means that process walks them.
    async fn drain_child(
        &mut self,
        pool: &PgPool,
        database_url: &str,
        connector: &Connector,
        child: &str,
        options: &RunOptions,
    ) -> Option<RunReport> {
        let client = self.client(connector);
        match children::drain(pool, database_url, client, connector, child, options).await {
            Ok(report) => report.run_id.is_some().then_some(report),
            Err(RunError::Locked { .. }) => {
                info!(source_system = %connector.spec.source_system, stream = %child, "another run is walking this child stream; it walks the children owed");
                None
            }
            Err(err) => {
                warn!(source_system = %connector.spec.source_system, stream = %child, error = %error_chain(&err), "walking the owed children failed; they stay owed");
                None
            }
        }
    }
}

/// Runs one unpartitioned stream of `connector`, reading pages from `source`.
pub async fn run_stream<S: Source + 'static>(
    pool: &PgPool,
    database_url: &str,
    connector: &Connector,
    stream_name: &str,
    source: S,
    options: &RunOptions,
) -> Result<RunReport, RunError> {
    run_partition(
        pool,
        database_url,
        connector,
        stream_name,
        "",
        source,
        options,
    )
    .await
}

/// Runs one partition of a stream (`""`: the stream is unpartitioned), reading pages from
/// `source`, which must already be the partition's (see [`crate::connector::partition::for_partition`]).
/// The partition has its own lock, checkpoint, runs and failures.
pub async fn run_partition<S: Source + 'static>(
    pool: &PgPool,
    database_url: &str,
    connector: &Connector,
    stream_name: &str,
    partition: &str,
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
    let qualified = crate::connector::partition::qualified(stream_name, partition);
    let span = info_span!("run", source_system = %source_system, stream = %stream_name, partition = %partition, run_id = tracing::field::Empty);
    async move {
        let mut lock = if options.dry_run {
            None
        } else {
            Some(
                StreamLock::try_acquire(database_url, &source_system, stream_name, partition)
                    .await?
                    .ok_or_else(|| RunError::Locked {
                        source_system: source_system.clone(),
                        stream: qualified.clone(),
                    })?,
            )
        };
        let same_table = streams_sharing_table(connector, stream);
        let owner = lock.as_ref().map(StreamLock::owner);
        // Errors are collected rather than returned with `?` so the lock is released below.
        let result = match Walk::prepare(
            pool,
            &source_system,
            stream_name,
            partition,
            stream,
            options,
            owner,
        )
        .await
        {
            Ok(walk) => {
                if let Some(lock) = lock.as_mut() {
                    lock.name_run(&format!("idem {source_system}.{qualified} {}", walk.run_id))
                        .await;
                }
                match walk.sharing_table_with(same_table).await {
                    Ok(mut walk) => {
                        walk.children = children::children_of(connector, stream_name);
                        walk.execute(source).await
                    }
                    Err(err) => Err(err),
                }
            }
            Err(err) => Err(err),
        };
        if let Some(lock) = lock {
            lock.release().await;
        }
        result
    }
    .instrument(span)
    .await
}

/// The streams of `connector` that write `stream`'s table (itself included): a record is
/// one row whichever of them stores it, so a failure of one is cleared by any of them.
fn streams_sharing_table(connector: &Connector, stream: &StreamSpec) -> Vec<String> {
    connector
        .spec
        .streams
        .iter()
        .filter(|(_, other)| other.table == stream.table)
        .map(|(name, _)| name.clone())
        .collect()
}

/// One walk's fixed inputs and running state.
struct Walk<'a> {
    pool: &'a PgPool,
    source_system: &'a str,
    stream_name: &'a str,
    /// The partition walked (`""` for an unpartitioned stream).
    partition: &'a str,
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
    /// Source ids with a stored failure in any stream writing this table.
    failing_keys: HashSet<String>,
    /// The streams writing this table (see [`streams_sharing_table`]).
    same_table: Vec<String>,
    counters: Counters,
    skipped_outside_window: u64,
    seen_ids: Option<Vec<String>>,
    last_token: Option<String>,
    /// The owner id this run claimed the stream with (none for dry runs): every
    /// transaction of the walk checks it first.
    owner: Option<Uuid>,
    /// This stream's child streams and their conditions (see [`children`]).
    children: Vec<(String, Vec<crate::connector::ParentCondition>)>,
}

impl<'a> Walk<'a> {
    async fn prepare(
        pool: &'a PgPool,
        source_system: &'a str,
        stream_name: &'a str,
        partition: &'a str,
        stream: &'a StreamSpec,
        options: &'a RunOptions,
        owner: Option<Uuid>,
    ) -> Result<Walk<'a>, RunError> {
        let table =
            DestinationTable::new(&stream.table, &stream.columns).with_ddl(options.ddl.clone());
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
            state::load_checkpoint(pool, source_system, stream_name, partition, &scope).await?;
        if let Mode::Replay { restart: true, .. } = options.mode {
            checkpoint.resume = None;
        }
        let now = walk_start_clock(pool).await?;
        let (resume, resumed) = match checkpoint.resume.clone() {
            Some(mut resume) => {
                // A feed walk interrupted after its last page resumes from the committed
                // cursor: "no cursor" would read only the newest page of the feed.
                if resume.next_page.is_none()
                    && options.mode == Mode::Regular
                    && matches!(stream.incremental, IncrementalSpec::Cursor)
                {
                    resume.next_page = checkpoint.cursor.clone();
                }
                (resume, true)
            }
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
                partition,
                mode_name,
                (resume.from, resume.to),
            )
            .await?
        };
        tracing::Span::current().record("run_id", tracing::field::display(run_id));
        if resumed {
            info!(page_token = ?resume.next_page, pages_done = resume.pages, "resuming an interrupted walk after its last committed page");
        }
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
            partition,
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
            failing_keys: HashSet::new(),
            same_table: vec![stream_name.to_string()],
            counters: Counters::default(),
            skipped_outside_window: 0,
            seen_ids,
            last_token: None,
            owner,
            children: Vec::new(),
        })
    }

    /// Records which streams write this walk's table, and which of their records have a
    /// stored failure: storing such a record clears its failure, whichever stream failed it.
    async fn sharing_table_with(mut self, streams: Vec<String>) -> Result<Walk<'a>, RunError> {
        if !self.options.dry_run {
            self.failing_keys = state::failing_source_ids(self.pool, self.source_system, &streams)
                .await?
                .into_iter()
                .collect();
        }
        self.same_table = streams;
        Ok(self)
    }

    async fn execute<S: Source + 'static>(mut self, mut source: S) -> Result<RunReport, RunError> {
        let started = Instant::now();
        if !self.options.dry_run && self.options.mode == Mode::Regular {
            // A retry Postgres refuses must not stop the stream: the failures stay stored
            // and the walk goes on.
            if let Err(err) = self.retry_stored_failures().await {
                warn!(error = %error_chain(&err), "retrying stored failures failed; they stay in the failures table");
            }
        }
        let mut failure: Option<String> = None;
        if self.replays_a_feed() && self.resume.next_page.is_none() {
            match self.find_oldest_feed_page(&mut source).await {
                Ok(token) => self.resume.next_page = Some(token),
                Err(err) => failure = Some(err),
            }
        }
        let (pages_tx, mut pages_rx) = mpsc::channel::<FetcherMessage>(PAGES_IN_FLIGHT);
        let fetcher = tokio::spawn(
            fetch_pages(
                source,
                self.first_request(),
                self.query_cap(),
                self.resume.results_in_query,
                self.updated_pointer(),
                self.keyset_id_pointer(),
                pages_tx,
            )
            .instrument(tracing::Span::current()),
        );
        let mut write_failed = false;
        // Only the fetcher's own word ends a walk: a channel that closes without it (the
        // task panicked or was cancelled) is a failed walk, never a complete one.
        let mut walk_complete = false;
        let mut interrupted = false;
        let mut stop = self.options.stop.clone();
        let mut writer = PageWriter::new(self.write_target(), self.options.batching);
        // Where the time goes: waiting for the vendor, or handing pages to the writer
        // (which waits only when Postgres is behind).
        let (mut waiting, mut writing) = (std::time::Duration::ZERO, std::time::Duration::ZERO);
        while failure.is_none() {
            let wait_started = Instant::now();
            let deadline = writer.deadline();
            let due = async {
                match deadline {
                    Some(deadline) => tokio::time::sleep_until(deadline).await,
                    None => std::future::pending().await,
                }
            };
            let stopping = async {
                match &mut stop {
                    Some(stop) => {
                        if !*stop.borrow() {
                            let _ = stop.changed().await;
                        }
                    }
                    None => std::future::pending().await,
                }
            };
            let message = tokio::select! {
                biased;
                _ = stopping => None,
                message = pages_rx.recv() => message,
                _ = due => {
                    // The open transaction is old enough: commit it without waiting for
                    // the next page.
                    writer.close_open();
                    continue;
                }
            };
            let Some(message) = message else {
                if stop.as_ref().is_some_and(|s| *s.borrow()) {
                    interrupted = true;
                    failure = Some(
                        "stopped by shutdown; the next run resumes after the last committed page"
                            .into(),
                    );
                }
                break;
            };
            let message = match message {
                FetcherMessage::Page(page) => page,
                FetcherMessage::Done => {
                    walk_complete = true;
                    break;
                }
            };
            waiting += wait_started.elapsed();
            match message {
                Ok(fetched) => {
                    let write_started = Instant::now();
                    let committed = self.commit_page(&mut writer, fetched).await;
                    writing += write_started.elapsed();
                    if let Err(err) = committed {
                        failure = Some(error_chain(&err));
                        write_failed = true;
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
        // Pages handed to the writer before a stop or a vendor error are committed; after
        // a write error nothing more is.
        let written = if !write_failed {
            let write_started = Instant::now();
            let finished = writer.finish().await;
            writing += write_started.elapsed();
            finished
        } else {
            Ok(())
        };
        self.counters += writer.take_committed();
        if let Some(progress) = &self.options.progress {
            progress.send_replace(self.counters);
        }
        drop(writer);
        if let Err(err) = written {
            failure.get_or_insert_with(|| error_chain(&err));
        }
        if failure.is_none() && !walk_complete {
            failure = Some(match fetcher.await {
                Err(err) if err.is_panic() => {
                    let panic = err.into_panic();
                    let reason = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "no message".into());
                    format!(
                        "the page fetcher panicked ({reason}); the walk is incomplete and the next run resumes after the last committed page"
                    )
                }
                _ => "the page fetcher stopped before the last page; the walk is incomplete".into(),
            });
        } else {
            fetcher.abort();
        }
        if failure.is_none() && !self.options.dry_run {
            if let Err(err) = self.complete().await {
                failure = Some(error_chain(&err));
            }
        }
        let status = match (&failure, self.counters.failed) {
            (Some(_), _) if interrupted => RunStatus::Interrupted,
            (Some(_), _) => RunStatus::Failed,
            (None, 0) => RunStatus::Succeeded,
            (None, _) => RunStatus::Partial,
        };
        // Vendor text may echo credentials or carry a NUL (which Postgres refuses): the
        // run's end must always be recordable.
        let failure = failure.map(|text| crate::redact::vendor_text(&text));
        if !self.options.dry_run {
            let name = match status {
                RunStatus::Succeeded => "succeeded",
                RunStatus::Partial => "partial",
                RunStatus::Failed => "failed",
                RunStatus::Interrupted => "interrupted",
            };
            state::finish_run(self.pool, self.run_id, name, failure.as_deref()).await?;
            crash_point("run_after_finish", 1);
        }
        let duration = started.elapsed();
        let c = &self.counters;
        let per_second = c.fetched as f64 / duration.as_secs_f64().max(1e-3);
        if interrupted {
            warn!(
                pages = c.pages,
                fetched = c.fetched,
                "run interrupted by shutdown; committed pages stay and the next run resumes after them"
            );
        } else if let Some(error) = &failure {
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
            partition: (!self.partition.is_empty()).then(|| self.partition.to_string()),
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
            children: Vec::new(),
        })
    }

    fn first_request(&self) -> PageRequest {
        let vendor_window = self.filter_window.is_none();
        // A keyset walk resumes from its committed instant: the ids of a tie it was paging
        // by position are gone with the process, so the tie is read again from its start.
        let token = match self.keyset_id_pointer() {
            Some(_) if vendor_window => None,
            _ => self.resume.next_page.clone(),
        };
        PageRequest {
            token,
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

    /// A replay of a newest-first feed (events): "no cursor" is only the newest page, so
    /// the walk must first find the feed's oldest page.
    fn replays_a_feed(&self) -> bool {
        matches!(self.options.mode, Mode::Replay { .. })
            && matches!(self.stream.pagination, PaginationSpec::FirstRecord { .. })
    }

    /// Walks a newest-first feed back to its oldest page (writing nothing) and returns the
    /// token that fetches that page and then walks forward, oldest record first, as a
    /// regular run does: a record changed twice keeps its newest version. The feed goes
    /// back as far as the vendor keeps it (Stripe: 30 days), which covers any window in it.
    async fn find_oldest_feed_page<S: Source>(&self, source: &mut S) -> Result<String, String> {
        let PaginationSpec::FirstRecord {
            backward_param: Some(_),
            ..
        } = &self.stream.pagination
        else {
            return Err(format!(
                "a replay of {}.{} (a newest-first feed) needs pagination.backward_param (Stripe: \"starting_after\") to find the oldest page of the window; without it only the newest page could be read",
                self.source_system, self.stream_name
            ));
        };
        let mut token = crate::paginate::FEED_OLDER.to_string();
        let mut oldest = token.clone();
        let mut probes = 0u64;
        loop {
            let request = PageRequest {
                token: Some(token.clone()),
                from: None,
                to: None,
            };
            let page = source
                .fetch_page(&request)
                .await
                .map_err(|e| e.to_string())?;
            probes += 1;
            if !page.records.is_empty() {
                oldest = token.clone();
            }
            match page.next {
                Some(next) => token = next,
                None => break,
            }
        }
        info!(
            pages = probes,
            "found the oldest page of the feed; the replay walks forward from it"
        );
        let cursor = oldest
            .strip_prefix(crate::paginate::FEED_OLDER)
            .unwrap_or_default();
        Ok(format!("{}{cursor}", crate::paginate::FEED_OLDEST))
    }

    /// Aborts the transaction's work unless this run still owns the stream.
    async fn fence(&self, tx: &mut sqlx::PgConnection) -> Result<(), StoreError> {
        match self.owner {
            Some(owner) => {
                crate::store::verify_owner(
                    tx,
                    self.source_system,
                    self.stream_name,
                    self.partition,
                    owner,
                )
                .await
            }
            None => Ok(()),
        }
    }

    /// Sorted streams paged by position are paged by keyset instead (see [`fetch_pages`]);
    /// the id pointer tells the records of a tie apart.
    fn keyset_id_pointer(&self) -> Option<String> {
        let by_position = matches!(
            self.stream.pagination,
            PaginationSpec::BodyCursor { .. }
                | PaginationSpec::Offset { .. }
                | PaginationSpec::PageNumber { .. }
        );
        (self.sorted() && by_position && self.stream.updated_at.is_some())
            .then(|| self.stream.id.clone())
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
        let stored = state::failures_of(
            self.pool,
            self.source_system,
            self.stream_name,
            self.partition,
        )
        .await?;
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
        self.fence(&mut tx).await?;
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
        // A parent stored at last owes its children, as if a page had brought it.
        if !self.children.is_empty() && !written.changed.is_empty() {
            let changed: HashSet<&str> = written.changed.iter().map(String::as_str).collect();
            let owed: Vec<(String, String)> = rows
                .iter()
                .filter(|r| changed.contains(r.source_id.as_str()))
                .map(|r| (r.source_id.clone(), r.data.clone()))
                .collect();
            crate::store::child_queue::enqueue(
                &mut tx,
                self.source_system,
                self.run_id,
                &self.children,
                &owed,
            )
            .await?;
        }
        // The stored row may be newer than the retried payload (another stream stored the
        // record since): the upsert's version guard keeps it, and the failure is cleared
        // all the same, since the record is stored.
        let keys: Vec<String> = rows.iter().map(|r| r.source_id.clone()).collect();
        state::clear_failures_of_records(&mut tx, self.source_system, &self.same_table, &keys)
            .await?;
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

    /// Normalizes a page and merges the copies of one record inside it: the newest wins
    /// (the larger `updated_at`, else the later one), so a record is one row or one failure,
    /// and one statement never touches a row twice.
    fn normalize(&mut self, records: Vec<Value>) -> (Vec<Row>, Vec<RecordFailure>) {
        enum Copy {
            Row(Row),
            Failed(RecordFailure),
        }
        let mut merged: Vec<Copy> = Vec::with_capacity(records.len());
        let mut position: HashMap<String, usize> = HashMap::new();
        for record in records {
            let copy = match self.normalizer.normalize(record) {
                Ok(row) => {
                    if let (Some((from, to)), Some(updated)) = (self.filter_window, row.updated_at)
                    {
                        if updated < from || updated >= to {
                            self.skipped_outside_window += 1;
                            continue;
                        }
                    }
                    Copy::Row(row)
                }
                Err(failure) => Copy::Failed(failure),
            };
            let key = match &copy {
                Copy::Row(row) => row.source_id.clone(),
                Copy::Failed(failure) => failure.record_key.clone(),
            };
            match position.get(&key) {
                Some(&index) => {
                    let keep_earlier = match (&merged[index], &copy) {
                        (Copy::Row(earlier), Copy::Row(later)) => {
                            earlier.updated_at > later.updated_at
                        }
                        _ => false,
                    };
                    if !keep_earlier {
                        merged[index] = copy;
                    }
                }
                None => {
                    position.insert(key, merged.len());
                    merged.push(copy);
                }
            }
        }
        let mut rows = Vec::with_capacity(merged.len());
        let mut failures = Vec::new();
        for copy in merged {
            match copy {
                Copy::Row(row) => rows.push(row),
                Copy::Failed(failure) => {
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

    /// Prepares a page's work (rows, failures, the checkpoint after it) and hands it to
    /// the writer, which commits it in its transaction.
    async fn commit_page(
        &mut self,
        writer: &mut PageWriter,
        fetched_page: Fetched,
    ) -> Result<(), StoreError> {
        let Fetched {
            token,
            page,
            next,
            results_in_query,
        } = fetched_page;
        let fetched = page.records.len() as u64;
        // The vendor's clock, not ours, stamps the changes made while we walk.
        if let Some(vendor_now) = page.vendor_time {
            self.resume.started_at = Some(
                self.resume
                    .started_at
                    .map_or(vendor_now, |started| started.min(vendor_now)),
            );
        }
        let (rows, failures) = self.normalize(page.records);
        let page_number = self.resume.pages + 1;
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
        // Kept in the set: Postgres may still refuse the row (then it stays a failure), and
        // clearing a failure already cleared is harmless.
        let resolved: Vec<String> = rows
            .iter()
            .filter(|r| self.failing_keys.contains(&r.source_id))
            .map(|r| r.source_id.clone())
            .collect();
        let mut checkpoint = self.checkpoint.clone();
        // A feed's cursor is committed with the page that reached it: whatever
        // interrupts the walk after this commit, the next run starts from here.
        if self.scope == MAIN_SCOPE
            && matches!(self.stream.incremental, IncrementalSpec::Cursor)
            && self.last_token.is_some()
        {
            checkpoint.cursor = self.last_token.clone();
        }
        if self.sorted() && self.scope == MAIN_SCOPE {
            checkpoint.high_water_mark = checkpoint.high_water_mark.max(self.resume.max_applied);
        }
        checkpoint.resume = Some(Resume {
            run_id: self.run_id,
            ..self.resume.clone()
        });
        self.checkpoint = checkpoint.clone();
        if let Some(seen) = &mut self.seen_ids {
            // A record that failed was seen all the same: it is not deleted at the vendor.
            seen.extend(rows.iter().map(|r| r.source_id.clone()));
            seen.extend(failures.iter().filter_map(|f| f.source_id.clone()));
        }
        writer
            .push(PageWork {
                page_number,
                rows,
                failures,
                resolved,
                fetched,
                checkpoint,
            })
            .await?;
        self.counters += writer.take_committed();
        if let Some(progress) = &self.options.progress {
            progress.send_replace(self.counters);
        }
        tracing::debug!(page = page_number, fetched, "page handed to the writer");
        if page_number % 50 == 0 {
            info!(
                pages = page_number,
                committed_records = self.counters.fetched,
                "progress"
            );
        }
        Ok(())
    }

    fn write_target(&self) -> WriteTarget {
        WriteTarget {
            pool: self.pool.clone(),
            source_system: self.source_system.to_string(),
            stream_name: self.stream_name.to_string(),
            partition: self.partition.to_string(),
            same_table: self.same_table.clone(),
            owner: self.owner,
            stream: self.stream.clone(),
            scope: self.scope.clone(),
            run_id: self.run_id,
            table: DestinationTable::new(&self.stream.table, &self.stream.columns),
            table_exists: self.table_exists,
            compare: match self.options.mode {
                Mode::Regular => Compare::Hash,
                Mode::Replay { .. } => Compare::Content,
            },
            dry_run: self.options.dry_run,
            children: self.children.clone(),
        }
    }

    /// The walk is complete: clear the resume point, advance the mark or cursor, mark
    /// deletions, and evaluate the reminder rules over the whole table.
    async fn complete(&mut self) -> Result<(), StoreError> {
        let mut tx = self
            .pool
            .begin()
            .await
            .context(|| "starting the final transaction".into())?;
        self.fence(&mut tx).await?;
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
                self.partition,
                &self.scope,
                &checkpoint,
                self.run_id,
            )
            .await?;
            self.checkpoint = checkpoint;
        } else {
            // A finished replay needs no resume point; the next one with the same window
            // starts afresh.
            sqlx::query("DELETE FROM idem_checkpoints WHERE source_system = $1 AND stream = $2 AND partition = $4 AND scope = $3")
                .bind(self.source_system)
                .bind(self.stream_name)
                .bind(&self.scope)
                .bind(self.partition)
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
///
/// With `keyset` (a sorted stream paged by position, like HubSpot search's `after`
/// offset) every page restarts the query from the page's largest `updated_at` instead of
/// following the position: a record edited during the walk moves to the end of the sort
/// and shifts the later ones down, which makes a position skip one. Records at that
/// instant are read again, as no-ops. When a whole page shares one instant the query pages
/// within it by position; a record of that tie seen again later with a newer time moved
/// while we paged, so the tie is read again from its start.
async fn fetch_pages<S: Source>(
    mut source: S,
    mut request: PageRequest,
    query_cap: Option<u64>,
    mut results_in_query: u64,
    updated: Option<(String, crate::connector::TimeFormat)>,
    keyset: Option<String>,
    pages: mpsc::Sender<FetcherMessage>,
) {
    let mut max_updated: Option<DateTime<Utc>> = None;
    let mut page_number = 0;
    // The instants whose records were paged by position in this walk, and the ids read
    // in each: a tie's record may move to the end of the sort any time until the walk ends.
    let mut ties: Vec<(DateTime<Utc>, HashSet<String>)> = Vec::new();
    loop {
        page_number += 1;
        crate::failpoint::panic_point("fetch_page", page_number);
        let result = source.fetch_page(&request).await;
        let page = match result {
            Ok(page) => page,
            Err(err) => {
                let _ = pages.send(FetcherMessage::Page(Err(err))).await;
                return;
            }
        };
        let token = request.token.clone();
        let page_len = page.records.len() as u64;
        results_in_query += page_len;
        let time_of = |record: &Value| {
            updated.as_ref().and_then(|(pointer, format)| {
                record
                    .pointer(pointer)
                    .and_then(|v| crate::normalize::parse_time(v, format).ok())
            })
        };
        let page_max = page.records.iter().filter_map(time_of).max();
        max_updated = max_updated.max(page_max);
        // A record of a tie paged by position seen again with a newer time moved while we
        // paged; a record after it may have slid into a position already read.
        let moved = keyset.as_ref().and_then(|id_pointer| {
            ties.iter()
                .filter(|(at, ids)| {
                    page.records.iter().any(|record| {
                        time_of(record).is_some_and(|t| t > *at)
                            && record
                                .pointer(id_pointer)
                                .and_then(id_text)
                                .is_some_and(|id| ids.contains(&id))
                    })
                })
                .map(|(at, _)| *at)
                .min()
        });
        let next = match (&keyset, page.next.clone()) {
            (Some(_), None) if moved.is_none() => None,
            (None, None) => None,
            (Some(id_pointer), next) => {
                let id_of = |record: &Value| record.pointer(id_pointer).and_then(id_text);
                let next = next.unwrap_or_default();
                match moved {
                    Some(at) => {
                        info!(tie = %at, "a record of a tie paged by position moved while we walked: reading the tie again");
                        ties.retain(|(other, _)| *other < at);
                        results_in_query = 0;
                        Some(PageRequest {
                            token: None,
                            from: Some(at),
                            to: request.to,
                        })
                    }
                    None if page_max.is_some() && page_max > request.from => {
                        results_in_query = 0;
                        Some(PageRequest {
                            token: None,
                            from: page_max,
                            to: request.to,
                        })
                    }
                    None => {
                        // The whole page is one instant: restarting from it would return
                        // this page again, so page within it by position.
                        let at = request.from.or(page_max).unwrap_or_default();
                        if ties.last().is_none_or(|(last, _)| *last != at) {
                            ties.push((at, HashSet::new()));
                        }
                        if let Some((_, ids)) = ties.last_mut() {
                            ids.extend(page.records.iter().filter_map(id_of));
                        }
                        if query_cap.is_some_and(|cap| results_in_query + page_len > cap) {
                            let _ = pages
                                .send(FetcherMessage::Page(Err(SourceError::TieBeyondCap {
                                    at: at.to_rfc3339(),
                                    cap: query_cap.unwrap_or_default(),
                                })))
                                .await;
                            return;
                        }
                        Some(PageRequest {
                            token: Some(next),
                            ..request.clone()
                        })
                    }
                }
            }
            (None, Some(next)) => {
                let capped = query_cap.is_some_and(|cap| results_in_query + page_len > cap);
                Some(if capped && max_updated.is_some() {
                    info!(results_in_query, restart_from = ?max_updated, "the vendor caps results per query: restarting the query from the largest updated_at read");
                    results_in_query = 0;
                    PageRequest {
                        token: None,
                        from: max_updated,
                        to: request.to,
                    }
                } else {
                    PageRequest {
                        token: Some(next),
                        ..request.clone()
                    }
                })
            }
        };
        let fetched = Fetched {
            token,
            page,
            next: next.clone(),
            results_in_query,
        };
        if pages.send(FetcherMessage::Page(Ok(fetched))).await.is_err() {
            return;
        }
        match next {
            Some(next) => request = next,
            None => {
                let _ = pages.send(FetcherMessage::Done).await;
                return;
            }
        }
    }
}

/// What the fetcher hands the writer: a page (or the error that ended the walk), then
/// `Done` once the last page has been handed on.
enum FetcherMessage {
    Page(Result<Fetched, SourceError>),
    Done,
}

/// An id as text, whether the vendor sends a string or a number.
fn id_text(value: &Value) -> Option<String> {
    match value {
        Value::String(text) => Some(text.clone()),
        Value::Number(number) => Some(number.to_string()),
        _ => None,
    }
}

/// One fetched page, with the request that fetches the page after it.
struct Fetched {
    token: Option<String>,
    page: Page,
    next: Option<PageRequest>,
    results_in_query: u64,
}

/// When a walk starts, by the database's clock: the host's may run ahead of everyone's.
/// The first page's `Date` header lowers it further if the vendor's clock is behind.
async fn walk_start_clock(pool: &PgPool) -> Result<DateTime<Utc>, StoreError> {
    sqlx::query_scalar("SELECT now()")
        .fetch_one(pool)
        .await
        .context(|| "reading the database's clock".into())
}

/// The one-line report of a run.
pub fn summary(report: &RunReport) -> String {
    let c = &report.counters;
    let seconds = report.duration_ms as f64 / 1000.0;
    let status = match (report.status, report.dry_run) {
        (_, true) => "dry run (nothing written)",
        (RunStatus::Succeeded, _) => "succeeded",
        (RunStatus::Partial, _) => "finished with failed records",
        (RunStatus::Failed, _) => "FAILED",
        (RunStatus::Interrupted, _) => "interrupted by shutdown (resumes next run)",
    };
    let mut line = format!(
        "{}.{} {}: {status}: {} fetched, {} inserted, {} updated, {} unchanged, {} failed",
        report.source_system,
        crate::connector::partition::qualified(
            &report.stream,
            report.partition.as_deref().unwrap_or("")
        ),
        report.mode,
        c.fetched,
        c.inserted,
        c.updated,
        c.unchanged,
        c.failed
    );
    if c.deleted > 0 {
        line.push_str(&format!(", {} marked deleted", c.deleted));
    }
    if report.skipped_outside_window > 0 {
        line.push_str(&format!(
            ", {} outside the window skipped",
            report.skipped_outside_window
        ));
    }
    line.push_str(&format!(
        " in {} pages, {seconds:.1}s ({:.0} records/s)",
        c.pages,
        c.fetched as f64 / seconds.max(0.001)
    ));
    if let Some(error) = &report.error {
        line.push_str(&format!(
            "\n  error: {}",
            crate::redact::for_terminal(&crate::redact::redact(error))
        ));
    }
    line
}
