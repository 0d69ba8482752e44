//! Property tests (proptest): connector files, pagination, normalization (written to a real
//! Postgres) and reminder templates, fed generated and mutated inputs. None may panic; bad
//! input is refused with a message naming where it is, or fails its one record.

use std::path::{Path, PathBuf};

use idem::connector::{self, Connector, PaginationSpec};
use idem::normalize::Normalizer;
use idem::paginate::{ResponseView, next_token};
use idem::record::Record;
use idem::store::table::{Compare, DestinationTable};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection, PgPool};

/// Every secret the shipped connectors reference is set; URLs take their defaults.
fn env(name: &str) -> Option<String> {
    (!name.ends_with("_URL") && name != "MISSING_VAR").then(|| "secret".into())
}

const SHIPPED: [&str; 3] = [
    "connectors/demo_billing.toml",
    "connectors/stripe.toml",
    "connectors/hubspot.toml",
];

fn shipped(name: &str) -> (PathBuf, toml::Table) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(name);
    let text = std::fs::read_to_string(&path).expect("read a shipped connector");
    (path, text.parse().expect("a shipped connector is TOML"))
}

/// A TOML value of any kind, small.
fn toml_value() -> impl Strategy<Value = toml::Value> {
    let leaf = prop_oneof![
        any::<i64>().prop_map(toml::Value::Integer),
        any::<bool>().prop_map(toml::Value::Boolean),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(toml::Value::Float),
        "[a-z_{}$/ .:*\\-]{0,12}".prop_map(toml::Value::String),
        Just(toml::Value::String("${MISSING_VAR}".into())),
        Just(toml::Value::String("/data".into())),
        Just(toml::Value::String("bad pointer".into())),
    ];
    leaf.prop_recursive(2, 8, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(toml::Value::Array),
            prop::collection::btree_map("[a-z_]{1,8}", inner, 0..3)
                .prop_map(|m| toml::Value::Table(m.into_iter().collect())),
        ]
    })
}

/// One step of a path into a TOML tree.
#[derive(Debug, Clone)]
enum Step {
    Key(String),
    Index(usize),
}

/// Every key position of a TOML tree (tables inside arrays included).
fn positions(v: &toml::Value, prefix: Vec<Step>, out: &mut Vec<Vec<Step>>) {
    match v {
        toml::Value::Table(t) => {
            for (k, x) in t {
                let mut p = prefix.clone();
                p.push(Step::Key(k.clone()));
                out.push(p.clone());
                positions(x, p, out);
            }
        }
        toml::Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                let mut p = prefix.clone();
                p.push(Step::Index(i));
                positions(x, p, out);
            }
        }
        _ => {}
    }
}

/// The stream a path is inside, and whether it reaches below the stream's own table.
fn stream_of(path: &[Step]) -> Option<&str> {
    match path {
        [Step::Key(s), Step::Key(name), _, ..] if s == "streams" => Some(name),
        _ => None,
    }
}

#[derive(Debug, Clone)]
enum Mutation {
    Remove,
    Replace(toml::Value),
    Rename(String),
    AddUnknown(String, toml::Value),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        Just(Mutation::Remove),
        toml_value().prop_map(Mutation::Replace),
        "[a-z_]{1,10}".prop_map(Mutation::Rename),
        ("[a-z_]{1,10}", toml_value()).prop_map(|(k, v)| Mutation::AddUnknown(k, v)),
    ]
}

fn apply(root: &mut toml::Value, path: &[Step], m: &Mutation) -> bool {
    let Some((Step::Key(key), parent_path)) = path.split_last() else {
        return false;
    };
    let mut cur = root;
    for step in parent_path {
        let next = match step {
            Step::Key(k) => cur.get_mut(k.as_str()),
            Step::Index(i) => cur.get_mut(*i),
        };
        let Some(next) = next else { return false };
        cur = next;
    }
    let Some(parent) = cur.as_table_mut() else {
        return false;
    };
    match m {
        Mutation::Remove => parent.remove(key).is_some(),
        Mutation::Replace(v) => parent.insert(key.clone(), v.clone()).is_some(),
        Mutation::Rename(to) => match parent.remove(key) {
            Some(v) => {
                parent.insert(to.clone(), v);
                true
            }
            None => false,
        },
        Mutation::AddUnknown(k, v) => {
            parent.insert(format!("zz_{k}"), v.clone());
            true
        }
    }
}

#[test]
fn prop_connector_files_accept_or_name_file_stream_and_field() {
    let mut runner = TestRunner::new(Config {
        cases: std::env::var("PROP_CASES")
            .ok()
            .and_then(|c| c.parse().ok())
            .unwrap_or(256),
        ..Config::default()
    });
    let strategy = (0..SHIPPED.len(), any::<prop::sample::Index>(), mutation());
    runner
        .run(&strategy, |(file, at, m)| {
            let (path, table) = shipped(SHIPPED[file]);
            let mut root = toml::Value::Table(table);
            let mut all = Vec::new();
            positions(&root, Vec::new(), &mut all);
            let target = at.get(&all).clone();
            if !apply(&mut root, &target, &m) {
                return Ok(());
            }
            let text = toml::to_string(&root).expect("a TOML table serializes");
            let result = std::panic::catch_unwind(|| connector::parse(&path, &text, &env));
            let Ok(result) = result else {
                return Err(TestCaseError::fail(format!(
                    "parse panicked on {target:?} mutated by {m:?}"
                )));
            };
            if let Err(issues) = result {
                prop_assert!(!issues.0.is_empty(), "refused without any issue");
                for issue in &issues.0 {
                    prop_assert_eq!(&issue.file, &path);
                    prop_assert!(!issue.message.trim().is_empty());
                }
                // A change inside a stream is refused naming a stream (that one, or one that
                // shares its table and now disagrees with it) and a field.
                if let Some(stream) = stream_of(&target) {
                    prop_assert!(
                        issues
                            .0
                            .iter()
                            .any(|i| i.stream.is_some() && i.field.is_some()),
                        "{target:?} mutated by {m:?} was refused without naming a stream and a field (changed stream '{stream}'): {issues}"
                    );
                }
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn prop_connector_text_edits_never_panic() {
    let mut runner = TestRunner::new(Config {
        cases: 48,
        ..Config::default()
    });
    let strategy = (
        0..SHIPPED.len(),
        prop::collection::vec(
            (
                any::<prop::sample::Index>(),
                "[\\[\\]{}=\"#\\n a-z0-9.$]{0,4}",
                0..6usize,
            ),
            1..4,
        ),
    );
    runner
        .run(&strategy, |(file, edits)| {
            let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(SHIPPED[file]);
            let mut text = std::fs::read_to_string(&path).unwrap();
            for (at, insert, delete) in edits {
                let mut i = at.index(text.len().max(1));
                while !text.is_char_boundary(i) {
                    i -= 1;
                }
                let mut j = (i + delete).min(text.len());
                while !text.is_char_boundary(j) {
                    j += 1;
                }
                text.replace_range(i..j, &insert);
            }
            let result = std::panic::catch_unwind(|| connector::parse(&path, &text, &env));
            prop_assert!(result.is_ok(), "parse panicked");
            if let Ok(Err(issues)) = result {
                for issue in &issues.0 {
                    prop_assert_eq!(&issue.file, &path);
                }
            }
            Ok(())
        })
        .unwrap();
}

/// Any JSON value, with the awkward ones overrepresented.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        prop_oneof![
            Just(1e308),
            Just(-1e308),
            Just(5e-324),
            Just(1e-300),
            Just(9.3e18),
            Just(-9.3e18)
        ]
        .prop_map(|f| json!(f)),
        any::<String>().prop_map(Value::String),
        prop_oneof![
            Just("\u{0}"),
            Just("a\u{0}b"),
            Just("2024-01-01T00:00:00Z"),
            Just("99999-12-31T23:59:59Z"),
            Just("0000-01-01T00:00:00Z"),
            Just("-infinity"),
            Just("infinity"),
            Just("2024-02-30"),
            Just("1e400"),
            Just("NaN"),
            Just("\u{feff}"),
            Just("\u{10ffff}"),
        ]
        .prop_map(|s| Value::String(s.into())),
        (1usize..3).prop_map(|half_mb| Value::String("x".repeat(half_mb << 19))),
        // Deeper than 127 never reaches a record: serde_json refuses the body (recursion
        // limit 128), which is the HTTP layer's business.
        (20usize..127).prop_map(|depth| {
            let mut v = json!(1);
            for _ in 0..depth {
                v = json!([v]);
            }
            v
        }),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(any::<String>(), inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn pagination_spec() -> impl Strategy<Value = PaginationSpec> {
    let ptr = prop_oneof![
        Just("/next".to_owned()),
        Just("/paging/next/after".to_owned()),
        Just("/id".to_owned()),
        Just("".to_owned()),
        "(/[a-z0-9~]{0,3}){0,3}",
    ];
    prop_oneof![
        Just(PaginationSpec::None),
        (ptr.clone(), "[a-z]{1,5}")
            .prop_map(|(cursor, param)| PaginationSpec::BodyCursor { cursor, param }),
        (
            "[a-z]{1,5}",
            prop::option::of(ptr.clone()),
            prop::option::of(ptr.clone())
        )
            .prop_map(|(param, field, has_more)| PaginationSpec::LastRecord {
                param,
                field,
                has_more
            }),
        (
            "[a-z]{1,5}",
            prop::option::of(ptr.clone()),
            prop::option::of("[a-z]{1,5}")
        )
            .prop_map(
                |(param, field, backward_param)| PaginationSpec::FirstRecord {
                    param,
                    field,
                    backward_param
                }
            ),
        ptr.prop_map(|pointer| PaginationSpec::NextUrl { pointer }),
        Just(PaginationSpec::LinkHeader),
        (any::<u64>(), prop::option::of(0u64..300)).prop_map(|(start, page_size)| {
            PaginationSpec::PageNumber {
                param: "page".into(),
                start,
                page_size,
            }
        }),
        (1u64..300).prop_map(|limit| PaginationSpec::Offset {
            param: "offset".into(),
            limit_param: "limit".into(),
            limit,
        }),
    ]
}

#[test]
fn prop_pagination_any_response_gives_a_next_token_or_none() {
    let mut runner = TestRunner::new(Config {
        cases: 512,
        ..Config::default()
    });
    let strategy = (
        pagination_spec(),
        json_value(),
        prop::collection::vec(json_value(), 0..5),
        prop::option::of(any::<String>()),
        prop::option::of(prop_oneof![
            any::<String>(),
            "[0-9]{1,25}",
            Just(u64::MAX.to_string())
        ]),
    );
    runner
        .run(&strategy, |(spec, body, records, link, token)| {
            let records: Vec<Record> = records.iter().map(Record::from_value).collect();
            let view = ResponseView {
                body: &body,
                link_header: link.as_deref(),
                records: &records,
                token: token.as_deref(),
            };
            let result = std::panic::catch_unwind(|| next_token(&spec, "/id", &view));
            let Ok(result) = result else {
                return Err(TestCaseError::fail(format!(
                    "next_token panicked: {spec:?}, token {token:?}, {} records",
                    records.len()
                )));
            };
            if let Ok(Some(next)) = &result {
                prop_assert!(!next.is_empty(), "an empty next token");
                prop_assert!(!records.is_empty(), "an empty page must end the walk");
                // Counted tokens always move forward: no walk asks for the same page twice.
                if let PaginationSpec::PageNumber { .. } | PaginationSpec::Offset { .. } = spec {
                    let cur: u64 = token.as_deref().and_then(|t| t.parse().ok()).unwrap_or(0);
                    let n: u64 = next.parse().expect("a counted token is a number");
                    prop_assert!(n > cur || token.is_none(), "{spec:?}: token {cur} -> {n}");
                }
            }
            Ok(())
        })
        .unwrap();
}

fn admin_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A migrated database of its own, dropped at the end.
struct Db {
    pool: PgPool,
    name: String,
}

impl Db {
    async fn new() -> Db {
        let name = format!("idem_props_{}", uuid::Uuid::new_v4().simple());
        let mut admin = PgConnection::connect(&admin_url())
            .await
            .expect("connect to the test Postgres (see README: scripts/test.sh)");
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&mut admin)
            .await
            .unwrap();
        let mut url = url::Url::parse(&admin_url()).unwrap();
        url.set_path(&format!("/{name}"));
        let pool = idem::store::connect(url.as_str(), 2).await.unwrap();
        idem::store::migrate(&pool).await.unwrap();
        Db { pool, name }
    }

    async fn drop(self) {
        self.pool.close().await;
        if let Ok(mut admin) = PgConnection::connect(&admin_url()).await {
            let _ = sqlx::query(&format!(
                "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                self.name
            ))
            .execute(&mut admin)
            .await;
        }
    }
}

/// A stream with a column of every type over the record's fields, and a reminder rule
/// whose templates read typed columns and the raw record.
fn every_type_connector() -> Connector {
    let mut text = String::from(
        r#"source_system = "props"
base_url = "http://127.0.0.1:1"

[streams.s]
path = "/x"
records = "/data"
id = "/id"
updated_at = { pointer = "/u", format = "unix_seconds" }
table = "props_rows"

[[streams.s.notifications]]
name = "r"
key = "r:{{ source_id }}:{{ data.k }}"
to = "email"
subject = "{{ t }} {{ data.s | upper }}"
body = "{{ n }} {{ data.j }} {{ data.d }} {{ (data.i | int) + 1 }} {{ data.extra.a.b }}"
"#,
    );
    for (name, ty, pointer, format) in [
        ("email", "text", "/e", ""),
        ("t", "text", "/s", ""),
        ("big", "bigint", "/i", ""),
        ("int", "integer", "/i", ""),
        ("n", "numeric", "/n", ""),
        ("dbl", "double precision", "/n", ""),
        ("flag", "boolean", "/b", ""),
        ("at", "timestamptz", "/t", ""),
        ("at_s", "timestamptz", "/i", "unix_seconds"),
        ("at_ms", "timestamptz", "/n", "unix_millis"),
        ("day", "date", "/d", "%Y-%m-%d"),
        ("j", "jsonb", "/j", ""),
    ] {
        text += &format!(
            "\n[[streams.s.columns]]\nname = \"{name}\"\npointer = \"{pointer}\"\ntype = \"{ty}\"\n"
        );
        if !format.is_empty() {
            text += &format!("format = \"{format}\"\n");
        }
    }
    connector::parse(Path::new("props.toml"), &text, &env).expect("the props connector loads")
}

/// A record whose fields are drawn from [`json_value`] (the id stays a usable string).
fn record() -> impl Strategy<Value = Value> {
    (
        "[a-z0-9]{1,8}",
        prop::collection::vec(json_value(), 10),
        any::<bool>(),
    )
        .prop_map(|(id, v, with_email)| {
            let mut r = json!({
                "id": id, "u": v[0], "s": v[1], "i": v[2], "n": v[3], "b": v[4],
                "t": v[5], "d": v[6], "j": v[7], "k": v[8], "extra": v[9],
            });
            if with_email {
                r["e"] = json!(format!("{id}@example.com"));
            }
            r
        })
}

fn good_record(id: &str) -> Value {
    json!({"id": id, "u": 1_700_000_000, "s": "fine", "i": 42, "n": 1.5, "b": true,
           "t": "2024-01-01T00:00:00Z", "d": "2024-01-02", "j": {"a": [1]}, "k": "key",
           "extra": {"a": {"b": "deep"}},
           "e": format!("{id}@example.com")})
}

fn text_record(text: String) -> Record {
    Record::from_raw(serde_json::value::RawValue::from_string(text).expect("valid JSON"))
}

/// A record read in one pass over its text (the common path) gives the row that parsing
/// it whole gives (the path that names what is wrong), whatever the order of its keys and
/// the spacing of its text: same outcome, id, time, columns and content hash; the same
/// failure when it fails.
#[test]
fn prop_a_record_read_in_one_pass_is_the_record_parsed_whole() {
    let connector = every_type_connector();
    let normalizer = Normalizer::new(connector.stream("s").unwrap());
    let outcome = |result: Result<idem::normalize::Row, idem::normalize::RecordFailure>| {
        result
            .map(|row| (row.source_id, row.updated_at, row.values, row.hash))
            .map_err(|failure| (failure.record_key, failure.error))
    };
    let mut runner = TestRunner::new(Config {
        cases: 48,
        ..Config::default()
    });
    let result = runner.run(&record(), |record| {
        let compact = serde_json::to_string(&record).unwrap();
        let reordered = idem_fakes::reversed_json(&record);
        let mut outcomes = Vec::new();
        for text in [compact, reordered] {
            // As the vendor path has it: parsed from the text (serde_json reads a float
            // back to within its last bit, so the generated value itself may differ);
            // text nested beyond serde_json's limit is kept as one string, to fail alone.
            let parsed: Value =
                serde_json::from_str(&text).unwrap_or_else(|_| Value::String(text.clone()));
            let whole = outcome(normalizer.normalize_value(parsed));
            let one_pass = outcome(normalizer.normalize(text_record(text.clone())));
            if one_pass != whole {
                // Records hold strings of up to a megabyte: show where the two part.
                let (a, b) = (format!("{one_pass:?}"), format!("{whole:?}"));
                let at = a.chars().zip(b.chars()).take_while(|(x, y)| x == y).count();
                let near = |s: &str| {
                    s.chars()
                        .skip(at.saturating_sub(60))
                        .take(200)
                        .collect::<String>()
                };
                return Err(TestCaseError::fail(format!(
                    "one pass: …{}\nparsed whole: …{}\ntext starts {}",
                    near(&a),
                    near(&b),
                    text.chars().take(300).collect::<String>()
                )));
            }
            outcomes.push((one_pass, serde_json::from_str::<Value>(&text).is_ok()));
        }
        // The same record written two ways is one row with one hash.
        if outcomes[0].1 {
            prop_assert!(
                outcomes[0].0 == outcomes[1].0,
                "key order changed the outcome"
            );
        }
        Ok(())
    });
    if let Err(err) = result {
        panic!("{}", err.to_string().chars().take(3000).collect::<String>());
    }
}

#[test]
fn prop_normalization_rows_are_accepted_by_postgres_or_fail_their_record() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let db = rt.block_on(Db::new());
    let connector = every_type_connector();
    let stream = connector.stream("s").unwrap().clone();
    let normalizer = Normalizer::new(&stream);
    let table = DestinationTable::new(&stream.table, &stream.columns);
    rt.block_on(table.ensure(&db.pool)).unwrap();
    let mut runner = TestRunner::new(Config {
        cases: 32,
        ..Config::default()
    });
    let strategy = prop::collection::vec(record(), 1..4);
    let result = runner.run(&strategy, |records| {
        // A page: the generated records and one good record; each bad one fails alone.
        let mut page = records.clone();
        let good_id = format!("good_{}", uuid::Uuid::new_v4().simple());
        page.push(good_record(&good_id));
        let mut rows = Vec::new();
        for r in page {
            let normalized =
                std::panic::catch_unwind(|| normalizer.normalize(Record::from_value(&r)));
            let Ok(normalized) = normalized else {
                return Err(TestCaseError::fail(format!("normalize panicked on {r}")));
            };
            if let Ok(row) = normalized {
                rows.push(row);
            }
        }
        prop_assert!(
            rows.iter().any(|r| r.source_id == good_id),
            "the good record failed"
        );
        // Ids may repeat within a page; a vendor page never has two versions of one id here.
        rows.sort_by(|a, b| a.source_id.cmp(&b.source_id));
        rows.dedup_by(|a, b| a.source_id == b.source_id);
        let written: Result<(), String> = rt.block_on(async {
            let mut tx = db.pool.begin().await.map_err(|e| e.to_string())?;
            table
                .write_page(
                    &mut tx,
                    "props",
                    uuid::Uuid::new_v4(),
                    &rows,
                    Compare::Content,
                    false,
                )
                .await
                .map_err(|e| idem::run::error_chain(&e))?;
            tx.commit().await.map_err(|e| e.to_string())
        });
        prop_assert!(
            written.is_ok(),
            "Postgres refused a normalized page: {}",
            written.unwrap_err()
        );
        let stored: i64 = rt
            .block_on(
                sqlx::query_scalar("SELECT count(*) FROM props_rows WHERE source_id = $1")
                    .bind(&good_id)
                    .fetch_one(&db.pool),
            )
            .unwrap();
        prop_assert_eq!(stored, 1);
        Ok(())
    });
    rt.block_on(db.drop());
    result.unwrap();
}

#[test]
fn prop_templates_render_or_fail_their_one_ledger_row() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let db = rt.block_on(Db::new());
    let connector = every_type_connector();
    let stream = connector.stream("s").unwrap().clone();
    let normalizer = Normalizer::new(&stream);
    let table = DestinationTable::new(&stream.table, &stream.columns);
    rt.block_on(table.ensure(&db.pool)).unwrap();
    let mut runner = TestRunner::new(Config {
        cases: 32,
        ..Config::default()
    });
    let strategy = prop::collection::vec(record(), 1..5);
    let result = runner.run(&strategy, |records| {
        let good_id = format!("good_{}", uuid::Uuid::new_v4().simple());
        let mut page = records;
        page.push(good_record(&good_id));
        let mut rows: Vec<_> = page
            .into_iter()
            .filter_map(|r| normalizer.normalize(Record::from_value(&r)).ok())
            .collect();
        rows.sort_by(|a, b| a.source_id.cmp(&b.source_id));
        rows.dedup_by(|a, b| a.source_id == b.source_id);
        let outcome: Result<i64, String> = rt.block_on(async {
            let mut tx = db.pool.begin().await.map_err(|e| e.to_string())?;
            table
                .write_page(
                    &mut tx,
                    "props",
                    uuid::Uuid::new_v4(),
                    &rows,
                    Compare::Content,
                    false,
                )
                .await
                .map_err(|e| idem::run::error_chain(&e))?;
            // As a page transaction matches them: from the values it wrote.
            let ids: Vec<&str> = rows.iter().map(|r| r.source_id.as_str()).collect();
            let values: Vec<&[Option<String>]> = rows.iter().map(|r| r.values.as_slice()).collect();
            let scope = idem::ledger::rules::Scope::Written {
                ids: &ids,
                values: &values,
            };
            idem::ledger::rules::enqueue(&mut tx, "props", "s", &stream, scope)
                .await
                .map_err(|e| idem::run::error_chain(&e))?;
            let good: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM idem_ledger WHERE source_id = $1 AND key = $2",
            )
            .bind(&good_id)
            // Ledger keys are namespaced by source system and stream.
            .bind(format!("props/s/r:{good_id}:key"))
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| e.to_string())?;
            tx.commit().await.map_err(|e| e.to_string())?;
            Ok(good)
        });
        match outcome {
            Ok(good) => prop_assert_eq!(good, 1, "a bad record cost the good one its ledger row"),
            Err(e) => {
                return Err(TestCaseError::fail(format!(
                    "enqueue failed as a whole: {e}"
                )));
            }
        }
        Ok(())
    });
    rt.block_on(db.drop());
    result.unwrap();
}
