//! The Stripe-shaped lists: `GET /v1/invoices`, `/v1/customers` and the newest-first
//! `/v1/events` feed.

use std::collections::HashMap;

use axum::extract::{Query, State as AxState};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use crate::data::bulk::InvoiceFilter;
use crate::data::list::InvRef;

use super::{DupExt, Q, Res, Shared, bad_request, int, lock, num, page_of, stripe_list};

/// `GET /v1/invoices`: ascending id, `limit`, `starting_after`, `updated[gte|gt|lt|lte]`,
/// `created[gte|lt]` (Stripe's own filter, used for backfills by creation windows).
pub(super) async fn invoices(
    AxState(st): AxState<Shared>,
    Query(q): Q,
    dup: DupExt,
) -> Res<Response> {
    let limit = num(&q, "limit", 10)?.clamp(1, 100);
    let filter = InvoiceFilter {
        created_gte: int(&q, "created[gte]")?,
        created_lt: int(&q, "created[lt]")?,
        updated_gte: int(&q, "updated[gte]")?,
        updated_gt: int(&q, "updated[gt]")?,
        updated_lt: int(&q, "updated[lt]")?,
        updated_lte: int(&q, "updated[lte]")?,
    };
    let s = lock(&st);
    let after = q.get("starting_after").map(String::as_str);
    let mut it = s.data.invoice_list(after, filter);
    let mut data: Vec<InvRef<'_>> = it.by_ref().take(limit).collect();
    let has_more = it.next().is_some();
    let prev = match (dup, after) {
        (Some(_), Some(id)) => s.data.invoice_at_or_before(id, filter),
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
        data: Vec<InvRef<'a>>,
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
pub(super) async fn customers(AxState(st): AxState<Shared>, Query(q): Q, dup: DupExt) -> Res {
    let limit = num(&q, "limit", 10)?.clamp(1, 100);
    let all = lock(&st).data.customers();
    let refs: Vec<&Value> = all.iter().collect();
    let start = match q.get("starting_after") {
        Some(id) => refs.partition_point(|c| c["id"].as_str().unwrap_or("") <= id.as_str()),
        None => 0,
    };
    let (data, has_more) = page_of(&refs, start, limit, dup.is_some(), Value::clone);
    Ok(stripe_list("/v1/customers", data, has_more))
}

pub(super) fn event_seq(q: &HashMap<String, String>, key: &str) -> Res<Option<usize>> {
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
pub(super) async fn events(AxState(st): AxState<Shared>, Query(q): Q, dup: DupExt) -> Res {
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
