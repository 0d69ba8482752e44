//! The console's writes: signing in and out with the admin token, and the guarded actions
//! (run a stream now, replay a window, resolve a ledger row), each behind the admin
//! session and its CSRF token and written to the action log.

use std::sync::Arc;

use axum::extract::{Form, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use chrono::Utc;
use minijinja::context;
use serde::Deserialize;
use tracing::{Instrument, error, info, warn};

use super::auth::Refusal;
use super::{Console, auth, views};
use crate::connector::Connector;
use crate::duration::HumanDuration;
use crate::ledger::Resolution;
use crate::run::{Mode, RunOptions, RunStatus, StreamRunner};

pub(super) async fn login_page(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
) -> Response {
    let (_, frame) = console.frame(&headers, "login");
    console.render("login.html", frame)
}

/// The sign-in form.
#[derive(Deserialize)]
pub(super) struct LoginForm {
    #[serde(default)]
    operator: String,
    #[serde(default)]
    token: String,
}

pub(super) async fn login(
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
pub(super) struct ActionForm {
    #[serde(default)]
    csrf: String,
}

pub(super) async fn logout(
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

pub(super) fn refused(
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
pub(super) struct ReplayForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    since: String,
}

pub(super) async fn run_now(
    State(console): State<Arc<Console>>,
    Path((source_system, stream)): Path<(String, String)>,
    headers: HeaderMap,
    Form(form): Form<ActionForm>,
) -> Response {
    act_on_stream(console, source_system, stream, headers, &form.csrf, None).await
}

pub(super) async fn replay(
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
pub(super) async fn act_on_stream(
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

pub(super) enum StartOutcome {
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
pub(super) struct ResolveForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    key: String,
    #[serde(default)]
    resolution: String,
    #[serde(default)]
    note: String,
}

pub(super) async fn resolve(
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
