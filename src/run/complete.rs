//! The end of a complete walk, in one transaction: the high-water mark or the cursor,
//! deletions of records the walk did not see, and the reminder rules.

use tracing::info;

use super::walk::Walk;
use crate::connector::IncrementalSpec;
use crate::failpoint::crash_point;
use crate::ledger;
use crate::store::state::{self, Counters, MAIN_SCOPE};
use crate::store::{Context, StoreError};

impl<'a> Walk<'a> {
    /// The walk is complete: clear the resume point, advance the mark or cursor, mark
    /// deletions, and evaluate the reminder rules over the whole table.
    pub(super) async fn complete(&mut self) -> Result<(), StoreError> {
        // Before the rule pass below plans its query; a walk that wrote nothing changed
        // nothing the statistics describe.
        let written = self.counters.inserted + self.counters.updated;
        if written > 0 {
            self.table
                .refresh_statistics_if_stale(self.pool, written)
                .await;
        }
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
            ledger::rules::Scope::WalkEnd {
                run_id: self.run_id,
            },
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
