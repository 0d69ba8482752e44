//! `GET /paged/{next_url,link,page,offset,stuck}`: one endpoint per generic pagination
//! kind over the invoices.

use std::collections::HashMap;

use axum::Json;
use axum::extract::{Query, State as AxState};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::data::bulk::InvoiceFilter;
use crate::data::list::InvRef;

use super::{DupExt, Q, Res, Shared, lock, num, page_of};

fn owned(inv: InvRef<'_>) -> Value {
    inv.value().into_owned()
}

pub(super) fn per_page(q: &HashMap<String, String>) -> Res<usize> {
    Ok(num(q, "per_page", 10)?.clamp(1, 1000))
}

/// `GET /paged/next_url?per_page=N[&after=ID]`: `{"items", "next": absolute URL | null}`.
pub(super) async fn paged_next_url(AxState(st): AxState<Shared>, Query(q): Q, dup: DupExt) -> Res {
    let pp = per_page(&q)?;
    let s = lock(&st);
    let after = q.get("after").map(String::as_str);
    let mut it = s.data.invoice_list(after, InvoiceFilter::default());
    let mut items: Vec<Value> = it.by_ref().take(pp).map(owned).collect();
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
        (Some(_), Some(a)) => s.data.invoice_at_or_before(a, InvoiceFilter::default()),
        _ => None,
    };
    if let Some(prev) = prev {
        items.insert(0, owned(prev));
    }
    Ok(Json(json!({"items": items, "next": next})))
}

/// `GET /paged/link?per_page=N&page=P`: `{"items"}` plus an RFC 8288 `Link: rel="next"`.
pub(super) async fn paged_link(
    AxState(st): AxState<Shared>,
    Query(q): Q,
    dup: DupExt,
) -> Res<Response> {
    let pp = per_page(&q)?;
    let page = num(&q, "page", 1)?.max(1);
    let s = lock(&st);
    let all: Vec<InvRef<'_>> = s.data.all_invoices().collect();
    let (items, more) = page_of(
        &all,
        (page - 1).saturating_mul(pp),
        pp,
        dup.is_some(),
        owned,
    );
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
pub(super) async fn paged_page(AxState(st): AxState<Shared>, Query(q): Q, dup: DupExt) -> Res {
    let pp = per_page(&q)?;
    let page = num(&q, "page", 1)?.max(1);
    let s = lock(&st);
    let all: Vec<InvRef<'_>> = s.data.all_invoices().collect();
    let (items, _) = page_of(
        &all,
        (page - 1).saturating_mul(pp),
        pp,
        dup.is_some(),
        owned,
    );
    Ok(Json(json!({"items": items})))
}

/// `GET /paged/offset?offset=O&limit=L`: `{"items", "total"}`.
pub(super) async fn paged_offset(AxState(st): AxState<Shared>, Query(q): Q, dup: DupExt) -> Res {
    let offset = num(&q, "offset", 0)?;
    let limit = num(&q, "limit", 10)?.clamp(1, 1000);
    let s = lock(&st);
    let all: Vec<InvRef<'_>> = s.data.all_invoices().collect();
    let (items, _) = page_of(&all, offset, limit, dup.is_some(), owned);
    Ok(Json(json!({"items": items, "total": all.len()})))
}

/// `GET /paged/stuck`: always the same first page and `"next_cursor": "abc"`.
pub(super) async fn paged_stuck(AxState(st): AxState<Shared>, Query(q): Q) -> Res {
    let pp = per_page(&q)?;
    let s = lock(&st);
    let items: Vec<Value> = s.data.all_invoices().take(pp).map(owned).collect();
    Ok(Json(json!({"items": items, "next_cursor": "abc"})))
}
