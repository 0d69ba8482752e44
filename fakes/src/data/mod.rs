//! The fake vendor's truth: invoices, contacts and the events feed, with deterministic seeding.

pub mod accounts;
pub(crate) mod bulk;
mod lines;
pub(crate) mod list;
mod seeded;

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, SecondsFormat};
use serde_json::{Value, json};

use list::InvRef;
use seeded::{seed_customer, seed_invoice};

/// The default vendor clock: 2026-11-20T00:00:00Z, in unix seconds.
pub const DEFAULT_CLOCK: i64 = 1_795_132_800;

const DAY: i64 = 86_400;

/// The vendor's records, mutable from tests through [`crate::FakeVendor::on_request`].
///
/// Mutating the maps directly is allowed: changed or new invoices still get an event in
/// the `/v1/events` feed when the change is made inside an `on_request` hook. The helper
/// methods ([`VendorData::update_invoice`], ...) also bump the "updated" timestamps.
///
/// Bulk-seeded invoices ([`crate::FakeVendor::seed_bulk_invoices`]) are not in
/// `invoices` until they change: the helpers move them there first, and an invoice a hook
/// inserts under a bulk id replaces the bulk one; but a hook reading or removing from the
/// map directly sees only the bulk invoices already moved.
pub struct VendorData {
    /// Invoices by id ("in_000001", ...); the map order is the API list order. Bulk
    /// invoices merge into that order from `bulk` (see `list.rs`).
    pub invoices: BTreeMap<String, Value>,
    /// HubSpot-shaped contacts by id ("1001", ...).
    pub contacts: BTreeMap<String, Value>,
    /// Charges of connected accounts, served by `GET /v1/charges` per `Stripe-Account`.
    pub accounts: accounts::Accounts,
    /// The full line list of invoices with more lines than they carry inline, by
    /// invoice id (see `lines.rs`); other invoices' lines are their inline ones.
    pub lines: BTreeMap<String, Vec<Value>>,
    pub(crate) events: Vec<Event>,
    pub(crate) clock: i64,
    pub(crate) bulk: Option<bulk::BulkInvoices>,
    next_invoice: usize,
    next_contact: usize,
}

/// One entry in the events feed; `seq` 1 is "evt_000001".
pub(crate) struct Event {
    pub(crate) kind: &'static str,
    pub(crate) created: i64,
    pub(crate) snapshot: Snapshot,
}

/// The invoice as it was when the event happened. Seeded invoices are regenerated on
/// demand instead of stored twice (benchmarks seed many).
pub(crate) enum Snapshot {
    Value(Value),
    Seeded(SeedPos),
}

#[derive(Clone, Copy)]
pub(crate) struct SeedPos {
    num: usize,
    pos: usize,
    n: usize,
    clock: i64,
}

impl Default for VendorData {
    fn default() -> Self {
        VendorData {
            invoices: BTreeMap::new(),
            contacts: BTreeMap::new(),
            accounts: Default::default(),
            lines: BTreeMap::new(),
            events: Vec::new(),
            clock: DEFAULT_CLOCK,
            bulk: None,
            next_invoice: 1,
            next_contact: 1,
        }
    }
}

impl VendorData {
    /// The vendor's "now" in unix seconds (see [`crate::FakeVendor::set_clock`]).
    pub fn now(&self) -> i64 {
        self.clock
    }

    /// Sets the vendor's "now" from inside a hook (see [`crate::FakeVendor::set_clock`]).
    pub fn set_clock(&mut self, unix_secs: i64) {
        self.clock = unix_secs;
    }

    /// Applies `f` to invoice `id`; bumps "updated" to now unless `f` changed it, and
    /// appends an `invoice.updated` event. Returns false when the id is unknown.
    pub fn update_invoice(&mut self, id: &str, f: impl FnOnce(&mut Value)) -> bool {
        let now = self.clock;
        self.materialize(id);
        let Some(inv) = self.invoices.get_mut(id) else {
            return false;
        };
        let before = inv.get("updated").cloned();
        f(inv);
        if inv.get("updated") == before.as_ref() {
            inv["updated"] = json!(now);
        }
        let snap = inv.clone();
        self.push_event("invoice.updated", now, snap);
        true
    }

    /// Inserts (or replaces) an invoice and appends an `invoice.created` (or
    /// `invoice.updated`) event. A missing "id" gets the next "in_NNNNNN"; missing
    /// "created"/"updated" become now.
    pub fn insert_invoice(&mut self, mut inv: Value) {
        let now = self.clock;
        if !inv.is_object() {
            inv = json!({});
        }
        let id = match inv.get("id").and_then(Value::as_str) {
            Some(id) => id.to_owned(),
            None => {
                let id = format!("in_{:06}", self.next_invoice);
                inv["id"] = json!(id);
                id
            }
        };
        if let Some(num) = id.strip_prefix("in_").and_then(|s| s.parse::<usize>().ok()) {
            self.next_invoice = self.next_invoice.max(num + 1);
        }
        for k in ["created", "updated"] {
            if inv.get(k).is_none() {
                inv[k] = json!(now);
            }
        }
        let was_bulk = self.bulk.as_mut().and_then(|b| b.take(&id)).is_some();
        let kind = if was_bulk || self.invoices.contains_key(&id) {
            "invoice.updated"
        } else {
            "invoice.created"
        };
        self.invoices.insert(id, inv.clone());
        self.push_event(kind, now, inv);
    }

    /// Applies `f` to contact `id`; bumps `properties.lastmodifieddate` and `updatedAt` to
    /// now unless `f` changed the former. Returns false when the id is unknown.
    pub fn update_contact(&mut self, id: &str, f: impl FnOnce(&mut Value)) -> bool {
        let now = rfc3339_ms(self.clock * 1000);
        let Some(c) = self.contacts.get_mut(id) else {
            return false;
        };
        let before = c["properties"]["lastmodifieddate"].clone();
        f(c);
        if c["properties"]["lastmodifieddate"] == before {
            c["properties"]["lastmodifieddate"] = json!(now);
        }
        c["updatedAt"] = c["properties"]["lastmodifieddate"].clone();
        true
    }

    pub(crate) fn push_event(&mut self, kind: &'static str, created: i64, inv: Value) {
        self.events.push(Event {
            kind,
            created,
            snapshot: Snapshot::Value(inv),
        });
    }

    /// Seeds `n` invoices after the existing ones (see the module docs for the shape).
    pub(crate) fn seed_invoices(&mut self, n: usize) {
        for pos in 0..n {
            let sp = SeedPos {
                num: self.next_invoice,
                pos,
                n,
                clock: self.clock,
            };
            self.next_invoice += 1;
            let inv = seed_invoice(sp);
            let id = inv["id"].as_str().unwrap_or_default().to_owned();
            let created = inv["created"].as_i64().unwrap_or_default();
            self.invoices.insert(id, inv);
            self.events.push(Event {
                kind: "invoice.created",
                created,
                snapshot: Snapshot::Seeded(sp),
            });
        }
    }

    /// Seeds `n` invoices after the existing ones as [`VendorData::seed_invoices`] does,
    /// into the compact bulk store (see `bulk.rs`); existing invoices under the seeded ids
    /// are replaced, as there.
    ///
    /// # Panics
    /// When called twice on one vendor: there is one bulk store.
    pub(crate) fn seed_bulk_invoices(&mut self, n: usize) {
        assert!(self.bulk.is_none(), "bulk invoices can be seeded once");
        let bulk = bulk::BulkInvoices::new(self.next_invoice, n, self.clock);
        self.invoices.retain(|id, _| bulk.pos_of(id).is_none());
        self.events.extend((0..n).map(|pos| Event {
            kind: "invoice.created",
            created: bulk.times(pos).0,
            snapshot: Snapshot::Seeded(bulk.seed_pos(pos)),
        }));
        self.next_invoice += n;
        self.bulk = Some(bulk);
    }

    /// Seeds `n` HubSpot contacts after the existing ones.
    pub(crate) fn seed_contacts(&mut self, n: usize) {
        for pos in 0..n {
            let c = seed_contact(self.next_contact, pos, n, self.clock);
            self.next_contact += 1;
            let id = c["id"].as_str().unwrap_or_default().to_owned();
            self.contacts.insert(id, c);
        }
    }

    /// Runs a test hook, then records events for invoices the hook changed directly in the
    /// map (changes made through the helpers already recorded theirs).
    pub(crate) fn run_hook(&mut self, hook: impl FnOnce(&mut VendorData)) {
        let mut before = self.invoices.clone();
        let events_before = self.events.len();
        hook(self);
        // A bulk invoice the hook wrote into the map was there before, from the seed.
        if let Some(bulk) = &mut self.bulk {
            for id in self.invoices.keys() {
                if before.contains_key(id) {
                    continue;
                }
                if let Some(seeded) = bulk.take(id) {
                    before.insert(id.clone(), seeded);
                }
            }
        }
        let evented: BTreeSet<String> = self.events[events_before..]
            .iter()
            .filter_map(|e| match &e.snapshot {
                Snapshot::Value(v) => v.get("id").and_then(Value::as_str).map(str::to_owned),
                Snapshot::Seeded(_) => None,
            })
            .collect();
        let now = self.clock;
        let changed: Vec<(&'static str, Value)> = self
            .invoices
            .iter()
            .filter(|(id, _)| !evented.contains(*id))
            .filter_map(|(id, inv)| match before.get(id) {
                None => Some(("invoice.created", inv.clone())),
                Some(old) if old != inv => Some(("invoice.updated", inv.clone())),
                Some(_) => None,
            })
            .collect();
        for (kind, inv) in changed {
            self.push_event(kind, now, inv);
        }
    }

    /// Renders event number `seq` (1-based) in Stripe's event shape.
    pub(crate) fn render_event(&self, seq: usize) -> Value {
        let e = &self.events[seq - 1];
        let obj = match &e.snapshot {
            Snapshot::Value(v) => v.clone(),
            Snapshot::Seeded(sp) => seed_invoice(*sp),
        };
        json!({
            "id": format!("evt_{seq:06}"),
            "object": "event",
            "type": e.kind,
            "created": e.created,
            "livemode": false,
            "data": {"object": obj},
        })
    }

    /// Customers derived from the invoices: one per distinct "customer".
    pub(crate) fn customers(&self) -> Vec<Value> {
        let mut by_id: BTreeMap<String, Value> = BTreeMap::new();
        for inv in self.all_invoices() {
            // Bulk invoices give their customer without rendering the whole invoice.
            let (cid, created, updated) = match inv {
                InvRef::Stored(inv) => {
                    let Some(cid) = inv.get("customer").and_then(Value::as_str) else {
                        continue;
                    };
                    let created = inv["created"].as_i64().unwrap_or_default();
                    let updated = inv["updated"].as_i64().unwrap_or_default();
                    (Cow::Borrowed(cid), created, updated)
                }
                InvRef::Bulk(sp) => {
                    let (created, updated) = seed_times(sp.pos, sp.n, sp.clock);
                    let [cid, _, _] = seed_customer(sp.num);
                    (Cow::Owned(cid), created, updated)
                }
            };
            if !by_id.contains_key(cid.as_ref()) {
                let (email, name) = match inv {
                    InvRef::Stored(inv) => {
                        (inv["customer_email"].clone(), inv["customer_name"].clone())
                    }
                    InvRef::Bulk(sp) => {
                        let [_, email, name] = seed_customer(sp.num);
                        (json!(email), json!(name))
                    }
                };
                let c = json!({
                    "id": cid,
                    "object": "customer",
                    "email": email,
                    "name": name,
                    "created": created,
                    "updated": updated,
                });
                by_id.insert(cid.clone().into_owned(), c);
            }
            let Some(c) = by_id.get_mut(cid.as_ref()) else {
                continue;
            };
            if created < c["created"].as_i64().unwrap_or(i64::MAX) {
                c["created"] = json!(created);
            }
            if updated > c["updated"].as_i64().unwrap_or(i64::MIN) {
                c["updated"] = json!(updated);
            }
        }
        by_id.into_values().collect()
    }
}

/// Formats unix milliseconds as RFC 3339 with milliseconds and a `Z`, as HubSpot does.
pub(crate) fn rfc3339_ms(ms: i64) -> String {
    DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Parses an RFC 3339 timestamp into unix milliseconds.
pub(crate) fn parse_ms(s: &str) -> Option<i64> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|d| d.timestamp_millis())
}

/// Seeded timestamps: created 10 s apart, "updated" shared by groups of three (ties), all
/// about a month before the clock.
fn seed_times(pos: usize, n: usize, clock: i64) -> (i64, i64) {
    let base = clock - 30 * DAY - 10 * n as i64 - 100;
    let created = base + 10 * pos as i64;
    let updated = base + 30 * (pos / 3) as i64 + 25;
    (created, updated)
}

const FIRST: [&str; 8] = [
    "Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "Ken",
];
const LAST: [&str; 8] = [
    "Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Allen", "Thompson",
];
const STAGES: [&str; 4] = ["lead", "subscriber", "marketingqualifiedlead", "customer"];

/// The seeded contact number `num` (id "{1000 + num}"); lastmodifieddate ties in threes.
fn seed_contact(num: usize, pos: usize, n: usize, clock: i64) -> Value {
    let (created, updated) = seed_times(pos, n, clock);
    let created = rfc3339_ms(created * 1000 + 250);
    let updated = rfc3339_ms(updated * 1000 + 500);
    let id = (1000 + num).to_string();
    json!({
        "id": id,
        "properties": {
            "email": format!("contact{num:04}@example.com"),
            "firstname": FIRST[num % FIRST.len()],
            "lastname": LAST[(num / FIRST.len()) % LAST.len()],
            "lifecyclestage": STAGES[num % STAGES.len()],
            "company": format!("Company {:03}", num % 50),
            "phone": format!("+1-555-{:04}", num % 10_000),
            "createdate": created,
            "lastmodifieddate": updated,
            "hs_object_id": id,
        },
        "createdAt": created,
        "updatedAt": updated,
        "archived": false,
    })
}
