//! The vendor HTTP client: auth, rate limit, timeouts, redirects, retries honoring
//! `Retry-After`, bodies read within their cap. The declarative connector's [`Source`](crate::connector::Source)
//! that sends its requests through it is [`HttpSource`] (`source.rs`).

mod source;

pub use source::{HttpSource, format_time, toml_to_json};

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use backon::{BackoffBuilder, ExponentialBuilder};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use reqwest::StatusCode;
use reqwest::header::{HeaderMap, LOCATION, RETRY_AFTER};
use serde_json::Value;
use tokio::sync::Mutex;

pub use crate::connector::HttpError;
use crate::connector::{Auth, Connector, CrossHost, Method};

/// Longest `Retry-After` we wait for; a vendor asking for more stops the stream.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(15 * 60);
/// How much of a vendor's error body is quoted in an error.
const ERROR_BODY_LIMIT: usize = 500;

/// Most redirects one request follows.
const MAX_REDIRECTS: u32 = 10;
/// How much of an error body is read (the rest is never downloaded).
const ERROR_BODY_READ_LIMIT: usize = 64 * 1024;

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
    /// The origin of `base_url`: the only one that receives credentials.
    origin: Option<url::Origin>,
    /// The declared rate, or this replica's share of it (see [`VendorClient::share_among`]);
    /// swapped whole when the share changes, never held across an await.
    limiter: std::sync::RwLock<Option<Arc<DefaultDirectRateLimiter>>>,
    oauth_token: Mutex<Option<(String, Instant)>>,
}

/// A limiter for `1 / replicas` of the connector's `[rate_limit]`: the period between
/// requests grows `replicas` times and the burst is split (at least one request).
fn limiter_for(connector: &Connector, replicas: u32) -> Option<Arc<DefaultDirectRateLimiter>> {
    connector.spec.rate_limit.as_ref().map(|limit| {
        let rate = f64::from(limit.requests_per_second.max(1));
        let period = Duration::from_secs_f64(f64::from(replicas) / rate);
        let burst =
            NonZeroU32::new((limit.burst.unwrap_or(1) / replicas).max(1)).expect("at least 1");
        let quota = Quota::with_period(period)
            .expect("a positive period")
            .allow_burst(burst);
        Arc::new(RateLimiter::direct(quota))
    })
}

impl VendorClient {
    pub fn new(connector: Connector) -> Arc<Self> {
        // Proxies come from HTTPS_PROXY / HTTP_PROXY / NO_PROXY (reqwest reads them).
        let mut builder = reqwest::Client::builder();
        for certificate in &connector.ca_certificates {
            builder = builder.add_root_certificate(certificate.clone());
        }
        let client = builder
            .timeout(connector.spec.http.timeout.0)
            .connect_timeout(connector.spec.http.timeout.0.min(Duration::from_secs(10)))
            .user_agent(concat!("idem/", env!("CARGO_PKG_VERSION")))
            // Redirects are followed by `send`, which decides per hop whether the target
            // may see credentials (reqwest keeps API-key and custom headers across hosts).
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("the TLS backend initializes");
        let limiter = std::sync::RwLock::new(limiter_for(&connector, 1));
        let origin = url::Url::parse(&connector.base_url)
            .ok()
            .map(|url| url.origin())
            .filter(url::Origin::is_tuple);
        Arc::new(Self {
            client,
            connector,
            origin,
            limiter,
            oauth_token: Mutex::new(None),
        })
    }

    pub fn connector(&self) -> &Connector {
        &self.connector
    }

    /// Makes this process take `1 / replicas` of the connector's declared rate and burst
    /// (each of `replicas` live `idem serve` processes does the same), so the vendor sees
    /// at most the declared rate across the deployment. Called when membership changes.
    pub fn share_among(&self, replicas: u32) {
        if let Ok(mut limiter) = self.limiter.write() {
            *limiter = limiter_for(&self.connector, replicas.max(1));
        }
    }

    /// Sends a request built by `build` (called once per attempt), retrying connect
    /// errors, timeouts, 429 and 5xx with exponential backoff and jitter, waiting at least
    /// what `Retry-After` asks. Redirects are followed here, hop by hop: credentials go
    /// only to `base_url`'s origin (see [`crate::connector::CrossHost`]). The body is read
    /// up to `http.max_response_bytes`. Errors and logs name the URL redacted.
    pub async fn send(
        &self,
        method: Method,
        url: &str,
        query: &[(String, String)],
        body: Option<&Value>,
    ) -> Result<Fetched, HttpError> {
        self.send_with_headers(method, url, query, body, &BTreeMap::new())
            .await
    }

    /// [`Self::send`] with a stream's own headers (a partition's account header), which
    /// go where the connector's headers go: only to `base_url`'s origin.
    pub async fn send_with_headers(
        &self,
        method: Method,
        url: &str,
        query: &[(String, String)],
        body: Option<&Value>,
        stream_headers: &BTreeMap<String, String>,
    ) -> Result<Fetched, HttpError> {
        let mut method = method;
        let mut body = body;
        let mut url = url.to_string();
        let mut query = query;
        let mut what = "the URL";
        let mut redirects = 0;
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
            let method_name = match method {
                Method::Get => "GET",
                Method::Post => "POST",
            };
            let credentials = self.may_carry_credentials(&url);
            if !credentials {
                // A link or Location built by the vendor may repeat the API key: it is
                // taken out, and a URL still holding a credential is never sent.
                url = self.strip_key_param(&url);
            }
            let full_url = shown_url(&url, query);
            let shown_url = crate::redact::url(&full_url);
            if !credentials
                && http.cross_host == CrossHost::WithoutCredentials
                && crate::redact::contains_secret(&full_url)
            {
                return Err(HttpError::Redirect {
                    method: method_name,
                    url: shown_url,
                    reason: format!(
                        "{what} points at another host than base_url and still carries a credential; refused"
                    ),
                });
            }
            if !credentials && http.cross_host == CrossHost::Refuse {
                return Err(HttpError::CrossHost {
                    method: method_name,
                    url: shown_url,
                    base: crate::redact::url(&self.connector.base_url),
                    what,
                });
            }
            let limiter = self.limiter.read().map(|l| l.clone()).unwrap_or(None);
            if let Some(limiter) = limiter {
                limiter.until_ready().await;
            }
            attempts += 1;
            let request = self
                .build(method, &url, query, body, credentials, stream_headers)
                .await?;
            let (failure, retry_after) = match request.send().await {
                Ok(mut response) => {
                    let status = response.status();
                    if status.is_redirection() && status != StatusCode::NOT_MODIFIED {
                        redirects += 1;
                        let target = response
                            .headers()
                            .get(LOCATION)
                            .and_then(|v| v.to_str().ok())
                            .and_then(|location| url::Url::parse(&url).ok()?.join(location).ok());
                        let redirect_error = |reason: String| HttpError::Redirect {
                            method: method_name,
                            url: shown_url.clone(),
                            reason,
                        };
                        let Some(target) = target else {
                            return Err(redirect_error(format!(
                                "HTTP {status} without a usable Location"
                            )));
                        };
                        if redirects > MAX_REDIRECTS {
                            return Err(redirect_error(format!(
                                "more than {MAX_REDIRECTS} redirects"
                            )));
                        }
                        if matches!(status.as_u16(), 301..=303) && method == Method::Post {
                            method = Method::Get;
                            body = None;
                        }
                        url = target.to_string();
                        // The Location is the whole URL; the API key (if any) is added
                        // again by `build` when the target may see it.
                        query = &[];
                        what = "a redirect";
                        attempts -= 1;
                        continue;
                    }
                    let headers = response.headers().clone();
                    if status.is_success() {
                        match read_capped(&mut response, http.max_response_bytes).await {
                            Ok(Some(bytes)) => {
                                return Ok(Fetched {
                                    headers,
                                    body: bytes,
                                });
                            }
                            Ok(None) => {
                                return Err(HttpError::TooLarge {
                                    method: method_name,
                                    url: shown_url,
                                    limit: http.max_response_bytes,
                                });
                            }
                            Err(err) => (transport(method_name, &shown_url, err, attempts), None),
                        }
                    } else {
                        let bytes = read_prefix(&mut response, ERROR_BODY_READ_LIMIT).await;
                        let body_text = quote_vendor(&bytes);
                        let error = HttpError::Status {
                            method: method_name,
                            url: shown_url.clone(),
                            status: status.as_u16(),
                            body: body_text,
                            attempts,
                            gave_up: false,
                        };
                        if status == StatusCode::UNAUTHORIZED
                            && matches!(self.connector.auth, Some(Auth::Oauth2 { .. }))
                            && credentials
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
                return Err(failure.given_up());
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
            tracing::warn!(
                url = %shown_url,
                attempt = attempts,
                wait_ms = wait.as_millis() as u64,
                error = %failure,
                "attempt {attempts} of {}, retrying in {:.1}s",
                http.max_attempts.max(1),
                wait.as_secs_f64()
            );
            tokio::time::sleep(wait).await;
        }
    }

    /// True when `url` is on `base_url`'s origin (scheme, host and port), the only place
    /// idem's credentials and configured headers go.
    pub fn may_carry_credentials(&self, url: &str) -> bool {
        let Some(origin) = &self.origin else {
            return false;
        };
        url::Url::parse(url).is_ok_and(|url| url.origin() == *origin)
    }

    /// A `next` link or `Link` target as it is kept in a checkpoint and shown: the
    /// connector's API-key parameter removed (it is added again when the link is fetched
    /// from `base_url`'s host) and any other known secret value masked. The vendor's own
    /// parameters stay as they are, even when named like secrets (`token=`, `key=`), so the
    /// link still fetches the next page.
    pub fn clean_link(&self, link: &str) -> String {
        crate::redact::mask_known(&self.strip_key_param(link)).replace('\0', "")
    }

    /// `link` without the connector's API-key query parameter.
    fn strip_key_param(&self, link: &str) -> String {
        let param = match &self.connector.auth {
            Some(Auth::QueryKey { param, .. }) => Some(param.as_str()),
            _ => None,
        };
        match (param, url::Url::parse(link)) {
            (Some(param), Ok(mut parsed)) if parsed.query_pairs().any(|(k, _)| k == param) => {
                let kept: Vec<(String, String)> = parsed
                    .query_pairs()
                    .filter(|(k, _)| k != param)
                    .map(|(k, v)| (k.into_owned(), v.into_owned()))
                    .collect();
                if kept.is_empty() {
                    parsed.set_query(None);
                } else {
                    parsed.query_pairs_mut().clear().extend_pairs(kept);
                }
                parsed.to_string()
            }
            _ => link.to_string(),
        }
    }

    async fn build(
        &self,
        method: Method,
        url: &str,
        query: &[(String, String)],
        body: Option<&Value>,
        credentials: bool,
        stream_headers: &BTreeMap<String, String>,
    ) -> Result<reqwest::RequestBuilder, HttpError> {
        let mut request = match method {
            Method::Get => self.client.get(url),
            Method::Post => self.client.post(url),
        };
        let mut query: Vec<(&str, &str)> = query
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        if !credentials {
            if !query.is_empty() {
                request = request.query(&query);
            }
            if let Some(body) = body {
                request = request.json(body);
            }
            return Ok(request);
        }
        for (name, value) in &self.connector.headers {
            request = request.header(name, value.expose());
        }
        for (name, value) in stream_headers {
            request = request.header(name, value);
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
        let mut form = vec![
            ("grant_type", "client_credentials"),
            ("client_id", client_id.as_str()),
            ("client_secret", client_secret.expose()),
        ];
        if let Some(scope) = scope {
            form.push(("scope", scope));
        }
        let token_url_shown = crate::redact::url(token_url);
        let token_error = |reason: String| HttpError::Token {
            url: token_url_shown.clone(),
            reason: crate::redact::vendor_text(&reason),
        };
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
        // An issued token is a credential like the configured ones.
        crate::redact::register(&token);
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
        crate::redact::vendor_text(&text.replace(url, "<url>"))
    };
    HttpError::Transport {
        method,
        url: url.to_string(),
        reason,
        attempts,
        gave_up: false,
    }
}

impl HttpError {
    /// The same error, marked as the last of all allowed attempts.
    fn given_up(mut self) -> Self {
        if let HttpError::Status {
            gave_up, attempts, ..
        }
        | HttpError::Transport {
            gave_up, attempts, ..
        } = &mut self
        {
            *gave_up = *attempts > 1;
        }
        self
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

/// The body, or `None` when it is longer than `limit` (checked against `Content-Length`
/// first, then while it streams in, so a huge body is never held).
async fn read_capped(
    response: &mut reqwest::Response,
    limit: u64,
) -> Result<Option<Vec<u8>>, reqwest::Error> {
    if response
        .content_length()
        .is_some_and(|length| length > limit)
    {
        return Ok(None);
    }
    let expected = response.content_length().unwrap_or(64 * 1024).min(limit);
    let mut body = Vec::with_capacity(expected as usize);
    while let Some(chunk) = response.chunk().await? {
        if (body.len() + chunk.len()) as u64 > limit {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body))
}

/// The first `limit` bytes or so of an error body; the rest is never downloaded.
async fn read_prefix(response: &mut reqwest::Response, limit: usize) -> Vec<u8> {
    let mut body = Vec::new();
    while body.len() < limit {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            _ => break,
        }
    }
    body
}

/// The start of a vendor's body, for an error: redacted before it is cut, so a secret
/// straddling the cut cannot leave its first half behind.
fn quote_vendor(bytes: &[u8]) -> String {
    let head = &bytes[..bytes.len().min(ERROR_BODY_READ_LIMIT)];
    let mut text = truncate(&crate::redact::vendor_text(&String::from_utf8_lossy(head)));
    if bytes.len() > head.len() && !text.ends_with(" bytes)") {
        text.push_str(&format!(" … ({} bytes)", bytes.len()));
    }
    text
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_links_lose_the_api_key_but_keep_the_vendors_own_parameters() {
        let text = "source_system = \"links\"\nbase_url = \"https://api.vendor.test\"\n[auth]\nkind = \"api_key\"\nquery_param = \"api_key\"\nvalue = \"${KEY}\"\n[streams.items]\npath = \"/items\"\nid = \"/id\"\ntable = \"items\"\n";
        let env = |name: &str| (name == "KEY").then(|| "k3y_links_SECRET".to_string());
        let connector =
            crate::connector::parse(std::path::Path::new("links.toml"), text, &env).unwrap();
        let client = VendorClient::new(connector);
        assert_eq!(
            client.clean_link(
                "https://api.vendor.test/items?token=c9&api_key=k3y_links_SECRET&key=7"
            ),
            "https://api.vendor.test/items?token=c9&key=7"
        );
        assert_eq!(
            client.clean_link("https://api.vendor.test/items?api_key=k3y_links_SECRET"),
            "https://api.vendor.test/items"
        );
        assert_eq!(
            client.clean_link("https://api.vendor.test/items?sig=k3y_links_SECRET"),
            "https://api.vendor.test/items?sig=***"
        );
        assert!(client.may_carry_credentials("https://api.vendor.test/items?page=2"));
        assert!(client.may_carry_credentials("https://API.vendor.test:443/x"));
        assert!(!client.may_carry_credentials("http://api.vendor.test/items"));
        assert!(!client.may_carry_credentials("https://api.vendor.test:8443/items"));
        assert!(!client.may_carry_credentials("https://api.vendor.test@evil.test/items"));
    }

    #[test]
    fn errors_say_gave_up_only_when_every_attempt_was_made() {
        let error = |attempts| HttpError::Transport {
            method: "GET",
            url: "http://vendor/v1/invoices".into(),
            reason: "could not connect".into(),
            attempts,
            gave_up: false,
        };
        assert_eq!(
            error(1).to_string(),
            "GET http://vendor/v1/invoices: could not connect"
        );
        assert_eq!(
            error(1).given_up().to_string(),
            "GET http://vendor/v1/invoices: could not connect"
        );
        assert_eq!(
            error(3).to_string(),
            "GET http://vendor/v1/invoices: could not connect (attempt 3)"
        );
        assert_eq!(
            error(5).given_up().to_string(),
            "GET http://vendor/v1/invoices: could not connect (gave up after 5 attempts)"
        );
    }

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
