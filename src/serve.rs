//! `idem serve`: scheduled runs, the notification dispatcher on a timer, and `/healthz`
//! and `/metrics`, until a shutdown signal. Every loop watches the same signal; a run in
//! progress stops after the page it is writing and the next run resumes after it.
//!
//! Most metrics are read from Postgres at scrape time: the runs, failures and ledger
//! tables are the truth, so those figures agree across restarts and replicas — they are
//! deployment-wide, the same on every replica, and must not be summed across replicas.
//! The `idem_process_*` series are this process's own counters and do add up.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tracing::{Instrument, error, info, info_span, warn};

use crate::config::Settings;
use crate::connector::Connector;
use crate::ledger::dispatch::{DispatchSettings, Dispatcher};
use crate::ledger::transport::AnyTransport;
use crate::run::StreamRunner;
use crate::store::{Context, StoreError};

/// Everything the service's loops share.
struct Service {
    pool: PgPool,
    settings: Settings,
    transport: AnyTransport,
    /// Woken by a worker after a run, so its reminders go out before the next tick.
    ran: Arc<Notify>,
}

/// Runs the service until `shutdown` turns true; returns when every loop has stopped, or
/// when `[serve] shutdown_grace` has passed since the signal, whichever comes first.
pub async fn serve(
    settings: Settings,
    connectors: Vec<Connector>,
    pool: PgPool,
    database_url: String,
    transport: AnyTransport,
    listener: TcpListener,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    // Every line this process logs carries its instance id.
    let root = info_span!("idem", instance = %crate::instance::id());
    let console = crate::console::Console::new(
        &settings,
        connectors.clone(),
        pool.clone(),
        database_url.clone(),
        shutdown.clone(),
    )
    .map_err(|err| std::io::Error::new(std::io::ErrorKind::InvalidInput, err.to_string()))?;
    let service = Arc::new(Service {
        pool: pool.clone(),
        settings,
        transport,
        ran: Arc::new(Notify::new()),
    });
    let serve_settings = service.settings.serve.clone();
    let mut tasks = Vec::new();

    let targets = crate::schedule::targets(&connectors, &serve_settings.schedules)
        .map_err(|err| std::io::Error::other(format!("serve.schedules: {err}")))?;
    if let Err(err) = crate::schedule::sync(&pool, &targets)
        .instrument(root.clone())
        .await
    {
        root.in_scope(|| error!(error = %crate::run::error_chain(&err), "the schedule could not be stored; nothing will run"));
    }
    // One client (and so one rate limiter) per connector, shared by every worker.
    let mut runner = StreamRunner::default();
    let clients: Vec<_> = connectors.iter().map(|c| runner.client(c)).collect();
    let (live_tx, mut live_rx) = watch::channel(1u32);
    tasks.push(tokio::spawn(
        crate::instance::heartbeat_loop(
            pool.clone(),
            serve_settings
                .heartbeat_every
                .0
                .max(Duration::from_millis(100)),
            live_tx,
            shutdown.clone(),
        )
        .instrument(root.clone()),
    ));
    tasks.push(tokio::spawn(
        async move {
            // Each live replica takes an equal share of every connector's declared rate.
            while live_rx.changed().await.is_ok() {
                let live = *live_rx.borrow_and_update();
                for client in &clients {
                    client.share_among(live);
                }
            }
        }
        .instrument(root.clone()),
    ));
    if !targets.is_empty() {
        let connectors = Arc::new(connectors);
        let targets = Arc::new(targets);
        tasks.push(tokio::spawn(
            crate::schedule::announce_next_runs(
                pool.clone(),
                targets.clone(),
                console.clone(),
                shutdown.clone(),
            )
            .instrument(root.clone()),
        ));
        for number in 0..serve_settings.workers.max(1) as usize {
            let worker = crate::schedule::Worker {
                pool: pool.clone(),
                database_url: database_url.clone(),
                connectors: connectors.clone(),
                targets: targets.clone(),
                runner: runner.clone(),
                ran: service.ran.clone(),
                ddl: service.settings.database.ddl_policy(),
                batching: service.settings.import.batching(),
            };
            tasks.push(tokio::spawn(
                worker
                    .run(number, shutdown.clone())
                    .instrument(root.clone()),
            ));
        }
    }
    tasks.push(tokio::spawn(
        notify_loop(service.clone(), shutdown.clone()).instrument(root.clone()),
    ));
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(service.clone())
        .merge(crate::console::router(console))
        .layer(axum::middleware::from_fn({
            // Requests are served on tasks of their own: each one carries the instance.
            let root = root.clone();
            move |request: axum::extract::Request, next: axum::middleware::Next| {
                next.run(request).instrument(root.clone())
            }
        }));
    // The HTTP server outlives the drain, so /metrics shows the shutdown in progress.
    let (drained_tx, mut drained_rx) = watch::channel(false);
    let mut server = tokio::spawn(
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = drained_rx.wait_for(|drained| *drained).await;
            })
            .into_future()
            .instrument(root.clone()),
    );
    let mut signal = shutdown.clone();
    tokio::select! {
        // The listener failed: there is no service to keep up.
        result = &mut server => {
            return result.unwrap_or_else(|err| Err(std::io::Error::other(err)));
        }
        _ = signal.wait_for(|stop| *stop) => {}
    }
    let signalled = Instant::now();
    let _ = crate::instance::counters()
        .shutdown_started
        .set(signalled.into_std());
    let grace = serve_settings.shutdown_grace.0;
    let all_stopped = async {
        for task in tasks {
            let _ = task.await;
        }
    };
    async move {
        if tokio::time::timeout(grace, all_stopped).await.is_err() {
            warn!(
                grace_ms = grace.as_millis() as u64,
                "shutdown grace elapsed with work in progress: exiting anyway (a send in flight is settled by its lease; a run resumes after its last committed page)"
            );
        }
        let took = signalled.elapsed();
        crate::instance::counters()
            .shutdown_ms
            .store(took.as_millis() as u64, std::sync::atomic::Ordering::Relaxed);
        let _ = drained_tx.send(true);
        // The grace bounds the HTTP server's open connections too.
        let remaining = grace.saturating_sub(signalled.elapsed()).max(Duration::from_millis(200));
        let served = match tokio::time::timeout(remaining, &mut server).await {
            Ok(result) => result.unwrap_or_else(|err| Err(std::io::Error::other(err))),
            Err(_) => {
                server.abort();
                Ok(())
            }
        };
        info!(shutdown_ms = signalled.elapsed().as_millis() as u64, "idem serve stopped");
        served
    }
    .instrument(root)
    .await
}

/// Sends due notifications every `notify_every` (with jitter, so replicas' passes drift
/// apart), and soon after a run (retries come due between runs).
async fn notify_loop(service: Arc<Service>, mut shutdown: watch::Receiver<bool>) {
    let every = service
        .settings
        .serve
        .notify_every
        .0
        .max(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(crate::instance::jittered(every, 0.1)) => {}
            _ = service.ran.notified() => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        dispatch(&service, &shutdown).await;
    }
}

async fn dispatch(service: &Service, shutdown: &watch::Receiver<bool>) {
    let dispatcher = Dispatcher::new(
        &service.pool,
        &service.transport,
        DispatchSettings::from_config(&service.settings.notify),
    )
    .with_stop(shutdown.clone());
    crate::instance::Counters::bump(&crate::instance::counters().dispatch_passes);
    if let Err(err) = dispatcher.run_once().await {
        error!(error = %crate::run::error_chain(&err), "notification dispatch failed; retried on the next tick");
        // Rows this pass claimed but never started are not left to their lease.
        let _ = dispatcher.release_unsent().await;
    }
}

async fn healthz(State(service): State<Arc<Service>>) -> impl IntoResponse {
    match sqlx::query("SELECT 1").execute(&service.pool).await {
        Ok(_) => (StatusCode::OK, "ok\n".to_string()),
        Err(err) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("database unreachable: {err}\n"),
        ),
    }
}

/// The migrations this binary applies, to compare with what the database has.
static MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Ready when the database answers and every migration this binary knows is applied
/// (a new binary against an old schema is alive but not ready).
async fn readyz(State(service): State<Arc<Service>>) -> impl IntoResponse {
    let applied: Result<Vec<i64>, sqlx::Error> =
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
            .fetch_all(&service.pool)
            .await;
    match applied {
        Err(err) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: database unreachable or not migrated: {err}\n"),
        ),
        Ok(applied) => {
            let missing: Vec<String> = MIGRATIONS
                .iter()
                .filter(|m| !applied.contains(&m.version))
                .map(|m| format!("{} {}", m.version, m.description))
                .collect();
            if missing.is_empty() {
                (StatusCode::OK, "ready\n".to_string())
            } else {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "not ready: migrations not applied (run `idem migrate`): {}\n",
                        missing.join(", ")
                    ),
                )
            }
        }
    }
}

async fn metrics(State(service): State<Arc<Service>>) -> impl IntoResponse {
    match render_metrics(&service.pool).await {
        Ok(mut text) => {
            crate::instance::render_process_metrics(&mut text);
            (
                StatusCode::OK,
                [("content-type", "text/plain; version=0.0.4")],
                text,
            )
        }
        Err(err) => (
            StatusCode::SERVICE_UNAVAILABLE,
            [("content-type", "text/plain; version=0.0.4")],
            format!("# database unreachable: {err}\n"),
        ),
    }
}

type RunTotals = (
    String,
    String,
    String,
    String,
    String,
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
);

/// The Prometheus text exposition of idem's tables.
pub async fn render_metrics(pool: &PgPool) -> Result<String, StoreError> {
    let runs: Vec<RunTotals> = sqlx::query_as(
        "SELECT source_system, stream, partition, mode, status, count(*), sum(fetched)::bigint, sum(inserted)::bigint,
                sum(updated)::bigint, sum(unchanged)::bigint, sum(failed)::bigint, sum(deleted)::bigint
         FROM idem_runs GROUP BY 1, 2, 3, 4, 5 ORDER BY 1, 2, 3, 4, 5",
    )
    .fetch_all(pool)
    .await
    .context(|| "reading metrics".into())?;
    let last_success: Vec<(String, String, String, DateTime<Utc>)> = sqlx::query_as(
        "SELECT source_system, stream, partition, max(finished_at) FROM idem_runs
         WHERE status IN ('succeeded', 'partial') AND finished_at IS NOT NULL GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
    )
    .fetch_all(pool)
    .await
    .context(|| "reading metrics".into())?;
    let failures: Vec<(String, String, String, i64)> = sqlx::query_as(
        "SELECT source_system, stream, partition, count(*) FROM idem_failures GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
    )
    .fetch_all(pool)
    .await
    .context(|| "reading metrics".into())?;
    let ledger = crate::ledger::counts_by_status(pool).await?;

    let live: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM idem_instances
         WHERE heartbeat_at > now() - heartbeat_ms * $1 * interval '1 millisecond'",
    )
    .bind(crate::instance::MISSED_HEARTBEATS as i32)
    .fetch_one(pool)
    .await
    .context(|| "reading metrics".into())?;

    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Deployment-wide series below are read from idem's tables: every replica reports the same values; do not sum them across replicas."
    );
    let _ = writeln!(
        out,
        "# HELP idem_live_instances idem serve processes whose heartbeat is current (deployment-wide)."
    );
    let _ = writeln!(out, "# TYPE idem_live_instances gauge");
    let _ = writeln!(out, "idem_live_instances {live}");
    let _ = writeln!(
        out,
        "# HELP idem_runs_total Runs recorded, by stream, mode and final status."
    );
    let _ = writeln!(out, "# TYPE idem_runs_total counter");
    for (ss, st, p, mode, status, count, ..) in &runs {
        let p = partition_label(p);
        let _ = writeln!(
            out,
            "idem_runs_total{{source_system=\"{ss}\",stream=\"{st}\"{p},mode=\"{mode}\",status=\"{status}\"}} {count}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP idem_records_total Records handled by runs, by stream and outcome."
    );
    let _ = writeln!(out, "# TYPE idem_records_total counter");
    let mut totals: std::collections::BTreeMap<(String, String, String, &str), i64> =
        Default::default();
    for (ss, st, p, _, _, _, fetched, inserted, updated, unchanged, failed, deleted) in &runs {
        for (outcome, value) in [
            ("fetched", fetched),
            ("inserted", inserted),
            ("updated", updated),
            ("unchanged", unchanged),
            ("failed", failed),
            ("deleted", deleted),
        ] {
            *totals
                .entry((ss.clone(), st.clone(), p.clone(), outcome))
                .or_default() += value;
        }
    }
    for ((ss, st, p, outcome), value) in totals {
        let p = partition_label(&p);
        let _ = writeln!(
            out,
            "idem_records_total{{source_system=\"{ss}\",stream=\"{st}\"{p},outcome=\"{outcome}\"}} {value}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP idem_last_success_timestamp_seconds When the stream's last successful run finished."
    );
    let _ = writeln!(out, "# TYPE idem_last_success_timestamp_seconds gauge");
    for (ss, st, p, at) in &last_success {
        let p = partition_label(p);
        let _ = writeln!(
            out,
            "idem_last_success_timestamp_seconds{{source_system=\"{ss}\",stream=\"{st}\"{p}}} {}",
            at.timestamp()
        );
    }
    let _ = writeln!(
        out,
        "# HELP idem_record_failures Records waiting in the failures table."
    );
    let _ = writeln!(out, "# TYPE idem_record_failures gauge");
    for (ss, st, p, count) in &failures {
        let p = partition_label(p);
        let _ = writeln!(
            out,
            "idem_record_failures{{source_system=\"{ss}\",stream=\"{st}\"{p}}} {count}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP idem_ledger_rows Notification ledger rows by status."
    );
    let _ = writeln!(out, "# TYPE idem_ledger_rows gauge");
    for (status, count) in &ledger {
        let _ = writeln!(out, "idem_ledger_rows{{status=\"{status}\"}} {count}");
    }
    Ok(out)
}

/// The `partition` label of a partitioned stream's series; unpartitioned streams keep
/// the labels they always had. Partition values are checked to need no escaping.
fn partition_label(partition: &str) -> String {
    if partition.is_empty() {
        String::new()
    } else {
        format!(",partition=\"{partition}\"")
    }
}

/// Turns true on SIGTERM or Ctrl-C.
pub fn shutdown_signal() -> watch::Receiver<bool> {
    let (sender, receiver) = watch::channel(false);
    let span = info_span!("idem", instance = %crate::instance::id());
    tokio::spawn(async move {
        let terminate = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut signal) => {
                    signal.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate => {}
        }
        info!("shutdown requested: claiming nothing more, finishing the page and the send in progress");
        let _ = sender.send(true);
    }.instrument(span));
    receiver
}
