//! One stream run, regular or replay: what a run is (its mode, options, outcome, errors and
//! one-line report). The work is split by job, in the order a walk meets it:
//!
//! - `runner`: which walks a run makes (partitions, owed child streams) and the vendor
//!   clients shared across streams;
//! - `walk`: one walk's state, prepared under the stream's lock, driven to its end;
//! - `retry`: stored record failures fetched again before the walk;
//! - `fetch`: the fetcher task, pages read ahead of the writer;
//! - `commit`: a page normalized and handed to the writer, which commits it with its
//!   checkpoint (several pages per transaction, in page order);
//! - `complete`: the end of a complete walk (mark or cursor, deletions, reminder rules);
//! - [`children`]: child streams, walked per owed parent.

pub mod children;
mod commit;
mod complete;
mod fetch;
mod retry;
mod runner;
mod walk;

pub use runner::{StreamRunner, run_partition, run_stream};

use chrono::{DateTime, Utc};
use uuid::Uuid;

pub use crate::errors::error_chain;
use crate::store::StoreError;
use crate::store::state::Counters;
use crate::writer::Batching;

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
