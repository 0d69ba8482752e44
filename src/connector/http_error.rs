//! Why a vendor request failed for good: the error every [`Source`](super::Source) built
//! on HTTP returns inside [`SourceError`](super::SourceError). It lives beside the
//! `Source` trait so the trait's error type depends on nothing above the connector; the
//! HTTP client (`http`) produces it.

use std::time::Duration;

/// A request that failed for good. The URL never carries secrets (the API key query
/// parameter is added after the URL shown here is taken).
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("{method} {url}: HTTP {status}: {body}{}", tries(*attempts, *gave_up))]
    Status {
        method: &'static str,
        url: String,
        status: u16,
        body: String,
        attempts: u32,
        /// Every attempt allowed was made (not set on a failure that is not retried).
        gave_up: bool,
    },
    #[error("{method} {url}: {reason}{}", tries(*attempts, *gave_up))]
    Transport {
        method: &'static str,
        url: String,
        reason: String,
        attempts: u32,
        /// Every attempt allowed was made (not set on a failure that is not retried).
        gave_up: bool,
    },
    #[error("{method} {url}: the vendor asked to retry after {wait:?}, longer than idem waits")]
    RetryAfterTooLong {
        method: &'static str,
        url: String,
        wait: Duration,
    },
    #[error("OAuth2 token request to {url} failed: {reason}")]
    Token { url: String, reason: String },
    #[error(
        "{method} {url}: the response is larger than the connector's http.max_response_bytes ({limit} bytes); raise the limit if the vendor really sends pages this big"
    )]
    TooLarge {
        method: &'static str,
        url: String,
        limit: u64,
    },
    #[error(
        "{method} {url}: {what} points at another host than base_url ({base}); refused, so no credential leaves the vendor's host (set http.cross_host = \"without_credentials\" to follow such links without credentials)"
    )]
    CrossHost {
        method: &'static str,
        url: String,
        base: String,
        what: &'static str,
    },
    #[error("{method} {url}: {reason}")]
    Redirect {
        method: &'static str,
        url: String,
        reason: String,
    },
}

/// How an error's attempts read: nothing for a first-attempt failure that is not
/// retried, "gave up" only when every attempt was made.
fn tries(attempts: u32, gave_up: bool) -> String {
    match (attempts, gave_up) {
        (_, true) => format!(" (gave up after {attempts} attempts)"),
        (1, false) => String::new(),
        (_, false) => format!(" (attempt {attempts})"),
    }
}
