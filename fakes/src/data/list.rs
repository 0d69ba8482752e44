//! The invoice list over both stores: the map of stored invoices and the bulk-seeded
//! ones, merged in lexical id order as if they were one map.

use std::borrow::Cow;
use std::collections::btree_map;
use std::iter::Peekable;
use std::ops::{Bound, Range};

use serde::{Serialize, Serializer};
use serde_json::Value;

use super::VendorData;
use super::bulk::{BulkInvoices, InvoiceFilter};
use super::seeded::SeedInvoice;
use super::{SeedPos, seed_invoice};

/// One invoice of the list: stored, or a bulk seed position rendered on demand.
#[derive(Clone, Copy)]
pub(crate) enum InvRef<'a> {
    Stored(&'a Value),
    Bulk(SeedPos),
}

impl<'a> InvRef<'a> {
    pub(crate) fn value(self) -> Cow<'a, Value> {
        match self {
            InvRef::Stored(v) => Cow::Borrowed(v),
            InvRef::Bulk(sp) => Cow::Owned(seed_invoice(sp)),
        }
    }
}

/// Bulk invoices serialize without a `Value` in between: building one costs several
/// times what printing it does, and the list must outpace idem by far.
impl Serialize for InvRef<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            InvRef::Stored(v) => v.serialize(s),
            InvRef::Bulk(sp) => SeedInvoice::new(*sp).serialize(s),
        }
    }
}

/// Ascending ids after a bound, kept by a filter (see [`VendorData::invoice_list`]).
pub(crate) struct InvoiceIter<'a> {
    stored: Peekable<btree_map::Range<'a, String, Value>>,
    bulk: Option<&'a BulkInvoices>,
    /// The next list index into the bulk store.
    idx: usize,
    positions: Range<usize>,
    filter: InvoiceFilter,
}

impl<'a> InvoiceIter<'a> {
    fn next_stored(&mut self) -> Option<(&'a String, &'a Value)> {
        while let Some(&(id, v)) = self.stored.peek() {
            if self.filter.keeps_value(v) {
                return Some((id, v));
            }
            self.stored.next();
        }
        None
    }

    fn next_bulk(&mut self) -> Option<usize> {
        let bulk = self.bulk?;
        while self.idx < bulk.len() {
            let pos = bulk.at(self.idx);
            if self.positions.contains(&pos) && bulk.is_live(pos) {
                return Some(pos);
            }
            self.idx += 1;
        }
        None
    }
}

impl<'a> Iterator for InvoiceIter<'a> {
    type Item = InvRef<'a>;

    fn next(&mut self) -> Option<InvRef<'a>> {
        let stored = self.next_stored();
        let bulk = self.next_bulk();
        let bulk_ref = |pos| self.bulk.map(|b| InvRef::Bulk(b.seed_pos(pos)));
        match (stored, bulk) {
            (Some((id, v)), Some(pos)) => {
                let bulk_id = self.bulk.map(|b| b.id(pos));
                if bulk_id.is_some_and(|b| b.as_str() < id.as_str()) {
                    let r = bulk_ref(pos);
                    self.idx += 1;
                    r
                } else {
                    self.stored.next();
                    Some(InvRef::Stored(v))
                }
            }
            (Some((_, v)), None) => {
                self.stored.next();
                Some(InvRef::Stored(v))
            }
            (None, Some(pos)) => {
                let r = bulk_ref(pos);
                self.idx += 1;
                r
            }
            (None, None) => None,
        }
    }
}

impl VendorData {
    /// The invoices `filter` keeps with an id after `after` (all when `None`), ascending
    /// id: the API list order.
    pub(crate) fn invoice_list(
        &self,
        after: Option<&str>,
        filter: InvoiceFilter,
    ) -> InvoiceIter<'_> {
        let lower = after.map_or(Bound::Unbounded, Bound::Excluded);
        let stored = self
            .invoices
            .range::<str, _>((lower, Bound::Unbounded))
            .peekable();
        let bulk = self.bulk.as_ref();
        InvoiceIter {
            stored,
            bulk,
            idx: match (bulk, after) {
                (Some(b), Some(a)) => b.index_after(a),
                _ => 0,
            },
            positions: bulk.map_or(0..0, |b| b.positions(&filter)),
            filter,
        }
    }

    /// Every invoice, ascending id.
    pub(crate) fn all_invoices(&self) -> InvoiceIter<'_> {
        self.invoice_list(None, InvoiceFilter::default())
    }

    /// The last invoice `filter` keeps with an id up to `id` (a page's predecessor, for
    /// the duplicated-records fault).
    pub(crate) fn invoice_at_or_before(
        &self,
        id: &str,
        filter: InvoiceFilter,
    ) -> Option<InvRef<'_>> {
        let stored = self
            .invoices
            .range::<str, _>((Bound::Unbounded, Bound::Included(id)))
            .rev()
            .find(|(_, v)| filter.keeps_value(v));
        let bulk = self.bulk.as_ref().and_then(|b| {
            let positions = b.positions(&filter);
            (0..b.index_after(id))
                .rev()
                .map(|idx| b.at(idx))
                .find(|&pos| positions.contains(&pos) && b.is_live(pos))
                .map(|pos| (b, pos))
        });
        match (stored, bulk) {
            (Some((sid, v)), Some((b, pos))) => {
                if b.id(pos).as_str() > sid.as_str() {
                    Some(InvRef::Bulk(b.seed_pos(pos)))
                } else {
                    Some(InvRef::Stored(v))
                }
            }
            (Some((_, v)), None) => Some(InvRef::Stored(v)),
            (None, Some((b, pos))) => Some(InvRef::Bulk(b.seed_pos(pos))),
            (None, None) => None,
        }
    }

    /// Invoice `id`, stored or bulk.
    pub(crate) fn invoice(&self, id: &str) -> Option<Cow<'_, Value>> {
        match self.invoices.get(id) {
            Some(v) => Some(Cow::Borrowed(v)),
            None => self.bulk.as_ref()?.get(id).map(Cow::Owned),
        }
    }

    /// Whether invoice `id` exists, stored or bulk.
    pub fn has_invoice(&self, id: &str) -> bool {
        self.invoices.contains_key(id) || self.bulk.as_ref().is_some_and(|b| b.contains(id))
    }

    /// How many invoices the vendor has, stored or bulk.
    pub fn invoice_count(&self) -> usize {
        self.invoices.len() + self.bulk.as_ref().map_or(0, BulkInvoices::live_count)
    }

    /// Moves bulk invoice `id` into the map so it can change there; true when it moved.
    pub(crate) fn materialize(&mut self, id: &str) -> bool {
        match self.bulk.as_mut().and_then(|b| b.take(id)) {
            Some(inv) => {
                self.invoices.insert(id.to_owned(), inv);
                true
            }
            None => false,
        }
    }
}
