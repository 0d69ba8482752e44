//! [`HttpSource`], the declarative connector's [`Source`]: one stream's endpoint, its
//! query (params, incremental bound, replay window) and its pagination, turned
//! into page requests that the vendor client (`super`) sends.

use std::collections::HashSet;
use std::sync::Arc;

use serde_json::Value;

use super::{Fetched, VendorClient, quote_vendor, shown_url};
use crate::connector::{
    IncrementalSpec, Method, Page, PageRequest, PaginationSpec, Source, SourceError, StreamSpec,
    TimeFormat,
};
use crate::paginate::{self, ResponseView};
use crate::record::{Record, RecordsFound};

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
        let shown = crate::redact::url(&shown_url(&url, &query));
        let Fetched { headers, body } = self
            .client
            .send_with_headers(
                self.stream.method,
                &url,
                &query,
                body.as_ref(),
                &self.stream.headers,
            )
            .await?;
        let malformed = |reason: String| SourceError::Malformed {
            url: shown.clone(),
            reason: crate::redact::vendor_text(&reason),
        };
        // The records stay text, each parsed only if it must be (see `crate::record`). A
        // lone surrogate or an out-of-range number fails its record, not the page.
        let split = crate::record::split_body(&body, &self.stream.records).map_err(|err| {
            malformed(format!(
                "the body is not JSON ({err}): {}",
                quote_vendor(&body)
            ))
        })?;
        // Peak memory for a page is its bytes plus its records' texts; the bytes go first.
        drop(body);
        let mut records = match split.records {
            RecordsFound::Array(records) => records,
            RecordsFound::Other(kind) => {
                return Err(malformed(format!(
                    "records pointer '{}' points at {kind}, not an array",
                    self.stream.records,
                )));
            }
            RecordsFound::Missing => {
                return Err(malformed(format!(
                    "records pointer '{}' points at nothing",
                    self.stream.records
                )));
            }
        };
        let link = headers
            .get(reqwest::header::LINK)
            .and_then(|v| v.to_str().ok());
        let next = paginate::next_token(
            &self.stream.pagination,
            &self.stream.id,
            &ResponseView {
                body: &split.body,
                link_header: link,
                records: &records,
                token: request.token.as_deref(),
            },
        )
        .map_err(malformed)?;
        // A next link may repeat the API key: it is kept, logged and shown without it.
        let next = match self.stream.pagination {
            PaginationSpec::NextUrl { .. } | PaginationSpec::LinkHeader => {
                next.map(|link| self.client.clean_link(&link))
            }
            _ => next,
        };
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
                            .as_ref()
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
                    cursor: crate::redact::vendor_text(token),
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
                if let Some(inner) = item.pointer(pointer) {
                    *item = Record::from_value(&inner);
                }
            }
        }
        let vendor_time = headers
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
