//! The page writer: groups a walk's pages into transactions (up to N records or T
//! milliseconds each) and commits them strictly in page order over one or more
//! connections, each transaction carrying the checkpoint of its own last page.
//!
//! Why this is safe (invariants 4 and 15): a transaction's bookkeeping (failures, run
//! counters, ledger rows, checkpoint) is written only after every earlier transaction has
//! committed, and it commits only then (the ledger rows it owes are found and rendered
//! earlier, from its own rows; only their insert waits). So the stored checkpoint always
//! names a page whose data, and all data before it, is committed; a crash loses the open
//! transactions whole and the next run re-reads their pages (as no-ops where they were
//! unchanged). Only the destination rows are written concurrently, and never the same row
//! by two open transactions: a page that shares a record with a still-uncommitted
//! transaction waits for it first, so two transactions never wait on each other.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{Instrument, warn};
use uuid::Uuid;

use crate::failpoint::crash_point;
use crate::ledger;
use crate::normalize::{RecordFailure, Row};
use crate::schema::connector::StreamSpec;
pub use crate::schema::settings::Batching;
use crate::store::state::{self, Checkpoint, Counters};
use crate::store::table::{Compare, DestinationTable, WriteCounts};
use crate::store::{Context, StoreError};

/// What one page brings to its transaction, prepared by the walk.
pub(crate) struct PageWork {
    pub page_number: u64,
    pub rows: Vec<Row>,
    pub failures: Vec<RecordFailure>,
    /// Stored failures whose records this page now stores.
    pub resolved: Vec<String>,
    pub fetched: u64,
    /// The checkpoint as it stands once this page is committed.
    pub checkpoint: Checkpoint,
}

/// The run's fixed facts every transaction needs.
pub(crate) struct WriteTarget {
    pub pool: PgPool,
    pub source_system: String,
    pub stream_name: String,
    /// The partition walked (`""` for an unpartitioned stream).
    pub partition: String,
    /// The streams writing this table: a stored record clears its failure in any of them.
    pub same_table: Vec<String>,
    /// The owner id this run claimed the stream with (none for dry runs).
    pub owner: Option<Uuid>,
    pub stream: StreamSpec,
    pub scope: String,
    pub run_id: Uuid,
    pub table: DestinationTable,
    pub table_exists: bool,
    pub compare: Compare,
    pub dry_run: bool,
    /// Child streams of this stream and their conditions on the parent record: the
    /// transaction owes them the parents it inserts or changes (every parent it touches
    /// in a replay), recorded in `idem_child_queue` with the parent rows.
    pub children: Vec<(String, Vec<crate::connector::ParentCondition>)>,
}

/// Why a transaction did not commit.
enum BatchError {
    Store(StoreError),
    /// An earlier transaction failed, so this one rolled back (its pages are re-read).
    EarlierFailed,
}

impl From<StoreError> for BatchError {
    fn from(err: StoreError) -> Self {
        BatchError::Store(err)
    }
}

/// A transaction still receiving pages.
struct OpenBatch {
    pages: mpsc::Sender<PageWork>,
    ids: HashSet<String>,
    records: usize,
    deadline: Instant,
    task: JoinHandle<Result<Counters, BatchError>>,
}

/// A transaction that has all its pages and is waiting for its turn to commit.
struct Closed {
    ids: HashSet<String>,
    task: JoinHandle<Result<Counters, BatchError>>,
}

/// Feeds pages into page-ordered transactions; see the module doc.
pub(crate) struct PageWriter {
    target: Arc<WriteTarget>,
    batching: Batching,
    open: Option<OpenBatch>,
    closed: VecDeque<Closed>,
    /// Tells the next transaction that the last one opened has committed.
    last_committed: Option<oneshot::Receiver<()>>,
    /// Counters of committed transactions not yet taken by the walk.
    committed: Counters,
}

impl PageWriter {
    pub fn new(target: WriteTarget, batching: Batching) -> Self {
        Self {
            target: Arc::new(target),
            batching: Batching {
                max_records: batching.max_records.max(1),
                connections: batching.connections.max(1),
                ..batching
            },
            open: None,
            closed: VecDeque::new(),
            last_committed: None,
            committed: Counters::default(),
        }
    }

    /// When the open transaction must be committed even if no page arrives.
    pub fn deadline(&self) -> Option<Instant> {
        self.open.as_ref().map(|open| open.deadline)
    }

    /// Counters of the transactions committed since the last call.
    pub fn take_committed(&mut self) -> Counters {
        std::mem::take(&mut self.committed)
    }

    /// Adds a page to the open transaction (opening one if needed); commits it once full.
    pub async fn push(&mut self, work: PageWork) -> Result<(), StoreError> {
        if self.open.is_none() {
            // Each transaction in flight holds a connection.
            while self.closed.len() + 1 > self.batching.connections {
                self.commit_oldest().await?;
            }
        }
        // A record still uncommitted in an earlier transaction: wait for it, so that no
        // two open transactions ever hold locks on the same row.
        if self
            .closed
            .iter()
            .any(|c| work.rows.iter().any(|r| c.ids.contains(&r.source_id)))
        {
            if let Some(open) = self.open.take() {
                self.close(open);
            }
            while !self.closed.is_empty() {
                self.commit_oldest().await?;
            }
        }
        if self.open.is_none() {
            self.open = Some(self.start());
        }
        let open = self.open.as_mut().expect("opened above");
        open.records += work.rows.len() + work.failures.len();
        open.ids
            .extend(work.rows.iter().map(|r| r.source_id.clone()));
        if open.pages.send(work).await.is_err() {
            // The transaction's task ended early: it failed on a page.
            let open = self.open.take().expect("open");
            return Err(self.fail(open.task).await);
        }
        if self.open.as_ref().expect("open").records >= self.batching.max_records {
            self.close_open();
        }
        Ok(())
    }

    /// Commits the open transaction now (its time is up, or the walk is stopping).
    pub fn close_open(&mut self) {
        if let Some(open) = self.open.take() {
            self.close(open);
        }
    }

    /// Commits everything pushed, in order.
    pub async fn finish(&mut self) -> Result<(), StoreError> {
        self.close_open();
        while !self.closed.is_empty() {
            self.commit_oldest().await?;
        }
        Ok(())
    }

    fn close(&mut self, open: OpenBatch) {
        drop(open.pages);
        self.closed.push_back(Closed {
            ids: open.ids,
            task: open.task,
        });
    }

    async fn commit_oldest(&mut self) -> Result<(), StoreError> {
        let Some(oldest) = self.closed.pop_front() else {
            return Ok(());
        };
        match oldest.task.await {
            Ok(Ok(counters)) => {
                self.committed += counters;
                Ok(())
            }
            Ok(Err(BatchError::Store(err))) => {
                self.abort_rest();
                Err(err)
            }
            Ok(Err(BatchError::EarlierFailed)) | Err(_) => {
                self.abort_rest();
                Err(StoreError::Query {
                    context: "a page transaction stopped unexpectedly".into(),
                    source: sqlx::Error::WorkerCrashed,
                })
            }
        }
    }

    async fn fail(&mut self, task: JoinHandle<Result<Counters, BatchError>>) -> StoreError {
        self.abort_rest();
        match task.await {
            Ok(Err(BatchError::Store(err))) => err,
            _ => {
                // The error is an earlier transaction's: report that one.
                StoreError::Query {
                    context: "a page transaction stopped unexpectedly".into(),
                    source: sqlx::Error::WorkerCrashed,
                }
            }
        }
    }

    /// Rolls back every transaction not committed yet (dropping a transaction rolls it
    /// back); none of them can have committed, as each waits for the one that failed.
    fn abort_rest(&mut self) {
        if let Some(open) = self.open.take() {
            open.task.abort();
        }
        for closed in self.closed.drain(..) {
            closed.task.abort();
        }
    }

    fn start(&mut self) -> OpenBatch {
        let (pages_tx, pages_rx) = mpsc::channel(PAGES_QUEUED);
        let (committed_tx, committed_rx) = oneshot::channel();
        let after = self.last_committed.replace(committed_rx);
        // The transaction's log lines carry the run's fields (source_system, stream, run_id).
        let task = tokio::spawn(
            write_transaction(self.target.clone(), pages_rx, after, committed_tx)
                .instrument(tracing::Span::current()),
        );
        OpenBatch {
            pages: pages_tx,
            ids: HashSet::new(),
            records: 0,
            deadline: Instant::now() + self.batching.max_wait,
            task,
        }
    }
}

impl Drop for PageWriter {
    fn drop(&mut self) {
        // A walk that ends on an error leaves nothing half-done running behind it.
        self.abort_rest();
    }
}

/// One transaction: writes its pages' rows as they come, then, once every earlier
/// transaction has committed, its bookkeeping and checkpoint, and commits.
async fn write_transaction(
    target: Arc<WriteTarget>,
    mut pages: mpsc::Receiver<PageWork>,
    after: Option<oneshot::Receiver<()>>,
    committed: oneshot::Sender<()>,
) -> Result<Counters, BatchError> {
    let t = &*target;
    let mut tx = t
        .pool
        .begin()
        .await
        .context(|| "starting a page transaction".into())?;
    // The ownership fence (a shared row lock, so concurrent transactions of this run do not
    // wait on each other) is held until this transaction ends.
    if let Some(owner) = t.owner {
        crate::store::verify_owner(
            &mut tx,
            &t.source_system,
            &t.stream_name,
            &t.partition,
            owner,
        )
        .await?;
    }
    let mut acc = Accumulated::default();
    let mut chunk = Chunk::default();
    let mut last: Option<(u64, Checkpoint)> = None;
    while let Some(work) = pages.recv().await {
        acc.counters += Counters {
            pages: 1,
            fetched: work.fetched,
            failed: work.failures.len() as u64,
            ..Counters::default()
        };
        acc.failures.extend(work.failures);
        acc.resolved.extend(work.resolved);
        chunk.add(work.rows, &mut acc.counters);
        if chunk.rows.len() >= CHUNK_ROWS {
            flush(t, &mut tx, &mut chunk, &mut acc).await?;
        }
        // A kill here loses this transaction's pages, and only them.
        crash_point("page_written", work.page_number);
        last = Some((work.page_number, work.checkpoint));
    }
    flush(t, &mut tx, &mut chunk, &mut acc).await?;
    let Accumulated {
        counters,
        failures,
        resolved,
        written,
        owed,
    } = acc;
    if t.dry_run {
        return Ok(counters);
    }
    // Matching and rendering read only this transaction's rows, so they overlap the
    // earlier transactions; the ledger insert waits for its turn below.
    let owed_reminders = if written.is_empty() {
        Vec::new()
    } else {
        // A record written by two chunks of this transaction (it changed between pages)
        // is matched as the table now holds it: its last copy.
        let mut seen = HashSet::new();
        let mut last_copies: Vec<&(String, Vec<Option<String>>)> = written
            .iter()
            .rev()
            .filter(|(id, _)| seen.insert(id.as_str()))
            .collect();
        last_copies.reverse();
        let ids: Vec<&str> = last_copies.iter().map(|(id, _)| id.as_str()).collect();
        let values: Vec<&[Option<String>]> =
            last_copies.iter().map(|(_, v)| v.as_slice()).collect();
        ledger::rules::find_matches(
            &mut tx,
            &t.source_system,
            &t.stream_name,
            &t.stream,
            ledger::rules::Scope::Written {
                ids: &ids,
                values: &values,
            },
        )
        .await?
    };
    if let Some(after) = after {
        if after.await.is_err() {
            return Err(BatchError::EarlierFailed);
        }
    }
    let Some((page_number, checkpoint)) = last else {
        let _ = committed.send(());
        return Ok(counters);
    };
    state::record_failures(
        &mut tx,
        &t.source_system,
        &t.stream_name,
        &t.partition,
        t.run_id,
        &failures,
    )
    .await?;
    state::clear_failures_of_records(&mut tx, &t.source_system, &t.same_table, &resolved).await?;
    state::add_counters(&mut tx, t.run_id, &counters).await?;
    if !owed_reminders.is_empty() {
        ledger::rules::record_matches(
            &mut tx,
            &t.source_system,
            &t.stream_name,
            &t.stream,
            owed_reminders,
        )
        .await?;
    }
    if !owed.is_empty() {
        crate::store::child_queue::enqueue(&mut tx, &t.source_system, t.run_id, &t.children, &owed)
            .await?;
    }
    state::save_checkpoint(
        &mut tx,
        &t.source_system,
        &t.stream_name,
        &t.partition,
        &t.scope,
        &checkpoint,
        t.run_id,
    )
    .await?;
    crash_point("page_before_commit", page_number);
    tx.commit().await.context(|| "committing a page".into())?;
    crash_point("page_after_commit", page_number);
    let _ = committed.send(());
    Ok(counters)
}

/// Whether Postgres refused the data itself (a data exception, a constraint, a size
/// limit), as opposed to the connection or the server failing: only then is one record to
/// blame.
fn refused_by_postgres(err: &StoreError) -> bool {
    let StoreError::Query { source, .. } = err else {
        return false;
    };
    source
        .as_database_error()
        .and_then(|e| e.code())
        .is_some_and(|code| {
            code.starts_with("22") || code.starts_with("23") || code.starts_with("54")
        })
}

/// A page Postgres refused although every record passed normalization (a constraint
/// the user added to the table, a limit idem does not know): the rows are written one
/// by one, each under a savepoint, and the ones refused become record failures, so the
/// page still commits. Only this rare path pays the round trips.
async fn write_one_by_one(
    t: &WriteTarget,
    tx: &mut sqlx::PgConnection,
    rows: &mut Vec<Row>,
    failures: &mut Vec<RecordFailure>,
    page_error: &StoreError,
) -> Result<WriteCounts, StoreError> {
    warn!(error = %crate::errors::error_chain(page_error), rows = rows.len(), "Postgres refused the page; writing its rows one by one to find the records it refuses");
    let mut total = WriteCounts::default();
    let mut kept = Vec::with_capacity(rows.len());
    for row in rows.drain(..) {
        sqlx::query("SAVEPOINT idem_one_row")
            .execute(&mut *tx)
            .await
            .context(|| "setting a savepoint".into())?;
        let single = std::slice::from_ref(&row);
        match t
            .table
            .write_page(tx, &t.source_system, t.run_id, single, t.compare, t.dry_run)
            .await
        {
            Ok(written) => {
                sqlx::query("RELEASE SAVEPOINT idem_one_row")
                    .execute(&mut *tx)
                    .await
                    .context(|| "releasing a savepoint".into())?;
                total.inserted += written.inserted;
                total.updated += written.updated;
                total.unchanged += written.unchanged;
                total.changed.extend(written.changed);
                kept.push(row);
            }
            Err(err) if refused_by_postgres(&err) => {
                sqlx::query("ROLLBACK TO SAVEPOINT idem_one_row")
                    .execute(&mut *tx)
                    .await
                    .context(|| "rolling back to a savepoint".into())?;
                let reason = match &err {
                    StoreError::Query { source, .. } => source.to_string(),
                    other => other.to_string(),
                };
                let failure = RecordFailure {
                    record_key: row.source_id.clone(),
                    source_id: Some(row.source_id.clone()),
                    payload: serde_json::from_str(&row.data).unwrap_or(serde_json::Value::Null),
                    error: crate::values::sanitize_text(&format!(
                        "Postgres refused the record: {reason}"
                    )),
                };
                warn!(record_key = %failure.record_key, error = %failure.error, "record failed; it goes to the failures table and is retried next run");
                failures.push(failure);
            }
            Err(err) => return Err(err),
        }
    }
    *rows = kept;
    Ok(total)
}

/// Pages a transaction holds while it writes a chunk: enough for the walk to prepare the
/// next chunk meanwhile (with 2 the walk, and so the vendor, waited on every chunk and
/// both cores idled a quarter of a first import).
const PAGES_QUEUED: usize = 16;

/// Rows written by one statement pair (classify, upsert): pages are merged up to this
/// many, so a 100-record page does not cost two round trips of its own.
const CHUNK_ROWS: usize = 1_000;

/// What a transaction has gathered for its bookkeeping.
#[derive(Default)]
struct Accumulated {
    counters: Counters,
    failures: Vec<RecordFailure>,
    resolved: Vec<String>,
    /// The rows inserted or changed, with their typed column values as written (the
    /// reminder rules match them without reading them back).
    written: Vec<(String, Vec<Option<String>>)>,
    /// Parents whose children are owed: (source_id, record).
    owed: Vec<(String, String)>,
}

/// Rows of consecutive pages not yet written, one per record.
#[derive(Default)]
struct Chunk {
    rows: Vec<Row>,
    position: HashMap<String, usize>,
}

impl Chunk {
    /// Adds a page's rows. A record already in the chunk (it changed between two pages)
    /// keeps its newest copy, as within a page, so one statement never touches a row
    /// twice; the superseded copy counts as unchanged.
    fn add(&mut self, rows: Vec<Row>, counters: &mut Counters) {
        for row in rows {
            match self.position.get(&row.source_id) {
                Some(&index) => {
                    counters.unchanged += 1;
                    if self.rows[index].updated_at <= row.updated_at {
                        self.rows[index] = row;
                    }
                }
                None => {
                    self.position.insert(row.source_id.clone(), self.rows.len());
                    self.rows.push(row);
                }
            }
        }
    }
}

/// Writes the chunk under a savepoint: a chunk Postgres refuses is rolled back alone and
/// written row by row, and the transaction's earlier chunks stay.
async fn flush(
    t: &WriteTarget,
    tx: &mut sqlx::PgConnection,
    chunk: &mut Chunk,
    acc: &mut Accumulated,
) -> Result<(), StoreError> {
    if chunk.rows.is_empty() {
        return Ok(());
    }
    let mut rows = std::mem::take(&mut chunk.rows);
    chunk.position.clear();
    let written = if t.table_exists {
        simple_query(tx, "SAVEPOINT idem_chunk")
            .await
            .context(|| "setting a savepoint".into())?;
        let write = t
            .table
            .write_page(tx, &t.source_system, t.run_id, &rows, t.compare, t.dry_run)
            .await;
        match write {
            Ok(written) => {
                simple_query(tx, "RELEASE SAVEPOINT idem_chunk")
                    .await
                    .context(|| "releasing a savepoint".into())?;
                written
            }
            Err(err) if refused_by_postgres(&err) => {
                simple_query(tx, "ROLLBACK TO SAVEPOINT idem_chunk")
                    .await
                    .context(|| "rolling back a refused chunk".into())?;
                let mut refused = Vec::new();
                let written = write_one_by_one(t, tx, &mut rows, &mut refused, &err).await?;
                // A record refused again keeps its failure.
                let refused_ids: HashSet<&str> = refused
                    .iter()
                    .filter_map(|f| f.source_id.as_deref())
                    .collect();
                acc.resolved.retain(|id| !refused_ids.contains(id.as_str()));
                acc.counters.failed += refused.len() as u64;
                acc.failures.extend(refused);
                written
            }
            Err(err) => return Err(err),
        }
    } else {
        WriteCounts {
            inserted: rows.len() as u64,
            ..WriteCounts::default()
        }
    };
    acc.counters.inserted += written.inserted;
    acc.counters.updated += written.updated;
    acc.counters.unchanged += written.unchanged;
    if !t.children.is_empty() {
        // A replay re-reads on purpose: it walks the children of every parent it touches.
        let owed: HashSet<&str> = written.changed.iter().map(String::as_str).collect();
        let every = t.compare == Compare::Content;
        acc.owed.extend(
            rows.iter()
                .filter(|r| every || owed.contains(r.source_id.as_str()))
                .map(|r| (r.source_id.clone(), r.data.clone())),
        );
    }
    if !written.changed.is_empty() {
        let changed: HashSet<&str> = written.changed.iter().map(String::as_str).collect();
        acc.written.extend(
            rows.into_iter()
                .filter(|r| changed.contains(r.source_id.as_str()))
                .map(|r| (r.source_id, r.values)),
        );
    }
    Ok(())
}

/// Runs statements without parameters in one round trip (the simple query protocol).
async fn simple_query(
    connection: &mut sqlx::PgConnection,
    sql: &'static str,
) -> Result<(), sqlx::Error> {
    use sqlx::Executor;
    connection.execute(sql).await.map(|_| ())
}

/// Writes `rows` in `tx` as a page transaction does (under a savepoint, row by row when
/// Postgres refuses the chunk): for walks that commit their own transactions (child
/// streams). Returns the counters, the rows Postgres refused and the ids written.
pub(crate) async fn write_rows(
    t: &WriteTarget,
    tx: &mut sqlx::PgConnection,
    rows: Vec<Row>,
) -> Result<(Counters, Vec<RecordFailure>, Vec<String>), StoreError> {
    let mut chunk = Chunk::default();
    let mut acc = Accumulated::default();
    chunk.add(rows, &mut acc.counters);
    flush(t, tx, &mut chunk, &mut acc).await?;
    let written = acc.written.into_iter().map(|(id, _)| id).collect();
    Ok((acc.counters, acc.failures, written))
}
