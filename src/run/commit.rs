//! A fetched page becomes rows and failures (normalized, checked against Postgres' limits)
//! and goes to the page writer, which commits it with its checkpoint.

use std::collections::HashMap;

use crate::record::Record;
use tracing::{info, info_span, warn};

use super::Mode;
use super::fetch::Fetched;
use super::walk::Walk;
use crate::connector::IncrementalSpec;
use crate::normalize::{RecordFailure, Row};
use crate::store::StoreError;
use crate::store::state::{MAIN_SCOPE, Resume};
use crate::store::table::{Compare, DestinationTable};
use crate::writer::{PageWork, PageWriter, WriteTarget};

impl<'a> Walk<'a> {
    /// Normalizes a page and merges the copies of one record inside it: the newest wins
    /// (the larger `updated_at`, else the later one), so a record is one row or one failure,
    /// and one statement never touches a row twice.
    pub(super) fn normalize(&mut self, records: Vec<Record>) -> (Vec<Row>, Vec<RecordFailure>) {
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
    pub(super) async fn commit_page(
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

    pub(super) fn write_target(&self) -> WriteTarget {
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
}
