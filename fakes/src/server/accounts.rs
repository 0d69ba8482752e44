//! `GET /v1/charges`: a different record set per `Stripe-Account` header (Stripe
//! Connect), for partitioned streams.

use std::ops::Bound;

use axum::extract::{Query, State as AxState};
use axum::http::HeaderMap;
use serde_json::Value;

use super::{Res, Shared, bad_request, int, lock, num, stripe_list};

/// `GET /v1/charges` for the account in `Stripe-Account`: ascending id, `limit`,
/// `starting_after`, `updated[gte]`. Without the header it answers 400 (the fake has no
/// platform account of its own), and 404 for an account it does not know.
pub(crate) async fn charges(
    AxState(st): AxState<Shared>,
    headers: HeaderMap,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> Res {
    let limit = num(&q, "limit", 10)?.clamp(1, 100);
    let gte = int(&q, "updated[gte]")?;
    let account = headers
        .get("stripe-account")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| bad_request("/v1/charges needs a Stripe-Account header"))?
        .to_string();
    let state = lock(&st);
    let Some(charges) = state.data.accounts.charges.get(&account) else {
        return Err(super::not_found_error(format!(
            "no such account: '{account}'"
        )));
    };
    let lower = match q.get("starting_after") {
        Some(id) => Bound::Excluded(id.clone()),
        None => Bound::Unbounded,
    };
    let mut it = charges
        .range((lower, Bound::Unbounded))
        .map(|(_, v)| v)
        .filter(|v| gte.is_none_or(|b| v["updated"].as_i64().unwrap_or(0) >= b));
    let data: Vec<Value> = it.by_ref().take(limit).cloned().collect();
    let has_more = it.next().is_some();
    Ok(stripe_list("/v1/charges", data, has_more))
}
