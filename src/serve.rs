//! `idem serve`: scheduled runs, the notification dispatcher on a timer, and `/healthz`
//! and `/metrics`, until a shutdown signal. Every loop watches the same signal; a run in
//! progress stops after the page it is writing and the next run resumes after it.
//!
//! Metrics are read from Postgres at scrape time: the runs, failures and ledger tables
//! are the truth, so the figures agree across restarts and replicas without an in-process
//! registry.

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
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::config::{Schedule, Settings};
use crate::connector::{Connector, select_streams};
use crate::ledger::dispatch::{DispatchSettings, Dispatcher};
use crate::ledger::transport::AnyTransport;
use crate::run::{Mode, RunError, RunOptions, StreamRunner};
use crate::store::{Context, StoreError};

/// Everything the service's loops share.
struct Service {
    pool: PgPool,
    database_url: String,
    connectors: Vec<Connector>,
    settings: Settings,
    transport: AnyTransport,
    console: Arc<crate::console::Console>,
}

/// Runs the service until `shutdown` turns true; returns when every loop has stopped.
pub async fn serve(
    settings: Settings,
    connectors: Vec<Connector>,
    pool: PgPool,
    database_url: String,
    transport: AnyTransport,
    listener: TcpListener,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let console = crate::console::Console::new(
        &settings,
        connectors.clone(),
        pool.clone(),
        database_url.clone(),
        shutdown.clone(),
    )
    .map_err(|err| std::io::Error::new(std::io::ErrorKind::InvalidInput, err.to_string()))?;
    let service = Arc::new(Service {
        pool,
        database_url,
        connectors,
        settings,
        transport,
        console: console.clone(),
    });
    let mut tasks = Vec::new();
    for (index, schedule) in service.settings.serve.schedules.iter().enumerate() {
        tasks.push(tokio::spawn(schedule_loop(
            service.clone(),
            index,
            schedule.clone(),
            shutdown.clone(),
        )));
    }
    tasks.push(tokio::spawn(notify_loop(service.clone(), shutdown.clone())));
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(service.clone())
        .merge(crate::console::router(console));
    let mut server_shutdown = shutdown.clone();
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = server_shutdown.wait_for(|stop| *stop).await;
        })
        .await;
    for task in tasks {
        let _ = task.await;
    }
    info!("idem serve stopped");
    served
}

/// Runs the schedule's streams, waits `every`, and again, until shutdown.
async fn schedule_loop(
    service: Arc<Service>,
    index: usize,
    schedule: Schedule,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut runner = StreamRunner::default();
    let targets = match select_streams(&service.connectors, &schedule.streams) {
        Ok(targets) => targets,
        Err(err) => {
            error!(schedule = index, error = %err, "schedule names unknown streams; it will not run");
            return;
        }
    };
    let options = RunOptions {
        stop: Some(shutdown.clone()),
        ddl: service.settings.database.ddl_policy(),
        batching: service.settings.import.batching(),
        ..RunOptions::new(Mode::Regular, false)
    };
    loop {
        for (connector, stream) in &targets {
            if *shutdown.borrow() {
                return;
            }
            match runner
                .run(
                    &service.pool,
                    &service.database_url,
                    connector,
                    stream,
                    &options,
                )
                .await
            {
                Ok(report) => info!(schedule = index, "{}", crate::cli::summary(&report)),
                Err(RunError::Locked {
                    source_system,
                    stream,
                }) => {
                    warn!(
                        schedule = index,
                        "{source_system}.{stream} is already running elsewhere; skipped this round"
                    )
                }
                Err(err) => {
                    error!(schedule = index, error = %crate::run::error_chain(&err), "run could not start")
                }
            }
        }
        dispatch(&service).await;
        let next = Utc::now() + schedule.every.as_chrono();
        for (connector, stream) in &targets {
            let name = format!("{}.{stream}", connector.spec.source_system);
            service.console.set_next_run(&name, next);
        }
        tokio::select! {
            _ = tokio::time::sleep(schedule.every.0) => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
    }
}

/// Sends due notifications every `notify_every` (retries come due between runs).
async fn notify_loop(service: Arc<Service>, mut shutdown: watch::Receiver<bool>) {
    let every = service
        .settings
        .serve
        .notify_every
        .0
        .max(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        dispatch(&service).await;
    }
}

async fn dispatch(service: &Service) {
    let dispatcher = Dispatcher::new(
        &service.pool,
        &service.transport,
        DispatchSettings::from_config(&service.settings.notify),
    );
    if let Err(err) = dispatcher.run_once().await {
        error!(error = %crate::run::error_chain(&err), "notification dispatch failed; retried on the next tick");
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
        Ok(text) => (
            StatusCode::OK,
            [("content-type", "text/plain; version=0.0.4")],
            text,
        ),
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
        "SELECT source_system, stream, mode, status, count(*), sum(fetched)::bigint, sum(inserted)::bigint,
                sum(updated)::bigint, sum(unchanged)::bigint, sum(failed)::bigint, sum(deleted)::bigint
         FROM idem_runs GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4",
    )
    .fetch_all(pool)
    .await
    .context(|| "reading metrics".into())?;
    let last_success: Vec<(String, String, DateTime<Utc>)> = sqlx::query_as(
        "SELECT source_system, stream, max(finished_at) FROM idem_runs
         WHERE status IN ('succeeded', 'partial') AND finished_at IS NOT NULL GROUP BY 1, 2 ORDER BY 1, 2",
    )
    .fetch_all(pool)
    .await
    .context(|| "reading metrics".into())?;
    let failures: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT source_system, stream, count(*) FROM idem_failures GROUP BY 1, 2 ORDER BY 1, 2",
    )
    .fetch_all(pool)
    .await
    .context(|| "reading metrics".into())?;
    let ledger = crate::ledger::counts_by_status(pool).await?;

    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP idem_runs_total Runs recorded, by stream, mode and final status."
    );
    let _ = writeln!(out, "# TYPE idem_runs_total counter");
    for (ss, st, mode, status, count, ..) in &runs {
        let _ = writeln!(
            out,
            "idem_runs_total{{source_system=\"{ss}\",stream=\"{st}\",mode=\"{mode}\",status=\"{status}\"}} {count}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP idem_records_total Records handled by runs, by stream and outcome."
    );
    let _ = writeln!(out, "# TYPE idem_records_total counter");
    let mut totals: std::collections::BTreeMap<(String, String, &str), i64> = Default::default();
    for (ss, st, _, _, _, fetched, inserted, updated, unchanged, failed, deleted) in &runs {
        for (outcome, value) in [
            ("fetched", fetched),
            ("inserted", inserted),
            ("updated", updated),
            ("unchanged", unchanged),
            ("failed", failed),
            ("deleted", deleted),
        ] {
            *totals.entry((ss.clone(), st.clone(), outcome)).or_default() += value;
        }
    }
    for ((ss, st, outcome), value) in totals {
        let _ = writeln!(
            out,
            "idem_records_total{{source_system=\"{ss}\",stream=\"{st}\",outcome=\"{outcome}\"}} {value}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP idem_last_success_timestamp_seconds When the stream's last successful run finished."
    );
    let _ = writeln!(out, "# TYPE idem_last_success_timestamp_seconds gauge");
    for (ss, st, at) in &last_success {
        let _ = writeln!(
            out,
            "idem_last_success_timestamp_seconds{{source_system=\"{ss}\",stream=\"{st}\"}} {}",
            at.timestamp()
        );
    }
    let _ = writeln!(
        out,
        "# HELP idem_record_failures Records waiting in the failures table."
    );
    let _ = writeln!(out, "# TYPE idem_record_failures gauge");
    for (ss, st, count) in &failures {
        let _ = writeln!(
            out,
            "idem_record_failures{{source_system=\"{ss}\",stream=\"{st}\"}} {count}"
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

/// Turns true on SIGTERM or Ctrl-C.
pub fn shutdown_signal() -> watch::Receiver<bool> {
    let (sender, receiver) = watch::channel(false);
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
        info!("shutdown requested: finishing the page in progress");
        let _ = sender.send(true);
    });
    receiver
}
