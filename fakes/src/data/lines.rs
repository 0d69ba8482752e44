//! Invoice line items beyond the inline ten: long invoices and the helpers that edit an
//! invoice's lines (served by `server::lines`).

use serde_json::{Value, json};

use super::VendorData;

/// Stripe embeds at most this many lines in an invoice; the rest are behind `/lines`.
pub const INLINE_LINES: usize = 10;

impl VendorData {
    /// Every line of invoice `id`: the full list kept for long invoices, else the inline
    /// lines. `None` when the invoice does not exist.
    pub fn invoice_lines(&self, id: &str) -> Option<Vec<Value>> {
        let invoice = self.invoice(id)?;
        Some(match self.lines.get(id) {
            Some(all) => all.clone(),
            None => invoice["lines"]["data"]
                .as_array()
                .cloned()
                .unwrap_or_default(),
        })
    }

    /// Seeds `n` invoices carrying `lines` line items each (`lines` > 10 leaves
    /// `lines.has_more` true), after the existing invoices.
    pub fn seed_long_invoices(&mut self, n: usize, lines: usize) {
        for _ in 0..n {
            let number = self.invoice_count() + 1;
            // The id `insert_invoice` gives; the map's last key is not it once ids reach
            // seven digits ("in_1000001" sorts before "in_999999") or live in the bulk store.
            let id = format!("in_{:06}", self.next_invoice);
            self.insert_invoice(json!({
                "object": "invoice",
                "number": format!("INV-L{number:05}"),
                "customer": format!("cus_{:04}", number % 1000 + 1),
                "customer_email": format!("customer{:04}@example.com", number % 1000 + 1),
                "status": "open",
                "amount_due": 0,
                "currency": "usd",
                "due_date": null,
            }));
            let all = (0..lines).map(|j| line(&id, j)).collect();
            self.set_lines(&id, all);
        }
    }

    /// Replaces invoice `id`'s lines: the inline list, `has_more` and `amount_due` follow,
    /// and the invoice is updated (an `invoice.updated` event) as Stripe does.
    pub fn set_lines(&mut self, id: &str, all: Vec<Value>) -> bool {
        let inline: Vec<Value> = all.iter().take(INLINE_LINES).cloned().collect();
        let total: i64 = all.iter().filter_map(|l| l["amount"].as_i64()).sum();
        let has_more = all.len() > INLINE_LINES;
        let count = all.len();
        self.lines.insert(id.to_string(), all);
        self.update_invoice(id, |invoice| {
            invoice["amount_due"] = json!(total);
            invoice["lines"] = json!({
                "object": "list",
                "url": format!("/v1/invoices/{id}/lines"),
                "has_more": has_more,
                "total_count": count,
                "data": inline,
            });
        })
    }

    /// Adds a new line at the end of invoice `id`; returns its id.
    pub fn add_invoice_line(&mut self, id: &str) -> Option<String> {
        let mut all = self.invoice_lines(id)?;
        let next = all.len();
        let mut new = line(id, next);
        // Ids must stay unique after removals.
        while all.iter().any(|l| l["id"] == new["id"]) {
            new = line(id, next + 1000);
        }
        let line_id = new["id"].as_str().map(str::to_string);
        all.push(new);
        self.set_lines(id, all);
        line_id
    }

    /// Removes line `line_id` of invoice `id`; false when either is unknown.
    pub fn remove_invoice_line(&mut self, id: &str, line_id: &str) -> bool {
        let Some(mut all) = self.invoice_lines(id) else {
            return false;
        };
        let before = all.len();
        all.retain(|l| l["id"] != line_id);
        before != all.len() && self.set_lines(id, all)
    }
}

/// Line `j` of invoice `id`.
fn line(id: &str, j: usize) -> Value {
    let unit = 100 + (j as i64 % 7) * 50;
    let suffix = id.trim_start_matches("in_");
    json!({
        "id": format!("il_{suffix}_{j}"),
        "object": "line_item",
        "invoice": id,
        "description": format!("Usage line {j}"),
        "amount": unit,
        "currency": "usd",
        "quantity": 1,
        "unit_amount": unit,
    })
}
