//! A vendor record as the JSON text the vendor sent, read without building its tree: the
//! values at a few JSON pointers and a hash of its content come from one pass over the text.
//!
//! Why: a no-op re-walk spent about 55 % of its CPU building each record's
//! `serde_json::Value` (a `BTreeMap` per object, a `String` per key), serializing it again
//! and freeing it, only to find the hash unchanged. The content hash here is independent
//! of key order and whitespace, like the `Value` it replaces (whose maps were sorted), and
//! [`hash_value`] computes the same hash from a `Value` for the records that take the slow
//! path (a value Postgres refuses, text serde_json cannot read).

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use serde_json::value::RawValue;
use xxhash_rust::xxh3::{Xxh3, xxh3_128_with_seed};

/// One record of a page: its JSON text, parsed only when it must be.
#[derive(Debug, Clone)]
pub struct Record {
    json: Box<RawValue>,
}

impl Record {
    pub fn from_raw(json: Box<RawValue>) -> Self {
        Self { json }
    }

    /// A record built by idem (a stored failure's payload, an event's inner record).
    pub fn from_value(value: &Value) -> Self {
        let text = serde_json::to_string(value).expect("a JSON value serializes");
        Self {
            json: RawValue::from_string(text).expect("serde_json writes valid JSON"),
        }
    }

    /// The record's JSON text, as the vendor wrote it.
    pub fn json(&self) -> &str {
        self.json.get()
    }

    pub fn into_json(self) -> String {
        let text: Box<str> = self.json.into();
        text.into()
    }

    /// The record parsed. What serde_json refuses (a lone surrogate, a number beyond
    /// `f64`) becomes a marker (see [`crate::values`]); text that cannot be read even so
    /// (nesting deeper than serde_json's limit) is kept as one string, so the record can
    /// still be stored as a failure with its payload.
    pub fn value(&self) -> Value {
        crate::values::parse_body(self.json().as_bytes())
            .unwrap_or_else(|_| Value::String(self.json().to_string()))
    }

    /// The value at a JSON pointer (`""` is the whole record), as `Value::pointer` finds it
    /// in [`Record::value`].
    pub fn pointer(&self, pointer: &str) -> Option<Value> {
        self.values_at(&Pointers::new([pointer])).swap_remove(0)
    }

    /// The values at several pointers, from one pass over the record.
    pub fn values_at(&self, pointers: &Pointers) -> Vec<Option<Value>> {
        match scan(self.json(), pointers) {
            Ok(scanned) => scanned.values,
            Err(_) => {
                let value = self.value();
                pointers
                    .tokens
                    .iter()
                    .map(|tokens| lookup(&value, tokens).cloned())
                    .collect()
            }
        }
    }
}

/// JSON pointers split into tokens once, to read many records with.
#[derive(Debug, Clone, Default)]
pub struct Pointers {
    tokens: Vec<Vec<Token>>,
}

#[derive(Debug, Clone)]
struct Token {
    key: String,
    /// The token as an array index, when it is one (`Value::pointer`'s rule: digits
    /// without a leading zero).
    index: Option<usize>,
}

impl Pointers {
    /// Pointers that do not start with `/` (other than `""`) point at nothing, as in
    /// `Value::pointer`.
    pub fn new<'a>(pointers: impl IntoIterator<Item = &'a str>) -> Self {
        let tokens = pointers
            .into_iter()
            .map(|pointer| {
                if pointer.is_empty() {
                    return Vec::new();
                }
                let Some(rest) = pointer.strip_prefix('/') else {
                    // Never matches: a key cannot hold this marker and also be an index.
                    return vec![Token {
                        key: "\u{0}not a pointer".into(),
                        index: None,
                    }];
                };
                rest.split('/')
                    .map(|raw| {
                        let key = raw.replace("~1", "/").replace("~0", "~");
                        let index = (!key.starts_with('+')
                            && (key == "0" || !key.starts_with('0')))
                        .then(|| key.parse().ok())
                        .flatten();
                        Token { key, index }
                    })
                    .collect()
            })
            .collect();
        Self { tokens }
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

/// What one pass over a record found.
#[derive(Debug)]
pub struct Scanned {
    /// The content hash: equal for records equal as JSON values (key order and whitespace
    /// aside), equal to [`hash_value`] of the parsed record.
    pub hash: u128,
    /// The value at each pointer, in the order given.
    pub values: Vec<Option<Value>>,
}

/// Why a record cannot be read in one pass; the caller parses it whole instead (and
/// finds the reason there, with the path to the value).
#[derive(Debug)]
pub struct ScanError(#[allow(dead_code)] serde_json::Error);

/// Hashes a record's content and reads the values at `pointers`, in one pass without
/// building the record's tree. Fails on what the slow path must see: text serde_json
/// refuses, nesting beyond its limit, a string or key holding NUL or a marker (values
/// Postgres refuses or idem put there), more than 64 pointers.
pub fn scan(json: &str, pointers: &Pointers) -> Result<Scanned, ScanError> {
    if pointers.len() > 64 {
        return Err(ScanError(serde::de::Error::custom("more than 64 pointers")));
    }
    let mut values = vec![None; pointers.len()];
    let mut deserializer = serde_json::Deserializer::from_str(json);
    let active = if pointers.is_empty() {
        0
    } else {
        u64::MAX >> (64 - pointers.len())
    };
    let hash = Node {
        pointers,
        active,
        depth: 0,
        values: &mut values,
    }
    .deserialize(&mut deserializer)
    .map_err(ScanError)?;
    deserializer.end().map_err(ScanError)?;
    Ok(Scanned { hash, values })
}

// Seeds of the content hash, one per kind of node, so that no two kinds collide.
const NULL: u64 = 1;
const FALSE: u64 = 2;
const TRUE: u64 = 3;
const UNSIGNED: u64 = 4;
const NEGATIVE: u64 = 5;
const FLOAT: u64 = 6;
const STRING: u64 = 7;
const KEY: u64 = 8;
const ENTRY: u64 = 9;
const OBJECT: u64 = 10;
const ARRAY: u64 = 11;

fn hash_unsigned(n: u64) -> u128 {
    xxh3_128_with_seed(&n.to_le_bytes(), UNSIGNED)
}

fn hash_signed(n: i64) -> u128 {
    // A non-negative integer is the same number whichever way serde_json handed it over.
    match u64::try_from(n) {
        Ok(n) => hash_unsigned(n),
        Err(_) => xxh3_128_with_seed(&n.to_le_bytes(), NEGATIVE),
    }
}

fn hash_float(n: f64) -> u128 {
    xxh3_128_with_seed(&n.to_bits().to_le_bytes(), FLOAT)
}

fn hash_string(text: &str) -> u128 {
    xxh3_128_with_seed(text.as_bytes(), STRING)
}

fn hash_key(text: &str) -> u128 {
    xxh3_128_with_seed(text.as_bytes(), KEY)
}

fn hash_entry(key: u128, value: u128) -> u128 {
    let mut bytes = [0u8; 32];
    bytes[..16].copy_from_slice(&key.to_le_bytes());
    bytes[16..].copy_from_slice(&value.to_le_bytes());
    xxh3_128_with_seed(&bytes, ENTRY)
}

/// An object is the sum of its entries' hashes: the same whatever the order of its keys.
fn hash_object(entries_sum: u128, entries: u64) -> u128 {
    let mut bytes = [0u8; 24];
    bytes[..16].copy_from_slice(&entries_sum.to_le_bytes());
    bytes[16..].copy_from_slice(&entries.to_le_bytes());
    xxh3_128_with_seed(&bytes, OBJECT)
}

fn array_hasher() -> Xxh3 {
    Xxh3::with_seed(ARRAY)
}

fn hash_constant(seed: u64) -> u128 {
    xxh3_128_with_seed(&[], seed)
}

/// The content hash of a parsed record: what [`scan`] computes from its text.
pub fn hash_value(value: &Value) -> u128 {
    match value {
        Value::Null => hash_constant(NULL),
        Value::Bool(false) => hash_constant(FALSE),
        Value::Bool(true) => hash_constant(TRUE),
        Value::Number(n) => match (n.as_u64(), n.as_i64()) {
            (Some(n), _) => hash_unsigned(n),
            (None, Some(n)) => hash_signed(n),
            _ => hash_float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(text) => hash_string(text),
        Value::Array(items) => {
            let mut hasher = array_hasher();
            for item in items {
                hasher.update(&hash_value(item).to_le_bytes());
            }
            hasher.digest128()
        }
        Value::Object(map) => {
            let sum = map.iter().fold(0u128, |sum, (key, value)| {
                sum.wrapping_add(hash_entry(hash_key(key), hash_value(value)))
            });
            hash_object(sum, map.len() as u64)
        }
    }
}

/// A float read as zero or subnormal may have been written with an exponent beyond what
/// Postgres' numeric holds (`1e-20000` is valid JSON and 0 to f64, but jsonb refuses
/// it), and the text is what Postgres is sent. Such a record takes the slow path, which
/// stores the number as serde_json read it. A literal `0.0` pays that too; it is rare.
fn float_postgres_may_refuse(n: f64) -> bool {
    n == 0.0 || n.is_subnormal()
}

fn refused(text: &str) -> bool {
    text.contains('\0') || crate::values::holds_marker(text)
}

/// One node of the record: hashes it, and reads the values of the `active` pointers
/// (a bit per pointer) that lead through it.
struct Node<'p, 'v> {
    pointers: &'p Pointers,
    active: u64,
    depth: usize,
    values: &'v mut Vec<Option<Value>>,
}

impl<'p, 'v> Node<'p, 'v> {
    fn child(&mut self, active: u64) -> Node<'p, '_> {
        Node {
            pointers: self.pointers,
            active,
            depth: self.depth + 1,
            values: self.values,
        }
    }

    fn active(&self) -> impl Iterator<Item = (usize, &'p [Token])> + '_ {
        let active = self.active;
        self.pointers
            .tokens
            .iter()
            .enumerate()
            .filter(move |(i, _)| active & (1 << i) != 0)
            .map(|(i, tokens)| (i, tokens.as_slice()))
    }
}

impl<'de> DeserializeSeed<'de> for Node<'_, '_> {
    type Value = u128;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<u128, D::Error> {
        let ends_here = self.active().any(|(_, tokens)| tokens.len() == self.depth);
        if !ends_here {
            return deserializer.deserialize_any(self);
        }
        // A pointer ends at this node: its value is needed whole (an id, a time; rarely
        // anything large). Pointers that go on below it read the parsed value.
        let value = Value::deserialize(deserializer)?;
        if value_refused(&value) {
            return Err(serde::de::Error::custom("a value Postgres refuses"));
        }
        let depth = self.depth;
        for (i, tokens) in self
            .active()
            .collect::<Vec<_>>()
            .into_iter()
            .filter(|(_, tokens)| tokens.len() >= depth)
        {
            self.values[i] = lookup(&value, &tokens[depth..]).cloned();
        }
        Ok(hash_value(&value))
    }
}

fn value_refused(value: &Value) -> bool {
    match value {
        Value::String(text) => refused(text),
        Value::Array(items) => items.iter().any(value_refused),
        Value::Object(map) => map.iter().any(|(k, v)| refused(k) || value_refused(v)),
        Value::Number(n) => n.is_f64() && n.as_f64().is_some_and(float_postgres_may_refuse),
        _ => false,
    }
}

fn lookup<'a>(value: &'a Value, tokens: &[Token]) -> Option<&'a Value> {
    tokens.iter().try_fold(value, |node, token| match node {
        Value::Object(map) => map.get(&token.key),
        Value::Array(items) => token.index.and_then(|i| items.get(i)),
        _ => None,
    })
}

use serde::Deserialize;

impl<'de> Visitor<'de> for Node<'_, '_> {
    type Value = u128;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_unit<E>(self) -> Result<u128, E> {
        Ok(hash_constant(NULL))
    }

    fn visit_none<E>(self) -> Result<u128, E> {
        Ok(hash_constant(NULL))
    }

    fn visit_bool<E>(self, v: bool) -> Result<u128, E> {
        Ok(hash_constant(if v { TRUE } else { FALSE }))
    }

    fn visit_u64<E>(self, v: u64) -> Result<u128, E> {
        Ok(hash_unsigned(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<u128, E> {
        Ok(hash_signed(v))
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<u128, E> {
        // `Value` keeps a float serde_json hands over only when finite (it never hands
        // over any other from text).
        if !v.is_finite() || float_postgres_may_refuse(v) {
            return Err(E::custom("a number Postgres may refuse as written"));
        }
        Ok(hash_float(v))
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<u128, E> {
        if refused(v) {
            return Err(E::custom("a value Postgres refuses"));
        }
        Ok(hash_string(v))
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<u128, A::Error> {
        let mut hasher = array_hasher();
        let mut index = 0usize;
        loop {
            let matched = if self.active == 0 {
                0
            } else {
                self.active()
                    .filter(|(_, tokens)| tokens[self.depth].index == Some(index))
                    .fold(0u64, |mask, (i, _)| mask | 1 << i)
            };
            let Some(hash) = seq.next_element_seed(self.child(matched))? else {
                break;
            };
            hasher.update(&hash.to_le_bytes());
            index += 1;
        }
        Ok(hasher.digest128())
    }

    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<u128, A::Error> {
        let mut sum = 0u128;
        let mut entries = 0u64;
        while let Some((key, matched)) = map.next_key_seed(Key {
            pointers: self.pointers,
            active: self.active,
            depth: self.depth,
        })? {
            let value = map.next_value_seed(self.child(matched))?;
            sum = sum.wrapping_add(hash_entry(key, value));
            entries += 1;
        }
        Ok(hash_object(sum, entries))
    }
}

/// An object's key: its hash, and which active pointers go on through it.
struct Key<'p> {
    pointers: &'p Pointers,
    active: u64,
    depth: usize,
}

impl<'de> DeserializeSeed<'de> for Key<'_> {
    type Value = (u128, u64);

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(u128, u64), D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Key<'_> {
    type Value = (u128, u64);

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an object key")
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<(u128, u64), E> {
        if refused(v) {
            return Err(E::custom("a key Postgres refuses"));
        }
        let mut matched = 0u64;
        if self.active != 0 {
            // Length and first byte before the bytes: most keys differ there, and a call
            // to `memcmp` per key and pointer showed in profiles.
            let first = v.as_bytes().first();
            for (i, tokens) in self.pointers.tokens.iter().enumerate() {
                // Only an active pointer goes this deep.
                if self.active & (1 << i) == 0 {
                    continue;
                }
                let key = &tokens[self.depth].key;
                if key.len() == v.len() && key.as_bytes().first() == first && key == v {
                    matched |= 1 << i;
                }
            }
        }
        Ok((hash_key(v), matched))
    }
}

/// A page body split in two: the body without its records (for the pagination fields),
/// and the records' own texts.
#[derive(Debug)]
pub struct SplitPage {
    /// The body, its records array left empty.
    pub body: Value,
    pub records: RecordsFound,
}

/// What the records pointer found.
#[derive(Debug)]
pub enum RecordsFound {
    Array(Vec<Record>),
    /// Not an array: what it is instead ("an object", "null", ...).
    Other(&'static str),
    Missing,
}

/// [`split_page`] of a vendor's body, which may not be UTF-8: what serde_json refuses
/// outside the records (or invalid UTF-8 anywhere) is replaced by markers, as
/// [`crate::values::parse_body`] does; `Err` keeps serde_json's error about the original.
pub fn split_body(body: &[u8], records: &str) -> Result<SplitPage, serde_json::Error> {
    crate::values::parse_leniently(body, |text| split_page(text, records))
}

/// Parses a page body, keeping the records under `records` (a JSON pointer) as text.
pub fn split_page(body: &str, records: &str) -> Result<SplitPage, serde_json::Error> {
    let pointers = Pointers::new([records]);
    let tokens = pointers.tokens[0].as_slice();
    let mut found = RecordsFound::Missing;
    let mut deserializer = serde_json::Deserializer::from_str(body);
    let body = Skeleton {
        tokens,
        found: &mut found,
    }
    .deserialize(&mut deserializer)?;
    deserializer.end()?;
    Ok(SplitPage {
        body,
        records: found,
    })
}

/// Builds the body's `Value` except along the path to the records.
struct Skeleton<'t, 'f> {
    tokens: &'t [Token],
    found: &'f mut RecordsFound,
}

impl<'de> DeserializeSeed<'de> for Skeleton<'_, '_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        if self.tokens.is_empty() {
            *self.found = deserializer.deserialize_any(RecordsVisitor)?;
            return Ok(Value::Array(Vec::new()));
        }
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Skeleton<'_, '_> {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(v.into())
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(v.into())
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        let wanted = self.tokens[0].index;
        loop {
            let item = if wanted == Some(items.len()) {
                seq.next_element_seed(Skeleton {
                    tokens: &self.tokens[1..],
                    found: &mut *self.found,
                })?
            } else {
                seq.next_element::<Value>()?
            };
            match item {
                Some(item) => items.push(item),
                None => break,
            }
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let value = if key == self.tokens[0].key {
                map.next_value_seed(Skeleton {
                    tokens: &self.tokens[1..],
                    found: &mut *self.found,
                })?
            } else {
                map.next_value::<Value>()?
            };
            object.insert(key, value);
        }
        Ok(Value::Object(object))
    }
}

/// The records array, each item kept as its text.
struct RecordsVisitor;

impl<'de> Visitor<'de> for RecordsVisitor {
    type Value = RecordsFound;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an array of records")
    }

    fn visit_unit<E>(self) -> Result<RecordsFound, E> {
        Ok(RecordsFound::Other("null"))
    }

    fn visit_none<E>(self) -> Result<RecordsFound, E> {
        Ok(RecordsFound::Other("null"))
    }

    fn visit_bool<E>(self, _: bool) -> Result<RecordsFound, E> {
        Ok(RecordsFound::Other("a boolean"))
    }

    fn visit_u64<E>(self, _: u64) -> Result<RecordsFound, E> {
        Ok(RecordsFound::Other("a number"))
    }

    fn visit_i64<E>(self, _: i64) -> Result<RecordsFound, E> {
        Ok(RecordsFound::Other("a number"))
    }

    fn visit_f64<E>(self, _: f64) -> Result<RecordsFound, E> {
        Ok(RecordsFound::Other("a number"))
    }

    fn visit_str<E>(self, _: &str) -> Result<RecordsFound, E> {
        Ok(RecordsFound::Other("a string"))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RecordsFound, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(RecordsFound::Other("an object"))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RecordsFound, A::Error> {
        let mut records = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(json) = seq.next_element::<Box<RawValue>>()? {
            records.push(Record::from_raw(json));
        }
        Ok(RecordsFound::Array(records))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn scanned(text: &str, pointers: &[&str]) -> Scanned {
        scan(text, &Pointers::new(pointers.iter().copied())).expect("scans")
    }

    #[test]
    fn the_content_hash_ignores_key_order_and_whitespace_but_not_content() {
        let a = r#"{"id":"in_1","amount":100,"lines":[{"x":1,"y":2.5}],"paid":false,"note":null}"#;
        let b = r#"{ "paid" : false, "note": null, "lines": [ {"y": 2.5, "x": 1} ], "amount": 100, "id": "in_1" }"#;
        assert_eq!(scanned(a, &[]).hash, scanned(b, &[]).hash);
        for changed in [
            r#"{"id":"in_1","amount":101,"lines":[{"x":1,"y":2.5}],"paid":false,"note":null}"#,
            r#"{"id":"in_1","amount":100,"lines":[{"y":1,"x":2.5}],"paid":false,"note":null}"#,
            r#"{"id":"in_1","amount":100.0,"lines":[{"x":1,"y":2.5}],"paid":false,"note":null}"#,
            r#"{"id":"in_1","amount":"100","lines":[{"x":1,"y":2.5}],"paid":false,"note":null}"#,
            r#"{"id":"in_1","amount":100,"lines":[{"x":1,"y":2.5}],"paid":false}"#,
            r#"{"id":"in_1","amount":100,"lines":[{"x":1,"y":2.5}],"paid":null,"note":false}"#,
            r#"{"id":"in_1","amount":100,"lines":[{"x":1},{"y":2.5}],"paid":false,"note":null}"#,
        ] {
            assert_ne!(
                scanned(a, &[]).hash,
                scanned(changed, &[]).hash,
                "{changed}"
            );
        }
        // Arrays keep their order; an object moved between levels is another record.
        assert_ne!(scanned("[1,2]", &[]).hash, scanned("[2,1]", &[]).hash);
        assert_ne!(
            scanned(r#"{"a":{"b":1}}"#, &[]).hash,
            scanned(r#"{"a":{},"b":1}"#, &[]).hash
        );
    }

    #[test]
    fn the_hash_of_the_text_is_the_hash_of_the_parsed_value() {
        let texts = [
            r#"{"id":"in_1","n":-7,"m":-12,"f":-2.5,"e":1e3,"u":18446744073709551615,"i":-9223372036854775808}"#,
            r#"{"s":"caf\u00e9 \"quoted\" \\ \/ tab\t","nested":{"a":[[],{},[{}]],"b":""}}"#,
            r#"[true,false,null,0,1.5,"x",{"k":[1,{"k":2}]}]"#,
            r#""just a string""#,
            "12",
        ];
        for text in texts {
            let value: Value = serde_json::from_str(text).expect("valid");
            assert_eq!(scanned(text, &[]).hash, hash_value(&value), "{text}");
            // And of the value serialized again, as a stored failure's payload is.
            let again = serde_json::to_string(&value).expect("serializes");
            assert_eq!(scanned(&again, &[]).hash, hash_value(&value), "{text}");
        }
    }

    #[test]
    fn pointers_read_what_value_pointer_reads() {
        let record = json!({
            "id": "in_1", "n": 7, "a/b": {"c~d": [10, {"deep": "x"}]},
            "list": [{"id": 1}, {"id": 2}], "obj": {"inner": {"k": true}}, "null": null,
            "01": "key that looks like an index"
        });
        let text = serde_json::to_string(&record).expect("serializes");
        let pointers = [
            "/id",
            "/n",
            "/a~1b/c~0d/1/deep",
            "/a~1b/c~0d/0",
            "/list/1/id",
            "/list/01/id",
            "/list/+1/id",
            "/list/9/id",
            "/obj",
            "/obj/inner/k",
            "/null",
            "/missing",
            "/id/deeper",
            "/01",
            "",
            "no-slash",
        ];
        // With "" the whole record is parsed at once; without it every other pointer is
        // followed key by key, short ones beside long ones.
        for pointers in [&pointers[..], &pointers[..14]] {
            let found = scanned(&text, pointers);
            for (pointer, value) in pointers.iter().zip(&found.values) {
                assert_eq!(value.as_ref(), record.pointer(pointer), "{pointer}");
            }
            assert_eq!(found.hash, hash_value(&record));
        }
    }

    #[test]
    fn what_the_slow_path_must_see_is_not_scanned() {
        for text in [
            r#"{"id":"a\u0000b"}"#,
            r#"{"a\u0000":1}"#,
            r#"{"id":"\ud800"}"#,
            r#"{"n":1e999}"#,
            r#"{"n":1e-20000}"#,
            r#"{"id":1e-20000}"#,
            "{\"id\":\"\u{FFFF}idem:lone-surrogate:\\\\ud800\u{FFFF}\"}",
            r#"{"id":1} trailing"#,
        ] {
            assert!(
                scan(text, &Pointers::new(["/id"])).is_err(),
                "{text} should not scan"
            );
        }
        let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
        assert!(scan(&deep, &Pointers::default()).is_err());
        // Such a record still parses (with markers), and is still read at a pointer.
        let record = Record::from_raw(RawValue::from_string(r#"{"id":"\ud800x"}"#.into()).unwrap());
        assert!(record.pointer("/id").is_some());
        let deep = Record::from_raw(RawValue::from_string(deep).unwrap());
        assert!(deep.value().is_string());
    }

    #[test]
    fn a_page_splits_into_its_pagination_fields_and_its_records_texts() {
        let body = r#"{"object":"list","has_more":true,"data":[{"id":"a","x":[1]} , {"id":"b"}],"url":"/v1"}"#;
        let page = split_page(body, "/data").expect("parses");
        assert_eq!(
            page.body,
            json!({"object":"list","has_more":true,"data":[],"url":"/v1"})
        );
        let RecordsFound::Array(records) = page.records else {
            panic!("records")
        };
        let texts: Vec<&str> = records.iter().map(Record::json).collect();
        assert_eq!(texts, [r#"{"id":"a","x":[1]}"#, r#"{"id":"b"}"#]);

        let nested = split_page(r#"{"result":{"items":[[1]],"n":1}}"#, "/result/items").unwrap();
        assert!(matches!(nested.records, RecordsFound::Array(ref r) if r[0].json() == "[1]"));
        let top = split_page(r#"[{"id":1}]"#, "").unwrap();
        assert!(matches!(top.records, RecordsFound::Array(ref r) if r.len() == 1));
        let in_array = split_page(
            r#"{"pages":[{"data":[]},{"data":[{"id":2}]}]}"#,
            "/pages/1/data",
        )
        .unwrap();
        assert!(matches!(in_array.records, RecordsFound::Array(ref r) if r.len() == 1));
        assert!(matches!(
            split_page(r#"{"data":{"id":1}}"#, "/data").unwrap().records,
            RecordsFound::Other("an object")
        ));
        assert!(matches!(
            split_page(r#"{"data":null}"#, "/data").unwrap().records,
            RecordsFound::Other("null")
        ));
        assert!(matches!(
            split_page(r#"{"items":[]}"#, "/data").unwrap().records,
            RecordsFound::Missing
        ));
        assert!(split_page(r#"{"data":[{"id":1}"#, "/data").is_err());
    }
}
