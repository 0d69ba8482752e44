//! The fetcher task: fetches pages one after another ahead of the writer, restarting
//! capped or position-paged queries from the largest `updated_at` read.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio::sync::mpsc;
use tracing::info;

use crate::connector::{Page, PageRequest, Source, SourceError};
use crate::record::{Pointers, Record};

/// Fetches pages one after another and hands them to the writer. A vendor that caps the
/// results of one query gets the query restarted from the largest `updated_at` read.
///
/// With `keyset` (a sorted stream paged by position, like HubSpot search's `after`
/// offset) every page restarts the query from the page's largest `updated_at` instead of
/// following the position: a record edited during the walk moves to the end of the sort
/// and shifts the later ones down, which makes a position skip one. Records at that
/// instant are read again, as no-ops. When a whole page shares one instant the query pages
/// within it by position; a record of that tie seen again later with a newer time moved
/// while we paged, so the tie is read again from its start.
pub(super) async fn fetch_pages<S: Source>(
    mut source: S,
    mut request: PageRequest,
    query_cap: Option<u64>,
    mut results_in_query: u64,
    updated: Option<(String, crate::connector::TimeFormat)>,
    keyset: Option<String>,
    pages: mpsc::Sender<FetcherMessage>,
) {
    let mut max_updated: Option<DateTime<Utc>> = None;
    let mut page_number = 0;
    // The instants whose records were paged by position in this walk, and the ids read
    // in each: a tie's record may move to the end of the sort any time until the walk ends.
    let mut ties: Vec<(DateTime<Utc>, HashSet<String>)> = Vec::new();
    // What the fetcher reads of a record, in one pass over it: its time, and its id in a
    // keyset walk.
    let keys = Pointers::new(
        updated
            .iter()
            .map(|(pointer, _)| pointer.as_str())
            .chain(keyset.as_deref()),
    );
    let read = |record: &Record| -> (Option<DateTime<Utc>>, Option<String>) {
        let mut values = record.values_at(&keys).into_iter();
        let time = updated.as_ref().and_then(|(_, format)| {
            values
                .next()
                .flatten()
                .and_then(|v| crate::normalize::parse_time(&v, format).ok())
        });
        let id = keyset
            .as_ref()
            .and_then(|_| values.next().flatten())
            .as_ref()
            .and_then(id_text);
        (time, id)
    };
    loop {
        page_number += 1;
        crate::failpoint::panic_point("fetch_page", page_number);
        let result = source.fetch_page(&request).await;
        let page = match result {
            Ok(page) => page,
            Err(err) => {
                let _ = pages.send(FetcherMessage::Page(Err(err))).await;
                return;
            }
        };
        let token = request.token.clone();
        let page_len = page.records.len() as u64;
        results_in_query += page_len;
        // Only a capped query restarts from the largest time, and only a keyset walk pages
        // by it: otherwise the records are not read here (the writer reads them once).
        let read_page: Vec<(Option<DateTime<Utc>>, Option<String>)> =
            if query_cap.is_some() || keyset.is_some() {
                page.records.iter().map(read).collect()
            } else {
                Vec::new()
            };
        let page_max = read_page.iter().filter_map(|(time, _)| *time).max();
        max_updated = max_updated.max(page_max);
        // A record of a tie paged by position seen again with a newer time moved while we
        // paged; a record after it may have slid into a position already read.
        let moved = ties
            .iter()
            .filter(|(at, ids)| {
                read_page.iter().any(|(time, id)| {
                    time.is_some_and(|t| t > *at) && id.as_ref().is_some_and(|id| ids.contains(id))
                })
            })
            .map(|(at, _)| *at)
            .min();
        let next = match (&keyset, page.next.clone()) {
            (Some(_), None) if moved.is_none() => None,
            (None, None) => None,
            (Some(_), next) => {
                let next = next.unwrap_or_default();
                match moved {
                    Some(at) => {
                        info!(tie = %at, "a record of a tie paged by position moved while we walked: reading the tie again");
                        ties.retain(|(other, _)| *other < at);
                        results_in_query = 0;
                        Some(PageRequest {
                            token: None,
                            from: Some(at),
                            to: request.to,
                        })
                    }
                    None if page_max.is_some() && page_max > request.from => {
                        results_in_query = 0;
                        Some(PageRequest {
                            token: None,
                            from: page_max,
                            to: request.to,
                        })
                    }
                    None => {
                        // The whole page is one instant: restarting from it would return
                        // this page again, so page within it by position.
                        let at = request.from.or(page_max).unwrap_or_default();
                        if ties.last().is_none_or(|(last, _)| *last != at) {
                            ties.push((at, HashSet::new()));
                        }
                        if let Some((_, ids)) = ties.last_mut() {
                            ids.extend(read_page.iter().filter_map(|(_, id)| id.clone()));
                        }
                        if query_cap.is_some_and(|cap| results_in_query + page_len > cap) {
                            let _ = pages
                                .send(FetcherMessage::Page(Err(SourceError::TieBeyondCap {
                                    at: at.to_rfc3339(),
                                    cap: query_cap.unwrap_or_default(),
                                })))
                                .await;
                            return;
                        }
                        Some(PageRequest {
                            token: Some(next),
                            ..request.clone()
                        })
                    }
                }
            }
            (None, Some(next)) => {
                let capped = query_cap.is_some_and(|cap| results_in_query + page_len > cap);
                Some(if capped && max_updated.is_some() {
                    info!(results_in_query, restart_from = ?max_updated, "the vendor caps results per query: restarting the query from the largest updated_at read");
                    results_in_query = 0;
                    PageRequest {
                        token: None,
                        from: max_updated,
                        to: request.to,
                    }
                } else {
                    PageRequest {
                        token: Some(next),
                        ..request.clone()
                    }
                })
            }
        };
        let fetched = Fetched {
            token,
            page,
            next: next.clone(),
            results_in_query,
        };
        if pages.send(FetcherMessage::Page(Ok(fetched))).await.is_err() {
            return;
        }
        match next {
            Some(next) => request = next,
            None => {
                let _ = pages.send(FetcherMessage::Done).await;
                return;
            }
        }
    }
}

/// What the fetcher hands the writer: a page (or the error that ended the walk), then
/// `Done` once the last page has been handed on.
pub(super) enum FetcherMessage {
    Page(Result<Fetched, SourceError>),
    Done,
}

/// An id as text, whether the vendor sends a string or a number.
pub(super) fn id_text(value: &Value) -> Option<String> {
    match value {
        Value::String(text) => Some(text.clone()),
        Value::Number(number) => Some(number.to_string()),
        _ => None,
    }
}

/// One fetched page, with the request that fetches the page after it.
pub(super) struct Fetched {
    pub(super) token: Option<String>,
    pub(super) page: Page,
    pub(super) next: Option<PageRequest>,
    pub(super) results_in_query: u64,
}
