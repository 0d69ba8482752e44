//! An in-project fake vendor (a billing/CRM HTTP API over real sockets) and an SMTP sink,
//! for tests and the demo.
//!
//! [`FakeVendor`] serves, on `127.0.0.1`:
//!
//! - `GET /v1/charges`: one list per connected account, chosen by the `Stripe-Account`
//!   header (see [`FakeVendor::seed_charges`]), for partitioned streams.
//! - `GET /v1/invoices`, `GET /v1/customers`, `GET /v1/events`: Stripe-shaped lists
//!   (`limit`, `starting_after`, `ending_before` for events, `updated[gte|gt|lt|lte]` for
//!   invoices). Invoices list ascending by id; several share the same `updated` (ties).
//! - `GET /v1/invoices/{id}/lines`: an invoice's line items (`limit`, `starting_after`,
//!   `has_more`; 404 for an unknown invoice). An invoice carries at most 10 lines inline
//!   with `lines.has_more`; [`FakeVendor::seed_long_invoices`] seeds invoices with more
//!   (see `lines.rs`), and `/_fake/state` counts the line item requests.
//! - `POST /crm/v3/objects/contacts/search` and `GET /crm/v3/objects/contacts`:
//!   HubSpot-shaped; the search caps `after + limit` at 10,000 with HTTP 400.
//!   `GET /crm/v4/objects/contacts/{id}/associations/companies`: the company a contact's
//!   `company` property names ("Company 007" is company 9007); 404 for an unknown contact.
//! - `GET /paged/{next_url,link,page,offset,stuck}`: one endpoint per pagination kind over
//!   the invoices. Their next links repeat an API key given as a query parameter, as many
//!   vendors' do, and may point at another host ([`FakeVendor::set_link_base`]).
//! - `POST /oauth/token`: client-credentials tokens (see [`FakeVendor::require_oauth2`]).
//! - `POST /email/send`: an email API honoring `Idempotency-Key` (409 while a request
//!   under the same key is in progress; see [`FakeVendor::set_email_delay`]).
//! - `GET /_fake/state`, `POST /_fake/update_invoice/{id}`, `GET /_fake/mailbox`,
//!   `GET /_fake/emails`: control endpoints for shell demos (not recorded, no faults).
//!
//! Faults ([`FakeVendor::inject`]) are applied before auth; auth applies to `/v1` and `/crm`.

mod data;
mod server;
mod smtp;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;

pub use data::accounts::Accounts;
pub use data::{DEFAULT_CLOCK, VendorData};
pub use smtp::{ReceivedMail, SmtpSink};

use server::{Auth, Hook, State};

/// Where an API key must be presented (see [`FakeVendor::require_api_key`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiKeyPlace {
    /// A request header with this name.
    Header(String),
    /// A query parameter with this name.
    Query(String),
}

/// A fault to inject: applies to the next `times` requests whose path starts with
/// `path_prefix` (faults are consumed in the order injected).
#[derive(Debug, Clone)]
pub struct Fault {
    /// Path prefix the fault matches, e.g. `/v1/invoices` or `/email`; with a `?`, a
    /// prefix of the path and query, e.g. `/paged/next_url?per_page=10&after=`.
    pub path_prefix: String,
    /// How many matching requests it applies to.
    pub times: usize,
    /// What happens to those requests.
    pub kind: FaultKind,
}

impl Fault {
    /// A fault for the next `times` requests under `path_prefix`.
    pub fn new(path_prefix: impl Into<String>, times: usize, kind: FaultKind) -> Fault {
        Fault {
            path_prefix: path_prefix.into(),
            times,
            kind,
        }
    }

    /// Shorthand: answer `code` (with an optional `Retry-After` value) `times` times.
    pub fn status(
        path_prefix: impl Into<String>,
        times: usize,
        code: u16,
        retry_after: Option<&str>,
    ) -> Fault {
        Fault::new(
            path_prefix,
            times,
            FaultKind::Status {
                code,
                retry_after: retry_after.map(str::to_owned),
                body: None,
            },
        )
    }
}

/// What an injected fault does.
#[derive(Debug, Clone)]
pub enum FaultKind {
    /// Answer this status (with `Retry-After` when given) and a JSON error body (`body`
    /// verbatim when given); the request never reaches auth or the handler.
    Status {
        /// HTTP status code.
        code: u16,
        /// `Retry-After` header value (seconds or an HTTP date).
        retry_after: Option<String>,
        /// Response body; a JSON error object when `None`.
        body: Option<String>,
    },
    /// Sleep this long before answering normally (to cause client timeouts).
    Delay(Duration),
    /// Answer 200 with the first half of the real body (not valid JSON).
    MalformedJson,
    /// Answer 200 JSON where the `data`/`results`/`items` array is an object.
    WrongShape,
    /// Repeat the previous page's last record at the start of this page.
    DuplicateRecords,
    /// Answer `code` with an error body that quotes the request back (method, URL with
    /// its query, every header), as many APIs do in 400/401/403 messages, with a terminal
    /// escape sequence in it.
    EchoRequest {
        /// HTTP status code.
        code: u16,
    },
    /// Answer `code` with these exact bytes (a NUL, a gzip blob, ...).
    RawBody {
        /// HTTP status code.
        code: u16,
        /// `Content-Type` header value.
        content_type: String,
        /// The body, verbatim.
        body: Vec<u8>,
    },
    /// Answer 200 with a JSON list body of `bytes` bytes, streamed without a
    /// `Content-Length` and generated as it is sent (the fake never holds it).
    HugeBody {
        /// Body size in bytes.
        bytes: u64,
    },
    /// Answer `code` with `Location: <to_base><path>?<query>` (the request's own path and
    /// query on another base URL).
    Redirect {
        /// 301, 302, 303, 307 or 308.
        code: u16,
        /// Base URL the client is sent to, e.g. another fake vendor's.
        to_base: String,
    },
    /// Handle the request (an email is delivered), then sleep this long before answering:
    /// a client that gives up first never learns that it succeeded.
    SlowAnswer(Duration),
}

/// One request the fake received (control endpoints under `/_fake/` excluded).
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    /// HTTP method, e.g. "GET".
    pub method: String,
    /// Path without the query string.
    pub path: String,
    /// Raw query string, if any.
    pub query: Option<String>,
    /// The `Authorization` header, if any.
    pub authorization: Option<String>,
    /// The `Idempotency-Key` header, if any.
    pub idempotency_key: Option<String>,
    /// Every header, as (lowercase name, value).
    pub headers: Vec<(String, String)>,
    /// Status answered; 0 while in flight or when the client went away before the answer.
    pub status: u16,
    /// When the request arrived.
    pub received: Instant,
}

/// An email accepted by `POST /email/send` (once per idempotency key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeliveredEmail {
    /// The provider's id, "msg_<n>".
    pub id: String,
    /// The `Idempotency-Key` header, if the client sent one.
    pub idempotency_key: Option<String>,
    /// Recipient.
    pub to: String,
    /// Subject.
    pub subject: String,
    /// Body text.
    pub body: String,
    /// The client's message id, if given.
    pub message_id: Option<String>,
}

/// A running fake vendor; the server stops when this is dropped.
pub struct FakeVendor {
    state: Arc<Mutex<State>>,
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeVendor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeVendor {
    /// Starts on `127.0.0.1` with an OS-chosen port.
    ///
    /// # Panics
    /// If no loopback port can be bound (a broken test environment).
    pub async fn start() -> FakeVendor {
        FakeVendor::start_on(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .expect("bind 127.0.0.1:0 for the fake vendor")
    }

    /// Starts on `addr` (port 0 picks a free port).
    pub async fn start_on(addr: SocketAddr) -> std::io::Result<FakeVendor> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State::new(format!("http://{addr}"))));
        let app = server::router(state.clone());
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::warn!(error = %e, "fake vendor server stopped");
            }
        });
        Ok(FakeVendor { state, addr, task })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        server::lock(&self.state)
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, no trailing slash.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Seeds `n` deterministic invoices ("in_000001", ...) after any existing ones: created
    /// 10 s apart about a month before the clock, `updated` shared by groups of three, every
    /// third paid, the other open with about half more than 3 days overdue.
    pub fn seed_invoices(&self, n: usize) {
        self.lock().data.seed_invoices(n);
    }

    /// Seeds the same `n` invoices as [`FakeVendor::seed_invoices`], identical over HTTP,
    /// into a compact store: each is kept as its list position only and rendered when
    /// served (about 70 bytes per invoice, with its event, instead of ~24 KB), for
    /// benchmarks with a million. One bulk seeding per vendor (it panics on a second).
    /// A bulk invoice moves into [`VendorData::invoices`] when it changes, in full (~24 KB
    /// there and as much in its event); until then an [`FakeVendor::on_request`] hook does
    /// not find it in that map.
    pub fn seed_bulk_invoices(&self, n: usize) {
        self.lock().data.seed_bulk_invoices(n);
    }

    /// Seeds `n` invoices with `lines` line items each after the existing ones; with more
    /// than 10 lines an invoice carries the first 10 and `lines.has_more = true`.
    pub fn seed_long_invoices(&self, n: usize, lines: usize) {
        self.lock().data.seed_long_invoices(n, lines);
    }

    /// Every line of invoice `id` (`None` when unknown).
    pub fn invoice_lines(&self, id: &str) -> Option<Vec<Value>> {
        self.lock().data.invoice_lines(id)
    }

    /// Replaces every line of invoice `id` (the invoice is updated); false when unknown.
    pub fn set_invoice_lines(&self, id: &str, lines: Vec<Value>) -> bool {
        let mut state = self.lock();
        state.data.has_invoice(id) && state.data.set_lines(id, lines)
    }

    /// Adds a line to invoice `id` (the invoice is updated); returns the line's id.
    pub fn add_invoice_line(&self, id: &str) -> Option<String> {
        self.lock().data.add_invoice_line(id)
    }

    /// Removes line `line_id` of invoice `id` (the invoice is updated).
    pub fn remove_invoice_line(&self, id: &str, line_id: &str) -> bool {
        self.lock().data.remove_invoice_line(id, line_id)
    }

    /// Requests made to `/v1/invoices/{id}/lines`, any invoice.
    pub fn line_item_requests(&self) -> usize {
        self.lock()
            .requests
            .iter()
            .filter(|r| r.path.starts_with("/v1/invoices/") && r.path.ends_with("/lines"))
            .count()
    }

    /// The vendor's current invoices, sorted by id.
    pub fn invoices(&self) -> Vec<Value> {
        let state = self.lock();
        state
            .data
            .all_invoices()
            .map(|inv| inv.value().into_owned())
            .collect()
    }

    /// Applies `f` to invoice `id` (no-op when unknown); bumps "updated" to the clock unless
    /// `f` changed it, and appends an `invoice.updated` event.
    pub fn update_invoice(&self, id: &str, f: impl FnOnce(&mut Value)) {
        self.lock().data.update_invoice(id, f);
    }

    /// Inserts or replaces an invoice (a missing "id" gets the next one) and appends an event.
    pub fn insert_invoice(&self, inv: Value) {
        self.lock().data.insert_invoice(inv);
    }

    /// Deletes invoice `id` at the vendor (lists stop returning it) and appends an
    /// `invoice.deleted` event. Returns false when the id is unknown.
    pub fn remove_invoice(&self, id: &str) -> bool {
        let mut state = self.lock();
        let now = state.data.clock;
        state.data.materialize(id);
        match state.data.invoices.remove(id) {
            Some(invoice) => {
                state.data.push_event("invoice.deleted", now, invoice);
                true
            }
            None => false,
        }
    }

    /// Sets the vendor's "now" (unix seconds) used for bumps and seeding.
    pub fn set_clock(&self, unix_secs: i64) {
        self.lock().data.clock = unix_secs;
    }

    /// Adds `n` charges to connected account `account` (created if new, even with
    /// `n = 0`); charge ids ("ch_000001", ...) are unique across accounts.
    pub fn seed_charges(&self, account: &str, n: usize) {
        let mut state = self.lock();
        let clock = state.data.clock;
        state.data.accounts.seed(account, n, clock);
    }

    /// The charges of `account` at the vendor, by id.
    pub fn charges(&self, account: &str) -> Vec<Value> {
        self.lock()
            .data
            .accounts
            .charges
            .get(account)
            .map(|c| c.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Applies `f` to charge `id` of `account`, stamping `updated` with the vendor's clock
    /// unless `f` set it. False when there is no such charge.
    pub fn update_charge(&self, account: &str, id: &str, f: impl FnOnce(&mut Value)) -> bool {
        let mut state = self.lock();
        let clock = state.data.clock;
        state.data.accounts.update(account, id, clock, f)
    }

    /// Seeds `n` deterministic HubSpot contacts (ids "1001", ...) after any existing ones.
    pub fn seed_contacts(&self, n: usize) {
        self.lock().data.seed_contacts(n);
    }

    /// The vendor's current contacts, in id order.
    pub fn contacts(&self) -> Vec<Value> {
        let st = self.lock();
        let mut v: Vec<&Value> = st.data.contacts.values().collect();
        v.sort_by(|a, b| server::hubspot::contact_order(a, b));
        v.into_iter().cloned().collect()
    }

    /// Applies `f` to contact `id`; bumps `lastmodifieddate`/`updatedAt` unless `f` changed it.
    pub fn update_contact(&self, id: &str, f: impl FnOnce(&mut Value)) {
        self.lock().data.update_contact(id, f);
    }

    /// Every `/v1` and `/crm` request then needs `Authorization: Bearer <token>`.
    pub fn require_bearer(&self, token: &str) {
        self.lock().auth = Auth::Bearer(token.to_owned());
    }

    /// `POST /oauth/token` (client credentials, as form fields or HTTP basic) then issues
    /// tokens valid for `token_ttl`; `/v1` and `/crm` need a valid unexpired one.
    pub fn require_oauth2(&self, client_id: &str, client_secret: &str, token_ttl: Duration) {
        self.lock().auth = Auth::OAuth2 {
            client_id: client_id.to_owned(),
            client_secret: client_secret.to_owned(),
            ttl: token_ttl,
            tokens: BTreeMap::new(),
        };
    }

    /// Expires every OAuth2 token issued so far.
    pub fn expire_all_tokens(&self) {
        if let Auth::OAuth2 { tokens, .. } = &mut self.lock().auth {
            tokens.clear();
        }
    }

    /// `/v1` and `/crm` then need `key` in the given header or query parameter.
    pub fn require_api_key(&self, place: ApiKeyPlace, key: &str) {
        self.lock().auth = Auth::ApiKey(place, key.to_owned());
    }

    /// `/v1` and `/crm` then need HTTP basic auth with these credentials.
    pub fn require_basic(&self, user: &str, pass: &str) {
        self.lock().auth = Auth::Basic(format!(
            "Basic {}",
            server::base64(format!("{user}:{pass}").as_bytes())
        ));
    }

    /// `next` URLs and `Link` headers of the `/paged` endpoints then point at `base`
    /// (another vendor's host) instead of this vendor.
    pub fn set_link_base(&self, base: &str) {
        self.lock().link_base = Some(base.trim_end_matches('/').to_owned());
    }

    /// Queues a fault (see [`Fault`]).
    pub fn inject(&self, fault: Fault) {
        if fault.times > 0 {
            self.lock().faults.push(fault);
        }
    }

    /// Queues `fault` when the `nth` (1-based, all recorded requests) request arrives, ahead
    /// of other queued faults, so it can hit that very request (when its path matches).
    pub fn inject_at(&self, nth: usize, fault: Fault) {
        if fault.times > 0 {
            self.lock().faults_at.entry(nth).or_default().push(fault);
        }
    }

    /// Runs `f` just before serving the `nth` (1-based, all recorded requests) request.
    pub fn on_request(&self, nth: usize, f: impl FnOnce(&mut VendorData) + Send + 'static) {
        let hook: Hook = Box::new(f);
        self.lock().hooks.entry(nth).or_default().push(hook);
    }

    /// Every request received so far, in arrival order (`/_fake/*` excluded).
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.lock().requests.clone()
    }

    /// How many recorded requests have a path starting with `path_prefix`.
    pub fn request_count(&self, path_prefix: &str) -> usize {
        self.lock()
            .requests
            .iter()
            .filter(|r| r.path.starts_with(path_prefix))
            .count()
    }

    /// Makes `POST /email/send` slow: each send takes `delay` before it delivers and
    /// answers; another request under the same key meanwhile answers 409 (in progress).
    pub fn set_email_delay(&self, delay: Duration) {
        self.lock().email_delay = delay;
    }

    /// Emails delivered by `POST /email/send`, each once.
    pub fn emails(&self) -> Vec<DeliveredEmail> {
        self.lock().emails.clone()
    }

    /// Replaces `from` by `to` in the raw text of every later response body (control
    /// endpoints excluded): e.g. a placeholder string by `\ud800`, a lone surrogate escape
    /// that serde_json refuses and no `Value` can hold.
    pub fn rewrite_bodies(&self, from: &str, to: &str) {
        self.lock()
            .body_rewrites
            .push((from.to_owned(), to.to_owned()));
    }

    /// From now on, serves every JSON body with each object's keys in reverse order and
    /// spaced out: the same records, written another way.
    pub fn reverse_key_order(&self) {
        self.lock().reverse_keys = true;
    }

    /// Serves `sink`'s messages at `GET /_fake/mailbox`.
    pub fn attach_mailbox(&self, sink: &SmtpSink) {
        self.lock().mailbox = Some(sink.store());
    }
}

/// `value` written as JSON another way: every object's keys in reverse order, with a
/// space after each separator. The same JSON value to any reader that does not depend on
/// key order.
pub fn reversed_json(value: &Value) -> String {
    fn write(value: &Value, out: &mut String) {
        match value {
            Value::Object(map) => {
                out.push('{');
                for (i, (key, item)) in map.iter().rev().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    out.push_str(&Value::String(key.clone()).to_string());
                    out.push_str(": ");
                    write(item, out);
                }
                out.push('}');
            }
            Value::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    write(item, out);
                }
                out.push(']');
            }
            other => out.push_str(&other.to_string()),
        }
    }
    let mut out = String::new();
    write(value, &mut out);
    out
}
