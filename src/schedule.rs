//! The shared schedule of `idem serve`: one due time per stream in Postgres
//! (`idem_schedule`), claimed atomically by whichever replica's worker polls first, so
//! with R replicas each stream still runs once per `every`, the runs spread over the
//! replicas, and a dead replica's streams run at their next due time on another.
//!
//! `every` is the time between starts: a claim moves the stream's due time to its
//! previous due time plus `every` (plus or minus [`DUE_JITTER`] of it), or to now plus
//! `every` when the stream fell more than a period behind (replicas were down), so missed
//! periods are not run back to back. A run that outlasts `every` is not started twice:
//! the claim of the next period finds the stream's lock held, counts a lock skip, and
//! the stream is due again a period later.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::{Notify, watch};
use tracing::{Instrument, debug, error, info, warn};

use crate::config::Schedule;
use crate::connector::{Connector, select_streams};
use crate::instance::{self, Counters};
use crate::run::{Mode, RunError, RunOptions, StreamRunner};
use crate::store::{Context, StoreError};

/// Spread of each new due time, as a fraction of `every`: replicas and streams started
/// together drift apart instead of hitting the vendor in step.
pub const DUE_JITTER: f64 = 0.05;

/// Longest a worker sleeps between polls for a due stream, so a schedule changed by
/// another replica (or a stream it released) is noticed soon.
const MAX_POLL: Duration = Duration::from_millis(1000);

/// One scheduled stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub source_system: String,
    pub stream: String,
    pub every: Duration,
}

/// The streams the schedules name, each once (a stream named by two schedules runs at
/// the shorter `every`).
pub fn targets(connectors: &[Connector], schedules: &[Schedule]) -> Result<Vec<Target>, String> {
    let mut by_stream: BTreeMap<(String, String), Duration> = BTreeMap::new();
    for schedule in schedules {
        for (connector, stream) in select_streams(connectors, &schedule.streams)? {
            let every = schedule.every.0.max(Duration::from_millis(10));
            by_stream
                .entry((connector.spec.source_system.clone(), stream.clone()))
                .and_modify(|e| *e = (*e).min(every))
                .or_insert(every);
        }
    }
    Ok(by_stream
        .into_iter()
        .map(|((source_system, stream), every)| Target {
            source_system,
            stream,
            every,
        })
        .collect())
}

/// Adds this configuration's streams to the shared schedule (due at once when new) and
/// records their `every`; a shortened `every` pulls the due time in.
pub async fn sync(pool: &PgPool, targets: &[Target]) -> Result<(), StoreError> {
    for target in targets {
        sqlx::query(
            "INSERT INTO idem_schedule (source_system, stream, every_ms) VALUES ($1, $2, $3)
             ON CONFLICT (source_system, stream) DO UPDATE SET every_ms = EXCLUDED.every_ms,
                 next_due_at = LEAST(idem_schedule.next_due_at, now() + EXCLUDED.every_ms * interval '1 millisecond')",
        )
        .bind(&target.source_system)
        .bind(&target.stream)
        .bind(target.every.as_millis() as i64)
        .execute(pool)
        .await
        .context(|| {
            format!(
                "adding {}.{} to the schedule",
                target.source_system, target.stream
            )
        })?;
    }
    Ok(())
}

/// Claims one due stream among `targets` for this instance, moving its due time a
/// period on in the same statement; `None` when nothing is due. Other replicas skip the
/// row while this statement holds it, so a due time is claimed once.
pub async fn claim(pool: &PgPool, targets: &[Target]) -> Result<Option<Target>, StoreError> {
    let (systems, streams) = names(targets);
    let claimed: Option<(String, String, i64)> = sqlx::query_as(
        "UPDATE idem_schedule s
         SET next_due_at = CASE WHEN s.next_due_at + s.every_ms * interval '1 millisecond' > now()
                                THEN s.next_due_at ELSE now() END
                           + s.every_ms * (1 + $4 * (2 * random() - 1)) * interval '1 millisecond',
             claimed_by = $1, claimed_at = now()
         FROM (SELECT source_system, stream FROM idem_schedule
               WHERE next_due_at <= now()
                 AND (source_system, stream) IN (SELECT * FROM unnest($2::text[], $3::text[]))
               ORDER BY next_due_at LIMIT 1 FOR UPDATE SKIP LOCKED) due
         WHERE s.source_system = due.source_system AND s.stream = due.stream
         RETURNING s.source_system, s.stream, s.every_ms",
    )
    .bind(instance::id())
    .bind(&systems)
    .bind(&streams)
    .bind(DUE_JITTER)
    .fetch_optional(pool)
    .await
    .context(|| "claiming a due stream from the schedule".into())?;
    Ok(claimed.map(|(source_system, stream, every_ms)| Target {
        source_system,
        stream,
        every: Duration::from_millis(every_ms.max(0) as u64),
    }))
}

/// How long until the next of `targets` comes due (zero if one is due now).
async fn until_next_due(pool: &PgPool, targets: &[Target]) -> Result<Duration, StoreError> {
    let (systems, streams) = names(targets);
    let seconds: Option<f64> = sqlx::query_scalar(
        "SELECT EXTRACT(EPOCH FROM min(next_due_at) - now())::float8 FROM idem_schedule
         WHERE (source_system, stream) IN (SELECT * FROM unnest($1::text[], $2::text[]))",
    )
    .bind(&systems)
    .bind(&streams)
    .fetch_one(pool)
    .await
    .context(|| "reading the schedule".into())?;
    Ok(Duration::from_secs_f64(seconds.unwrap_or(1.0).max(0.0)))
}

fn names(targets: &[Target]) -> (Vec<String>, Vec<String>) {
    targets
        .iter()
        .map(|t| (t.source_system.clone(), t.stream.clone()))
        .unzip()
}

/// What a worker needs.
pub struct Worker {
    pub pool: PgPool,
    pub database_url: String,
    pub connectors: Arc<Vec<Connector>>,
    pub targets: Arc<Vec<Target>>,
    /// Shares one vendor client (and so one rate limiter) per connector with the
    /// process's other workers.
    pub runner: StreamRunner,
    /// Woken after a run, so reminders it made go out without waiting a whole tick.
    pub ran: Arc<Notify>,
    /// Whether runs may create or alter destination tables (`[database] ddl`).
    pub ddl: crate::store::table::DdlPolicy,
    /// How pages are grouped into transactions (`[import]`).
    pub batching: crate::writer::Batching,
}

impl Worker {
    /// Claims due streams and runs them, one at a time, until `shutdown`: then it claims
    /// nothing more and the run in progress stops after its page (`interrupted`).
    pub async fn run(mut self, number: usize, shutdown: watch::Receiver<bool>) {
        let options = RunOptions {
            stop: Some(shutdown.clone()),
            ddl: self.ddl.clone(),
            batching: self.batching,
            ..RunOptions::new(Mode::Regular, false)
        };
        let mut shutdown = shutdown;
        while !*shutdown.borrow() {
            let claimed = match claim(&self.pool, &self.targets).await {
                Ok(claimed) => claimed,
                Err(err) => {
                    warn!(worker = number, error = %crate::run::error_chain(&err), "the schedule could not be read; retrying");
                    None
                }
            };
            let Some(target) = claimed else {
                let wait = until_next_due(&self.pool, &self.targets)
                    .await
                    .unwrap_or(MAX_POLL)
                    .min(MAX_POLL);
                // Jitter keeps the replicas' polls of one due time from arriving together.
                let wait = wait + instance::jittered(Duration::from_millis(25), 1.0);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.wait_for(|stop| *stop) => break,
                }
                continue;
            };
            Counters::bump(&instance::counters().claims);
            self.run_claimed(number, &target, &options).await;
        }
        debug!(worker = number, "scheduler worker stopped");
    }

    async fn run_claimed(&mut self, number: usize, target: &Target, options: &RunOptions) {
        let Some(connector) = self
            .connectors
            .iter()
            .find(|c| c.spec.source_system == target.source_system)
        else {
            return;
        };
        let span = tracing::info_span!("scheduled", worker = number);
        // A previous run still holding the lock is seen through the pool, so a skipped
        // period opens no Postgres session; only a stream that looks free gets one.
        let mut held = Ok(false);
        for partition in connector.partitions(&target.stream) {
            held = crate::store::stream_lock_held(
                &self.pool,
                &target.source_system,
                &target.stream,
                &partition,
            )
            .await;
            if !matches!(held, Ok(false)) {
                break;
            }
        }
        let result = if held.unwrap_or(false) {
            Err(RunError::Locked {
                source_system: target.source_system.clone(),
                stream: target.stream.clone(),
            })
        } else {
            self.runner
                .run(
                    &self.pool,
                    &self.database_url,
                    connector,
                    &target.stream,
                    options,
                )
                .instrument(span.clone())
                .await
        };
        span.in_scope(|| match result {
            Ok(report) => {
                Counters::bump(&instance::counters().runs_started);
                self.ran.notify_one();
                info!("{}", crate::run::summary(&report));
            }
            Err(RunError::Locked {
                source_system,
                stream,
            }) => {
                Counters::bump(&instance::counters().lock_skips);
                debug!(
                    "{source_system}.{stream} is still running (its previous run outlasted `every`); skipped this period"
                );
            }
            Err(err) => {
                error!(error = %crate::run::error_chain(&err), "run could not start")
            }
        });
    }
}

/// Tells the console when each scheduled stream is due next, as the shared schedule
/// says (whichever replica will run it), refreshed every second until shutdown.
pub async fn announce_next_runs(
    pool: PgPool,
    targets: Arc<Vec<Target>>,
    console: Arc<crate::console::Console>,
    mut shutdown: watch::Receiver<bool>,
) {
    let (systems, streams) = names(&targets);
    loop {
        let due: Result<Vec<(String, String, chrono::DateTime<chrono::Utc>)>, _> = sqlx::query_as(
            "SELECT source_system, stream, next_due_at FROM idem_schedule
             WHERE (source_system, stream) IN (SELECT * FROM unnest($1::text[], $2::text[]))",
        )
        .bind(&systems)
        .bind(&streams)
        .fetch_all(&pool)
        .await;
        for (source_system, stream, at) in due.unwrap_or_default() {
            console.set_next_run(&format!("{source_system}.{stream}"), at);
        }
        tokio::select! {
            _ = tokio::time::sleep(instance::jittered(Duration::from_secs(1), 0.1)) => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
    }
}

/// `idem check`'s word on connections: a warning when `[serve] replicas` × connections
/// per replica reach 80 % of the server's `max_connections`, or `None` (also when the
/// server cannot be asked).
pub async fn connection_warning(serve: &crate::config::ServeSettings, url: &str) -> Option<String> {
    use sqlx::Connection;
    let ask = async {
        let mut connection = sqlx::PgConnection::connect(url).await.ok()?;
        let max: String = sqlx::query_scalar("SHOW max_connections")
            .fetch_one(&mut connection)
            .await
            .ok()?;
        let _ = connection.close().await;
        max.parse::<u32>().ok()
    };
    let max = tokio::time::timeout(Duration::from_secs(3), ask)
        .await
        .ok()
        .flatten()?;
    let per_replica = serve.connections_per_replica();
    let total = serve.replicas.max(1) * per_replica;
    (u64::from(total) * 10 >= u64::from(max) * 8).then(|| {
        format!(
            "warning: {} replica(s) × {per_replica} connections (pool_size {} + {} lock sessions of workers) = {total}, against max_connections = {max} on the server; lower [serve] workers or pool_size, or raise max_connections",
            serve.replicas.max(1),
            serve.pool_size(),
            serve.workers.max(1)
        )
    })
}
