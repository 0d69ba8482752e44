//! Raw record → row: the id, `updated_at`, typed column values and a content hash.
//!
//! Everything that can be wrong with one record is found here, before any SQL runs, so a
//! bad record becomes a [`RecordFailure`] and never aborts its page's transaction.

use chrono::{DateTime, NaiveDate, NaiveDateTime, TimeZone, Utc};
use serde_json::Value;

use crate::record::{self, Pointers, Record};
use crate::schema::connector::{ColumnSpec, ColumnType, StreamSpec, TimeFormat};
use crate::values;

/// A record ready to upsert. Typed values are text that Postgres casts without error
/// (checked here), so one statement can carry every row of a page.
#[derive(Debug, Clone)]
pub struct Row {
    pub source_id: String,
    pub updated_at: Option<DateTime<Utc>>,
    /// One entry per declared column, in declaration order; `None` is SQL NULL.
    pub values: Vec<Option<String>>,
    /// The record's JSON text (the vendor's own, unless idem had to parse it).
    pub data: String,
    /// Hash of the mapping and the record's content (see [`crate::record`]): equal
    /// hash, nothing to write. [`HASH_VERSION`] and 16 bytes.
    pub hash: Vec<u8>,
}

/// A record that cannot be stored, with what is wrong.
#[derive(Debug, Clone)]
pub struct RecordFailure {
    /// The record's id, or a hash of its payload when it has none.
    pub record_key: String,
    pub source_id: Option<String>,
    pub payload: Value,
    pub error: String,
}

/// The longest id a row may have: `UNIQUE (source_system, source_id)` is a btree index,
/// whose entries Postgres caps at 2704 bytes.
const MAX_ID_BYTES: usize = 2000;

/// Normalizes the records of one stream.
pub struct Normalizer {
    id: String,
    updated_at: Option<(String, TimeFormat)>,
    columns: Vec<ColumnSpec>,
    mapping_fingerprint: Vec<u8>,
    pointers: Pointers,
}

/// The first byte of every content hash idem writes now. Hashes written before it (16
/// bytes, of the record serialized with sorted keys) are "legacy": a walk that meets one
/// compares it the old way and, when the record is unchanged, rewrites the hash alone.
pub const HASH_VERSION: u8 = 2;

/// What a mapping contributes to every hash: a change of mapping changes every hash, so
/// the next walk rewrites the rows with the new columns instead of calling them
/// unchanged. Only the typed columns: two streams filling one table with the same columns
/// (an events feed and a backfill) hash the same record the same way.
pub fn mapping_fingerprint(columns: &[ColumnSpec]) -> Vec<u8> {
    format!(
        "{:?}",
        columns
            .iter()
            .map(|c| (&c.name, &c.pointer, c.column_type, &c.format))
            .collect::<Vec<_>>()
    )
    .into_bytes()
}

/// The hash idem wrote before [`HASH_VERSION`]: of the record parsed and serialized again
/// (which sorted its keys). `None` when `data` is not JSON serde_json reads.
pub fn legacy_hash(fingerprint: &[u8], data: &str) -> Option<Vec<u8>> {
    let value: Value = serde_json::from_str(data).ok()?;
    let canonical = serde_json::to_string(&value).ok()?;
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    hasher.update(fingerprint);
    hasher.update(canonical.as_bytes());
    Some(hasher.digest128().to_be_bytes().to_vec())
}

impl Normalizer {
    pub fn new(stream: &StreamSpec) -> Self {
        let updated_at = stream
            .updated_at
            .as_ref()
            .map(|u| (u.pointer.clone(), u.format.clone()));
        // Read in one pass over the record's text: the id, updated_at, then each column.
        let pointers = Pointers::new(
            std::iter::once(stream.id.as_str())
                .chain(updated_at.iter().map(|(pointer, _)| pointer.as_str()))
                .chain(stream.columns.iter().map(|c| c.pointer.as_str())),
        );
        Self {
            id: stream.id.clone(),
            updated_at,
            columns: stream.columns.clone(),
            mapping_fingerprint: mapping_fingerprint(&stream.columns),
            pointers,
        }
    }

    pub fn columns(&self) -> &[ColumnSpec] {
        &self.columns
    }

    fn content_hash(&self, content: u128) -> Vec<u8> {
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        hasher.update(&self.mapping_fingerprint);
        hasher.update(&content.to_le_bytes());
        let mut hash = Vec::with_capacity(17);
        hash.push(HASH_VERSION);
        hash.extend_from_slice(&hasher.digest128().to_be_bytes());
        hash
    }

    pub fn normalize(&self, record: Record) -> Result<Row, RecordFailure> {
        match self.read_in_one_pass(record) {
            Ok(row) => Ok(row),
            Err(record) => self.normalize_value(record.value()),
        }
    }

    /// The common case, from the record's text without parsing it whole: the text itself
    /// is what Postgres stores (jsonb parses it, in any key order). Anything unusual (no
    /// id, a value that does not fit its column, a value Postgres refuses, text
    /// serde_json cannot read) hands the record back, for [`Self::normalize_value`] to
    /// find and name.
    fn read_in_one_pass(&self, record: Record) -> Result<Row, Record> {
        let Ok(scanned) = record::scan(record.json(), &self.pointers) else {
            return Err(record);
        };
        let mut values = scanned.values.into_iter();
        let source_id = match values.next().flatten() {
            Some(Value::String(id)) if !id.is_empty() => id,
            Some(Value::Number(id)) => id.to_string(),
            _ => return Err(record),
        };
        if source_id.len() > MAX_ID_BYTES {
            return Err(record);
        }
        let updated_at = match &self.updated_at {
            None => None,
            Some((_, format)) => match values.next().flatten() {
                Some(value) if !value.is_null() => match parse_time(&value, format) {
                    Ok(time) => Some(time),
                    Err(_) => return Err(record),
                },
                _ => return Err(record),
            },
        };
        let mut typed = Vec::with_capacity(self.columns.len());
        for (column, value) in self.columns.iter().zip(values) {
            match typed_value(value.as_ref(), column) {
                Ok(value) => typed.push(value),
                Err(_) => return Err(record),
            }
        }
        Ok(Row {
            source_id,
            updated_at,
            values: typed,
            hash: self.content_hash(scanned.hash),
            data: record.into_json(),
        })
    }

    /// Normalizes a parsed record, naming what is wrong with it.
    pub fn normalize_value(&self, record: Value) -> Result<Row, RecordFailure> {
        let data = serde_json::to_string(&record).expect("a JSON value serializes");
        let fail = |source_id: Option<String>, record: Value, error: String| {
            // What goes into idem_failures must itself be storable: no NUL in the key, the
            // error or the payload.
            let payload_hash =
                || hex(&xxhash_rust::xxh3::xxh3_128(data.as_bytes()).to_be_bytes()[..8]);
            let source_id = source_id.map(|id| values::sanitize_text(&id));
            let record_key = match &source_id {
                None => format!("no-id:{}", payload_hash()),
                // The key is in idem_failures' primary key, which has the same size limit.
                Some(id) if id.len() > MAX_ID_BYTES => {
                    format!("long-id:{}…{}", values::cut(id, 100), payload_hash())
                }
                Some(id) => id.clone(),
            };
            RecordFailure {
                record_key,
                source_id,
                payload: values::storable_payload(record),
                error: values::sanitize_text(&error),
            }
        };
        let source_id = match record.pointer(&self.id) {
            Some(Value::String(id)) if !id.is_empty() => id.clone(),
            Some(Value::Number(id)) => id.to_string(),
            _ => {
                let error = format!("record has no id at '{}'", self.id);
                return Err(fail(None, record, error));
            }
        };
        if source_id.len() > MAX_ID_BYTES {
            let error = format!(
                "the id is {} bytes long; Postgres cannot index ids longer than {MAX_ID_BYTES} bytes",
                source_id.len()
            );
            return Err(fail(Some(source_id), record, error));
        }
        if let Some(why) = values::refused_value(&record, &data) {
            let error = format!("the record holds {why}");
            return Err(fail(Some(source_id), record, error));
        }
        let updated_at = match &self.updated_at {
            None => None,
            Some((pointer, format)) => match record.pointer(pointer) {
                None | Some(Value::Null) => {
                    let error = format!("record has no updated_at at '{pointer}'");
                    return Err(fail(Some(source_id), record, error));
                }
                Some(value) => match parse_time(value, format) {
                    Ok(time) => Some(time),
                    Err(reason) => {
                        let error = format!("updated_at at '{pointer}': {reason}");
                        return Err(fail(Some(source_id), record, error));
                    }
                },
            },
        };
        let mut values = Vec::with_capacity(self.columns.len());
        for column in &self.columns {
            match typed_value(record.pointer(&column.pointer), column) {
                Ok(value) => values.push(value),
                Err(reason) => {
                    let error = format!(
                        "column '{}' ({}) from '{}': {reason}",
                        column.name,
                        column.column_type.sql(),
                        column.pointer
                    );
                    return Err(fail(Some(source_id), record, error));
                }
            }
        }
        Ok(Row {
            source_id,
            updated_at,
            values,
            hash: self.content_hash(record::hash_value(&record)),
            data,
        })
    }
}

/// A value as an error message quotes it: short, cut on a character boundary.
fn shown(value: &Value) -> String {
    let text = value.to_string();
    match values::cut(&text, 80) {
        short if short.len() < text.len() => format!("{short}…"),
        _ => text,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads a point in time written in `format`, refusing years outside
/// [`values::YEARS`] (milliseconds in a seconds field land in year ~58,000: storing that, or
/// letting it move a high-water mark, would stall the stream).
pub fn parse_time(value: &Value, format: &TimeFormat) -> Result<DateTime<Utc>, String> {
    let time = parse_time_unchecked(value, format)?;
    let year = chrono::Datelike::year(&time);
    if !values::YEARS.contains(&year) {
        let hint = if *format == TimeFormat::UnixSeconds && year > 9999 {
            " (milliseconds in a unix_seconds field?)"
        } else {
            ""
        };
        return Err(format!(
            "{} is in year {year}, outside 1..=9999{hint}",
            values::cut(&value.to_string(), 80)
        ));
    }
    Ok(time)
}

fn parse_time_unchecked(value: &Value, format: &TimeFormat) -> Result<DateTime<Utc>, String> {
    let as_integer = || -> Result<i64, String> {
        match value {
            Value::Number(n) => n
                .as_i64()
                .or_else(|| n.as_f64().map(|f| f as i64))
                .ok_or_else(|| format!("{n} is not an integer")),
            Value::String(s) => s
                .trim()
                .parse()
                .map_err(|_| format!("'{}' is not an integer", values::cut(s, 80))),
            other => Err(format!("expected a number, found {}", shown(other))),
        }
    };
    let out_of_range = || "timestamp out of range".to_string();
    match format {
        TimeFormat::UnixSeconds => Utc
            .timestamp_opt(as_integer()?, 0)
            .single()
            .ok_or_else(out_of_range),
        TimeFormat::UnixMillis => Utc
            .timestamp_millis_opt(as_integer()?)
            .single()
            .ok_or_else(out_of_range),
        TimeFormat::Rfc3339 => {
            let text = value
                .as_str()
                .ok_or_else(|| format!("expected an RFC 3339 string, found {}", shown(value)))?;
            DateTime::parse_from_rfc3339(text)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|err| format!("'{}' is not RFC 3339: {err}", values::cut(text, 80)))
        }
        TimeFormat::Custom(pattern) => {
            let text = value
                .as_str()
                .ok_or_else(|| format!("expected a string, found {}", shown(value)))?;
            if let Ok(time) = DateTime::parse_from_str(text, pattern) {
                return Ok(time.with_timezone(&Utc));
            }
            NaiveDateTime::parse_from_str(text, pattern)
                .map(|t| t.and_utc())
                .or_else(|_| {
                    NaiveDate::parse_from_str(text, pattern)
                        .map(|d| d.and_hms_opt(0, 0, 0).expect("midnight").and_utc())
                })
                .map_err(|err| {
                    format!(
                        "'{}' does not match '{pattern}': {err}",
                        values::cut(text, 80)
                    )
                })
        }
    }
}

fn typed_value(value: Option<&Value>, column: &ColumnSpec) -> Result<Option<String>, String> {
    let value = match value {
        None | Some(Value::Null) => return Ok(None),
        Some(value) => value,
    };
    let text = || match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    match column.column_type {
        ColumnType::Text => Ok(Some(text())),
        ColumnType::Jsonb => Ok(Some(value.to_string())),
        ColumnType::Bigint | ColumnType::Integer => {
            let parsed: i64 = match value {
                Value::Number(n) => n
                    .as_i64()
                    .ok_or_else(|| format!("{n} is not a whole number"))?,
                Value::String(s) => s
                    .trim()
                    .parse()
                    .map_err(|_| format!("'{}' is not a whole number", values::cut(s, 80)))?,
                other => return Err(format!("expected a whole number, found {}", shown(other))),
            };
            if column.column_type == ColumnType::Integer && i32::try_from(parsed).is_err() {
                return Err(format!("{parsed} does not fit in integer"));
            }
            Ok(Some(parsed.to_string()))
        }
        ColumnType::Numeric | ColumnType::Double => {
            if !matches!(value, Value::String(_) | Value::Number(_)) {
                return Err(format!(
                    "expected a number, found {}",
                    values::cut(&value.to_string(), 80)
                ));
            }
            let raw = text();
            if column.column_type == ColumnType::Numeric {
                values::numeric_text(&raw).map(Some)
            } else {
                values::double_text(&raw).map(Some)
            }
        }
        ColumnType::Boolean => match value {
            Value::Bool(b) => Ok(Some(b.to_string())),
            Value::String(s) if matches!(s.as_str(), "true" | "false") => Ok(Some(s.clone())),
            other => Err(format!("expected true or false, found {}", shown(other))),
        },
        ColumnType::Timestamptz | ColumnType::Date => {
            let format = column.format.clone().unwrap_or_default();
            let time = parse_time(value, &format)?;
            Ok(Some(if column.column_type == ColumnType::Date {
                time.date_naive().to_string()
            } else {
                time.to_rfc3339()
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rec(value: Value) -> Record {
        Record::from_value(&value)
    }

    fn text(json: &str) -> Record {
        Record::from_raw(serde_json::value::RawValue::from_string(json.into()).unwrap())
    }

    fn stream() -> StreamSpec {
        toml::from_str(
            r#"
            path = "/v1/invoices"
            id = "/id"
            table = "invoices"
            updated_at = { pointer = "/updated", format = "unix_seconds" }
            columns = [
              { name = "amount_due", pointer = "/amount_due", type = "bigint" },
              { name = "due_date", pointer = "/due_date", type = "timestamptz", format = "unix_seconds" },
            ]
            "#,
        )
        .unwrap()
    }

    #[test]
    fn a_value_that_does_not_fit_names_the_column_and_record() {
        let normalizer = Normalizer::new(&stream());
        let bad = normalizer
            .normalize(rec(
                json!({"id": "in_1", "updated": 5, "amount_due": "lots"}),
            ))
            .unwrap_err();
        assert_eq!(bad.record_key, "in_1");
        assert!(bad.error.contains("amount_due"), "{}", bad.error);
        let no_id = normalizer
            .normalize(rec(json!({"updated": 5})))
            .unwrap_err();
        assert!(no_id.source_id.is_none() && no_id.record_key.starts_with("no-id:"));
        let good = normalizer
            .normalize(rec(
                json!({"id": "in_1", "updated": 5, "amount_due": 12, "due_date": null}),
            ))
            .unwrap();
        assert_eq!(good.values, vec![Some("12".to_string()), None]);
    }

    #[test]
    fn the_same_record_hashes_the_same_and_a_change_differs() {
        let normalizer = Normalizer::new(&stream());
        let a = normalizer
            .normalize(rec(json!({"id": "x", "updated": 1, "amount_due": 1})))
            .unwrap();
        let b = normalizer
            .normalize(rec(json!({"updated": 1, "amount_due": 1, "id": "x"})))
            .unwrap();
        let c = normalizer
            .normalize(rec(json!({"id": "x", "updated": 1, "amount_due": 2})))
            .unwrap();
        assert_eq!(a.hash, b.hash);
        assert_ne!(a.hash, c.hash);
    }

    #[test]
    fn a_vendor_that_reorders_keys_or_spaces_its_json_changes_no_hash() {
        let normalizer = Normalizer::new(&stream());
        let compact = normalizer
            .normalize(text(r#"{"id":"x","updated":1,"amount_due":7,"due_date":86400,"meta":{"a":1,"b":[1,2]}}"#))
            .unwrap();
        let reordered = normalizer
            .normalize(text(
                r#"{ "meta": {"b": [1, 2], "a": 1}, "due_date": 86400, "amount_due": 7, "updated": 1, "id": "x" }"#,
            ))
            .unwrap();
        assert_eq!(compact.hash, reordered.hash);
        assert_eq!(compact.values, reordered.values);
        assert_eq!(
            compact.values,
            vec![Some("7".into()), Some("1970-01-02T00:00:00+00:00".into())]
        );
        // The one-pass reading stores the vendor's text; parsing it whole gives the same row.
        assert!(reordered.data.starts_with(r#"{ "meta""#));
        assert_eq!(compact.hash.len(), 17);
        assert_eq!(compact.hash[0], HASH_VERSION);
        let parsed = normalizer
            .normalize_value(serde_json::from_str(&reordered.data).unwrap())
            .unwrap();
        assert_eq!(
            (
                parsed.source_id,
                parsed.updated_at,
                parsed.values,
                parsed.hash
            ),
            (
                compact.source_id,
                compact.updated_at,
                compact.values,
                compact.hash
            )
        );
    }

    #[test]
    fn records_the_one_pass_reading_hands_back_fail_as_before() {
        let normalizer = Normalizer::new(&stream());
        let cases = [
            (r#"{"id":"","updated":1}"#, "no id"),
            (r#"{"id":"x"}"#, "no updated_at"),
            (r#"{"id":"x","updated":"soon"}"#, "updated_at at '/updated'"),
            (r#"{"id":"x","updated":1,"amount_due":1.5}"#, "amount_due"),
            (r#"{"id":"x","updated":1,"note":"a\u0000b"}"#, "NUL"),
            (r#"{"id":"x","updated":1,"note":"\ud800"}"#, "surrogate"),
        ];
        for (json, expected) in cases {
            let failure = normalizer.normalize(text(json)).unwrap_err();
            assert!(
                failure.error.contains(expected),
                "{json}: {}",
                failure.error
            );
        }
    }

    #[test]
    fn a_hash_written_before_the_version_byte_is_recognised() {
        let stream = stream();
        let fingerprint = mapping_fingerprint(&stream.columns);
        let row = Normalizer::new(&stream)
            .normalize(text(r#"{"updated":1,"id":"x","amount_due":3}"#))
            .unwrap();
        let legacy = legacy_hash(&fingerprint, &row.data).unwrap();
        // What 0.x wrote for this record: the fingerprint, then the sorted serialization.
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        hasher.update(&fingerprint);
        hasher.update(br#"{"amount_due":3,"id":"x","updated":1}"#);
        assert_eq!(legacy, hasher.digest128().to_be_bytes().to_vec());
        assert_eq!(legacy.len(), 16);
        assert_ne!(legacy, row.hash);
    }
}
