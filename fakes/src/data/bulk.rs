//! Compact storage for many seeded invoices: a million of them as `Value`s would need
//! ~24 GB, so the bulk store keeps only their list order and regenerates each on demand.

use std::io::Write;
use std::ops::Range;

use serde_json::Value;

use super::{SeedPos, seed_invoice, seed_times};

/// Invoices seeded by `VendorData::seed_bulk_invoices`, identical over HTTP to those of
/// `seed_invoices`: seed position `pos` is invoice number `first_num + pos`, its JSON is
/// `seed_invoice` of that position. An invoice that gets updated, replaced or removed
/// moves to `VendorData::invoices` for good (its `overridden` bit), so the map stays the
/// single truth for every changed invoice.
pub(crate) struct BulkInvoices {
    first_num: usize,
    n: usize,
    clock: i64,
    /// Seed positions in lexical id order, the API's list order ("in_1000000" sorts
    /// between "in_100000" and "in_100001"); u32 keeps a million at 4 MB.
    order: Vec<u32>,
    overridden: Vec<u64>,
    overridden_count: usize,
}

/// An invoice id ("in_" and at least six digits) formatted without allocating: list
/// scans compare many of them.
pub(crate) struct IdBuf {
    buf: [u8; 24],
    len: usize,
}

impl IdBuf {
    pub(crate) fn new(num: usize) -> IdBuf {
        let mut buf = [0u8; 24];
        let mut rest = &mut buf[..];
        // "in_" and at most 20 digits always fit in 24 bytes.
        let _ = write!(rest, "in_{num:06}");
        let len = 24 - rest.len();
        IdBuf { buf, len }
    }

    pub(crate) fn as_str(&self) -> &str {
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or_default()
    }
}

/// A key whose numeric order is the lexical order of the id's digits: each digit maps
/// to 1..=10 in base 11 and the end of the id to 0, so a prefix sorts first.
fn lexical_key(num: usize) -> u128 {
    let id = IdBuf::new(num);
    let digits = &id.as_str().as_bytes()[3..];
    (0..20).fold(0u128, |k, i| {
        k * 11 + digits.get(i).map_or(0, |d| u128::from(d - b'0') + 1)
    })
}

/// Created/updated bounds of an invoice list request (`created[gte|lt]`,
/// `updated[gte|gt|lt|lte]`); `None` is no bound.
#[derive(Clone, Copy, Default)]
pub(crate) struct InvoiceFilter {
    pub(crate) created_gte: Option<i64>,
    pub(crate) created_lt: Option<i64>,
    pub(crate) updated_gte: Option<i64>,
    pub(crate) updated_gt: Option<i64>,
    pub(crate) updated_lt: Option<i64>,
    pub(crate) updated_lte: Option<i64>,
}

impl InvoiceFilter {
    pub(crate) fn keeps(&self, created: i64, updated: i64) -> bool {
        self.created_gte.is_none_or(|b| created >= b)
            && self.created_lt.is_none_or(|b| created < b)
            && self.updated_gte.is_none_or(|b| updated >= b)
            && self.updated_gt.is_none_or(|b| updated > b)
            && self.updated_lt.is_none_or(|b| updated < b)
            && self.updated_lte.is_none_or(|b| updated <= b)
    }

    /// The stored invoice's timestamps, 0 when missing (as the list always treated them).
    pub(crate) fn keeps_value(&self, inv: &Value) -> bool {
        let created = inv.get("created").and_then(Value::as_i64).unwrap_or(0);
        let updated = inv.get("updated").and_then(Value::as_i64).unwrap_or(0);
        self.keeps(created, updated)
    }
}

impl BulkInvoices {
    /// # Panics
    /// Beyond `u32::MAX` invoices (the order array's width).
    pub(crate) fn new(first_num: usize, n: usize, clock: i64) -> BulkInvoices {
        let count = u32::try_from(n).expect("at most u32::MAX bulk invoices");
        let mut order: Vec<u32> = (0..count).collect();
        order.sort_by_cached_key(|&pos| lexical_key(first_num + pos as usize));
        BulkInvoices {
            first_num,
            n,
            clock,
            order,
            overridden: vec![0; n.div_ceil(64)],
            overridden_count: 0,
        }
    }

    pub(crate) fn seed_pos(&self, pos: usize) -> SeedPos {
        SeedPos {
            num: self.first_num + pos,
            pos,
            n: self.n,
            clock: self.clock,
        }
    }

    /// (created, updated) of position `pos`.
    pub(crate) fn times(&self, pos: usize) -> (i64, i64) {
        seed_times(pos, self.n, self.clock)
    }

    pub(crate) fn id(&self, pos: usize) -> IdBuf {
        IdBuf::new(self.first_num + pos)
    }

    /// Invoices still served from the seed (not moved to the map).
    pub(crate) fn live_count(&self) -> usize {
        self.n - self.overridden_count
    }

    pub(crate) fn is_live(&self, pos: usize) -> bool {
        self.overridden[pos / 64] & (1 << (pos % 64)) == 0
    }

    /// The seed position of `id` when it is one of ours, live or not. Ids must match the
    /// seeder's formatting exactly ("in_01" is not invoice 1).
    pub(crate) fn pos_of(&self, id: &str) -> Option<usize> {
        let num: usize = id.strip_prefix("in_")?.parse().ok()?;
        let pos = num.checked_sub(self.first_num).filter(|&p| p < self.n)?;
        (IdBuf::new(num).as_str() == id).then_some(pos)
    }

    /// Whether `id` is a live invoice of ours.
    pub(crate) fn contains(&self, id: &str) -> bool {
        self.pos_of(id).is_some_and(|p| self.is_live(p))
    }

    /// The live invoice `id`, regenerated.
    pub(crate) fn get(&self, id: &str) -> Option<Value> {
        let pos = self.pos_of(id).filter(|&p| self.is_live(p))?;
        Some(seed_invoice(self.seed_pos(pos)))
    }

    /// Hands live invoice `id` over to the map: returns it and stops serving it.
    pub(crate) fn take(&mut self, id: &str) -> Option<Value> {
        let inv = self.get(id)?;
        if let Some(pos) = self.pos_of(id) {
            self.overridden[pos / 64] |= 1 << (pos % 64);
            self.overridden_count += 1;
        }
        Some(inv)
    }

    /// How many entries `order` has (live or not).
    pub(crate) fn len(&self) -> usize {
        self.n
    }

    /// The seed position at list index `idx`.
    pub(crate) fn at(&self, idx: usize) -> usize {
        self.order[idx] as usize
    }

    /// The list index of the first id after `after`.
    pub(crate) fn index_after(&self, after: &str) -> usize {
        self.order
            .partition_point(|&pos| self.id(pos as usize).as_str() <= after)
    }

    /// The positions `filter` keeps: created grows with the position and updated never
    /// shrinks (see `seed_times`), so each bound cuts the positions at one point and a
    /// list scan compares integers instead of reading timestamps.
    pub(crate) fn positions(&self, filter: &InvoiceFilter) -> Range<usize> {
        let first = |pred: &dyn Fn(usize) -> bool| {
            let (mut lo, mut hi) = (0, self.n);
            while lo < hi {
                let mid = lo + (hi - lo) / 2;
                if pred(mid) {
                    hi = mid;
                } else {
                    lo = mid + 1;
                }
            }
            lo
        };
        let created = |p: usize| self.times(p).0;
        let updated = |p: usize| self.times(p).1;
        let mut lo = 0;
        let mut hi = self.n;
        if let Some(b) = filter.created_gte {
            lo = lo.max(first(&|p| created(p) >= b));
        }
        if let Some(b) = filter.created_lt {
            hi = hi.min(first(&|p| created(p) >= b));
        }
        if let Some(b) = filter.updated_gte {
            lo = lo.max(first(&|p| updated(p) >= b));
        }
        if let Some(b) = filter.updated_gt {
            lo = lo.max(first(&|p| updated(p) > b));
        }
        if let Some(b) = filter.updated_lt {
            hi = hi.min(first(&|p| updated(p) >= b));
        }
        if let Some(b) = filter.updated_lte {
            hi = hi.min(first(&|p| updated(p) > b));
        }
        lo..hi.max(lo)
    }
}
