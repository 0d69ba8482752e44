//! The connected accounts' charges (Stripe Connect), a record set per account, served by
//! `server::accounts` for partitioned streams.

use std::collections::BTreeMap;

use serde_json::{Value, json};

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

#[cfg(test)]
mod tests {
    use crate::FakeVendor;
    use serde_json::Value;

    async fn charges(v: &FakeVendor, account: Option<&str>, query: &str) -> (u16, Value) {
        let mut request =
            reqwest::Client::new().get(format!("{}/v1/charges?{query}", v.base_url()));
        if let Some(account) = account {
            request = request.header("Stripe-Account", account);
        }
        let resp = request.send().await.expect("request");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    fn ids(list: &Value) -> Vec<&str> {
        list["data"]
            .as_array()
            .expect("data")
            .iter()
            .map(|c| c["id"].as_str().unwrap())
            .collect()
    }

    #[tokio::test]
    async fn each_account_sees_its_own_charges_page_by_page() {
        let v = FakeVendor::start().await;
        v.seed_charges("acct_a", 3);
        v.seed_charges("acct_b", 2);
        let (status, first) = charges(&v, Some("acct_a"), "limit=2").await;
        assert_eq!(status, 200);
        assert_eq!(ids(&first), ["ch_000001", "ch_000002"]);
        assert_eq!(first["has_more"], true);
        let (_, rest) = charges(&v, Some("acct_a"), "limit=2&starting_after=ch_000002").await;
        assert_eq!(ids(&rest), ["ch_000003"]);
        assert_eq!(rest["has_more"], false);
        let (_, b) = charges(&v, Some("acct_b"), "").await;
        assert_eq!(ids(&b), ["ch_000004", "ch_000005"]);

        // A change is stamped with the clock and found by `updated[gte]`.
        v.set_clock(crate::DEFAULT_CLOCK + 100);
        assert!(v.update_charge("acct_b", "ch_000005", |c| c["status"] = "refunded".into()));
        assert!(!v.update_charge("acct_a", "ch_000005", |_| {}));
        let since = crate::DEFAULT_CLOCK + 100;
        let (_, changed) = charges(&v, Some("acct_b"), &format!("updated[gte]={since}")).await;
        assert_eq!(ids(&changed), ["ch_000005"]);

        assert_eq!(charges(&v, None, "").await.0, 400);
        assert_eq!(charges(&v, Some("acct_zz"), "").await.0, 404);
    }
}
