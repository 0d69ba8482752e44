//! The HubSpot-shaped contacts: `POST /crm/v3/objects/contacts/search` (filter groups,
//! sorts, `after` offsets capped at 10,000) and `GET /crm/v3/objects/contacts`.

use std::cmp::Ordering;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Query, State as AxState};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde_json::{Value, json};

use super::{DupExt, Q, Reject, Res, Shared, lock, num, page_of};
use crate::data::parse_ms;

/// Orders contacts by numeric id (ids are decimal strings).
pub(crate) fn contact_order(a: &Value, b: &Value) -> Ordering {
    let id = |v: &Value| v["id"].as_str().map(|s| (s.len(), s.to_owned()));
    id(a).cmp(&id(b))
}

pub(super) fn hs_error(message: impl Into<String>) -> Reject {
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
pub(super) enum Key {
    Num(i64),
    Str(String),
}

pub(super) fn prop_key(c: &Value, prop: &str) -> Option<Key> {
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

pub(super) fn filter_key(v: &Value) -> Key {
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

pub(super) struct Filter {
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

pub(super) fn parse_filter_groups(body: &Value) -> Res<Vec<Vec<Filter>>> {
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
pub(super) const SEARCH_CAP: usize = 10_000;

/// `POST /crm/v3/objects/contacts/search`: HubSpot search with filters, one sort,
/// offset-style `after`, and the 10,000-result cap. As at HubSpot, `after` is a position
/// in the result sorted now (by the sort property, then id): a contact edited between two
/// pages moves to the end and every later one shifts down a place.
pub(super) async fn contacts_search(AxState(st): AxState<Shared>, dup: DupExt, body: Bytes) -> Res {
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
    let (results, has_more) = page_of(&refs, after, limit, dup.is_some(), Value::clone);
    let mut out = json!({"total": refs.len(), "results": results});
    if has_more {
        out["paging"] = json!({"next": {"after": (after + limit).to_string()}});
    }
    Ok(Json(out))
}

/// `GET /crm/v3/objects/contacts`: id order; `after` is the last id seen.
pub(super) async fn contacts_list(AxState(st): AxState<Shared>, Query(q): Q, dup: DupExt) -> Res {
    let limit = num(&q, "limit", 10)?.clamp(1, 100);
    let after = num(&q, "after", 0)?;
    let s = lock(&st);
    let mut all: Vec<&Value> = s.data.contacts.values().collect();
    all.sort_by(|a, b| contact_order(a, b));
    let id_num = |c: &Value| c["id"].as_str().and_then(|s| s.parse::<usize>().ok());
    let start = all.partition_point(|c| id_num(c).is_some_and(|n| n <= after));
    let (results, has_more) = page_of(&all, start, limit, dup.is_some(), Value::clone);
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
