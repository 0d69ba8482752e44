//! One walk of one stream (or partition): prepare its state under the stream's lock, then
//! run the fetcher and the writer side by side until the last page, and report.

use std::collections::HashSet;
use std::time::Instant;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio::sync::mpsc;
use tracing::{Instrument, info, warn};
use uuid::Uuid;

use super::fetch::{FetcherMessage, fetch_pages};
use super::{Mode, PAGES_IN_FLIGHT, RunError, RunOptions, RunReport, RunStatus};
use crate::connector::{IncrementalSpec, PageRequest, PaginationSpec, Source, StreamSpec};
pub use crate::errors::error_chain;
use crate::failpoint::crash_point;
use crate::normalize::Normalizer;
use crate::store::state::{self, Checkpoint, Counters, MAIN_SCOPE, Resume};
use crate::store::table::DestinationTable;
use crate::store::{Context, StoreError};
use crate::writer::PageWriter;

/// One walk's fixed inputs and running state.
pub(super) struct Walk<'a> {
    pub(super) pool: &'a PgPool,
    pub(super) source_system: &'a str,
    pub(super) stream_name: &'a str,
    /// The partition walked (`""` for an unpartitioned stream).
    pub(super) partition: &'a str,
    pub(super) stream: &'a StreamSpec,
    pub(super) options: &'a RunOptions,
    pub(super) table: DestinationTable,
    pub(super) table_exists: bool,
    pub(super) normalizer: Normalizer,
    pub(super) scope: String,
    pub(super) checkpoint: Checkpoint,
    pub(super) resume: Resume,
    pub(super) resumed: bool,
    pub(super) run_id: Uuid,
    /// Records outside a replay's window are skipped when the vendor cannot filter.
    pub(super) filter_window: Option<(DateTime<Utc>, DateTime<Utc>)>,
    /// Source ids with a stored failure in any stream writing this table.
    pub(super) failing_keys: HashSet<String>,
    /// The streams writing this table (see [`streams_sharing_table`]).
    pub(super) same_table: Vec<String>,
    pub(super) counters: Counters,
    pub(super) skipped_outside_window: u64,
    pub(super) seen_ids: Option<Vec<String>>,
    pub(super) last_token: Option<String>,
    /// The owner id this run claimed the stream with (none for dry runs): every
    /// transaction of the walk checks it first.
    pub(super) owner: Option<Uuid>,
    /// This stream's child streams and their conditions (see [`children`]).
    pub(super) children: Vec<(String, Vec<crate::connector::ParentCondition>)>,
}

impl<'a> Walk<'a> {
    pub(super) async fn prepare(
        pool: &'a PgPool,
        source_system: &'a str,
        stream_name: &'a str,
        partition: &'a str,
        stream: &'a StreamSpec,
        options: &'a RunOptions,
        owner: Option<Uuid>,
    ) -> Result<Walk<'a>, RunError> {
        let table = DestinationTable::new(&stream.table, &stream.columns)
            .with_indexes(stream.rule_threshold_columns())
            .with_ddl(options.ddl.clone());
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
    pub(super) async fn sharing_table_with(
        mut self,
        streams: Vec<String>,
    ) -> Result<Walk<'a>, RunError> {
        if !self.options.dry_run {
            self.failing_keys = state::failing_source_ids(self.pool, self.source_system, &streams)
                .await?
                .into_iter()
                .collect();
        }
        self.same_table = streams;
        Ok(self)
    }

    pub(super) async fn execute<S: Source + 'static>(
        mut self,
        mut source: S,
    ) -> Result<RunReport, RunError> {
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

    pub(super) fn first_request(&self) -> PageRequest {
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

    pub(super) fn query_cap(&self) -> Option<u64> {
        match &self.stream.incremental {
            IncrementalSpec::HighWaterMark {
                max_results_per_query,
                ..
            } => *max_results_per_query,
            _ => None,
        }
    }

    pub(super) fn updated_pointer(&self) -> Option<(String, crate::connector::TimeFormat)> {
        self.stream
            .updated_at
            .as_ref()
            .map(|u| (u.pointer.clone(), u.format.clone()))
    }

    /// A replay of a newest-first feed (events): "no cursor" is only the newest page, so
    /// the walk must first find the feed's oldest page.
    pub(super) fn replays_a_feed(&self) -> bool {
        matches!(self.options.mode, Mode::Replay { .. })
            && matches!(self.stream.pagination, PaginationSpec::FirstRecord { .. })
    }

    /// Walks a newest-first feed back to its oldest page (writing nothing) and returns the
    /// token that fetches that page and then walks forward, oldest record first, as a
    /// regular run does: a record changed twice keeps its newest version. The feed goes
    /// back as far as the vendor keeps it (Stripe: 30 days), which covers any window in it.
    pub(super) async fn find_oldest_feed_page<S: Source>(
        &self,
        source: &mut S,
    ) -> Result<String, String> {
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
    pub(super) async fn fence(&self, tx: &mut sqlx::PgConnection) -> Result<(), StoreError> {
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
    pub(super) fn keyset_id_pointer(&self) -> Option<String> {
        let by_position = matches!(
            self.stream.pagination,
            PaginationSpec::BodyCursor { .. }
                | PaginationSpec::Offset { .. }
                | PaginationSpec::PageNumber { .. }
        );
        (self.sorted() && by_position && self.stream.updated_at.is_some())
            .then(|| self.stream.id.clone())
    }

    pub(super) fn sorted(&self) -> bool {
        matches!(
            self.stream.incremental,
            IncrementalSpec::HighWaterMark { sorted: true, .. }
        )
    }
}

/// When a walk starts, by the database's clock: the host's may run ahead of everyone's.
/// The first page's `Date` header lowers it further if the vendor's clock is behind.
pub(super) async fn walk_start_clock(pool: &PgPool) -> Result<DateTime<Utc>, StoreError> {
    sqlx::query_scalar("SELECT now()")
        .fetch_one(pool)
        .await
        .context(|| "reading the database's clock".into())
}
