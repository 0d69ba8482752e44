//! Who this process is among the replicas: its instance id (on runs, ledger leases and
//! every log line of `idem serve`), its heartbeat row, the live membership that shares a
//! connector's rate limit, the prompt `abandoned` verdict on a dead replica's runs, and
//! the per-process counters `/metrics` shows beside the deployment-wide gauges.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rand::Rng;
use sqlx::PgPool;
use tokio::sync::watch;
use tracing::{Instrument, debug, info, warn};

use crate::errors::error_chain;
pub use crate::identity::{id, set_id};
use crate::store::{Context, StoreError};

/// `base` plus or minus up to `fraction` of it, so timers of replicas started together
/// (and of one replica's loops) drift apart instead of firing in step.
pub fn jittered(base: Duration, fraction: f64) -> Duration {
    let spread = base.as_secs_f64() * fraction;
    let offset = rand::rng().random_range(-spread..=spread);
    Duration::from_secs_f64((base.as_secs_f64() + offset).max(0.001))
}

/// Per-process counters: what this replica did since it started. Unlike the gauges read
/// from tables (the same on every replica), these add up across replicas.
#[derive(Default)]
pub struct Counters {
    /// Runs this process started (it held the stream's lock).
    pub runs_started: AtomicU64,
    /// Due streams this process claimed whose previous run still held the lock.
    pub lock_skips: AtomicU64,
    /// Dispatcher passes this process made.
    pub dispatch_passes: AtomicU64,
    /// Schedule claims this process made.
    pub claims: AtomicU64,
    /// Milliseconds from the shutdown signal until every loop stopped (0 until then).
    pub shutdown_ms: AtomicU64,
    /// When the shutdown signal came (unset while running).
    pub shutdown_started: OnceLock<std::time::Instant>,
}

/// The process's counters.
pub fn counters() -> &'static Counters {
    static COUNTERS: OnceLock<Counters> = OnceLock::new();
    COUNTERS.get_or_init(Counters::default)
}

impl Counters {
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// How many missed heartbeats make an instance dead.
pub const MISSED_HEARTBEATS: u32 = 3;

/// Registers this instance, then renews its heartbeat every `every` (with jitter) until
/// `shutdown`, publishing the number of live instances on `live` and marking the
/// `running` runs of dead instances `abandoned`. Removes its row on the way out, so the
/// others take its share of the rate limit at once.
pub async fn heartbeat_loop(
    pool: PgPool,
    every: Duration,
    live: watch::Sender<u32>,
    mut shutdown: watch::Receiver<bool>,
) {
    let span = tracing::info_span!("heartbeat");
    async move {
        loop {
            match beat(&pool, every).await {
                Ok(count) => {
                    live.send_if_modified(|current| {
                        let changed = *current != count;
                        if changed {
                            info!(live_instances = count, "replica membership changed");
                        }
                        *current = count;
                        changed
                    });
                }
                Err(err) => {
                    warn!(error = %error_chain(&err), "heartbeat failed; retried on the next tick")
                }
            }
            match reap(&pool).await {
                Ok(0) => {}
                Ok(n) => {
                    warn!(
                        runs = n,
                        "marked runs of instances that stopped heartbeating as abandoned"
                    )
                }
                Err(err) => {
                    debug!(error = %error_chain(&err), "reaping dead instances' runs failed")
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(jittered(every, 0.1)) => {}
                _ = shutdown.wait_for(|stop| *stop) => break,
            }
        }
        let _ = sqlx::query("DELETE FROM idem_instances WHERE id = $1")
            .bind(id())
            .execute(&pool)
            .await;
    }
    .instrument(span)
    .await
}

/// Renews this instance's row; returns how many instances are live (itself included).
pub async fn beat(pool: &PgPool, every: Duration) -> Result<u32, StoreError> {
    let every_ms = every.as_millis() as i64;
    sqlx::query(
        "INSERT INTO idem_instances (id, heartbeat_ms) VALUES ($1, $2)
         ON CONFLICT (id) DO UPDATE SET heartbeat_at = now(), heartbeat_ms = EXCLUDED.heartbeat_ms",
    )
    .bind(id())
    .bind(every_ms)
    .execute(pool)
    .await
    .context(|| "renewing this instance's heartbeat".into())?;
    let live: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM idem_instances
         WHERE heartbeat_at > now() - heartbeat_ms * $1 * interval '1 millisecond'",
    )
    .bind(MISSED_HEARTBEATS as i32)
    .fetch_one(pool)
    .await
    .context(|| "counting live instances".into())?;
    Ok(live.max(1) as u32)
}

/// Marks `abandoned` the runs still `running` under an instance whose heartbeat stopped,
/// and forgets those instances. Returns the runs marked.
pub async fn reap(pool: &PgPool) -> Result<u64, StoreError> {
    let mut tx = pool
        .begin()
        .await
        .context(|| "reaping dead instances".into())?;
    let dead: Vec<String> = sqlx::query_scalar(
        "DELETE FROM idem_instances
         WHERE heartbeat_at < now() - heartbeat_ms * $1 * interval '1 millisecond'
         RETURNING id",
    )
    .bind(MISSED_HEARTBEATS as i32)
    .fetch_all(&mut *tx)
    .await
    .context(|| "finding instances that stopped heartbeating".into())?;
    if dead.is_empty() {
        return Ok(0);
    }
    let marked = sqlx::query(
        "UPDATE idem_runs SET status = 'abandoned', finished_at = now(),
                error = 'interrupted: instance ' || instance || ' stopped heartbeating'
         WHERE status = 'running' AND instance = ANY($1)",
    )
    .bind(&dead)
    .execute(&mut *tx)
    .await
    .context(|| "marking dead instances' runs abandoned".into())?
    .rows_affected();
    tx.commit()
        .await
        .context(|| "reaping dead instances".into())?;
    Ok(marked)
}

/// Appends this process's counters to a Prometheus exposition.
pub fn render_process_metrics(out: &mut String) {
    use std::fmt::Write as _;
    let c = counters();
    let _ = writeln!(
        out,
        "# Per-process series below count what this replica did since it started; they add up across replicas."
    );
    for (name, help, value) in [
        (
            "idem_process_runs_started_total",
            "Runs this process started.",
            &c.runs_started,
        ),
        (
            "idem_process_lock_skips_total",
            "Claimed streams this process skipped because their previous run still held the lock.",
            &c.lock_skips,
        ),
        (
            "idem_process_schedule_claims_total",
            "Due streams this process claimed from the shared schedule.",
            &c.claims,
        ),
        (
            "idem_process_dispatch_passes_total",
            "Notification dispatcher passes this process made.",
            &c.dispatch_passes,
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} counter");
        let _ = writeln!(
            out,
            "{name}{{instance=\"{}\"}} {}",
            id(),
            value.load(Ordering::Relaxed)
        );
    }
    let _ = writeln!(
        out,
        "# HELP idem_process_shutdown_seconds Time since this process got its shutdown signal while it drains, then the time it took (0 while running)."
    );
    let _ = writeln!(out, "# TYPE idem_process_shutdown_seconds gauge");
    // While draining: the time so far; once every loop stopped: the time it took.
    let seconds = match (
        c.shutdown_ms.load(Ordering::Relaxed),
        c.shutdown_started.get(),
    ) {
        (0, Some(started)) => started.elapsed().as_secs_f64(),
        (ms, _) => ms as f64 / 1000.0,
    };
    let _ = writeln!(
        out,
        "idem_process_shutdown_seconds{{instance=\"{}\"}} {seconds}",
        id()
    );
}
