//! The operator console of `idem serve`: server-rendered pages (streams, one stream, the
//! ledger) read from idem's tables, and a few actions (run now, replay a window, resolve
//! a ledger row) behind the admin token, CSRF checks and an action log.
//!
//! Reading needs no credentials; nothing secret is rendered (payloads and resume points
//! are redacted and cut, see [`views`]). Templates are minijinja with HTML autoescape.
//! This file holds the console's state, routes and response headers; the pages are in
//! `pages`, the writes in `actions`, sessions and CSRF in [`auth`].

mod actions;
pub mod auth;
mod pages;
pub mod table;
pub mod views;

pub use pages::overview;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Router, middleware};
use chrono::{DateTime, Utc};
use minijinja::{Environment, Value, context};
use sqlx::PgPool;
use tokio::sync::watch;
use tracing::error;

use crate::config::Settings;
use crate::connector::Connector;
use crate::duration::HumanDuration;
use crate::secret::Secret;
use auth::{Gate, Session};

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
        .route("/", get(pages::index))
        .route("/streams/{source}/{stream}", get(pages::stream_page))
        .route("/streams/{source}/{stream}/run", post(actions::run_now))
        .route("/streams/{source}/{stream}/replay", post(actions::replay))
        .route("/ledger", get(pages::ledger_page))
        .route("/ledger/resolve", post(actions::resolve))
        .route("/login", get(actions::login_page).post(actions::login))
        .route("/logout", post(actions::logout))
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
