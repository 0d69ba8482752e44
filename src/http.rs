//! The vendor HTTP client: auth, rate limit, timeouts, retries honoring `Retry-After`;
//! and [`HttpSource`], the declarative connector's [`Source`].

use std::collections::HashSet;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use backon::{BackoffBuilder, ExponentialBuilder};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use reqwest::StatusCode;
use reqwest::header::{HeaderMap, RETRY_AFTER};
use serde_json::Value;
use tokio::sync::Mutex;

use crate::connector::{
    Auth, Connector, IncrementalSpec, Method, Page, PageRequest, PaginationSpec, Source,
    SourceError, StreamSpec, TimeFormat,
};
use crate::paginate::{self, ResponseView};

/// Longest `Retry-After` we wait for; a vendor asking for more stops the stream.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(15 * 60);
/// How much of a vendor's error body is quoted in an error.
const ERROR_BODY_LIMIT: usize = 500;

/// A request that failed for good. The URL never carries secrets (the API key query
/// parameter is added after the URL shown here is taken).
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("{method} {url}: HTTP {status}: {body} (attempt {attempts})")]
    Status {
        method: &'static str,
        url: String,
        status: u16,
        body: String,
        attempts: u32,
    },
    #[error("{method} {url}: {reason} (gave up after {attempts} attempts)")]
    Transport {
        method: &'static str,
        url: String,
        reason: String,
        attempts: u32,
    },
    #[error("{method} {url}: the vendor asked to retry after {wait:?}, longer than idem waits")]
    RetryAfterTooLong {
        method: &'static str,
        url: String,
        wait: Duration,
    },
    #[error("OAuth2 token request to {url} failed: {reason}")]
    Token { url: String, reason: String },
}

/// A successful response: headers and body.
pub struct Fetched {
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

/// One vendor's client: shared by all streams of a connector, so the rate limit holds
/// for the vendor as a whole.
pub struct VendorClient {
    client: reqwest::Client,
    connector: Connector,
    limiter: Option<DefaultDirectRateLimiter>,
    oauth_token: Mutex<Option<(String, Instant)>>,
}

impl VendorClient {
    pub fn new(connector: Connector) -> Arc<Self> {
        let client = reqwest::Client::builder()
            .timeout(connector.spec.http.timeout.0)
            .connect_timeout(connector.spec.http.timeout.0.min(Duration::from_secs(10)))
            .user_agent(concat!("idem/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("the TLS backend initializes");
        let limiter = connector.spec.rate_limit.as_ref().map(|limit| {
            let rate = NonZeroU32::new(limit.requests_per_second.max(1)).expect("at least 1");
            let burst = NonZeroU32::new(limit.burst.unwrap_or(1).max(1)).expect("at least 1");
            RateLimiter::direct(Quota::per_second(rate).allow_burst(burst))
        });
        Arc::new(Self {
            client,
            connector,
            limiter,
            oauth_token: Mutex::new(None),
        })
    }

    pub fn connector(&self) -> &Connector {
        &self.connector
    }

    /// Sends a request built by `build` (called once per attempt), retrying connect
    /// errors, timeouts, 429 and 5xx with exponential backoff and jitter, waiting at least
    /// what `Retry-After` asks. `shown_url` is what errors and logs name.
    pub async fn send(
        &self,
        method: Method,
        url: &str,
        query: &[(String, String)],
        body: Option<&Value>,
    ) -> Result<Fetched, HttpError> {
        let method_name = match method {
            Method::Get => "GET",
            Method::Post => "POST",
        };
        let shown_url = shown_url(url, query);
        let http = &self.connector.spec.http;
        let mut delays = ExponentialBuilder::default()
            .with_min_delay(http.initial_backoff.0)
            .with_max_delay(http.max_backoff.0)
            .with_jitter()
            .with_max_times(http.max_attempts.saturating_sub(1) as usize)
            .build();
        let mut attempts = 0;
        let mut refreshed_token = false;
        loop {
            if let Some(limiter) = &self.limiter {
                limiter.until_ready().await;
            }
            attempts += 1;
            let request = self.build(method, url, query, body).await?;
            let (failure, retry_after) = match request.send().await {
                Ok(response) => {
                    let status = response.status();
                    let headers = response.headers().clone();
                    match response.bytes().await {
                        Ok(bytes) if status.is_success() => {
                            return Ok(Fetched {
                                headers,
                                body: bytes.to_vec(),
                            });
                        }
                        Ok(bytes) => {
                            let body_text = truncate(&String::from_utf8_lossy(&bytes));
                            let error = HttpError::Status {
                                method: method_name,
                                url: shown_url.clone(),
                                status: status.as_u16(),
                                body: body_text,
                                attempts,
                            };
                            if status == StatusCode::UNAUTHORIZED
                                && matches!(self.connector.auth, Some(Auth::Oauth2 { .. }))
                                && !refreshed_token
                            {
                                // The token may have been revoked before its expiry: fetch a
                                // new one once, right away.
                                refreshed_token = true;
                                *self.oauth_token.lock().await = None;
                                continue;
                            }
                            if !is_retryable(status) {
                                return Err(error);
                            }
                            (error, retry_after(&headers))
                        }
                        Err(err) => (transport(method_name, &shown_url, err, attempts), None),
                    }
                }
                Err(err) => {
                    let retryable =
                        err.is_timeout() || err.is_connect() || err.is_request() || err.is_body();
                    let error = transport(method_name, &shown_url, err, attempts);
                    if !retryable {
                        return Err(error);
                    }
                    (error, None)
                }
            };
            let Some(backoff) = delays.next() else {
                return Err(failure);
            };
            if let Some(wait) = retry_after {
                if wait > MAX_RETRY_AFTER {
                    return Err(HttpError::RetryAfterTooLong {
                        method: method_name,
                        url: shown_url,
                        wait,
                    });
                }
            }
            let wait = retry_after.map_or(backoff, |asked| asked.max(backoff));
            tracing::warn!(url = %shown_url, attempt = attempts, wait_ms = wait.as_millis() as u64, error = %failure, "retrying vendor request");
            tokio::time::sleep(wait).await;
        }
    }

    async fn build(
        &self,
        method: Method,
        url: &str,
        query: &[(String, String)],
        body: Option<&Value>,
    ) -> Result<reqwest::RequestBuilder, HttpError> {
        let mut request = match method {
            Method::Get => self.client.get(url),
            Method::Post => self.client.post(url),
        };
        let mut query: Vec<(&str, &str)> = query
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        for (name, value) in &self.connector.headers {
            request = request.header(name, value.expose());
        }
        match &self.connector.auth {
            None => {}
            Some(Auth::Bearer(token)) => request = request.bearer_auth(token.expose()),
            Some(Auth::Basic { username, password }) => {
                request = request.basic_auth(username, Some(password.expose()))
            }
            Some(Auth::HeaderKey { header, value }) => {
                request = request.header(header, value.expose())
            }
            Some(Auth::QueryKey { param, value }) => query.push((param, value.expose())),
            Some(Auth::Oauth2 { .. }) => request = request.bearer_auth(self.oauth_token().await?),
        }
        if !query.is_empty() {
            request = request.query(&query);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        Ok(request)
    }

    /// The cached OAuth2 token, fetched anew when missing or about to expire.
    async fn oauth_token(&self) -> Result<String, HttpError> {
        let Some(Auth::Oauth2 {
            token_url,
            client_id,
            client_secret,
            scope,
        }) = &self.connector.auth
        else {
            unreachable!("only called for oauth2 connectors")
        };
        let mut cached = self.oauth_token.lock().await;
        if let Some((token, expires)) = cached.as_ref() {
            if Instant::now() < *expires {
                return Ok(token.clone());
            }
        }
        let token_error = |reason: String| HttpError::Token {
            url: token_url.clone(),
            reason,
        };
        let mut form = vec![
            ("grant_type", "client_credentials"),
            ("client_id", client_id.as_str()),
            ("client_secret", client_secret.expose()),
        ];
        if let Some(scope) = scope {
            form.push(("scope", scope));
        }
        let response = self
            .client
            .post(token_url)
            .form(&form)
            .send()
            .await
            .map_err(|err| token_error(err.without_url().to_string()))?;
        let status = response.status();
        let body: Value = response.json().await.map_err(|err| {
            token_error(format!(
                "HTTP {status}, unreadable body: {}",
                err.without_url()
            ))
        })?;
        let token = body
            .get("access_token")
            .and_then(Value::as_str)
            .ok_or_else(|| token_error(format!("HTTP {status}, no access_token in the answer")))?
            .to_string();
        let lifetime = body
            .get("expires_in")
            .and_then(Value::as_u64)
            .unwrap_or(3600);
        // Renew a little before the vendor's expiry so no request carries a token that
        // dies in flight.
        let expires = Instant::now() + Duration::from_millis(lifetime * 900);
        *cached = Some((token.clone(), expires));
        Ok(token)
    }
}

fn is_retryable(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
        || status.is_server_error()
}

/// The reason never quotes reqwest's URL: it would carry an API key sent as a query
/// parameter.
fn transport(method: &'static str, url: &str, err: reqwest::Error, attempts: u32) -> HttpError {
    let err = err.without_url();
    let reason = if err.is_timeout() {
        "timed out".to_string()
    } else if err.is_connect() {
        "could not connect".to_string()
    } else {
        let mut text = err.to_string();
        let mut source = std::error::Error::source(&err);
        while let Some(inner) = source {
            text = format!("{text}: {inner}");
            source = inner.source();
        }
        text.replace(url, "<url>")
    };
    HttpError::Transport {
        method,
        url: url.to_string(),
        reason,
        attempts,
    }
}

/// `Retry-After` as seconds or an HTTP date.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(when.duration_since(SystemTime::now()).unwrap_or_default())
}

fn truncate(text: &str) -> String {
    let text = text.trim();
    if text.len() <= ERROR_BODY_LIMIT {
        return text.to_string();
    }
    let mut end = ERROR_BODY_LIMIT;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &text[..end], text.len())
}

fn shown_url(url: &str, query: &[(String, String)]) -> String {
    if query.is_empty() {
        return url.to_string();
    }
    let query: Vec<String> = query.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}{}", query.join("&"))
}

/// The declarative connector's [`Source`]: one stream's endpoint and pagination.
pub struct HttpSource {
    client: Arc<VendorClient>,
    stream: StreamSpec,
    seen_tokens: HashSet<String>,
}

impl HttpSource {
    pub fn new(client: Arc<VendorClient>, stream: StreamSpec) -> Self {
        Self {
            client,
            stream,
            seen_tokens: HashSet::new(),
        }
    }

    fn window_format(&self) -> TimeFormat {
        match &self.stream.incremental {
            IncrementalSpec::HighWaterMark { format, .. } => format.clone(),
            _ => TimeFormat::UnixSeconds,
        }
    }

    /// URL, query and body of the request for `request`.
    fn plan(&self, request: &PageRequest) -> (String, Vec<(String, String)>, Option<Value>) {
        let connector = self.client.connector();
        let base = format!("{}{}", connector.base_url, self.stream.path);
        // A next-page URL carries all its parameters already.
        if let (Some(token), PaginationSpec::NextUrl { .. } | PaginationSpec::LinkHeader) =
            (&request.token, &self.stream.pagination)
        {
            let url = if token.starts_with("http://") || token.starts_with("https://") {
                token.clone()
            } else {
                format!("{}{}", connector.base_url, token)
            };
            return (url, Vec::new(), None);
        }
        let mut params: Vec<(String, Value)> = connector
            .spec
            .params
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        params.extend(
            self.stream
                .params
                .iter()
                .map(|(k, v)| (k.clone(), toml_to_json(v))),
        );
        let format = self.window_format();
        if let IncrementalSpec::HighWaterMark {
            param, param_to, ..
        } = &self.stream.incremental
        {
            if let (Some(param), Some(from)) = (param, request.from) {
                params.push((param.clone(), Value::String(format_time(from, &format))));
            }
            if let (Some(param), Some(to)) = (param_to, request.to) {
                params.push((param.clone(), Value::String(format_time(to, &format))));
            }
        }
        match (&self.stream.pagination, &request.token) {
            (
                PaginationSpec::BodyCursor { param, .. } | PaginationSpec::LastRecord { param, .. },
                Some(token),
            ) => params.push((param.clone(), Value::String(token.clone()))),
            (
                PaginationSpec::FirstRecord {
                    param,
                    backward_param,
                    ..
                },
                Some(token),
            ) => match paginate::FeedToken::parse(token) {
                paginate::FeedToken::Newer(cursor) => {
                    params.push((param.clone(), Value::String(cursor.to_string())))
                }
                paginate::FeedToken::Older(cursor) | paginate::FeedToken::Oldest(cursor) => {
                    if let (Some(back), false) = (backward_param, cursor.is_empty()) {
                        params.push((back.clone(), Value::String(cursor.to_string())));
                    }
                }
            },
            (PaginationSpec::PageNumber { param, start, .. }, token) => params.push((
                param.clone(),
                Value::String(token.clone().unwrap_or_else(|| start.to_string())),
            )),
            (
                PaginationSpec::Offset {
                    param,
                    limit_param,
                    limit,
                },
                token,
            ) => {
                params.push((
                    param.clone(),
                    Value::String(token.clone().unwrap_or_else(|| "0".into())),
                ));
                params.push((limit_param.clone(), Value::String(limit.to_string())));
            }
            _ => {}
        }
        match self.stream.method {
            Method::Get => {
                let query = params
                    .into_iter()
                    .map(|(k, v)| (k, v.as_str().map_or_else(|| v.to_string(), str::to_string)))
                    .collect();
                (base, query, None)
            }
            Method::Post => {
                let mut body = self
                    .stream
                    .body
                    .as_ref()
                    .map(toml_to_json)
                    .unwrap_or_else(|| Value::Object(Default::default()));
                // An open window still fills the template, with bounds in the vendor's own
                // format: the epoch, and a far future.
                let from = format_time(
                    request.from.unwrap_or(chrono::DateTime::UNIX_EPOCH),
                    &format,
                );
                let far_future = chrono::DateTime::from_timestamp(253_402_300_799, 0)
                    .expect("9999-12-31 is a valid time");
                let to = format_time(request.to.unwrap_or(far_future), &format);
                fill_window(&mut body, &from, &to);
                if let Value::Object(map) = &mut body {
                    for (k, v) in params {
                        map.insert(k, v);
                    }
                }
                (base, Vec::new(), Some(body))
            }
        }
    }
}

impl Source for HttpSource {
    async fn fetch_page(&mut self, request: &PageRequest) -> Result<Page, SourceError> {
        if request.token.is_none() {
            // A new query (a run's first page, or a capped query restarted from a later
            // mark): its cursors may repeat the previous query's ("200", "400", ...).
            self.seen_tokens.clear();
        }
        let (url, query, body) = self.plan(request);
        let shown = shown_url(&url, &query);
        let fetched = self
            .client
            .send(self.stream.method, &url, &query, body.as_ref())
            .await?;
        let malformed = |reason: String| SourceError::Malformed {
            url: shown.clone(),
            reason,
        };
        // A lone surrogate or an out-of-range number fails its record, not the page.
        let json: Value = crate::values::parse_body(&fetched.body).map_err(|err| {
            malformed(format!(
                "the body is not JSON ({err}): {}",
                truncate(&String::from_utf8_lossy(&fetched.body))
            ))
        })?;
        let mut records = match json.pointer(&self.stream.records) {
            Some(Value::Array(items)) => items.clone(),
            Some(other) => {
                return Err(malformed(format!(
                    "records pointer '{}' points at {}, not an array",
                    self.stream.records,
                    kind_of(other)
                )));
            }
            None => {
                return Err(malformed(format!(
                    "records pointer '{}' points at nothing",
                    self.stream.records
                )));
            }
        };
        let link = fetched
            .headers
            .get(reqwest::header::LINK)
            .and_then(|v| v.to_str().ok());
        let next = paginate::next_token(
            &self.stream.pagination,
            &self.stream.id,
            &ResponseView {
                body: &json,
                link_header: link,
                records: &records,
                token: request.token.as_deref(),
            },
        )
        .map_err(malformed)?;
        // Walking back to find a feed's oldest page: the next token is the oldest record's.
        let next = match (
            request.token.as_deref().map(paginate::FeedToken::parse),
            &self.stream.pagination,
        ) {
            (Some(paginate::FeedToken::Older(_)), PaginationSpec::FirstRecord { field, .. }) => {
                let pointer = field.as_deref().unwrap_or(&self.stream.id);
                match records.last() {
                    None => None,
                    Some(oldest) => Some(
                        oldest
                            .pointer(pointer)
                            .and_then(|v| {
                                v.as_str()
                                    .map(str::to_string)
                                    .or_else(|| v.as_i64().map(|n| n.to_string()))
                            })
                            .map(|id| format!("{}{id}", paginate::FEED_OLDER))
                            .ok_or_else(|| {
                                malformed(format!(
                                    "the oldest record has no cursor value at '{pointer}'"
                                ))
                            })?,
                    ),
                }
            }
            _ => next,
        };
        if let Some(token) = &next {
            if request.token.as_deref() == Some(token) || !self.seen_tokens.insert(token.clone()) {
                return Err(SourceError::RepeatedCursor {
                    url: shown,
                    cursor: token.clone(),
                });
            }
        }
        if matches!(self.stream.pagination, PaginationSpec::FirstRecord { .. }) {
            // A newest-first page: hand it on oldest first, so that when a record appears
            // twice the newer version is the one written.
            records.reverse();
        }
        if let Some(pointer) = &self.stream.record {
            // Envelopes (events) paged the feed; what is stored is the record inside. An
            // item without one is handed on whole, to be stored as a failure with its
            // payload.
            for item in &mut records {
                if let Some(inner) = item.pointer_mut(pointer) {
                    *item = inner.take();
                }
            }
        }
        let vendor_time = fetched
            .headers
            .get(reqwest::header::DATE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| chrono::DateTime::parse_from_rfc2822(v).ok())
            .map(|t| t.with_timezone(&chrono::Utc));
        Ok(Page {
            records,
            next,
            vendor_time,
        })
    }
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Writes a window bound the way the vendor expects it.
pub fn format_time(time: chrono::DateTime<chrono::Utc>, format: &TimeFormat) -> String {
    match format {
        TimeFormat::UnixSeconds => time.timestamp().to_string(),
        TimeFormat::UnixMillis => time.timestamp_millis().to_string(),
        TimeFormat::Rfc3339 => time.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
        TimeFormat::Custom(pattern) => time.format(pattern).to_string(),
    }
}

fn fill_window(value: &mut Value, from: &str, to: &str) {
    match value {
        Value::String(text) => {
            let compact = text.replace(' ', "");
            if compact == "{{from}}" {
                *text = from.to_string();
            } else if compact == "{{to}}" {
                *text = to.to_string();
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| fill_window(v, from, to)),
        Value::Object(map) => map.values_mut().for_each(|v| fill_window(v, from, to)),
        _ => {}
    }
}

/// TOML values as JSON (dates become strings).
pub fn toml_to_json(value: &toml::Value) -> Value {
    match value {
        toml::Value::String(s) => Value::String(s.clone()),
        toml::Value::Integer(i) => Value::from(*i),
        toml::Value::Float(f) => Value::from(*f),
        toml::Value::Boolean(b) => Value::Bool(*b),
        toml::Value::Datetime(d) => Value::String(d.to_string()),
        toml::Value::Array(items) => Value::Array(items.iter().map(toml_to_json).collect()),
        toml::Value::Table(table) => Value::Object(
            table
                .iter()
                .map(|(k, v)| (k.clone(), toml_to_json(v)))
                .collect(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, "3".parse().unwrap());
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(3)));
        let later = SystemTime::now() + Duration::from_secs(120);
        headers.insert(RETRY_AFTER, httpdate::fmt_http_date(later).parse().unwrap());
        let wait = retry_after(&headers).unwrap();
        assert!(wait > Duration::from_secs(100) && wait <= Duration::from_secs(120));
    }
}
