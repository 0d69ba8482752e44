//! Before a walk: stored record failures are fetched again by id where the vendor allows
//! it, and stored or cleared in the walk's first transaction.

use std::collections::HashSet;

use tracing::info;

use super::walk::Walk;
use crate::store::state::{self, Counters};
use crate::store::table::Compare;
use crate::store::{Context, StoreError};

impl<'a> Walk<'a> {
    /// Stored failures are normalized again first: a fixed mapping clears them even when
    /// the vendor does not send the record again.
    pub(super) async fn retry_stored_failures(&mut self) -> Result<(), StoreError> {
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
        let (rows, _still_failing) = self.normalize(
            stored
                .iter()
                .map(|f| crate::record::Record::from_value(&f.payload))
                .collect(),
        );
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
        let changed: HashSet<&str> = written.changed.iter().map(String::as_str).collect();
        // A record stored at last is matched against the reminder rules here, as a page's
        // transaction does: the walk's end skips what this run wrote.
        if !changed.is_empty() {
            let written_rows: Vec<_> = rows
                .iter()
                .filter(|r| changed.contains(r.source_id.as_str()))
                .collect();
            let ids: Vec<&str> = written_rows.iter().map(|r| r.source_id.as_str()).collect();
            let values: Vec<&[Option<String>]> =
                written_rows.iter().map(|r| r.values.as_slice()).collect();
            crate::ledger::rules::enqueue(
                &mut tx,
                self.source_system,
                self.stream_name,
                self.stream,
                crate::ledger::rules::Scope::Written {
                    ids: &ids,
                    values: &values,
                },
            )
            .await?;
        }
        // A parent stored at last owes its children, as if a page had brought it.
        if !self.children.is_empty() && !changed.is_empty() {
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
}
