//! The fake vendor's HTTP side: its shared state, the router, and the helpers its
//! endpoints share (errors, query parsing, Stripe-shaped lists). The middleware in front
//! of every endpoint is `gate`; each family of endpoints has a file of its own.

mod accounts;
mod associations;
mod control;
mod email;
mod gate;
pub(crate) mod hubspot;
mod lines;
mod oauth;
mod paged;
mod stripe;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use axum::extract::Query;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde_json::{Value, json};

use crate::data::VendorData;
use crate::{ApiKeyPlace, DeliveredEmail, Fault, FaultKind, ReceivedMail, RecordedRequest};

/// A test mutation run before the nth request.
pub(crate) type Hook = Box<dyn FnOnce(&mut VendorData) + Send>;

pub(crate) type Shared = Arc<Mutex<State>>;
type Q = Query<HashMap<String, String>>;
pub(super) type Res<T = Json<Value>> = Result<T, Reject>;

/// An early error answer, boxed to keep `Result`s small.
pub(crate) struct Reject(Box<Response>);

impl IntoResponse for Reject {
    fn into_response(self) -> Response {
        *self.0
    }
}

impl From<Response> for Reject {
    fn from(r: Response) -> Self {
        Reject(Box::new(r))
    }
}

/// How API requests must authenticate.
pub(crate) enum Auth {
    None,
    Bearer(String),
    OAuth2 {
        client_id: String,
        client_secret: String,
        ttl: std::time::Duration,
        /// Issued tokens and their expiry.
        tokens: BTreeMap<String, Instant>,
    },
    ApiKey(ApiKeyPlace, String),
    /// The exact expected `Authorization` header value.
    Basic(String),
}

/// Everything the fake knows, behind one mutex.
pub(crate) struct State {
    pub(crate) data: VendorData,
    pub(crate) base_url: String,
    pub(crate) auth: Auth,
    pub(crate) faults: Vec<Fault>,
    /// Faults queued when the nth request arrives (see `FakeVendor::inject_at`).
    pub(crate) faults_at: BTreeMap<usize, Vec<Fault>>,
    pub(crate) hooks: BTreeMap<usize, Vec<Hook>>,
    pub(crate) requests: Vec<RecordedRequest>,
    pub(crate) emails: Vec<DeliveredEmail>,
    /// Idempotency key → (payload, message id).
    pub(crate) email_keys: HashMap<String, (Value, String)>,
    /// Idempotency keys whose first request is still being worked on (answered 409).
    pub(crate) email_keys_in_progress: std::collections::HashSet<String>,
    /// Time each `/email/send` takes before it delivers and answers.
    pub(crate) email_delay: std::time::Duration,
    pub(crate) mailbox: Option<Arc<Mutex<Vec<ReceivedMail>>>>,
    /// Text replacements applied to every response body (see `FakeVendor::rewrite_bodies`).
    pub(crate) body_rewrites: Vec<(String, String)>,
    /// Serve JSON bodies with every object's keys in reverse order and spaced out (see
    /// `FakeVendor::reverse_key_order`).
    pub(crate) reverse_keys: bool,
    /// Base of the `/paged` endpoints' next links, when not this vendor.
    pub(crate) link_base: Option<String>,
}

impl State {
    pub(crate) fn new(base_url: String) -> State {
        State {
            data: VendorData::default(),
            base_url,
            auth: Auth::None,
            faults: Vec::new(),
            faults_at: BTreeMap::new(),
            hooks: BTreeMap::new(),
            requests: Vec::new(),
            emails: Vec::new(),
            email_keys: HashMap::new(),
            email_keys_in_progress: std::collections::HashSet::new(),
            email_delay: std::time::Duration::ZERO,
            mailbox: None,
            body_rewrites: Vec::new(),
            reverse_keys: false,
            link_base: None,
        }
    }

    /// Consumes one application of the first queued fault matching `path` (or, for a
    /// prefix with a `?`, matching `path?query`).
    fn take_fault(&mut self, path: &str, path_and_query: &str) -> Option<FaultKind> {
        let i = self.faults.iter().position(|f| {
            let target = if f.path_prefix.contains('?') {
                path_and_query
            } else {
                path
            };
            target.starts_with(&f.path_prefix)
        })?;
        let f = &mut self.faults[i];
        f.times -= 1;
        let kind = f.kind.clone();
        if f.times == 0 {
            self.faults.remove(i);
        }
        Some(kind)
    }

    /// Where next links point.
    fn link_base(&self) -> &str {
        self.link_base.as_deref().unwrap_or(&self.base_url)
    }

    /// `&name=key` when the request carried the query API key: next links repeat it.
    fn echoed_key(&self, q: &HashMap<String, String>) -> String {
        match &self.auth {
            Auth::ApiKey(ApiKeyPlace::Query(name), _) => q
                .get(name)
                .map(|key| {
                    format!(
                        "&{name}={}",
                        url::form_urlencoded::byte_serialize(key.as_bytes()).collect::<String>()
                    )
                })
                .unwrap_or_default(),
            _ => String::new(),
        }
    }

    fn check_auth(&self, headers: &HeaderMap, query: Option<&str>) -> Result<(), Reject> {
        let authz = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let bearer = authz.and_then(|a| {
            let (scheme, tok) = a.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| tok.trim())
        });
        match &self.auth {
            Auth::None => Ok(()),
            Auth::Bearer(t) if bearer == Some(t.as_str()) => Ok(()),
            Auth::Bearer(_) => {
                Err(unauthorized("Bearer", "missing or invalid bearer token").into())
            }
            Auth::OAuth2 { tokens, .. } => match bearer.and_then(|t| tokens.get(t)) {
                Some(exp) if *exp > Instant::now() => Ok(()),
                Some(_) => Err(unauthorized("Bearer", "access token expired").into()),
                None => Err(unauthorized("Bearer", "missing or invalid access token").into()),
            },
            Auth::ApiKey(ApiKeyPlace::Header(name), key) => {
                match headers.get(name.as_str()).and_then(|v| v.to_str().ok()) {
                    Some(v) if v == key => Ok(()),
                    _ => Err(unauthorized("ApiKey", "missing or invalid API key").into()),
                }
            }
            Auth::ApiKey(ApiKeyPlace::Query(name), key) => {
                let ok = url::form_urlencoded::parse(query.unwrap_or("").as_bytes())
                    .any(|(k, v)| k == name.as_str() && v == key.as_str());
                if ok {
                    Ok(())
                } else {
                    Err(unauthorized("ApiKey", "missing or invalid API key").into())
                }
            }
            Auth::Basic(expected) if authz == Some(expected.as_str()) => Ok(()),
            Auth::Basic(_) => Err(unauthorized("Basic", "missing or invalid credentials").into()),
        }
    }
}

/// Locks the state, recovering from a panicked test hook.
pub(crate) fn lock(s: &Mutex<State>) -> MutexGuard<'_, State> {
    s.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Marker: this request is under a [`FaultKind::DuplicateRecords`] fault.
#[derive(Clone, Copy)]
struct Dup;
type DupExt = Option<Extension<Dup>>;

pub(crate) fn router(st: Shared) -> Router {
    Router::new()
        .route("/v1/invoices", get(stripe::invoices))
        .route("/v1/invoices/{id}/lines", get(lines::invoice_lines))
        .route("/v1/customers", get(stripe::customers))
        .route("/v1/charges", get(accounts::charges))
        .route("/v1/events", get(stripe::events))
        .route(
            "/crm/v3/objects/contacts/search",
            post(hubspot::contacts_search),
        )
        .route("/crm/v3/objects/contacts", get(hubspot::contacts_list))
        .route(
            "/crm/v4/objects/contacts/{id}/associations/companies",
            get(associations::contact_companies),
        )
        .route("/paged/next_url", get(paged::paged_next_url))
        .route("/paged/link", get(paged::paged_link))
        .route("/paged/page", get(paged::paged_page))
        .route("/paged/offset", get(paged::paged_offset))
        .route("/paged/stuck", get(paged::paged_stuck))
        .route("/oauth/token", post(oauth::oauth_token))
        .route("/email/send", post(email::email_send))
        .route("/_fake/state", get(control::fake_state))
        .route(
            "/_fake/update_invoice/{id}",
            post(control::fake_update_invoice),
        )
        .route("/_fake/mailbox", get(control::fake_mailbox))
        .route("/_fake/emails", get(control::fake_emails))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(st.clone(), gate::gate))
        .with_state(st)
}

fn error(status: StatusCode, kind: &str, message: impl Into<String>) -> Response {
    let body = json!({"error": {"type": kind, "message": message.into()}});
    (status, Json(body)).into_response()
}

pub(super) fn bad_request(message: impl Into<String>) -> Reject {
    error(StatusCode::BAD_REQUEST, "invalid_request_error", message).into()
}

fn unauthorized(scheme: &str, message: &str) -> Response {
    let mut resp = error(StatusCode::UNAUTHORIZED, "authentication_error", message);
    if let Ok(v) = HeaderValue::from_str(&format!("{scheme} realm=\"fake-vendor\"")) {
        resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    resp
}

/// A 404 with a Stripe-shaped error body.
pub(super) fn not_found_error(message: impl Into<String>) -> Reject {
    error(StatusCode::NOT_FOUND, "invalid_request_error", message).into()
}

async fn not_found() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "no such route",
    )
}

/// A non-negative integer query parameter, `default` when absent.
pub(super) fn num(q: &HashMap<String, String>, key: &str, default: usize) -> Res<usize> {
    match q.get(key) {
        None => Ok(default),
        Some(v) => v
            .parse()
            .map_err(|_| bad_request(format!("invalid integer for {key}: {v:?}"))),
    }
}

pub(super) fn int(q: &HashMap<String, String>, key: &str) -> Res<Option<i64>> {
    q.get(key)
        .map(|v| {
            v.parse()
                .map_err(|_| bad_request(format!("invalid integer for {key}: {v:?}")))
        })
        .transpose()
}

/// `all[start..start + limit]`, plus the record before `start` when duplicating, each
/// through `render`; returns the page and whether records remain after it.
fn page_of<T: Copy>(
    all: &[T],
    start: usize,
    limit: usize,
    dup: bool,
    render: impl Fn(T) -> Value,
) -> (Vec<Value>, bool) {
    let start = start.min(all.len());
    let end = start.saturating_add(limit).min(all.len());
    let mut out: Vec<Value> = Vec::with_capacity(end - start + 1);
    if dup && start > 0 {
        out.push(render(all[start - 1]));
    }
    out.extend(all[start..end].iter().map(|v| render(*v)));
    (out, end < all.len())
}

pub(super) fn stripe_list(url: &str, data: Vec<Value>, has_more: bool) -> Json<Value> {
    Json(json!({"object": "list", "url": url, "has_more": has_more, "data": data}))
}

/// Standard base64 (with padding), enough for HTTP basic credentials.
pub(crate) fn base64(input: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = |i: usize| u32::from(chunk.get(i).copied().unwrap_or(0));
        let n = (b(0) << 16) | (b(1) << 8) | b(2);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(T[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}
