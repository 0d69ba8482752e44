//! The console's pages, read-only and open without credentials: the streams overview
//! (also `idem status`'s first table), one stream's runs and failures, the ledger.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use chrono::{DateTime, Utc};
use minijinja::context;
use serde::Deserialize;
use sqlx::PgPool;

use super::{Console, FAILURES_SHOWN, LEDGER_SHOWN, LEDGER_STATUSES, RUNS_SHOWN, db_error, views};
use crate::connector::Connector;
use crate::duration::HumanDuration;

pub(super) async fn index(State(console): State<Arc<Console>>, headers: HeaderMap) -> Response {
    let (_, frame) = console.frame(&headers, "streams");
    match stream_rows(&console).await {
        Ok(rows) => {
            let running = rows.iter().any(|r| r.in_progress.is_some());
            let ctx = context! {
                streams => rows,
                now => views::short_time(Utc::now()),
                lag_alert => console.lag_alert.to_string(),
                refresh => running.then_some(5),
                ..frame
            };
            console.render("index.html", ctx)
        }
        Err(err) => db_error(&console, err),
    }
}

pub(super) async fn stream_rows(
    console: &Console,
) -> Result<Vec<views::StreamRow>, crate::store::StoreError> {
    let next_runs = console.next_runs.lock().expect("next runs lock").clone();
    overview(
        &console.pool,
        &console.connectors,
        console.lag_alert,
        &next_runs,
    )
    .await
}

/// One row per configured stream: its last run, mark and lag, next run, failures and
/// ledger rows, and why it is in trouble, if it is (the console's first page and
/// `idem status`).
pub async fn overview(
    pool: &PgPool,
    connectors: &[Connector],
    lag_alert: HumanDuration,
    next_runs: &HashMap<String, DateTime<Utc>>,
) -> Result<Vec<views::StreamRow>, crate::store::StoreError> {
    let now = Utc::now();
    // Keyed by partition too: a partitioned stream shows one row per partition.
    let last: BTreeMap<(String, String, String), views::RunRecord> = views::runs(pool, None, 1)
        .await?
        .into_iter()
        .map(|r| {
            (
                (
                    r.source_system.clone(),
                    r.stream.clone(),
                    r.partition.clone(),
                ),
                r,
            )
        })
        .collect();
    let checkpoints: BTreeMap<(String, String, String), crate::store::state::CheckpointRow> =
        crate::store::state::list_checkpoints(pool, None)
            .await?
            .into_iter()
            .filter(|cp| cp.scope == crate::store::state::MAIN_SCOPE)
            .map(|cp| {
                (
                    (
                        cp.source_system.clone(),
                        cp.stream.clone(),
                        cp.partition.clone(),
                    ),
                    cp,
                )
            })
            .collect();
    let failures = views::failure_counts(pool).await?;
    let ledger = views::ledger_counts(pool).await?;
    let mut rows = Vec::new();
    let mut streams: Vec<(String, String, String)> = Vec::new();
    for connector in connectors {
        for stream in connector.spec.streams.keys() {
            for partition in connector.partitions(stream) {
                streams.push((
                    connector.spec.source_system.clone(),
                    stream.clone(),
                    partition,
                ));
            }
        }
    }
    for (source_system, stream, partition) in streams {
        let part_key = (source_system.clone(), stream.clone(), partition.clone());
        let key = (source_system.clone(), stream.clone());
        let name = format!("{source_system}.{stream}");
        let record = last.get(&part_key);
        let mut trouble = Vec::new();
        let in_progress = match record {
            Some(r) if r.status == "running" => {
                if crate::store::stream_lock_held(pool, &source_system, &stream, &partition).await?
                {
                    Some(format!(
                        "{} since {}: page {}, {} records so far",
                        r.mode,
                        views::human_span(now - r.started_at),
                        r.pages,
                        r.fetched
                    ))
                } else {
                    trouble.push("its last run was interrupted (the process stopped)".into());
                    None
                }
            }
            _ => None,
        };
        if let Some(r) = record {
            match r.status.as_str() {
                "failed" => trouble.push("last run failed".into()),
                "abandoned" => trouble.push("last run was interrupted".into()),
                _ => {}
            }
        }
        let (mark, lag) = match checkpoints.get(&part_key) {
            None => ("no checkpoint yet".to_string(), "-".to_string()),
            Some(cp) => match (&cp.high_water_mark, &cp.cursor) {
                (Some(hwm), _) => {
                    let lag = now - *hwm;
                    if lag > lag_alert.as_chrono() {
                        trouble.push(format!(
                            "mark {} behind (alert past {})",
                            views::human_span(lag),
                            lag_alert
                        ));
                    }
                    (views::short_time(*hwm), views::human_span(lag))
                }
                (None, Some(cursor)) => {
                    let lag = now - cp.updated_at;
                    if lag > lag_alert.as_chrono() {
                        trouble.push(format!(
                            "cursor unchanged for {} (alert past {})",
                            views::human_span(lag),
                            lag_alert
                        ));
                    }
                    (
                        format!("cursor {}", views::cut(&views::redact_text(cursor), 24)),
                        format!("moved {} ago", views::human_span(lag)),
                    )
                }
                (None, None) => ("walk in progress".to_string(), "-".to_string()),
            },
        };
        let failures = failures.get(&part_key).copied().unwrap_or(0);
        if failures > 0 {
            trouble.push(format!("{failures} failed record(s) waiting"));
        }
        let ledger = ledger.get(&key).cloned().unwrap_or_default();
        for (status, n) in &ledger {
            match status.as_str() {
                "needs_review" => trouble.push(format!("{n} ledger row(s) need review")),
                "failed" => trouble.push(format!("{n} notification(s) failed")),
                _ => {}
            }
        }
        let next_run = if in_progress.is_some() {
            "running now".to_string()
        } else {
            match next_runs.get(&name) {
                Some(at) if *at > now => format!("in {}", views::human_span(*at - now)),
                Some(_) => "due now".to_string(),
                None => "not scheduled here".to_string(),
            }
        };
        let ledger_links = ledger
            .iter()
            .map(|(status, n)| {
                let href = format!(
                    "/ledger?status={}&stream={}",
                    views::urlencoded(status),
                    views::urlencoded(&name)
                );
                (status.clone(), *n, href)
            })
            .collect();
        rows.push(views::StreamRow {
            href: format!(
                "/streams/{}/{}",
                views::urlencoded(&source_system),
                views::urlencoded(&stream)
            ),
            ledger_links,
            source_system,
            stream: crate::connector::partition::qualified(&stream, &partition),
            last_run: record.map(|r| views::RunView::from_record(r, now)),
            mark,
            lag,
            next_run,
            in_progress,
            failures,
            ledger,
            trouble,
        });
    }
    Ok(rows)
}

pub(super) async fn stream_page(
    State(console): State<Arc<Console>>,
    Path((source_system, stream)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if console.find(&source_system, &stream).is_none() {
        let (_, frame) = console.frame(&headers, "streams");
        let mut response = console.render(
            "refused.html",
            context! { message => format!("No configured stream {source_system}.{stream}."), ..frame },
        );
        *response.status_mut() = StatusCode::NOT_FOUND;
        return response;
    }
    let (_, frame) = console.frame(&headers, "streams");
    let name = format!("{source_system}.{stream}");
    let loaded = async {
        let rows = stream_rows(&console).await?;
        let row = rows
            .into_iter()
            .find(|r| r.source_system == source_system && r.stream == stream);
        let now = Utc::now();
        let runs: Vec<views::RunView> =
            views::runs(&console.pool, Some((&source_system, &stream)), RUNS_SHOWN)
                .await?
                .iter()
                .map(|r| views::RunView::from_record(r, now))
                .collect();
        let checkpoints = views::checkpoints(&console.pool, &source_system, &stream).await?;
        let failures =
            views::failures(&console.pool, &source_system, &stream, FAILURES_SHOWN + 1).await?;
        let actions = views::recent_actions(&console.pool, &format!("stream:{name}"), 20).await?;
        Ok::<_, crate::store::StoreError>((row, runs, checkpoints, failures, actions))
    }
    .await;
    match loaded {
        Ok((row, runs, checkpoints, mut failures, actions)) => {
            let failures_more = failures.len() as i64 > FAILURES_SHOWN;
            failures.truncate(FAILURES_SHOWN as usize);
            let in_progress = row.as_ref().and_then(|r| r.in_progress.clone());
            let ctx = context! {
                href => format!("/streams/{}/{}", views::urlencoded(&source_system), views::urlencoded(&stream)),
                name => name,
                source_system => source_system,
                stream => stream,
                trouble => row.map(|r| r.trouble).unwrap_or_default(),
                refresh => in_progress.is_some().then_some(5),
                in_progress => in_progress,
                runs => runs,
                checkpoints => checkpoints,
                failures => failures,
                failures_more => failures_more,
                payload_shown => views::PAYLOAD_SHOWN,
                actions => actions,
                ..frame
            };
            console.render("stream.html", ctx)
        }
        Err(err) => db_error(&console, err),
    }
}

/// The ledger page's filters.
#[derive(Debug, Deserialize)]
pub(super) struct LedgerFilter {
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    stream: Option<String>,
    #[serde(default)]
    key: Option<String>,
}

pub(super) async fn ledger_page(
    State(console): State<Arc<Console>>,
    Query(filter): Query<LedgerFilter>,
    headers: HeaderMap,
) -> Response {
    let (_, frame) = console.frame(&headers, "ledger");
    let nonempty = |v: &Option<String>| {
        v.as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    };
    let (status, stream, key) = (
        nonempty(&filter.status),
        nonempty(&filter.stream),
        nonempty(&filter.key),
    );
    let loaded = async {
        let rows = views::ledger_rows(
            &console.pool,
            status.as_deref(),
            stream.as_deref(),
            key.as_deref(),
            LEDGER_SHOWN,
        )
        .await?;
        let counts = crate::ledger::counts_by_status(&console.pool).await?;
        // Every status is offered, counted or not, so a filter on an empty one still shows.
        let mut statuses: Vec<(String, i64)> = LEDGER_STATUSES
            .iter()
            .map(|s| {
                let n = counts.iter().find(|(c, _)| c == s).map_or(0, |(_, n)| *n);
                (s.to_string(), n)
            })
            .collect();
        for (status, n) in counts {
            if !LEDGER_STATUSES.contains(&status.as_str()) {
                statuses.push((status, n));
            }
        }
        let actions = views::recent_actions(&console.pool, "ledger:", 20).await?;
        Ok::<_, crate::store::StoreError>((rows, statuses, actions))
    }
    .await;
    match loaded {
        Ok((rows, statuses, actions)) => {
            let streams: Vec<String> = console
                .streams()
                .into_iter()
                .map(|(a, b)| format!("{a}.{b}"))
                .collect();
            let ctx = context! {
                rows => rows,
                statuses => statuses,
                streams => streams,
                actions => actions,
                limit => LEDGER_SHOWN,
                filter_status => status.unwrap_or_default(),
                filter_stream => stream.unwrap_or_default(),
                filter_key => key.unwrap_or_default(),
                ..frame
            };
            console.render("ledger.html", ctx)
        }
        Err(err) => db_error(&console, err),
    }
}
