//! Child streams: the walk that drains the queue of parents whose children are owed, one
//! transaction per child page, a parent's entry cleared with its last page (the queue is
//! filled by `store::child_queue`, in the parent page's own transaction).
//!
//! Why this is crash safe across the two levels: a parent page's transaction inserts the
//! owed parents into `idem_child_queue` together with the parent rows (`enqueue`, called
//! by the page writer), so a parent stored is a parent owed. A parent's entry is deleted
//! only in the transaction that commits the last page of its children; a kill anywhere
//! before that leaves the entry, and the next drain walks that parent's children again
//! from their first page (pages already committed are re-read as no-ops). Deletions
//! within a parent need that complete walk, so they are never marked from a partial one.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgConnection, PgPool};
use tracing::{Instrument, info, info_span, warn};
use uuid::Uuid;

use super::{RunError, RunOptions, RunReport, RunStatus, error_chain};
use crate::connector::template;
use crate::connector::{
    ColumnSpec, ColumnType, Connector, OnMissing, PARENT_COLUMN, PageRequest, ParentCondition,
    Source, SourceError, StreamSpec,
};
use crate::failpoint::crash_point;
use crate::http::{HttpError, HttpSource, VendorClient};
use crate::normalize::{Normalizer, RecordFailure, Row};
use crate::store::child_queue::owed_count;
use crate::store::state::{self, Counters, MAIN_SCOPE};
use crate::store::table::{Compare, DestinationTable};
use crate::store::{Context, StoreError, StreamLock};
use crate::writer::WriteTarget;

/// The child streams of `parent` in `connector`, with their conditions on the parent.
pub fn children_of(connector: &Connector, parent: &str) -> Vec<(String, Vec<ParentCondition>)> {
    connector
        .spec
        .streams
        .iter()
        .filter_map(|(name, spec)| {
            let link = spec.parent.as_ref()?;
            link.streams
                .iter()
                .any(|p| p == parent)
                .then(|| (name.clone(), link.when.clone()))
        })
        .collect()
}

/// A stream's table columns: the declared ones, and a child stream's parent key.
pub fn table_columns(stream: &StreamSpec) -> Vec<ColumnSpec> {
    let mut columns = stream.columns.clone();
    if stream.parent.is_none() {
        return columns;
    }
    columns.push(ColumnSpec {
        name: PARENT_COLUMN.into(),
        // Never in a record: the value is set from the parent after normalizing.
        pointer: "/\u{0}idem_parent".into(),
        column_type: ColumnType::Text,
        format: None,
    });
    columns
}

/// Walks the children of every parent owed to child stream `child` (a run of its own,
/// under the child's stream lock). A parent whose walk fails stays owed; the others go on.
pub async fn drain(
    pool: &PgPool,
    database_url: &str,
    client: Arc<VendorClient>,
    connector: &Connector,
    child: &str,
    options: &RunOptions,
) -> Result<RunReport, RunError> {
    let source_system = connector.spec.source_system.clone();
    let stream = connector
        .stream(child)
        .filter(|s| s.parent.is_some())
        .ok_or_else(|| RunError::UnknownStream {
            source_system: source_system.clone(),
            stream: child.to_string(),
        })?;
    let span = info_span!("run", source_system = %source_system, stream = %child, run_id = tracing::field::Empty);
    async move {
        if options.dry_run {
            info!("a dry run does not walk child streams");
            return Ok(empty_report(&source_system, child, true));
        }
        // Nothing owed, no run: most parent runs change nothing.
        if owed_count(pool, &source_system, child).await? == 0 {
            return Ok(empty_report(&source_system, child, false));
        }
        let lock = StreamLock::try_acquire(database_url, &source_system, child, "")
            .await?
            .ok_or_else(|| RunError::Locked {
                source_system: source_system.clone(),
                stream: child.to_string(),
            })?;
        let mut drain = Drain {
            pool,
            client,
            source_system: &source_system,
            child,
            stream,
            owner: lock.owner(),
            pages: 0,
            counters: Counters::default(),
            missing: 0,
        };
        let result = drain.run(options).await;
        lock.release().await;
        result
    }
    .instrument(span)
    .await
}

fn empty_report(source_system: &str, child: &str, dry_run: bool) -> RunReport {
    RunReport {
        source_system: source_system.to_string(),
        stream: child.to_string(),
        run_id: None,
        mode: "run",
        dry_run,
        status: RunStatus::Succeeded,
        counters: Counters::default(),
        skipped_outside_window: 0,
        duration_ms: 0,
        error: None,
        children: Vec::new(),
        partition: None,
    }
}

/// One owed parent, as queued.
struct Owed {
    parent_id: String,
    parent: Value,
    enqueued_at: DateTime<Utc>,
}

/// How one parent's children walk ended.
enum Walked {
    Complete,
    /// The child path answered 404: the parent is gone at the vendor.
    Missing,
}

struct Drain<'a> {
    pool: &'a PgPool,
    client: Arc<VendorClient>,
    source_system: &'a str,
    child: &'a str,
    stream: &'a StreamSpec,
    owner: Uuid,
    /// Child pages committed by this process (the failpoints' count).
    pages: u64,
    counters: Counters,
    missing: u64,
}

impl Drain<'_> {
    async fn run(&mut self, options: &RunOptions) -> Result<RunReport, RunError> {
        let started = Instant::now();
        let columns = table_columns(self.stream);
        let table = DestinationTable::new(&self.stream.table, &columns)
            .with_indexes(self.stream.rule_threshold_columns())
            .with_ddl(options.ddl.clone());
        table.ensure(self.pool).await?;
        if options.ddl.allow {
            // Only the table's owner may add it; without it deletions are slower, not wrong.
            if let Err(err) = self.ensure_parent_index().await {
                warn!(error = %error_chain(&err), "cannot add the index by parent; deletions within a parent scan the table");
            }
        }
        let owed: Vec<(String, String, DateTime<Utc>)> = sqlx::query_as(
            "SELECT parent_source_id, parent::text, enqueued_at FROM idem_child_queue
             WHERE source_system = $1 AND stream = $2 ORDER BY enqueued_at, parent_source_id",
        )
        .bind(self.source_system)
        .bind(self.child)
        .fetch_all(self.pool)
        .await
        .context(|| "reading the owed children".into())?;
        let run_id = state::start_run(
            self.pool,
            self.source_system,
            self.child,
            "",
            "run",
            (None, None),
        )
        .await?;
        tracing::Span::current().record("run_id", tracing::field::display(run_id));
        info!(parents = owed.len(), "walking the children of owed parents");
        let mut spec = self.stream.clone();
        spec.columns = columns.clone();
        let target = WriteTarget {
            partition: String::new(),
            pool: self.pool.clone(),
            source_system: self.source_system.to_string(),
            stream_name: self.child.to_string(),
            same_table: vec![self.child.to_string()],
            owner: Some(self.owner),
            stream: spec.clone(),
            scope: MAIN_SCOPE.to_string(),
            run_id,
            table,
            table_exists: true,
            compare: Compare::Hash,
            dry_run: false,
            children: Vec::new(),
        };
        let normalizer = Normalizer::new(&spec);
        let mut errors = Vec::new();
        let mut interrupted = false;
        for (parent_id, parent, enqueued_at) in owed {
            if options.stop.as_ref().is_some_and(|s| *s.borrow()) {
                interrupted = true;
                errors
                    .push("stopped by shutdown; the owed parents left are walked next run".into());
                break;
            }
            let owed = Owed {
                parent_id,
                parent: serde_json::from_str(&parent).unwrap_or(Value::Null),
                enqueued_at,
            };
            let walked = self.walk_parent(&target, &normalizer, &owed).await;
            match walked {
                Ok(Walked::Complete) => {}
                Ok(Walked::Missing) => self.missing += 1,
                Err(err) => {
                    // The parent stays owed: the next drain walks its children again.
                    warn!(parent_source_id = %owed.parent_id, error = %err, "walking this parent's children failed; it stays owed");
                    errors.push(format!("parent {}: {err}", owed.parent_id));
                }
            }
            if let Some(progress) = &options.progress {
                progress.send_replace(self.counters);
            }
        }
        let status = match (errors.is_empty(), self.counters.failed) {
            _ if interrupted => RunStatus::Interrupted,
            (false, _) => RunStatus::Failed,
            (true, 0) => RunStatus::Succeeded,
            (true, _) => RunStatus::Partial,
        };
        let error = (!errors.is_empty()).then(|| crate::redact::vendor_text(&errors.join("; ")));
        let name = match status {
            RunStatus::Succeeded => "succeeded",
            RunStatus::Partial => "partial",
            RunStatus::Interrupted => "interrupted",
            RunStatus::Failed => "failed",
        };
        state::finish_run(self.pool, run_id, name, error.as_deref()).await?;
        crash_point("child_run_after_finish", 1);
        let c = &self.counters;
        info!(status = ?status, pages = c.pages, fetched = c.fetched, inserted = c.inserted,
            updated = c.updated, unchanged = c.unchanged, failed = c.failed, deleted = c.deleted,
            missing_parents = self.missing, "run finished");
        Ok(RunReport {
            run_id: Some(run_id),
            status,
            counters: self.counters,
            duration_ms: started.elapsed().as_millis() as u64,
            error,
            ..empty_report(self.source_system, self.child, false)
        })
    }

    /// Deletions within a parent look its children up by parent: without an index each
    /// parent would scan the whole table. Looked up first, so a drain with the index in
    /// place takes no lock on the table.
    async fn ensure_parent_index(&self) -> Result<(), StoreError> {
        // Postgres cuts names at 63 bytes; the lookup must use the name it keeps.
        let table = &self.stream.table;
        let index = format!("{}_by_parent", &table[..table.len().min(53)]);
        let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(format!("\"{index}\""))
            .fetch_one(self.pool)
            .await
            .context(|| format!("looking for index {index}"))?;
        if !exists {
            sqlx::query(&format!(
                "CREATE INDEX IF NOT EXISTS \"{index}\" ON \"{}\" (source_system, \"{PARENT_COLUMN}\")",
                self.stream.table
            ))
            .execute(self.pool)
            .await
            .context(|| format!("creating index {index}"))?;
        }
        Ok(())
    }

    /// Walks one parent's children from their first page, a transaction per page; the
    /// last one also marks the parent's unseen children deleted and clears its entry.
    async fn walk_parent(
        &mut self,
        target: &WriteTarget,
        normalizer: &Normalizer,
        owed: &Owed,
    ) -> Result<Walked, String> {
        let parent_id = owed.parent_id.as_str();
        let render_err = |field: &str, err: template::TemplateError| {
            format!("{field} of stream {}: {err}", self.child)
        };
        let mut stream = self.stream.clone();
        stream.path = template::render(&self.stream.path, parent_id, &owed.parent, true)
            .map_err(|e| render_err("path", e))?;
        for (key, value) in stream.params.iter_mut() {
            *value = template::render_toml(value, parent_id, &owed.parent)
                .map_err(|e| render_err(&format!("params.{key}"), e))?;
        }
        if let Some(body) = &stream.body {
            stream.body = Some(
                template::render_toml(body, parent_id, &owed.parent)
                    .map_err(|e| render_err("body", e))?,
            );
        }
        let link = self.stream.parent.as_ref().expect("a child stream");
        let mut source = HttpSource::new(self.client.clone(), stream);
        let mut request = PageRequest::default();
        let mut seen: Vec<String> = Vec::new();
        loop {
            let page = match source.fetch_page(&request).await {
                Ok(page) => page,
                Err(SourceError::Http(HttpError::Status {
                    status: 404, url, ..
                })) => {
                    self.parent_missing(target, owed, link.on_missing, &url)
                        .await
                        .map_err(|e| error_chain(&e))?;
                    return Ok(Walked::Missing);
                }
                Err(err) => return Err(err.to_string()),
            };
            let last = page.next.is_none();
            let fetched = page.records.len() as u64;
            let (rows, failures) = self.normalize(normalizer, parent_id, page.records);
            seen.extend(rows.iter().map(|r| r.source_id.clone()));
            seen.extend(failures.iter().filter_map(|f| f.source_id.clone()));
            let delete = (last && link.mark_deleted).then_some(seen.as_slice());
            self.commit_page(target, owed, rows, failures, fetched, last, delete)
                .await
                .map_err(|e| error_chain(&e))?;
            if last {
                return Ok(Walked::Complete);
            }
            request = PageRequest {
                token: page.next,
                ..PageRequest::default()
            };
        }
    }

    /// Normalizes a page of children: each row gets its parent's key, and its id is made
    /// unique across parents when the connector says it is unique only within one.
    fn normalize(
        &self,
        normalizer: &Normalizer,
        parent_id: &str,
        records: Vec<crate::record::Record>,
    ) -> (Vec<Row>, Vec<RecordFailure>) {
        let within = self
            .stream
            .parent
            .as_ref()
            .is_some_and(|p| p.id_unique_within_parent);
        let scoped = |id: &str| {
            if within {
                format!("{parent_id}/{id}")
            } else {
                id.to_string()
            }
        };
        let mut rows: Vec<Row> = Vec::new();
        let mut failures = Vec::new();
        let mut position: std::collections::HashMap<String, usize> = Default::default();
        for record in records {
            match normalizer.normalize(record) {
                Ok(mut row) => {
                    row.source_id = scoped(&row.source_id);
                    if let Some(slot) = row.values.last_mut() {
                        *slot = Some(parent_id.to_string());
                    }
                    // The parent is part of the row: a child moved to another parent is
                    // a change.
                    let mut bytes = row.hash.clone();
                    bytes.extend_from_slice(parent_id.as_bytes());
                    row.hash = std::iter::once(crate::normalize::HASH_VERSION)
                        .chain(xxhash_rust::xxh3::xxh3_128(&bytes).to_be_bytes())
                        .collect();
                    // The later copy of a record in one page wins, as in plain streams.
                    match position.get(&row.source_id) {
                        Some(&index) => rows[index] = row,
                        None => {
                            position.insert(row.source_id.clone(), rows.len());
                            rows.push(row);
                        }
                    }
                }
                Err(mut failure) => {
                    failure.source_id = failure.source_id.map(|id| scoped(&id));
                    if within && failure.source_id.is_some() {
                        failure.record_key = scoped(&failure.record_key);
                    }
                    warn!(record_key = %failure.record_key, error = %failure.error, parent_source_id = %parent_id, "record failed; it goes to the failures table");
                    failures.push(failure);
                }
            }
        }
        (rows, failures)
    }

    /// One child page in its own transaction; the last page of a parent also clears the
    /// parent's entry (and, after a complete walk, marks its unseen children deleted).
    #[allow(clippy::too_many_arguments)]
    async fn commit_page(
        &mut self,
        target: &WriteTarget,
        owed: &Owed,
        rows: Vec<Row>,
        failures: Vec<RecordFailure>,
        fetched: u64,
        last: bool,
        delete_unseen: Option<&[String]>,
    ) -> Result<(), StoreError> {
        let mut tx = self
            .pool
            .begin()
            .await
            .context(|| "starting a child page transaction".into())?;
        crate::store::verify_owner(&mut tx, self.source_system, self.child, "", self.owner).await?;
        let stored: Vec<String> = rows.iter().map(|r| r.source_id.clone()).collect();
        let (mut counters, refused, written) =
            crate::writer::write_rows(target, &mut tx, rows).await?;
        let refused_ids: HashSet<String> =
            refused.iter().filter_map(|f| f.source_id.clone()).collect();
        let resolved: Vec<String> = stored
            .into_iter()
            .filter(|id| !refused_ids.contains(id))
            .collect();
        let mut all_failures = failures;
        all_failures.extend(refused);
        counters.pages = 1;
        counters.fetched = fetched;
        counters.failed = all_failures.len() as u64;
        state::record_failures(
            &mut tx,
            self.source_system,
            self.child,
            "",
            target.run_id,
            &all_failures,
        )
        .await?;
        state::clear_failures_of_records(
            &mut tx,
            self.source_system,
            &target.same_table,
            &resolved,
        )
        .await?;
        if !written.is_empty() {
            let ids: Vec<&str> = written.iter().map(String::as_str).collect();
            crate::ledger::rules::enqueue(
                &mut tx,
                self.source_system,
                self.child,
                self.stream,
                crate::ledger::rules::Scope::Records(&ids),
            )
            .await?;
        }
        if let Some(seen) = delete_unseen {
            counters.deleted = self
                .mark_children_deleted(&mut tx, &owed.parent_id, seen)
                .await?;
        }
        state::add_counters(&mut tx, target.run_id, &counters).await?;
        if last {
            self.clear_owed(&mut tx, owed).await?;
        }
        self.pages += 1;
        crash_point("child_page_before_commit", self.pages);
        tx.commit()
            .await
            .context(|| "committing a child page".into())?;
        crash_point("child_page_after_commit", self.pages);
        self.counters += counters;
        Ok(())
    }

    /// The parent is gone at the vendor (404): recorded, its entry cleared and, when the
    /// connector says so, its stored children marked deleted.
    async fn parent_missing(
        &mut self,
        target: &WriteTarget,
        owed: &Owed,
        on_missing: OnMissing,
        url: &str,
    ) -> Result<(), StoreError> {
        warn!(parent_source_id = %owed.parent_id, url = %url, on_missing = ?on_missing, "the child path answered 404: the parent is gone at the vendor");
        let mut tx = self
            .pool
            .begin()
            .await
            .context(|| "starting a transaction".into())?;
        crate::store::verify_owner(&mut tx, self.source_system, self.child, "", self.owner).await?;
        let mut counters = Counters::default();
        if on_missing == OnMissing::DeleteChildren {
            counters.deleted = self
                .mark_children_deleted(&mut tx, &owed.parent_id, &[])
                .await?;
        }
        state::add_counters(&mut tx, target.run_id, &counters).await?;
        self.clear_owed(&mut tx, owed).await?;
        tx.commit()
            .await
            .context(|| "committing a missing parent".into())?;
        self.counters += counters;
        Ok(())
    }

    /// Marks `parent_id`'s stored children not in `seen` deleted; never another parent's.
    async fn mark_children_deleted(
        &self,
        tx: &mut PgConnection,
        parent_id: &str,
        seen: &[String],
    ) -> Result<u64, StoreError> {
        let sql = format!(
            "UPDATE \"{}\" SET deleted_at = now(), last_changed_at = now()
             WHERE source_system = $1 AND \"{PARENT_COLUMN}\" = $2 AND deleted_at IS NULL
               AND NOT (source_id = ANY($3))",
            self.stream.table
        );
        let done = sqlx::query(&sql)
            .bind(self.source_system)
            .bind(parent_id)
            .bind(seen)
            .execute(&mut *tx)
            .await
            .context(|| format!("marking deleted children of parent {parent_id}"))?;
        Ok(done.rows_affected())
    }

    /// Clears the parent's entry, unless the parent changed again since it was read (then
    /// the newer entry stays owed).
    async fn clear_owed(&self, tx: &mut PgConnection, owed: &Owed) -> Result<(), StoreError> {
        sqlx::query(
            "DELETE FROM idem_child_queue WHERE source_system = $1 AND stream = $2
               AND parent_source_id = $3 AND enqueued_at = $4",
        )
        .bind(self.source_system)
        .bind(self.child)
        .bind(&owed.parent_id)
        .bind(owed.enqueued_at)
        .execute(&mut *tx)
        .await
        .context(|| format!("clearing the owed children of parent {}", owed.parent_id))?;
        Ok(())
    }
}
