//! Which walks a run makes: the stream's partitions one after another, owed child streams
//! before and after, each through the vendor client the runner shares across streams.

use std::sync::Arc;

use sqlx::PgPool;
use tracing::{Instrument, info, info_span, warn};

use super::children;
use super::walk::Walk;
use super::{RunError, RunOptions, RunReport, worse};
use crate::connector::{Connector, Source, StreamSpec};
pub use crate::errors::error_chain;
use crate::http::{HttpSource, VendorClient};
use crate::store::StreamLock;

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
        let mut report = run_partition(pool, connector, stream, partition, source, options).await?;
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
    connector: &Connector,
    stream_name: &str,
    source: S,
    options: &RunOptions,
) -> Result<RunReport, RunError> {
    run_partition(pool, connector, stream_name, "", source, options).await
}

/// Runs one partition of a stream (`""`: the stream is unpartitioned), reading pages from
/// `source`, which must already be the partition's (see [`crate::connector::partition::for_partition`]).
/// The partition has its own lock, checkpoint, runs and failures.
pub async fn run_partition<S: Source + 'static>(
    pool: &PgPool,
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
                StreamLock::try_acquire_from(pool, &source_system, stream_name, partition)
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
pub(super) fn streams_sharing_table(connector: &Connector, stream: &StreamSpec) -> Vec<String> {
    connector
        .spec
        .streams
        .iter()
        .filter(|(_, other)| other.table == stream.table)
        .map(|(name, _)| name.clone())
        .collect()
}
