//! What valid JSON holds that Postgres (or serde_json) refuses, found per record instead of
//! per page: NUL characters, lone UTF-16 surrogates, invalid UTF-8, numbers and times out
//! of range.
//!
//! A vendor body that serde_json refuses only because of such a value is parsed again
//! leniently: each offending value is replaced by a *marker*, a string that names what was
//! there (`"\u{FFFF}idem:lone-surrogate:\ud800\u{FFFF}"`). Normalization fails any record
//! holding a marker, so one bad value fails its record and the rest of the page commits.
//! Markers are also how a failure row stays storable (`idem_failures.payload` is jsonb, which
//! refuses NUL): a stored payload with a marker fails again when retried, it never gets
//! written as if the marker were data.

use serde_json::Value;

/// Opens and closes a marker. U+FFFF is a Unicode noncharacter: vendors do not send it.
const MARK: char = '\u{FFFF}';
const MARK_PREFIX: &str = "\u{FFFF}idem:";

/// Years a stored time may have: what ISO 8601 writes without an expanded year, what every
/// client reads back, and what catches milliseconds read as seconds (year 58,000).
pub const YEARS: std::ops::RangeInclusive<i32> = 1..=9999;

fn marker(kind: &str, detail: &str) -> String {
    format!("{MARK}idem:{kind}:{detail}{MARK}")
}

/// Parses a vendor body; when serde_json refuses it, parses it again with the values it
/// cannot hold (lone surrogates, invalid UTF-8, numbers beyond `f64`) replaced by markers.
/// `Err` keeps serde_json's error about the original body.
pub fn parse_body(body: &[u8]) -> Result<Value, serde_json::Error> {
    parse_leniently(body, |text| serde_json::from_str(text))
}

/// Runs `parse` on the body as text; when serde_json refuses it, runs `parse` again on the
/// text with the values it cannot hold replaced by markers (see [`parse_body`]). `Err`
/// keeps the error about the original body. `parse` may read the body into any shape.
pub fn parse_leniently<T>(
    body: &[u8],
    parse: impl Fn(&str) -> Result<T, serde_json::Error>,
) -> Result<T, serde_json::Error> {
    // One UTF-8 check of the whole body, then parsing from `str`: `from_slice` checks
    // every string again on its own (5 % of a no-op re-walk's CPU).
    let parsed = match std::str::from_utf8(body) {
        Ok(text) => parse(text),
        // Bytes that are not UTF-8 can only sit in a string, which serde_json refuses
        // (its error names where); the repair below marks them.
        Err(_) => Err(serde_json::from_slice::<Value>(body)
            .err()
            .unwrap_or_else(|| serde::de::Error::custom("the body is not UTF-8"))),
    };
    parsed.or_else(|original| parse(&repair(body)).map_err(|_| original))
}

/// The body as text with what serde_json refuses replaced by markers. Never panics.
fn repair(body: &[u8]) -> String {
    // Invalid UTF-8 first: each bad sequence becomes a marker (only meaningful inside a
    // string; elsewhere the body stays unparsable, as it should).
    let mut text = String::with_capacity(body.len());
    for chunk in body.utf8_chunks() {
        text.push_str(chunk.valid());
        if !chunk.invalid().is_empty() {
            let bytes: String = chunk.invalid().iter().map(|b| format!("{b:02x}")).collect();
            text.push_str(&marker("invalid-utf8", &bytes));
        }
    }
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let mut in_string = false;
    let hex4 = |at: usize| -> Option<u16> {
        if at + 4 > chars.len() {
            return None;
        }
        let digits: String = chars[at..at + 4].iter().collect();
        u16::from_str_radix(&digits, 16).ok()
    };
    while i < chars.len() {
        let c = chars[i];
        if in_string {
            match c {
                '"' => {
                    in_string = false;
                    out.push(c);
                    i += 1;
                }
                '\\' if chars.get(i + 1) == Some(&'u') => match hex4(i + 2) {
                    Some(unit @ 0xD800..=0xDBFF) => {
                        let low = (chars.get(i + 6) == Some(&'\\')
                            && chars.get(i + 7) == Some(&'u'))
                        .then(|| hex4(i + 8))
                        .flatten()
                        .filter(|low| (0xDC00..=0xDFFF).contains(low));
                        if low.is_some() {
                            out.extend(&chars[i..i + 12]);
                            i += 12;
                        } else {
                            out.push_str(&json_marker("lone-surrogate", unit));
                            i += 6;
                        }
                    }
                    Some(unit @ 0xDC00..=0xDFFF) => {
                        out.push_str(&json_marker("lone-surrogate", unit));
                        i += 6;
                    }
                    _ => {
                        out.push(c);
                        i += 1;
                    }
                },
                '\\' => {
                    out.push(c);
                    if let Some(next) = chars.get(i + 1) {
                        out.push(*next);
                    }
                    i += 2;
                }
                _ => {
                    out.push(c);
                    i += 1;
                }
            }
        } else if c == '"' {
            in_string = true;
            out.push(c);
            i += 1;
        } else if c == '-' || c.is_ascii_digit() {
            let start = i;
            while i < chars.len() && matches!(chars[i], '0'..='9' | '-' | '+' | '.' | 'e' | 'E') {
                i += 1;
            }
            let token: String = chars[start..i].iter().collect();
            match token.parse::<f64>() {
                Ok(number) if number.is_infinite() => {
                    out.push('"');
                    out.push_str(&marker("number-out-of-range", &token));
                    out.push('"');
                }
                _ => out.push_str(&token),
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

/// A lone surrogate's marker, written as the inside of a JSON string.
fn json_marker(kind: &str, unit: u16) -> String {
    format!("\\uffffidem:{kind}:\\\\u{unit:04x}\\uffff")
}

/// Why `record` cannot be stored, naming where: a NUL character (Postgres text and jsonb
/// refuse it) or a marker, in any string or key. `serialized` is the record as JSON text,
/// for a fast first look.
pub fn refused_value(record: &Value, serialized: &str) -> Option<String> {
    if !serialized.contains("\\u0000") && !serialized.contains(MARK) {
        return None;
    }
    let mut path = String::new();
    find_refused(record, &mut path)
}

fn find_refused(value: &Value, path: &mut String) -> Option<String> {
    let at = |path: &str| {
        if path.is_empty() {
            "/".to_string()
        } else {
            path.to_string()
        }
    };
    match value {
        Value::String(text) => describe_refused(text).map(|why| format!("{why} at '{}'", at(path))),
        Value::Array(items) => items.iter().enumerate().find_map(|(index, item)| {
            let len = path.len();
            path.push_str(&format!("/{index}"));
            let found = find_refused(item, path);
            path.truncate(len);
            found
        }),
        Value::Object(map) => map.iter().find_map(|(key, item)| {
            let len = path.len();
            path.push('/');
            path.push_str(&sanitize_text(&key.replace('~', "~0").replace('/', "~1")));
            let found = describe_refused(key)
                .map(|why| format!("{why} in the key '{}'", at(path)))
                .or_else(|| find_refused(item, path));
            path.truncate(len);
            found
        }),
        _ => None,
    }
}

/// Whether a string holds a marker (put there by idem, or sent by a vendor that means
/// something else by it: either way the record takes the path that names it).
pub fn holds_marker(text: &str) -> bool {
    // Its first byte first (U+FFFF is EF BF BF in UTF-8): a byte search is a `memchr`, and
    // almost every string lacks it. `str::contains` of a non-ASCII char is a substring
    // search, which cost 5 % of a no-op re-walk.
    text.as_bytes().contains(&0xEF) && text.contains(MARK_PREFIX)
}

fn describe_refused(text: &str) -> Option<String> {
    if text.contains('\0') {
        return Some("a NUL character (\\u0000), which Postgres cannot store,".into());
    }
    let start = text.find(MARK_PREFIX)?;
    let rest = &text[start + MARK_PREFIX.len()..];
    let inner = rest.split(MARK).next().unwrap_or(rest);
    let (kind, detail) = inner.split_once(':').unwrap_or((inner, ""));
    Some(match kind {
        "nul" => "a NUL character (\\u0000), which Postgres cannot store,".into(),
        "lone-surrogate" => format!("a lone UTF-16 surrogate ({detail}), which is not Unicode,"),
        "invalid-utf8" => format!("bytes that are not UTF-8 (0x{detail})"),
        "number-out-of-range" => format!("the number {detail}, beyond double precision,"),
        _ => "a value idem marked as unstorable".into(),
    })
}

/// A record as it can go into `idem_failures.payload`: NULs become markers (jsonb refuses
/// them), so retrying the stored payload fails the same way instead of storing a guess.
pub fn storable_payload(value: Value) -> Value {
    let nul = || marker("nul", "");
    match value {
        Value::String(text) if text.contains('\0') => Value::String(text.replace('\0', &nul())),
        Value::Array(items) => Value::Array(items.into_iter().map(storable_payload).collect()),
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(key, item)| (key.replace('\0', &nul()), storable_payload(item)))
                .collect(),
        ),
        other => other,
    }
}

/// Text as Postgres `text` takes it: NUL written as `\u0000`.
pub fn sanitize_text(text: &str) -> String {
    if text.contains('\0') {
        text.replace('\0', "\\u0000")
    } else {
        text.to_string()
    }
}

/// A prefix of `text` of at most `max` bytes, cut on a character boundary.
pub fn cut(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Checks a double precision value as Postgres reads it, and writes it the way Postgres
/// reads it back exactly. Postgres refuses overflow *and* underflow to zero.
pub fn double_text(raw: &str) -> Result<String, String> {
    let trimmed = raw.trim();
    let number: f64 = trimmed
        .parse()
        .map_err(|_| format!("'{}' is not a number", cut(raw, 80)))?;
    let literal_special = trimmed
        .trim_start_matches(['+', '-'])
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic());
    if number.is_nan() {
        return Ok("NaN".into());
    }
    if number.is_infinite() {
        if literal_special {
            return Ok(if number > 0.0 {
                "Infinity"
            } else {
                "-Infinity"
            }
            .into());
        }
        return Err(format!(
            "{} is out of range for double precision",
            cut(raw, 80)
        ));
    }
    let mantissa = trimmed.split(['e', 'E']).next().unwrap_or("");
    if number == 0.0 && mantissa.chars().any(|c| matches!(c, '1'..='9')) {
        return Err(format!(
            "{} is out of range for double precision (too small)",
            cut(raw, 80)
        ));
    }
    Ok(format!("{number:?}"))
}

/// Checks a numeric value against what Postgres' `numeric` holds: at most 131072 digits
/// before the decimal point and 16383 after. Only finite decimal numbers are taken.
pub fn numeric_text(raw: &str) -> Result<String, String> {
    let shown = cut(raw, 80);
    let text = raw.trim();
    let unsigned = text.strip_prefix(['+', '-']).unwrap_or(text);
    let (mantissa, exponent) = match unsigned.split_once(['e', 'E']) {
        Some((m, e)) => {
            let digits = e.strip_prefix(['+', '-']).unwrap_or(e);
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!("'{shown}' is not a finite number"));
            }
            // Saturating: an absurd exponent is out of range either way.
            let value: i64 = digits.parse().unwrap_or(i64::MAX / 4);
            (m, if e.starts_with('-') { -value } else { value })
        }
        None => (unsigned, 0),
    };
    let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits_ok = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if (whole.is_empty() && fraction.is_empty()) || !digits_ok(whole) || !digits_ok(fraction) {
        return Err(format!("'{shown}' is not a finite number"));
    }
    let significant = whole.trim_start_matches('0');
    let all_zero = significant.is_empty() && fraction.bytes().all(|b| b == b'0');
    let before_point = if all_zero {
        0
    } else if significant.is_empty() {
        let leading = fraction.len() - fraction.trim_start_matches('0').len();
        exponent - leading as i64
    } else {
        significant.len() as i64 + exponent
    };
    let after_point = (fraction.len() as i64 - exponent).max(0);
    if exponent.abs() >= 1_073_741_823 || before_point > 131_072 || after_point > 16_383 {
        return Err(format!("{shown} is out of range for numeric"));
    }
    Ok(text.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lone_surrogate_fails_only_its_value() {
        let body = br#"{"data":[{"id":"a","n":"x\ud800y"},{"id":"b","n":"\ud83d\ude00 \\ud800"}]}"#;
        let value = parse_body(body).unwrap();
        let a = &value["data"][0];
        let b = &value["data"][1];
        let why = refused_value(a, &a.to_string()).unwrap();
        assert!(
            why.contains("lone UTF-16 surrogate (\\ud800)") && why.contains("/n"),
            "{why}"
        );
        assert_eq!(b["n"], "😀 \\ud800");
        assert_eq!(refused_value(b, &b.to_string()), None);
        let low = parse_body(br#"[{"id":"\udc00"}]"#).unwrap();
        assert!(refused_value(&low, &low.to_string()).is_some());
    }

    #[test]
    fn numbers_beyond_f64_and_invalid_utf8_become_markers() {
        let value = parse_body(b"[{\"a\":1e400,\"b\":-1e999},{\"s\":\"ok\xff\"}]").unwrap();
        let why = refused_value(&value[0], &value[0].to_string()).unwrap();
        assert!(why.contains("1e400"), "{why}");
        assert!(
            refused_value(&value[1], &value[1].to_string())
                .unwrap()
                .contains("0xff")
        );
        assert!(parse_body(b"{\"data\": [").is_err());
        assert!(parse_body(b"\xff{}").is_err());
    }

    #[test]
    fn nul_is_found_in_values_and_keys_and_stored_as_a_marker() {
        let record = serde_json::json!({"id": "a", "deep": [{"k\u{0}": 1}]});
        let why = refused_value(&record, &record.to_string()).unwrap();
        assert!(
            why.contains("NUL") && why.contains("/deep/0/k\\u0000"),
            "{why}"
        );
        let stored = storable_payload(record);
        assert!(!stored.to_string().contains("\\u0000"));
        assert!(
            refused_value(&stored, &stored.to_string())
                .unwrap()
                .contains("NUL")
        );
    }

    #[test]
    fn doubles_and_numerics_follow_postgres_ranges() {
        assert!(double_text("1e400").is_err());
        assert!(double_text("1e-400").is_err());
        assert_eq!(double_text("0e-400").unwrap(), "0.0");
        assert_eq!(double_text("1e-310").unwrap(), "1e-310");
        assert_eq!(double_text("-inf").unwrap(), "-Infinity");
        assert_eq!(double_text(" 2.5 ").unwrap(), "2.5");
        assert!(numeric_text("1e131071").is_ok());
        assert!(numeric_text("1e131072").is_err());
        assert!(numeric_text("1e-16383").is_ok());
        assert!(numeric_text("1e-16384").is_err());
        assert!(numeric_text("0e99999999999999999999").is_err());
        assert!(numeric_text("0e1000000").is_ok());
        assert!(numeric_text("NaN").is_err());
        assert!(numeric_text("1.2.3").is_err());
        assert!(numeric_text(".5").is_ok());
        assert!(numeric_text("-12.50").is_ok());
        assert_eq!(cut("héllo", 2), "h");
    }
}
