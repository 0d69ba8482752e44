//! The fake vendor's HTTP side: request recording, hooks, faults and auth in one middleware,
//! then the endpoint handlers (Stripe-, HubSpot- and generic-pagination-shaped).

mod accounts;
mod associations;
mod lines;

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use axum::body::{Bytes, to_bytes};
use axum::extract::{Path, Query, Request, State as AxState};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde_json::{Map, Value, json};

use crate::data::{VendorData, parse_ms};
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
        .route("/v1/invoices", get(invoices))
        .route("/v1/invoices/{id}/lines", get(lines::invoice_lines))
        .route("/v1/customers", get(customers))
        .route("/v1/charges", get(accounts::charges))
        .route("/v1/events", get(events))
        .route("/crm/v3/objects/contacts/search", post(contacts_search))
        .route("/crm/v3/objects/contacts", get(contacts_list))
        .route(
            "/crm/v4/objects/contacts/{id}/associations/companies",
            get(associations::contact_companies),
        )
        .route("/paged/next_url", get(paged_next_url))
        .route("/paged/link", get(paged_link))
        .route("/paged/page", get(paged_page))
        .route("/paged/offset", get(paged_offset))
        .route("/paged/stuck", get(paged_stuck))
        .route("/oauth/token", post(oauth_token))
        .route("/email/send", post(email_send))
        .route("/_fake/state", get(fake_state))
        .route("/_fake/update_invoice/{id}", post(fake_update_invoice))
        .route("/_fake/mailbox", get(fake_mailbox))
        .route("/_fake/emails", get(fake_emails))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(st.clone(), gate))
        .with_state(st)
}

/// Records the request, runs due hooks, applies faults, checks auth, then serves.
async fn gate(AxState(st): AxState<Shared>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_owned();
    if path.starts_with("/_fake/") {
        return next.run(req).await;
    }
    let (idx, fault) = {
        let mut s = lock(&st);
        let h = req.headers();
        let hv = |name: &str| h.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
        s.requests.push(RecordedRequest {
            method: req.method().to_string(),
            path: path.clone(),
            query: req.uri().query().map(str::to_owned),
            authorization: hv("authorization"),
            idempotency_key: hv("idempotency-key"),
            headers: h
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_owned(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            status: 0,
            received: Instant::now(),
        });
        let nth = s.requests.len();
        if let Some(hooks) = s.hooks.remove(&nth) {
            for hook in hooks {
                s.data.run_hook(hook);
            }
        }
        if let Some(faults) = s.faults_at.remove(&nth) {
            for fault in faults.into_iter().rev() {
                s.faults.insert(0, fault);
            }
        }
        let path_and_query = req
            .uri()
            .path_and_query()
            .map_or(path.clone(), |pq| pq.as_str().to_owned());
        (nth - 1, s.take_fault(&path, &path_and_query))
    };
    let mut resp = serve(&st, &path, req, next, fault).await;
    let mut s = lock(&st);
    if let Some(r) = s.requests.get_mut(idx) {
        r.status = resp.status().as_u16();
    }
    // The vendor's own clock (see `FakeVendor::set_clock`), as a real vendor's `Date` is.
    if let Some(date) = chrono::DateTime::from_timestamp(s.data.clock, 0).and_then(|t| {
        HeaderValue::from_str(&t.format("%a, %d %b %Y %H:%M:%S GMT").to_string()).ok()
    }) {
        resp.headers_mut().insert(header::DATE, date);
    }
    resp
}

async fn serve(
    st: &Shared,
    path: &str,
    mut req: Request,
    next: Next,
    fault: Option<FaultKind>,
) -> Response {
    match &fault {
        Some(FaultKind::Status {
            code,
            retry_after,
            body,
        }) => return status_fault(*code, retry_after.as_deref(), body.clone()),
        Some(FaultKind::EchoRequest { code }) => return echo_request(*code, &req),
        Some(FaultKind::RawBody {
            code,
            content_type,
            body,
        }) => {
            let status = StatusCode::from_u16(*code).unwrap_or(StatusCode::BAD_REQUEST);
            return (
                status,
                [(header::CONTENT_TYPE, content_type.clone())],
                body.clone(),
            )
                .into_response();
        }
        Some(FaultKind::HugeBody { bytes }) => return huge_body(*bytes),
        Some(FaultKind::Redirect { code, to_base }) => {
            let status = StatusCode::from_u16(*code).unwrap_or(StatusCode::FOUND);
            let location = match req.uri().query() {
                Some(q) => format!("{to_base}{path}?{q}"),
                None => format!("{to_base}{path}"),
            };
            let mut resp = status.into_response();
            if let Ok(v) = HeaderValue::from_str(&location) {
                resp.headers_mut().insert(header::LOCATION, v);
            }
            return resp;
        }
        Some(FaultKind::Delay(d)) => tokio::time::sleep(*d).await,
        Some(FaultKind::DuplicateRecords) => {
            req.extensions_mut().insert(Dup);
        }
        _ => {}
    }
    if path.starts_with("/v1/") || path.starts_with("/crm/") {
        let checked = lock(st).check_auth(req.headers(), req.uri().query());
        if let Err(resp) = checked {
            return resp.into_response();
        }
    }
    let resp = next.run(req).await;
    let resp = match fault {
        Some(FaultKind::SlowAnswer(d)) => {
            tokio::time::sleep(d).await;
            resp
        }
        Some(FaultKind::MalformedJson) => malformed(resp).await,
        Some(FaultKind::WrongShape) => wrong_shape(resp).await,
        _ => resp,
    };
    let rewrites = lock(st).body_rewrites.clone();
    if rewrites.is_empty() {
        resp
    } else {
        rewrite_body(resp, &rewrites).await
    }
}

/// Applies raw text replacements to a body: how a test serves JSON that no `Value` can
/// hold (a lone surrogate escape, a number beyond f64).
async fn rewrite_body(resp: Response, rewrites: &[(String, String)]) -> Response {
    let (mut parts, body) = resp.into_parts();
    let bytes = to_bytes(body, usize::MAX).await.unwrap_or_default();
    let mut text = String::from_utf8_lossy(&bytes).into_owned();
    for (from, to) in rewrites {
        text = text.replace(from.as_str(), to);
    }
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, axum::body::Body::from(text))
}

/// An error that quotes the request back, credentials and all, as plain text with a raw
/// terminal escape sequence in it.
fn echo_request(code: u16, req: &Request) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST);
    let headers: Vec<String> = req
        .headers()
        .iter()
        .map(|(k, v)| format!("{k}: {}", String::from_utf8_lossy(v.as_bytes())))
        .collect();
    let body = format!(
        "\u{1b}[2J\u{1b}[31mbad request\u{7}: {} {}\r\nrequest headers:\r\n{}",
        req.method(),
        req.uri(),
        headers.join("\r\n")
    );
    (status, [(header::CONTENT_TYPE, "text/plain")], body).into_response()
}

/// `{"data": [{"id": "big_0000000000", "amount_due": 1}, ...]}` of about `bytes` bytes
/// (64 bytes a record), valid JSON, generated chunk by chunk as the client reads.
fn huge_body(bytes: u64) -> Response {
    const RECORD: u64 = 64;
    const CHUNK_RECORDS: u64 = 1024;
    let records = bytes.saturating_sub(16) / RECORD;
    let stream = futures_util::stream::unfold(Some(0u64), move |next| async move {
        let first = next?;
        let mut chunk = String::with_capacity((RECORD * CHUNK_RECORDS) as usize + 16);
        if first == 0 {
            chunk.push_str("{\"data\": [");
        }
        let last = (first + CHUNK_RECORDS).min(records);
        for n in first..last {
            let separator = if n == 0 { "" } else { "," };
            let record = format!("{separator}{{\"id\": \"big_{n:010}\", \"amount_due\": 1}}");
            chunk.push_str(&format!("{record:<width$}", width = RECORD as usize));
        }
        let next = if last >= records {
            chunk.push_str("]}");
            None
        } else {
            Some(last)
        };
        Some((Ok::<_, std::io::Error>(Bytes::from(chunk)), next))
    });
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        axum::body::Body::from_stream(stream),
    )
        .into_response()
}

fn status_fault(code: u16, retry_after: Option<&str>, body: Option<String>) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = body.unwrap_or_else(|| {
        json!({"error": {
            "type": "injected_fault",
            "code": code,
            "message": format!("injected fault: HTTP {code}"),
        }})
        .to_string()
    });
    let mut resp = (status, [(header::CONTENT_TYPE, "application/json")], body).into_response();
    if let Some(v) = retry_after.and_then(|ra| HeaderValue::from_str(ra).ok()) {
        resp.headers_mut().insert(header::RETRY_AFTER, v);
    }
    resp
}

async fn malformed(resp: Response) -> Response {
    let bytes = to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap_or_default();
    let mut cut = bytes[..bytes.len() / 2].to_vec();
    if cut.is_empty() || serde_json::from_slice::<Value>(&cut).is_ok() {
        cut = b"{\"data\": [{\"id\":".to_vec();
    }
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        cut,
    )
        .into_response()
}

async fn wrong_shape(resp: Response) -> Response {
    let bytes = to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap_or_default();
    let mut v: Value = serde_json::from_slice(&bytes).unwrap_or_else(|_| json!({}));
    let mut changed = false;
    for k in ["data", "results", "items"] {
        if let Some(arr) = v.get(k).and_then(Value::as_array).cloned() {
            let obj: Map<String, Value> = arr
                .into_iter()
                .enumerate()
                .map(|(i, x)| (i.to_string(), x))
                .collect();
            v[k] = Value::Object(obj);
            changed = true;
        }
    }
    if !changed {
        v = json!({"data": {"unexpected": v}});
    }
    (StatusCode::OK, Json(v)).into_response()
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

/// `all[start..start + limit]`, plus the record before `start` when duplicating;
/// returns the page and whether records remain after it.
fn page_of(all: &[&Value], start: usize, limit: usize, dup: bool) -> (Vec<Value>, bool) {
    let start = start.min(all.len());
    let end = start.saturating_add(limit).min(all.len());
    let mut out: Vec<Value> = Vec::with_capacity(end - start + 1);
    if dup && start > 0 {
        out.push(all[start - 1].clone());
    }
    out.extend(all[start..end].iter().map(|v| (*v).clone()));
    (out, end < all.len())
}

pub(super) fn stripe_list(url: &str, data: Vec<Value>, has_more: bool) -> Json<Value> {
    Json(json!({"object": "list", "url": url, "has_more": has_more, "data": data}))
}

/// `GET /v1/invoices`: ascending id, `limit`, `starting_after`, `updated[gte|gt|lt|lte]`,
/// `created[gte|lt]` (Stripe's own filter, used for backfills by creation windows).
async fn invoices(AxState(st): AxState<Shared>, Query(q): Q, dup: DupExt) -> Res<Response> {
    let limit = num(&q, "limit", 10)?.clamp(1, 100);
    let (gte, gt) = (int(&q, "updated[gte]")?, int(&q, "updated[gt]")?);
    let (lt, lte) = (int(&q, "updated[lt]")?, int(&q, "updated[lte]")?);
    let (created_gte, created_lt) = (int(&q, "created[gte]")?, int(&q, "created[lt]")?);
    let keep = |inv: &Value| {
        let u = inv.get("updated").and_then(Value::as_i64).unwrap_or(0);
        let c = inv.get("created").and_then(Value::as_i64).unwrap_or(0);
        created_gte.is_none_or(|b| c >= b)
            && created_lt.is_none_or(|b| c < b)
            && gte.is_none_or(|b| u >= b)
            && gt.is_none_or(|b| u > b)
            && lt.is_none_or(|b| u < b)
            && lte.is_none_or(|b| u <= b)
    };
    let s = lock(&st);
    let map = &s.data.invoices;
    let after = q.get("starting_after");
    let lower = match after {
        Some(id) => Bound::Excluded(id.clone()),
        None => Bound::Unbounded,
    };
    let mut it = map
        .range((lower, Bound::Unbounded))
        .map(|(_, v)| v)
        .filter(|v| keep(v));
    let mut data: Vec<&Value> = it.by_ref().take(limit).collect();
    let has_more = it.next().is_some();
    let prev = match (dup, after) {
        (Some(_), Some(id)) => map
            .range(..=id.clone())
            .rev()
            .map(|(_, v)| v)
            .find(|v| keep(v)),
        _ => None,
    };
    if let Some(prev) = prev {
        data.insert(0, prev);
    }
    // Serialized from the stored records without copying them: the benchmark needs this
    // server to outpace idem by far (a deep copy per record halved its rate).
    #[derive(serde::Serialize)]
    struct List<'a> {
        object: &'static str,
        url: &'static str,
        has_more: bool,
        data: Vec<&'a Value>,
    }
    let list = List {
        object: "list",
        url: "/v1/invoices",
        has_more,
        data,
    };
    let body = serde_json::to_vec(&list).map_err(|err| bad_request(err.to_string()))?;
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

/// `GET /v1/customers`: customers derived from the invoices, ascending id.
async fn customers(AxState(st): AxState<Shared>, Query(q): Q, dup: DupExt) -> Res {
    let limit = num(&q, "limit", 10)?.clamp(1, 100);
    let all = lock(&st).data.customers();
    let refs: Vec<&Value> = all.iter().collect();
    let start = match q.get("starting_after") {
        Some(id) => refs.partition_point(|c| c["id"].as_str().unwrap_or("") <= id.as_str()),
        None => 0,
    };
    let (data, has_more) = page_of(&refs, start, limit, dup.is_some());
    Ok(stripe_list("/v1/customers", data, has_more))
}

fn event_seq(q: &HashMap<String, String>, key: &str) -> Res<Option<usize>> {
    q.get(key)
        .map(|v| {
            v.strip_prefix("evt_")
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| bad_request(format!("invalid event id for {key}: {v:?}")))
        })
        .transpose()
}

/// `GET /v1/events`: newest first; `limit`, `starting_after` (older), `ending_before`
/// (newer), `type` (`invoice.*` matches every invoice event, as at Stripe).
async fn events(AxState(st): AxState<Shared>, Query(q): Q, dup: DupExt) -> Res {
    let limit = num(&q, "limit", 10)?.clamp(1, 100);
    let starting_after = event_seq(&q, "starting_after")?;
    let ending_before = event_seq(&q, "ending_before")?;
    let s = lock(&st);
    let evs = &s.data.events;
    let kind = q.get("type");
    let seqs: Vec<usize> = (1..=evs.len())
        .rev()
        .filter(|&i| {
            kind.is_none_or(|k| match k.strip_suffix('*') {
                Some(prefix) => evs[i - 1].kind.starts_with(prefix),
                None => evs[i - 1].kind == k,
            })
        })
        .collect();
    let (page, has_more): (Vec<usize>, bool) = if let Some(eb) = ending_before {
        let newer = seqs.partition_point(|&i| i > eb);
        let from = newer.saturating_sub(limit);
        (seqs[from..newer].to_vec(), from > 0)
    } else {
        let start = starting_after.map_or(0, |sa| seqs.partition_point(|&i| i >= sa));
        let end = start.saturating_add(limit).min(seqs.len());
        let mut page = seqs[start..end].to_vec();
        if dup.is_some() && start > 0 {
            page.insert(0, seqs[start - 1]);
        }
        (page, end < seqs.len())
    };
    let data = page.into_iter().map(|i| s.data.render_event(i)).collect();
    Ok(stripe_list("/v1/events", data, has_more))
}

/// Orders contacts by numeric id (ids are decimal strings).
pub(crate) fn contact_order(a: &Value, b: &Value) -> Ordering {
    let id = |v: &Value| v["id"].as_str().map(|s| (s.len(), s.to_owned()));
    id(a).cmp(&id(b))
}

fn hs_error(message: impl Into<String>) -> Reject {
    let body = json!({
        "status": "error",
        "message": message.into(),
        "correlationId": "00000000-0000-0000-0000-000000000000",
        "category": "VALIDATION_ERROR",
    });
    Reject(Box::new(
        (StatusCode::BAD_REQUEST, Json(body)).into_response(),
    ))
}

/// A contact property as a comparable key: dates and integers numerically.
#[derive(PartialEq, PartialOrd)]
enum Key {
    Num(i64),
    Str(String),
}

fn prop_key(c: &Value, prop: &str) -> Option<Key> {
    let v = match prop {
        "id" => c.get("id"),
        _ => c["properties"].get(prop),
    }?;
    let s = match v {
        Value::Null => return None,
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    if matches!(prop, "lastmodifieddate" | "createdate") {
        if let Some(ms) = parse_ms(&s) {
            return Some(Key::Num(ms));
        }
    }
    Some(match s.parse() {
        Ok(n) => Key::Num(n),
        Err(_) => Key::Str(s),
    })
}

fn filter_key(v: &Value) -> Key {
    let s = match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    if let Ok(n) = s.parse() {
        Key::Num(n)
    } else if let Some(ms) = parse_ms(&s) {
        Key::Num(ms)
    } else {
        Key::Str(s)
    }
}

struct Filter {
    prop: String,
    op: String,
    value: Key,
}

impl Filter {
    fn matches(&self, c: &Value) -> bool {
        let have = prop_key(c, &self.prop);
        let ord = have.as_ref().and_then(|h| h.partial_cmp(&self.value));
        match self.op.as_str() {
            "HAS_PROPERTY" => have.is_some(),
            "NOT_HAS_PROPERTY" => have.is_none(),
            "EQ" => ord == Some(Ordering::Equal),
            "NEQ" => ord != Some(Ordering::Equal),
            "GT" => ord == Some(Ordering::Greater),
            "GTE" => matches!(ord, Some(Ordering::Greater | Ordering::Equal)),
            "LT" => ord == Some(Ordering::Less),
            "LTE" => matches!(ord, Some(Ordering::Less | Ordering::Equal)),
            _ => false,
        }
    }
}

fn parse_filter_groups(body: &Value) -> Res<Vec<Vec<Filter>>> {
    const OPS: [&str; 8] = [
        "EQ",
        "NEQ",
        "GT",
        "GTE",
        "LT",
        "LTE",
        "HAS_PROPERTY",
        "NOT_HAS_PROPERTY",
    ];
    let empty = Vec::new();
    let groups = body
        .get("filterGroups")
        .and_then(Value::as_array)
        .unwrap_or(&empty);
    groups
        .iter()
        .map(|g| {
            g.get("filters")
                .and_then(Value::as_array)
                .unwrap_or(&empty)
                .iter()
                .map(|f| {
                    let prop = f["propertyName"].as_str().unwrap_or_default().to_owned();
                    let op = f["operator"].as_str().unwrap_or_default().to_owned();
                    if prop.is_empty() || !OPS.contains(&op.as_str()) {
                        return Err(hs_error(format!("invalid filter: {f}")));
                    }
                    Ok(Filter {
                        prop,
                        op,
                        value: filter_key(&f["value"]),
                    })
                })
                .collect()
        })
        .collect()
}

/// The most results one search query can reach (HubSpot's limit).
const SEARCH_CAP: usize = 10_000;

/// `POST /crm/v3/objects/contacts/search`: HubSpot search with filters, one sort,
/// offset-style `after`, and the 10,000-result cap. As at HubSpot, `after` is a position
/// in the result sorted now (by the sort property, then id): a contact edited between two
/// pages moves to the end and every later one shifts down a place.
async fn contacts_search(AxState(st): AxState<Shared>, dup: DupExt, body: Bytes) -> Res {
    let body: Value = serde_json::from_slice(&body)
        .map_err(|e| hs_error(format!("Invalid input JSON on line 1: {e}")))?;
    let limit = match &body["limit"] {
        Value::Null => 10,
        v => v
            .as_u64()
            .filter(|l| (1..=200).contains(l))
            .ok_or_else(|| hs_error(format!("limit must be between 1 and 200, got {v}")))?
            as usize,
    };
    let after: usize = match &body["after"] {
        Value::Null => 0,
        Value::String(s) => s
            .parse()
            .map_err(|_| hs_error(format!("invalid after: {s:?}")))?,
        v => v
            .as_u64()
            .ok_or_else(|| hs_error(format!("invalid after: {v}")))? as usize,
    };
    if after.saturating_add(limit) > SEARCH_CAP {
        return Err(hs_error(format!(
            "Paging beyond {SEARCH_CAP} results is not supported: after ({after}) + limit \
             ({limit}) exceeds the search limit of {SEARCH_CAP} results"
        )));
    }
    let groups = parse_filter_groups(&body)?;
    let sort = body["sorts"].get(0).map(|s| {
        let prop = match s {
            Value::String(p) => p.trim_start_matches('-').to_owned(),
            _ => s["propertyName"].as_str().unwrap_or("id").to_owned(),
        };
        let desc = s["direction"].as_str() == Some("DESCENDING")
            || s.as_str().is_some_and(|p| p.starts_with('-'));
        (prop, desc)
    });
    let s = lock(&st);
    let mut hits: Vec<(Option<Key>, &Value)> = s
        .data
        .contacts
        .values()
        .filter(|c| groups.is_empty() || groups.iter().any(|g| g.iter().all(|f| f.matches(c))))
        .map(|c| (sort.as_ref().and_then(|(p, _)| prop_key(c, p)), c))
        .collect();
    let desc = sort.as_ref().is_some_and(|(_, d)| *d);
    hits.sort_by(|(ka, a), (kb, b)| {
        let by_key = ka.partial_cmp(kb).unwrap_or(Ordering::Equal);
        let by_key = if desc { by_key.reverse() } else { by_key };
        by_key.then_with(|| contact_order(a, b))
    });
    let refs: Vec<&Value> = hits.into_iter().map(|(_, c)| c).collect();
    let (results, has_more) = page_of(&refs, after, limit, dup.is_some());
    let mut out = json!({"total": refs.len(), "results": results});
    if has_more {
        out["paging"] = json!({"next": {"after": (after + limit).to_string()}});
    }
    Ok(Json(out))
}

/// `GET /crm/v3/objects/contacts`: id order; `after` is the last id seen.
async fn contacts_list(AxState(st): AxState<Shared>, Query(q): Q, dup: DupExt) -> Res {
    let limit = num(&q, "limit", 10)?.clamp(1, 100);
    let after = num(&q, "after", 0)?;
    let s = lock(&st);
    let mut all: Vec<&Value> = s.data.contacts.values().collect();
    all.sort_by(|a, b| contact_order(a, b));
    let id_num = |c: &Value| c["id"].as_str().and_then(|s| s.parse::<usize>().ok());
    let start = all.partition_point(|c| id_num(c).is_some_and(|n| n <= after));
    let (results, has_more) = page_of(&all, start, limit, dup.is_some());
    let mut out = json!({"results": results});
    if let Some(last) = all.get(start + limit - 1).filter(|_| has_more) {
        let last = last["id"].as_str().unwrap_or_default();
        let link = format!(
            "{}/crm/v3/objects/contacts?limit={limit}&after={last}",
            s.base_url
        );
        out["paging"] = json!({"next": {"after": last, "link": link}});
    }
    Ok(Json(out))
}

fn per_page(q: &HashMap<String, String>) -> Res<usize> {
    Ok(num(q, "per_page", 10)?.clamp(1, 1000))
}

/// `GET /paged/next_url?per_page=N[&after=ID]`: `{"items", "next": absolute URL | null}`.
async fn paged_next_url(AxState(st): AxState<Shared>, Query(q): Q, dup: DupExt) -> Res {
    let pp = per_page(&q)?;
    let s = lock(&st);
    let map = &s.data.invoices;
    let after = q.get("after");
    let lower = after.map_or(Bound::Unbounded, |a| Bound::Excluded(a.clone()));
    let mut it = map.range((lower, Bound::Unbounded)).map(|(_, v)| v);
    let mut items: Vec<Value> = it.by_ref().take(pp).cloned().collect();
    let more = it.next().is_some();
    let next = match items.last() {
        Some(last) if more => {
            let id = last["id"].as_str().unwrap_or_default();
            json!(format!(
                "{}/paged/next_url?per_page={pp}&after={id}{}",
                s.link_base(),
                s.echoed_key(&q)
            ))
        }
        _ => Value::Null,
    };
    let prev = match (dup, after) {
        (Some(_), Some(a)) => map.range(..=a.clone()).next_back().map(|(_, v)| v),
        _ => None,
    };
    if let Some(prev) = prev {
        items.insert(0, prev.clone());
    }
    Ok(Json(json!({"items": items, "next": next})))
}

/// `GET /paged/link?per_page=N&page=P`: `{"items"}` plus an RFC 8288 `Link: rel="next"`.
async fn paged_link(AxState(st): AxState<Shared>, Query(q): Q, dup: DupExt) -> Res<Response> {
    let pp = per_page(&q)?;
    let page = num(&q, "page", 1)?.max(1);
    let s = lock(&st);
    let all: Vec<&Value> = s.data.invoices.values().collect();
    let (items, more) = page_of(&all, (page - 1).saturating_mul(pp), pp, dup.is_some());
    let mut resp = Json(json!({"items": items})).into_response();
    if more {
        let link = format!(
            "<{}/paged/link?per_page={pp}&page={}{}>; rel=\"next\"",
            s.link_base(),
            page + 1,
            s.echoed_key(&q)
        );
        if let Ok(v) = HeaderValue::from_str(&link) {
            resp.headers_mut().insert(header::LINK, v);
        }
    }
    Ok(resp)
}

/// `GET /paged/page?page=P&per_page=N`: P from 1; empty `items` past the end.
async fn paged_page(AxState(st): AxState<Shared>, Query(q): Q, dup: DupExt) -> Res {
    let pp = per_page(&q)?;
    let page = num(&q, "page", 1)?.max(1);
    let s = lock(&st);
    let all: Vec<&Value> = s.data.invoices.values().collect();
    let (items, _) = page_of(&all, (page - 1).saturating_mul(pp), pp, dup.is_some());
    Ok(Json(json!({"items": items})))
}

/// `GET /paged/offset?offset=O&limit=L`: `{"items", "total"}`.
async fn paged_offset(AxState(st): AxState<Shared>, Query(q): Q, dup: DupExt) -> Res {
    let offset = num(&q, "offset", 0)?;
    let limit = num(&q, "limit", 10)?.clamp(1, 1000);
    let s = lock(&st);
    let all: Vec<&Value> = s.data.invoices.values().collect();
    let (items, _) = page_of(&all, offset, limit, dup.is_some());
    Ok(Json(json!({"items": items, "total": all.len()})))
}

/// `GET /paged/stuck`: always the same first page and `"next_cursor": "abc"`.
async fn paged_stuck(AxState(st): AxState<Shared>, Query(q): Q) -> Res {
    let pp = per_page(&q)?;
    let s = lock(&st);
    let items: Vec<Value> = s.data.invoices.values().take(pp).cloned().collect();
    Ok(Json(json!({"items": items, "next_cursor": "abc"})))
}

fn oauth_error(status: StatusCode, code: &str, description: &str) -> Response {
    let body = json!({"error": code, "error_description": description});
    (status, Json(body)).into_response()
}

/// `POST /oauth/token`: client-credentials grant (form fields, JSON, or HTTP basic).
async fn oauth_token(AxState(st): AxState<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.contains("json"));
    let form: HashMap<String, String> = if is_json {
        serde_json::from_slice::<HashMap<String, Value>>(&body)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(k, v)| v.as_str().map(|s| (k, s.to_owned())))
            .collect()
    } else {
        url::form_urlencoded::parse(&body).into_owned().collect()
    };
    let mut s = lock(&st);
    let Auth::OAuth2 {
        client_id,
        client_secret,
        ttl,
        tokens,
    } = &mut s.auth
    else {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_client",
            "OAuth2 is not enabled on this fake vendor",
        );
    };
    if form.get("grant_type").map(String::as_str) != Some("client_credentials") {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "only client_credentials is supported",
        );
    }
    let basic = format!(
        "Basic {}",
        base64(format!("{client_id}:{client_secret}").as_bytes())
    );
    let basic_ok = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        == Some(basic.as_str());
    let form_ok = form.get("client_id") == Some(client_id)
        && form.get("client_secret") == Some(client_secret);
    if !basic_ok && !form_ok {
        return oauth_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "client authentication failed",
        );
    }
    let token = format!("tok_{:032x}", rand::random::<u128>());
    tokens.insert(token.clone(), Instant::now() + *ttl);
    Json(json!({
        "access_token": token,
        "token_type": "bearer",
        "expires_in": ttl.as_secs(),
    }))
    .into_response()
}

/// `POST /email/send`: delivers once per `Idempotency-Key`; replays answer the same id;
/// a different payload under a used key answers 422; a key whose first request is still
/// being worked on (see `FakeVendor::set_email_delay`) answers 409, as Stripe does. The
/// work runs on its own task, so a client that gives up does not stop the delivery.
async fn email_send(AxState(st): AxState<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let payload: Value = match serde_json::from_slice(&body) {
        Ok(v @ Value::Object(_)) => v,
        _ => return bad_request("body must be a JSON object").into_response(),
    };
    let Some(to) = payload["to"]
        .as_str()
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
    else {
        return bad_request("\"to\" is required").into_response();
    };
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let delay = {
        let mut s = lock(&st);
        if let Some((seen, id)) = key.as_ref().and_then(|k| s.email_keys.get(k)) {
            if *seen != payload {
                return error(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "idempotency_error",
                    "Idempotency-Key reused with a different payload",
                );
            }
            let mut resp = Json(json!({"id": id})).into_response();
            resp.headers_mut()
                .insert("idempotent-replayed", HeaderValue::from_static("true"));
            return resp;
        }
        if let Some(k) = &key {
            if !s.email_keys_in_progress.insert(k.clone()) {
                return error(
                    StatusCode::CONFLICT,
                    "idempotency_error",
                    "There is currently another in-progress request using this Idempotency-Key; try again later",
                );
            }
        }
        s.email_delay
    };
    let work = tokio::spawn(async move {
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let mut s = lock(&st);
        let id = format!("msg_{}", s.emails.len() + 1);
        let text = |k: &str| payload[k].as_str().unwrap_or_default().to_owned();
        let email = DeliveredEmail {
            id: id.clone(),
            idempotency_key: key.clone(),
            to,
            subject: text("subject"),
            body: text("body"),
            message_id: payload["message_id"].as_str().map(str::to_owned),
        };
        s.emails.push(email);
        if let Some(k) = key {
            s.email_keys_in_progress.remove(&k);
            s.email_keys.insert(k, (payload.clone(), id.clone()));
        }
        id
    });
    match work.await {
        Ok(id) => Json(json!({"id": id})).into_response(),
        Err(_) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "api_error",
            "the send task failed",
        ),
    }
}

async fn fake_state(AxState(st): AxState<Shared>) -> Json<Value> {
    let s = lock(&st);
    Json(json!({
        "base_url": s.base_url,
        "clock": s.data.clock,
        "invoices": s.data.invoices.len(),
        "contacts": s.data.contacts.len(),
        "events": s.data.events.len(),
        "requests": s.requests.len(),
        "line_item_requests": s.requests.iter().filter(|r| r.path.starts_with("/v1/invoices/") && r.path.ends_with("/lines")).count(),
        "emails": s.emails.len(),
        "mailbox": s.mailbox.as_ref().map(|m| m.lock().unwrap_or_else(PoisonError::into_inner).len()),
    }))
}

/// `POST /_fake/update_invoice/{id}`: merges the body's fields (bumping "updated" unless
/// given) and answers the updated invoice.
async fn fake_update_invoice(
    AxState(st): AxState<Shared>,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let Ok(Value::Object(fields)) = serde_json::from_slice::<Value>(&body) else {
        return bad_request("body must be a JSON object of fields to merge").into_response();
    };
    let mut s = lock(&st);
    let found = s.data.update_invoice(&id, |inv| {
        for (k, v) in fields {
            inv[k] = v;
        }
    });
    match s.data.invoices.get(&id) {
        Some(inv) if found => Json(inv.clone()).into_response(),
        _ => error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "no such invoice",
        ),
    }
}

async fn fake_mailbox(AxState(st): AxState<Shared>) -> Response {
    let Some(mb) = lock(&st).mailbox.clone() else {
        return error(StatusCode::NOT_FOUND, "not_found", "no SMTP sink attached");
    };
    let msgs: Vec<Value> = mb
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .map(|m| {
            json!({
                "from": m.from,
                "to": m.to,
                "subject": m.subject,
                "message_id": m.message_id,
            })
        })
        .collect();
    Json(Value::Array(msgs)).into_response()
}

async fn fake_emails(AxState(st): AxState<Shared>) -> Json<Value> {
    Json(json!(lock(&st).emails))
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
