//! The operator console of `idem serve`: server-rendered pages (streams, one stream, the
//! ledger) read from idem's tables, and a few actions (run now, replay a window, resolve
//! a ledger row) behind the admin token, CSRF checks and an action log.
//!
//! Reading needs no credentials; nothing secret is rendered (payloads and resume points
//! are redacted and cut, see [`views`]). Templates are minijinja with HTML autoescape.

pub mod auth;
pub mod table;
pub mod views;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use axum::extract::{Form, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Router, middleware};
use chrono::{DateTime, Utc};
use minijinja::{Environment, Value, context};
use serde::Deserialize;
use sqlx::PgPool;
use tokio::sync::watch;
use tracing::{Instrument, error, info, warn};

use crate::config::Settings;
use crate::connector::Connector;
use crate::duration::HumanDuration;
use crate::ledger::Resolution;
use crate::run::{Mode, RunOptions, RunStatus, StreamRunner};
use crate::secret::Secret;
use auth::{Gate, Refusal, Session};

/// Runs per stream on its page; failures shown per stream; ledger rows per page.
const RUNS_SHOWN: i64 = 20;
const FAILURES_SHOWN: i64 = 50;
const LEDGER_SHOWN: i64 = 200;
const LEDGER_STATUSES: [&str; 6] = [
    "needs_review",
    "failed",
    "pending",
    "sending",
    "sent",
    "cancelled",
];

/// Why the console could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("serve.admin_token: {0}")]
    Token(#[from] crate::secret::ResolveError),
    #[error("serve.admin_token resolves to an empty value; unset it for a read-only console")]
    EmptyToken,
}

/// The console's state, shared by its handlers and the schedule loops of `idem serve`.
pub struct Console {
    pool: PgPool,
    database_url: String,
    connectors: Vec<Connector>,
    lag_alert: HumanDuration,
    gate: Gate,
    templates: Environment<'static>,
    /// When each scheduled stream runs next, as the schedule loops announce it.
    next_runs: Mutex<HashMap<String, DateTime<Utc>>>,
    /// Streams whose console-started run has not finished (closes the gap between the
    /// click and the run taking the stream's lock).
    started: Mutex<HashSet<String>>,
    shutdown: watch::Receiver<bool>,
    /// Runs started here obey `[database] ddl` and `[import]` like scheduled ones.
    run_defaults: (crate::store::table::DdlPolicy, crate::writer::Batching),
}

impl Console {
    pub fn new(
        settings: &Settings,
        connectors: Vec<Connector>,
        pool: PgPool,
        database_url: String,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Arc<Console>, ConsoleError> {
        let token = match &settings.serve.admin_token {
            None => None,
            Some(raw) => {
                let value = crate::secret::resolve(raw)?;
                if value.trim().is_empty() {
                    return Err(ConsoleError::EmptyToken);
                }
                Some(Secret::new(value))
            }
        };
        let mut templates = Environment::new();
        for (name, text) in [
            ("base.html", include_str!("templates/base.html")),
            ("index.html", include_str!("templates/index.html")),
            ("stream.html", include_str!("templates/stream.html")),
            ("ledger.html", include_str!("templates/ledger.html")),
            ("login.html", include_str!("templates/login.html")),
            ("refused.html", include_str!("templates/refused.html")),
        ] {
            templates
                .add_template(name, text)
                .expect("the console's templates parse");
        }
        Ok(Arc::new(Console {
            pool,
            database_url,
            connectors,
            lag_alert: settings.serve.lag_alert,
            gate: Gate::new(token),
            templates,
            next_runs: Mutex::new(HashMap::new()),
            started: Mutex::new(HashSet::new()),
            shutdown,
            run_defaults: (settings.database.ddl_policy(), settings.import.batching()),
        }))
    }

    /// Records when a scheduled stream (`source.stream`) runs next.
    pub fn set_next_run(&self, stream: &str, at: DateTime<Utc>) {
        self.next_runs
            .lock()
            .expect("next runs lock")
            .insert(stream.to_string(), at);
    }

    fn render(&self, name: &str, ctx: Value) -> Response {
        match self
            .templates
            .get_template(name)
            .and_then(|t| t.render(ctx))
        {
            Ok(html) => html_response(StatusCode::OK, html),
            Err(err) => {
                error!(template = name, error = %err, "console page failed to render");
                html_response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "<!doctype html><title>error</title><p role=\"alert\">This page failed to render; the server log has the cause.</p>".into(),
                )
            }
        }
    }

    fn find(&self, source_system: &str, stream: &str) -> Option<&Connector> {
        self.connectors
            .iter()
            .find(|c| c.spec.source_system == source_system && c.spec.streams.contains_key(stream))
    }

    fn streams(&self) -> Vec<(String, String)> {
        self.connectors
            .iter()
            .flat_map(|c| {
                c.spec
                    .streams
                    .keys()
                    .map(move |s| (c.spec.source_system.clone(), s.clone()))
            })
            .collect()
    }

    /// What the base template needs: the session (if any), its flash, read-only or not.
    fn frame(&self, headers: &HeaderMap, page: &str) -> (Option<Session>, Value) {
        let session = self.gate.session(headers);
        let frame = context! {
            page => page,
            read_only => self.gate.read_only(),
            session => session.as_ref().map(|s| context! { operator => s.operator.clone(), csrf => s.csrf.clone() }),
            flash => session.as_ref().and_then(|s| s.flash.clone()),
        };
        (session, frame)
    }
}

fn html_response(status: StatusCode, html: String) -> Response {
    let mut response = (status, html).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    response
}

/// Headers every console response carries: no framing, no scripts, no caching of pages
/// that may show customer data, no referrer to other sites.
async fn security_headers(request: axum::extract::Request, next: middleware::Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    for (name, value) in [
        (
            "content-security-policy",
            "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
        ("x-frame-options", "DENY"),
        ("x-content-type-options", "nosniff"),
        ("referrer-policy", "same-origin"),
        ("cache-control", "no-store"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

/// The console's routes, to merge beside `/healthz` and `/metrics`.
pub fn router(console: Arc<Console>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/streams/{source}/{stream}", get(stream_page))
        .route("/streams/{source}/{stream}/run", post(run_now))
        .route("/streams/{source}/{stream}/replay", post(replay))
        .route("/ledger", get(ledger_page))
        .route("/ledger/resolve", post(resolve))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .layer(middleware::from_fn(security_headers))
        .with_state(console)
}

fn db_error(console: &Console, err: impl std::fmt::Display) -> Response {
    error!(error = %err, "console could not read the database");
    let _ = console;
    html_response(
        StatusCode::SERVICE_UNAVAILABLE,
        "<!doctype html><title>database unavailable</title><p role=\"alert\">The database could not be read; the server log has the cause. <a href=\"/readyz\">/readyz</a></p>".into(),
    )
}

async fn index(State(console): State<Arc<Console>>, headers: HeaderMap) -> Response {
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

async fn stream_rows(console: &Console) -> Result<Vec<views::StreamRow>, crate::store::StoreError> {
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

async fn stream_page(
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
struct LedgerFilter {
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    stream: Option<String>,
    #[serde(default)]
    key: Option<String>,
}

async fn ledger_page(
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

async fn login_page(State(console): State<Arc<Console>>, headers: HeaderMap) -> Response {
    let (_, frame) = console.frame(&headers, "login");
    console.render("login.html", frame)
}

/// The sign-in form.
#[derive(Deserialize)]
struct LoginForm {
    #[serde(default)]
    operator: String,
    #[serde(default)]
    token: String,
}

async fn login(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    let operator = form.operator.trim();
    let refusal = if !auth::same_origin(&headers) {
        Err(Refusal::Csrf)
    } else if operator.is_empty() || operator.chars().count() > 80 {
        Err(Refusal::NotSignedIn)
    } else {
        console.gate.sign_in(&form.token, operator)
    };
    match refusal {
        Ok(id) => {
            info!(operator, "console sign-in");
            let mut response = Redirect::to("/").into_response();
            response.headers_mut().insert(
                header::SET_COOKIE,
                HeaderValue::from_str(&auth::cookie(&id)).expect("cookie is ASCII"),
            );
            response
        }
        Err(refusal) => {
            warn!(operator, reason = ?refusal, "console sign-in refused");
            let (_, frame) = console.frame(&headers, "login");
            let message = match refusal {
                Refusal::NotSignedIn => "Wrong admin token, or no name given.",
                other => other.message(),
            };
            let mut response = console.render("login.html", context! { error => message, ..frame });
            *response.status_mut() = StatusCode::UNAUTHORIZED;
            response
        }
    }
}

/// A form that carries only the CSRF token.
#[derive(Deserialize)]
struct ActionForm {
    #[serde(default)]
    csrf: String,
}

async fn logout(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    Form(form): Form<ActionForm>,
) -> Response {
    if let Err(refusal) = console.gate.authorize(&headers, &form.csrf) {
        return refused(&console, &headers, refusal, "logout", "session");
    }
    console.gate.sign_out(&headers);
    let mut response = Redirect::to("/").into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&auth::expired_cookie()).expect("cookie is ASCII"),
    );
    response
}

fn refused(
    console: &Console,
    headers: &HeaderMap,
    refusal: Refusal,
    action: &str,
    target: &str,
) -> Response {
    warn!(action, target, reason = ?refusal, "console action refused");
    let (_, frame) = console.frame(headers, "refused");
    let mut response = console.render(
        "refused.html",
        context! { message => refusal.message(), ..frame },
    );
    *response.status_mut() = match refusal {
        Refusal::NotSignedIn => StatusCode::UNAUTHORIZED,
        Refusal::ReadOnly | Refusal::Csrf => StatusCode::FORBIDDEN,
    };
    response
}

/// The replay form.
#[derive(Deserialize)]
struct ReplayForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    since: String,
}

async fn run_now(
    State(console): State<Arc<Console>>,
    Path((source_system, stream)): Path<(String, String)>,
    headers: HeaderMap,
    Form(form): Form<ActionForm>,
) -> Response {
    act_on_stream(console, source_system, stream, headers, &form.csrf, None).await
}

async fn replay(
    State(console): State<Arc<Console>>,
    Path((source_system, stream)): Path<(String, String)>,
    headers: HeaderMap,
    Form(form): Form<ReplayForm>,
) -> Response {
    let since = form.since.clone();
    act_on_stream(
        console,
        source_system,
        stream,
        headers,
        &form.csrf,
        Some(since),
    )
    .await
}

/// Run now (`since` = None) or replay the last `since`: checks the session, refuses
/// when the stream is running, else starts the run in the background and says so.
async fn act_on_stream(
    console: Arc<Console>,
    source_system: String,
    stream: String,
    headers: HeaderMap,
    csrf: &str,
    since: Option<String>,
) -> Response {
    let name = format!("{source_system}.{stream}");
    let target = format!("stream:{name}");
    let action = if since.is_some() { "replay" } else { "run" };
    let session = match console.gate.authorize(&headers, csrf) {
        Ok(session) => session,
        Err(refusal) => return refused(&console, &headers, refusal, action, &target),
    };
    let page = format!(
        "/streams/{}/{}",
        views::urlencoded(&source_system),
        views::urlencoded(&stream)
    );
    let Some(connector) = console.find(&source_system, &stream).cloned() else {
        console
            .gate
            .flash(&headers, format!("No configured stream {name}."));
        return Redirect::to("/").into_response();
    };
    let mode = match &since {
        None => Mode::Regular,
        Some(text) => match HumanDuration::parse(text) {
            Ok(since) if !since.0.is_zero() => {
                let now = Utc::now();
                Mode::Replay {
                    from: now - since.as_chrono(),
                    to: now,
                    label: format!("since:{since}"),
                    restart: false,
                }
            }
            Ok(_) => {
                console
                    .gate
                    .flash(&headers, "A replay window must be longer than zero.".into());
                return Redirect::to(&page).into_response();
            }
            Err(err) => {
                console
                    .gate
                    .flash(&headers, format!("Not replayed: {err}."));
                return Redirect::to(&page).into_response();
            }
        },
    };
    let what = match &since {
        None => "run".to_string(),
        Some(since) => format!("replay of the last {since}"),
    };
    let outcome = match console.start(connector, stream.clone(), mode).await {
        Ok(StartOutcome::Started) => {
            format!("started a {what} of {name}; this page shows its progress (reload)")
        }
        Ok(StartOutcome::AlreadyRunning(progress)) => format!(
            "not started: {name} is running now ({progress}); nothing was queued. Try again when it has finished."
        ),
        Err(err) => {
            error!(error = %err, stream = %name, "console could not check the stream's lock");
            format!("not started: {err}")
        }
    };
    info!(operator = %session.operator, action, stream = %name, outcome = %outcome, "console action");
    if let Err(err) = views::log_action(
        &console.pool,
        &session.operator,
        action,
        &target,
        since.as_deref(),
        &outcome,
    )
    .await
    {
        error!(error = %err, "console action could not be logged");
    }
    console.gate.flash(&headers, outcome);
    Redirect::to(&page).into_response()
}

enum StartOutcome {
    Started,
    AlreadyRunning(String),
}

impl Console {
    /// Starts a run of `stream` in the background unless one is running (here or in any
    /// process: the stream's lock is checked). The run itself takes the same lock, so a
    /// run that starts elsewhere in between makes this one stop at once, untouched.
    async fn start(
        self: &Arc<Self>,
        connector: Connector,
        stream: String,
        mode: Mode,
    ) -> Result<StartOutcome, crate::store::StoreError> {
        let name = format!("{}.{stream}", connector.spec.source_system);
        let mut held = false;
        for partition in connector.partitions(&stream) {
            held = held
                || crate::store::stream_lock_held(
                    &self.pool,
                    &connector.spec.source_system,
                    &stream,
                    &partition,
                )
                .await?;
        }
        if held {
            let progress = views::runs(
                &self.pool,
                Some((&connector.spec.source_system, &stream)),
                1,
            )
            .await?
            .into_iter()
            .find(|r| r.status == "running")
            .map_or("its lock is held".to_string(), |r| {
                format!("page {}, {} records so far", r.pages, r.fetched)
            });
            return Ok(StartOutcome::AlreadyRunning(progress));
        }
        if !self
            .started
            .lock()
            .expect("started lock")
            .insert(name.clone())
        {
            return Ok(StartOutcome::AlreadyRunning(
                "started from this console a moment ago".into(),
            ));
        }
        let console = self.clone();
        tokio::spawn(async move {
            let options = RunOptions {
                stop: Some(console.shutdown.clone()),
                ddl: console.run_defaults.0.clone(),
                batching: console.run_defaults.1,
                ..RunOptions::new(mode, false)
            };
            let mut runner = StreamRunner::default();
            match runner
                .run(
                    &console.pool,
                    &console.database_url,
                    &connector,
                    &stream,
                    &options,
                )
                .await
            {
                Ok(report) if report.status == RunStatus::Failed => {
                    error!("console-started {}", crate::run::summary(&report))
                }
                Ok(report) => info!("console-started {}", crate::run::summary(&report)),
                Err(err) => {
                    warn!(stream = %name, error = %crate::run::error_chain(&err), "console-started run did not start")
                }
            }
            console.started.lock().expect("started lock").remove(&name);
        }
        .instrument(tracing::Span::current()));
        Ok(StartOutcome::Started)
    }
}

/// The resolve form of a ledger row.
#[derive(Deserialize)]
struct ResolveForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    key: String,
    #[serde(default)]
    resolution: String,
    #[serde(default)]
    note: String,
}

async fn resolve(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    Form(form): Form<ResolveForm>,
) -> Response {
    let target = format!("ledger:{}", form.key);
    let session = match console.gate.authorize(&headers, &form.csrf) {
        Ok(session) => session,
        Err(refusal) => return refused(&console, &headers, refusal, "resolve", &target),
    };
    let back = "/ledger?status=needs_review";
    let note = form.note.trim();
    if note.is_empty() {
        console.gate.flash(
            &headers,
            format!(
                "Not resolved: {} needs a note saying how you know.",
                form.key
            ),
        );
        return Redirect::to(back).into_response();
    }
    let resolution = match form.resolution.as_str() {
        "sent" => Resolution::Sent,
        "retry" => Resolution::Retry,
        "cancel" => Resolution::Cancel,
        other => {
            console.gate.flash(
                &headers,
                format!(
                    "Not resolved: '{}' is not sent, retry or cancel.",
                    views::cut(other, 20)
                ),
            );
            return Redirect::to(back).into_response();
        }
    };
    let (outcome, done) = match crate::ledger::resolve(&console.pool, &form.key, resolution).await {
        Ok(row) => (format!("now {}", row.status), true),
        Err(err) => (format!("refused: {err}"), false),
    };
    info!(operator = %session.operator, key = %form.key, resolution = %form.resolution, note, outcome = %outcome, "console action: resolve");
    if let Err(err) = views::log_action(
        &console.pool,
        &session.operator,
        "resolve",
        &target,
        Some(note),
        &outcome,
    )
    .await
    {
        error!(error = %err, "console action could not be logged");
    }
    console.gate.flash(
        &headers,
        if done {
            format!(
                "{}: {outcome} (resolved as {} by {}).",
                form.key, form.resolution, session.operator
            )
        } else {
            format!("{}: {outcome}", form.key)
        },
    );
    Redirect::to(back).into_response()
}
