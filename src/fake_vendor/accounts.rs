//! The fake vendor's multi-account endpoint: `GET /v1/charges` answers a different record
//! set per `Stripe-Account` header (Stripe Connect), for partitioned streams.

use std::collections::BTreeMap;
use std::ops::Bound;

use axum::extract::{Query, State as AxState};
use axum::http::HeaderMap;
use serde_json::{Value, json};

use super::server::{Res, Shared, bad_request, int, lock, num, stripe_list};

/// Charges per connected account. Ids are unique across accounts, as Stripe's are.
#[derive(Debug, Default)]
pub struct Accounts {
    /// Account id ("acct_...") → charge id → charge; the map order is the list order.
    pub charges: BTreeMap<String, BTreeMap<String, Value>>,
    next_charge: usize,
}

impl Accounts {
    /// Adds `n` charges to `account` (creating the account, even with `n = 0`), each
    /// `created` and `updated` at `clock` minus a few seconds.
    pub fn seed(&mut self, account: &str, n: usize, clock: i64) {
        let charges = self.charges.entry(account.to_string()).or_default();
        for i in 0..n {
            self.next_charge += 1;
            let id = format!("ch_{:06}", self.next_charge);
            let at = clock - (n - i) as i64;
            charges.insert(
                id.clone(),
                json!({
                    "id": id, "object": "charge", "amount": 1000 + self.next_charge as i64,
                    "currency": "eur", "status": "succeeded", "created": at, "updated": at,
                }),
            );
        }
    }

    /// Applies `f` to charge `id` of `account` and stamps it `updated = clock` unless `f`
    /// changed `updated` itself. False when there is no such charge.
    pub fn update(
        &mut self,
        account: &str,
        id: &str,
        clock: i64,
        f: impl FnOnce(&mut Value),
    ) -> bool {
        let Some(charge) = self.charges.get_mut(account).and_then(|c| c.get_mut(id)) else {
            return false;
        };
        let before = charge["updated"].clone();
        f(charge);
        if charge["updated"] == before {
            charge["updated"] = json!(clock);
        }
        true
    }
}

/// `GET /v1/charges` for the account in `Stripe-Account`: ascending id, `limit`,
/// `starting_after`, `updated[gte]`. Without the header it answers 400 (the fake has no
/// platform account of its own), and 404 for an account it does not know.
pub(super) async fn charges(
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
        return Err(super::server::not_found_error(format!(
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
