//! The pagination kinds: given one response, the token of the next page (or none).
//!
//! A token is a string the HTTP source (`http::HttpSource`) knows how to turn back into a
//! request: a cursor value, a next-page URL, a page number or an offset. Tokens are also
//! what a checkpoint stores to resume mid-run, so they must be plain strings.

use serde_json::Value;

use crate::record::Record;

use crate::schema::connector::PaginationSpec;

/// What one response says about the next page.
pub struct ResponseView<'a> {
    /// The parsed body.
    pub body: &'a Value,
    /// The `Link` header, if any.
    pub link_header: Option<&'a str>,
    /// The records of this page (already selected).
    pub records: &'a [Record],
    /// The token that fetched this page.
    pub token: Option<&'a str>,
}

/// Tokens of a newest-first feed walked towards older records (replays only): `older:ID`
/// pages back from `ID` to find the feed's oldest page; `oldest:ID` fetches that page
/// again and continues towards newer records like any feed walk. An empty `ID` stands
/// for the newest page.
pub const FEED_OLDER: &str = "older:";
/// See [`FEED_OLDER`].
pub const FEED_OLDEST: &str = "oldest:";

/// Which way a feed token pages, and the cursor it carries.
pub enum FeedToken<'a> {
    /// Towards newer records (the connector's `param`).
    Newer(&'a str),
    /// Back towards older records, finding where the feed starts.
    Older(&'a str),
    /// The oldest page, from where the walk goes towards newer records.
    Oldest(&'a str),
}

impl<'a> FeedToken<'a> {
    pub fn parse(token: &'a str) -> FeedToken<'a> {
        if let Some(id) = token.strip_prefix(FEED_OLDER) {
            FeedToken::Older(id)
        } else if let Some(id) = token.strip_prefix(FEED_OLDEST) {
            FeedToken::Oldest(id)
        } else {
            FeedToken::Newer(token)
        }
    }
}

/// The next page's token, or `None` when the walk is complete. `Err` names what is off.
pub fn next_token(
    spec: &PaginationSpec,
    id_pointer: &str,
    view: &ResponseView<'_>,
) -> Result<Option<String>, String> {
    if view.records.is_empty() {
        return Ok(None);
    }
    match spec {
        PaginationSpec::None => Ok(None),
        PaginationSpec::BodyCursor { cursor, .. } => Ok(view.body.pointer(cursor).and_then(scalar)),
        PaginationSpec::FirstRecord { field, .. } => {
            let pointer = field.as_deref().unwrap_or(id_pointer);
            let first = view.records.first().expect("records is not empty");
            first
                .pointer(pointer)
                .as_ref()
                .and_then(scalar)
                .map(Some)
                .ok_or_else(|| format!("the first record has no cursor value at '{pointer}'"))
        }
        PaginationSpec::LastRecord {
            field, has_more, ..
        } => {
            if let Some(flag) = has_more {
                match view.body.pointer(flag) {
                    Some(Value::Bool(false)) => return Ok(None),
                    Some(Value::Bool(true)) => {}
                    other => {
                        return Err(format!(
                            "has_more pointer '{flag}' should point at a boolean, found {}",
                            describe(other)
                        ));
                    }
                }
            }
            let pointer = field.as_deref().unwrap_or(id_pointer);
            let last = view.records.last().expect("records is not empty");
            last.pointer(pointer)
                .as_ref()
                .and_then(scalar)
                .map(Some)
                .ok_or_else(|| format!("the last record has no cursor value at '{pointer}'"))
        }
        PaginationSpec::NextUrl { pointer } => Ok(view.body.pointer(pointer).and_then(scalar)),
        PaginationSpec::LinkHeader => Ok(view.link_header.and_then(link_next)),
        PaginationSpec::PageNumber {
            start, page_size, ..
        } => {
            if page_size.is_some_and(|size| (view.records.len() as u64) < size) {
                return Ok(None);
            }
            let current = parse_number(view.token, *start)?;
            // A page number at u64::MAX has no successor: wrapping would restart the walk.
            let next = current
                .checked_add(1)
                .ok_or_else(|| format!("page number {current} has no next page number"))?;
            Ok(Some(next.to_string()))
        }
        PaginationSpec::Offset { limit, .. } => {
            if (view.records.len() as u64) < *limit {
                return Ok(None);
            }
            let current = parse_number(view.token, 0)?;
            let next = current
                .checked_add(view.records.len() as u64)
                .ok_or_else(|| format!("offset {current} has no next offset"))?;
            Ok(Some(next.to_string()))
        }
    }
}

fn parse_number(token: Option<&str>, default: u64) -> Result<u64, String> {
    token.map_or(Ok(default), |t| {
        t.parse()
            .map_err(|_| format!("page token '{t}' is not a number"))
    })
}

/// A non-empty string or number, as a token; null, "" and anything else end the walk.
fn scalar(value: &Value) -> Option<String> {
    match value {
        Value::String(text) if !text.is_empty() => Some(text.clone()),
        Value::Number(number) => Some(number.to_string()),
        _ => None,
    }
}

fn describe(value: Option<&Value>) -> String {
    match value {
        None => "nothing".into(),
        Some(value) => {
            let text = value.to_string();
            if text.len() > 40 {
                format!("{}…", crate::values::cut(&text, 40))
            } else {
                text
            }
        }
    }
}

/// The `rel="next"` target of an RFC 8288 `Link` header.
pub fn link_next(header: &str) -> Option<String> {
    header.split(',').find_map(|part| {
        let mut pieces = part.split(';');
        let target = pieces.next()?.trim();
        let target = target.strip_prefix('<')?.strip_suffix('>')?;
        pieces
            .any(|param| {
                let param = param.trim();
                param
                    .strip_prefix("rel=")
                    .map(|rel| {
                        rel.trim_matches('"')
                            .split_whitespace()
                            .any(|r| r == "next")
                    })
                    .unwrap_or(false)
            })
            .then(|| target.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn view<'a>(
        body: &'a Value,
        records: &'a [Record],
        token: Option<&'a str>,
    ) -> ResponseView<'a> {
        ResponseView {
            body,
            link_header: None,
            records,
            token,
        }
    }

    fn records(values: &[Value]) -> Vec<Record> {
        values.iter().map(Record::from_value).collect()
    }

    #[test]
    fn link_header_next_is_found_among_other_relations() {
        let header = r#"<https://api.example.com/items?page=1>; rel="prev", <https://api.example.com/items?page=3>; rel="next""#;
        assert_eq!(
            link_next(header).as_deref(),
            Some("https://api.example.com/items?page=3")
        );
        assert_eq!(link_next(r#"<https://x/y>; rel="last""#), None);
    }

    #[test]
    fn last_record_cursor_stops_when_has_more_is_false() {
        let spec = PaginationSpec::LastRecord {
            param: "starting_after".into(),
            field: None,
            has_more: Some("/has_more".into()),
        };
        let records = records(&[json!({"id": "in_1"}), json!({"id": "in_2"})]);
        let more = json!({"has_more": true});
        assert_eq!(
            next_token(&spec, "/id", &view(&more, &records, None))
                .unwrap()
                .as_deref(),
            Some("in_2")
        );
        let done = json!({"has_more": false});
        assert_eq!(
            next_token(&spec, "/id", &view(&done, &records, None)).unwrap(),
            None
        );
        let broken = json!({});
        assert!(next_token(&spec, "/id", &view(&broken, &records, None)).is_err());
    }

    #[test]
    fn first_record_cursor_walks_a_newest_first_feed_towards_newer_records() {
        let spec = PaginationSpec::FirstRecord {
            param: "ending_before".into(),
            field: None,
            backward_param: None,
        };
        // Stripe events: newest first, so the first record is the newest of the page.
        let records = records(&[json!({"id": "evt_9"}), json!({"id": "evt_8"})]);
        let more = json!({"has_more": true});
        assert_eq!(
            next_token(&spec, "/id", &view(&more, &records, Some("evt_7")))
                .unwrap()
                .as_deref(),
            Some("evt_9")
        );
        // has_more = false is not trusted: one more request keeps the newest cursor.
        let done = json!({"has_more": false});
        assert_eq!(
            next_token(&spec, "/id", &view(&done, &records, None))
                .unwrap()
                .as_deref(),
            Some("evt_9")
        );
        assert_eq!(
            next_token(&spec, "/id", &view(&more, &[], Some("evt_9"))).unwrap(),
            None
        );
    }

    #[test]
    fn page_and_offset_stop_on_short_or_empty_pages() {
        let page = PaginationSpec::PageNumber {
            param: "page".into(),
            start: 1,
            page_size: Some(2),
        };
        let full = records(&[json!({}), json!({})]);
        let body = json!({});
        assert_eq!(
            next_token(&page, "/id", &view(&body, &full, Some("3")))
                .unwrap()
                .as_deref(),
            Some("4")
        );
        assert_eq!(
            next_token(&page, "/id", &view(&body, &full[..1], Some("3"))).unwrap(),
            None
        );
        assert_eq!(
            next_token(&page, "/id", &view(&body, &[], None)).unwrap(),
            None
        );
        let offset = PaginationSpec::Offset {
            param: "offset".into(),
            limit_param: "limit".into(),
            limit: 2,
        };
        assert_eq!(
            next_token(&offset, "/id", &view(&body, &full, None))
                .unwrap()
                .as_deref(),
            Some("2")
        );
        assert_eq!(
            next_token(&offset, "/id", &view(&body, &full, Some("2")))
                .unwrap()
                .as_deref(),
            Some("4")
        );
    }

    #[test]
    fn body_cursor_ends_when_absent_or_null() {
        let spec = PaginationSpec::BodyCursor {
            cursor: "/paging/next/after".into(),
            param: "after".into(),
        };
        let records = records(&[json!({})]);
        let next = json!({"paging": {"next": {"after": "100"}}});
        assert_eq!(
            next_token(&spec, "/id", &view(&next, &records, None))
                .unwrap()
                .as_deref(),
            Some("100")
        );
        let last = json!({"results": []});
        assert_eq!(
            next_token(&spec, "/id", &view(&last, &records, None)).unwrap(),
            None
        );
    }
}
