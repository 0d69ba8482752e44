//! Correct at the edges: values Postgres refuses fail their record (never the page), one
//! record twice in a page, a fetcher that dies, failed records never marked deleted, older
//! versions never overwriting newer rows, and a column whose type changed.

use std::path::Path;

use idem::connector::Connector;
use idem::run::{Mode, RunReport, RunStatus};
use serde_json::{Value, json};

use crate::helpers::{TestApp, spawn_app, stderr};

/// The typed columns every stream of the edge connector declares (one table, one shape).
const COLUMNS: &[(&str, &str, &str)] = &[
    ("number", "/number", "text"),
    ("status", "/status", "text"),
    ("amount_due", "/amount_due", "bigint"),
    (
        "due_date",
        "/due_date",
        "timestamptz\"\nformat = \"unix_seconds",
    ),
    ("memo", "/memo", "text"),
    ("ratio", "/ratio", "double precision"),
    ("exact", "/exact", "numeric"),
    ("small", "/small", "integer"),
    ("extra", "/extra", "jsonb"),
];

/// The streams of the edge connector, all into table `edge_invoices`.
fn stream_text(name: &str) -> String {
    let body = match name {
        // The invoice list by `updated` window, like the demo connector.
        "invoices" => {
            "path = \"/v1/invoices\"\nparams = { limit = \"100\" }\nrecords = \"/data\"\nupdated_at = { pointer = \"/updated\", format = \"unix_seconds\" }\n\
             pagination = { kind = \"last_record\", param = \"starting_after\", has_more = \"/has_more\" }\n\
             incremental = { kind = \"high_water_mark\", param = \"updated[gte]\", param_to = \"updated[lt]\", format = \"unix_seconds\", sorted = false }"
        }
        // Every invoice event (created and updated), unwrapped to the invoice.
        "invoice_events" => {
            "path = \"/v1/events\"\nparams = { limit = \"100\", type = \"invoice.*\" }\nrecords = \"/data\"\nrecord = \"/data/object\"\nupdated_at = { pointer = \"/updated\", format = \"unix_seconds\" }\n\
             pagination = { kind = \"first_record\", param = \"ending_before\", field = \"/id\" }\nincremental = { kind = \"cursor\" }"
        }
        // Only `invoice.created` events: the first version of each invoice, an older
        // source for the same rows (like a backfill page fetched before an update).
        "created_events" | "created_events_broken" => {
            "path = \"/v1/events\"\nparams = { limit = \"100\", type = \"invoice.created\" }\nrecords = \"/data\"\nrecord = \"/data/object\"\n\
             pagination = { kind = \"first_record\", param = \"ending_before\", field = \"/id\" }\nincremental = { kind = \"cursor\" }"
        }
        // The whole list every run, marking what the vendor no longer returns.
        "full" => {
            "path = \"/v1/invoices\"\nparams = { limit = \"4\" }\nrecords = \"/data\"\nupdated_at = { pointer = \"/updated\", format = \"unix_seconds\" }\n\
             pagination = { kind = \"last_record\", param = \"starting_after\", has_more = \"/has_more\" }\n\
             incremental = { kind = \"full\", mark_deleted = true }"
        }
        other => panic!("unknown edge stream {other}"),
    };
    // The broken variant reads `updated` as RFC 3339 while the vendor writes unix seconds:
    // every record fails until the connector is fixed.
    let updated_at = match name {
        "created_events" => "updated_at = { pointer = \"/updated\", format = \"unix_seconds\" }\n",
        "created_events_broken" => {
            "updated_at = { pointer = \"/updated\", format = \"rfc3339\" }\n"
        }
        _ => "",
    };
    let stream = name.trim_end_matches("_broken");
    let mut text = format!(
        "[streams.{stream}]\nid = \"/id\"\ntable = \"edge_invoices\"\n{updated_at}{body}\n"
    );
    for (column, pointer, kind) in COLUMNS {
        text.push_str(&format!(
            "\n[[streams.{stream}.columns]]\nname = \"{column}\"\npointer = \"{pointer}\"\ntype = \"{kind}\"\n"
        ));
    }
    text
}

fn edge_text(streams: &[&str]) -> String {
    let mut text = "source_system = \"edge\"\nbase_url = \"${VENDOR_URL}\"\n\n[auth]\nkind = \"bearer\"\ntoken = \"sk_test_demo\"\n\n[http]\ninitial_backoff = \"10ms\"\nmax_backoff = \"50ms\"\nmax_attempts = 2\n\n".to_string();
    for stream in streams {
        text.push_str(&stream_text(stream));
        text.push('\n');
    }
    text
}

fn edge_connector(app: &TestApp, streams: &[&str]) -> Connector {
    let base = app.vendor.base_url();
    idem::connector::parse(Path::new("edge.toml"), &edge_text(streams), &|name| {
        (name == "VENDOR_URL").then(|| base.clone())
    })
    .unwrap_or_else(|issues| panic!("{issues}"))
}

async fn run(app: &TestApp, connector: &Connector, stream: &str) -> RunReport {
    app.run_connector(connector, stream, Mode::Regular, false)
        .await
}

/// `(record_key, error, attempts)` of every stored failure, by key.
async fn failures(app: &TestApp) -> Vec<(String, String, i32)> {
    sqlx::query_as("SELECT record_key, error, attempts FROM idem_failures ORDER BY record_key")
        .fetch_all(&app.pool)
        .await
        .expect("read failures")
}

async fn stored_ids(app: &TestApp) -> Vec<String> {
    sqlx::query_scalar("SELECT source_id FROM edge_invoices ORDER BY source_id")
        .fetch_all(&app.pool)
        .await
        .expect("read rows")
}

async fn stored(app: &TestApp, id: &str) -> Value {
    sqlx::query_scalar("SELECT data FROM edge_invoices WHERE source_id = $1")
        .bind(id)
        .fetch_one(&app.pool)
        .await
        .unwrap_or_else(|e| panic!("row {id}: {e}"))
}

fn invoice(id: &str, fields: Value) -> Value {
    let mut invoice = json!({"id": id, "number": format!("N-{id}"), "status": "open", "amount_due": 100, "currency": "eur"});
    for (key, value) in fields.as_object().expect("an object").clone() {
        invoice[key] = value;
    }
    invoice
}

#[tokio::test]
async fn values_postgres_refuses_fail_the_record_not_the_page() {
    let app = spawn_app(20).await;
    // Each bad record holds one value Postgres (or serde_json) refuses, typed or only in
    // `data`; every one of them sits in the same page as the 20 good invoices.
    let bad: Vec<(&str, Value, &str)> = vec![
        ("in_bad_nul_typed", json!({"memo": "a\u{0}b"}), "NUL"),
        (
            "in_bad_nul_data",
            json!({"notes": {"deep": ["x\u{0}"]}}),
            "NUL",
        ),
        ("in_bad_nul_key", json!({"notes": {"k\u{0}": 1}}), "NUL"),
        (
            "in_bad_nul_jsonb_column",
            json!({"extra": {"a": "\u{0}"}}),
            "NUL",
        ),
        (
            "in_bad_ms_in_seconds",
            json!({"due_date": 1_795_132_800_000_i64}),
            "year",
        ),
        (
            "in_bad_updated_ms",
            json!({"updated": 1_795_132_800_000_i64}),
            "year",
        ),
        (
            "in_bad_year_10000",
            json!({"due_date": 253_402_300_800_i64}),
            "year 10000",
        ),
        (
            "in_bad_double_overflow",
            json!({"ratio": "1e400"}),
            "double precision",
        ),
        (
            "in_bad_double_underflow",
            json!({"ratio": "-1e-400"}),
            "double precision",
        ),
        (
            "in_bad_numeric_overflow",
            json!({"exact": "1e131072"}),
            "numeric",
        ),
        (
            "in_bad_integer_overflow",
            json!({"small": 3_000_000_000_i64}),
            "integer",
        ),
        (
            "in_bad_bigint_overflow",
            json!({"amount_due": "9223372036854775808"}),
            "whole number",
        ),
        (
            "in_bad_surrogate_typed",
            json!({"memo": "@LONE_HIGH@"}),
            "surrogate",
        ),
        (
            "in_bad_surrogate_data",
            json!({"notes": ["@LONE_LOW@"]}),
            "surrogate",
        ),
        (
            "in_bad_number_beyond_f64",
            json!({"notes": "@HUGE@"}),
            "1e400",
        ),
    ];
    for (id, fields, _) in &bad {
        app.vendor.insert_invoice(invoice(id, fields.clone()));
    }
    // An id that is not valid Unicode, and one with a NUL: their failure rows are still
    // storable.
    app.vendor
        .insert_invoice(invoice("in_bad_id_@LONE_HIGH@", json!({})));
    app.vendor
        .insert_invoice(invoice("in_bad_id_\u{0}", json!({})));
    // An id too long for the unique index (random, so Postgres cannot compress it).
    let long_id: String = (0..200u8)
        .map(|i| format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&[i])))
        .collect();
    let long_id = format!("in_bad_long_{long_id}");
    app.vendor.insert_invoice(invoice(&long_id, json!({})));
    // JSON no serde_json `Value` can hold, served as raw text.
    app.vendor.rewrite_bodies("@LONE_HIGH@", "\\ud800");
    app.vendor.rewrite_bodies("@LONE_LOW@", "x\\udfffy");
    app.vendor.rewrite_bodies("\"@HUGE@\"", "1e400");
    // A valid pair and a quoted backslash stay data: they are not lone surrogates.
    app.vendor.insert_invoice(invoice(
        "in_good_pair",
        json!({"memo": "@PAIR@", "notes": "\\ud800 is text", "ratio": "1e-310", "exact": "1e400",
               "tiny": "@TINY@"}),
    ));
    app.vendor.rewrite_bodies("@PAIR@", "\\ud83d\\ude00");
    // Valid JSON that f64 reads as 0 but Postgres' numeric cannot hold (its exponent is
    // beyond -16383): the record is stored with the number as idem reads it.
    app.vendor.rewrite_bodies("\"@TINY@\"", "1e-20000");

    let connector = edge_connector(&app, &["invoices"]);
    let report = run(&app, &connector, "invoices").await;
    assert_eq!(report.status, RunStatus::Partial, "{report:?}");
    assert_eq!(report.counters.pages, 1, "{report:?}");
    assert_eq!(report.counters.failed, bad.len() as u64 + 3, "{report:?}");
    assert_eq!(report.counters.inserted, 21, "{report:?}");
    let ids = stored_ids(&app).await;
    assert_eq!(ids.len(), 21, "{ids:?}");
    assert!(ids.iter().all(|id| !id.starts_with("in_bad")), "{ids:?}");
    assert_eq!(stored(&app, "in_good_pair").await["memo"], "😀");
    assert_eq!(
        stored(&app, "in_good_pair").await["tiny"].as_f64(),
        Some(0.0)
    );
    let double: f64 =
        sqlx::query_scalar("SELECT ratio FROM edge_invoices WHERE source_id = 'in_good_pair'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(double, 1e-310);

    let stored_failures = failures(&app).await;
    assert_eq!(stored_failures.len(), bad.len() + 3, "{stored_failures:#?}");
    assert!(
        stored_failures
            .iter()
            .any(|(key, error, _)| key.starts_with("long-id:in_bad_long_")
                && error.contains("bytes long")),
        "{stored_failures:#?}"
    );
    for (id, _, why) in &bad {
        let (_, error, _) = stored_failures
            .iter()
            .find(|(key, _, _)| key == id)
            .unwrap_or_else(|| panic!("no failure for {id}: {stored_failures:#?}"));
        assert!(error.contains(why), "{id}: '{error}' does not say '{why}'");
    }
    assert!(
        stored_failures
            .iter()
            .any(|(key, _, _)| key == "in_bad_id_\\u0000"),
        "{stored_failures:#?}"
    );
    assert!(
        stored_failures
            .iter()
            .any(|(key, error, _)| key.starts_with("in_bad_id_\u{FFFF}")
                && error.contains("surrogate")),
        "{stored_failures:#?}"
    );
    // The mark is the largest applied `updated`, not the milliseconds of a failed record.
    let mark: Option<chrono::DateTime<chrono::Utc>> = sqlx::query_scalar(
        "SELECT high_water_mark FROM idem_checkpoints WHERE stream = 'invoices' AND scope = 'main'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert!(
        mark.is_some_and(|m| chrono::Datelike::year(&m) < 2100),
        "{mark:?}"
    );

    // The next run retries them (the stored payloads fail the same way), and the stream
    // keeps moving: a record changed since is stored.
    app.vendor
        .update_invoice("in_000007", |inv| inv["status"] = json!("paid"));
    let again = run(&app, &connector, "invoices").await;
    assert_eq!(again.status, RunStatus::Partial, "{again:?}");
    assert_eq!(stored(&app, "in_000007").await["status"], "paid");
    let retried = failures(&app).await;
    assert_eq!(retried.len(), bad.len() + 3);
    assert!(
        retried.iter().all(|(_, _, attempts)| *attempts == 2),
        "{retried:#?}"
    );
    assert_eq!(stored_ids(&app).await.len(), 21);
}

#[tokio::test]
async fn a_bad_record_repeated_in_one_page_is_one_failure() {
    let app = spawn_app(5).await;
    let connector = edge_connector(&app, &["invoice_events"]);
    let nul = |n: i64| json!({"memo": format!("v{n}\u{0}")});
    // Three events of one bad invoice; one invoice bad then fixed, one good then broken,
    // one good invoice changed twice: all in the newest page of events.
    app.vendor.insert_invoice(invoice("in_bad", nul(1)));
    app.vendor
        .update_invoice("in_bad", |inv| inv["memo"] = json!("v2\u{0}"));
    app.vendor
        .update_invoice("in_bad", |inv| inv["amount_due"] = json!(3));
    app.vendor.insert_invoice(invoice("in_fixed", nul(1)));
    app.vendor
        .update_invoice("in_fixed", |inv| inv["memo"] = json!("fixed"));
    app.vendor
        .insert_invoice(invoice("in_broken", json!({"memo": "fine"})));
    app.vendor
        .update_invoice("in_broken", |inv| inv["memo"] = json!("broken\u{0}"));
    app.vendor
        .update_invoice("in_000002", |inv| inv["status"] = json!("uncollectible"));
    app.vendor
        .update_invoice("in_000002", |inv| inv["status"] = json!("paid"));

    let report = run(&app, &connector, "invoice_events").await;
    assert_eq!(report.status, RunStatus::Partial, "{report:?}");
    assert_eq!(
        report.counters.fetched, 14,
        "one page of 14 events: {report:?}"
    );
    assert_eq!(report.counters.failed, 2, "{report:?}");
    let stored_failures = failures(&app).await;
    let keys: Vec<&str> = stored_failures.iter().map(|(k, _, _)| k.as_str()).collect();
    assert_eq!(keys, ["in_bad", "in_broken"], "{stored_failures:#?}");
    assert!(
        stored_failures
            .iter()
            .all(|(_, _, attempts)| *attempts == 1)
    );
    let ids = stored_ids(&app).await;
    assert!(!ids.contains(&"in_bad".to_string()) && !ids.contains(&"in_broken".to_string()));
    assert_eq!(stored(&app, "in_fixed").await["memo"], "fixed");
    assert_eq!(stored(&app, "in_000002").await["status"], "paid");
    let copies: i64 =
        sqlx::query_scalar("SELECT count(*) FROM edge_invoices WHERE source_id = 'in_000002'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(copies, 1);
}

#[tokio::test]
async fn records_that_fail_to_normalize_are_not_marked_deleted() {
    let app = spawn_app(10).await;
    let connector = edge_connector(&app, &["full"]);
    let first = run(&app, &connector, "full").await;
    assert_eq!(first.status, RunStatus::Succeeded, "{first:?}");
    assert_eq!(stored_ids(&app).await.len(), 10);

    // Three records now fail in three ways; one is really gone.
    app.vendor
        .update_invoice("in_000003", |inv| inv["memo"] = json!("x\u{0}y"));
    app.vendor
        .update_invoice("in_000004", |inv| inv["amount_due"] = json!("lots"));
    app.vendor
        .update_invoice("in_000009", |inv| inv["updated"] = json!("yesterday"));
    assert!(app.vendor.remove_invoice("in_000006"));
    let second = run(&app, &connector, "full").await;
    assert_eq!(second.status, RunStatus::Partial, "{second:?}");
    assert_eq!(second.counters.failed, 3, "{second:?}");
    assert_eq!(second.counters.deleted, 1, "{second:?}");
    let deleted: Vec<String> = sqlx::query_scalar(
        "SELECT source_id FROM edge_invoices WHERE deleted_at IS NOT NULL ORDER BY 1",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(
        deleted,
        ["in_000006"],
        "a record the vendor returned was marked deleted"
    );
    assert_eq!(failures(&app).await.len(), 3);
}

#[tokio::test]
async fn an_older_version_never_overwrites_a_newer_row() {
    let app = spawn_app(5).await;
    let connector = edge_connector(&app, &["invoices", "created_events"]);
    app.vendor
        .update_invoice("in_000002", |inv| inv["status"] = json!("paid"));
    let list = run(&app, &connector, "invoices").await;
    assert_eq!(list.status, RunStatus::Succeeded, "{list:?}");
    let newer = stored(&app, "in_000002").await;
    assert_eq!(newer["status"], "paid");

    // The created events hold every invoice's first version: older than the row of
    // in_000002, equal to the others.
    let older = run(&app, &connector, "created_events").await;
    assert_eq!(older.status, RunStatus::Succeeded, "{older:?}");
    assert_eq!(older.counters.fetched, 5, "{older:?}");
    assert_eq!(
        (older.counters.inserted, older.counters.updated),
        (0, 0),
        "{older:?}"
    );
    assert_eq!(
        stored(&app, "in_000002").await,
        newer,
        "an older version replaced a newer row"
    );
    // A newer version still replaces the row, from either stream.
    app.vendor
        .update_invoice("in_000002", |inv| inv["amount_due"] = json!(7));
    let events = edge_connector(&app, &["invoice_events"]);
    let newest = run(&app, &events, "invoice_events").await;
    assert_eq!(newest.status, RunStatus::Succeeded, "{newest:?}");
    assert_eq!(stored(&app, "in_000002").await["amount_due"], 7);
    let amount: i64 =
        sqlx::query_scalar("SELECT amount_due FROM edge_invoices WHERE source_id = 'in_000002'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(amount, 7);
}

#[tokio::test]
async fn a_stored_failure_never_overwrites_a_newer_row() {
    let app = spawn_app(5).await;
    let fixed = edge_connector(&app, &["invoices", "created_events"]);
    let broken = edge_connector(&app, &["invoices", "created_events_broken"]);
    // The list stores in_000002's newer version; then the created events, read with a
    // broken mapping, fail all five first versions.
    app.vendor
        .update_invoice("in_000002", |inv| inv["status"] = json!("paid"));
    let list = run(&app, &fixed, "invoices").await;
    assert_eq!(list.status, RunStatus::Succeeded, "{list:?}");
    let failed = run(&app, &broken, "created_events").await;
    assert_eq!(failed.status, RunStatus::Partial, "{failed:?}");
    assert_eq!(failures(&app).await.len(), 5);

    // With the mapping fixed, the stored failures are retried: the old version of
    // in_000002 must not replace the newer row, and every failure is cleared.
    let retried = run(&app, &fixed, "created_events").await;
    assert_eq!(retried.status, RunStatus::Succeeded, "{retried:?}");
    assert_eq!(stored(&app, "in_000002").await["status"], "paid");
    assert_eq!(failures(&app).await, vec![]);

    // A failure is superseded when another stream stores the record later.
    app.vendor.insert_invoice(invoice("in_000006", json!({})));
    app.vendor.insert_invoice(invoice("in_000007", json!({})));
    let failed = run(&app, &broken, "created_events").await;
    assert_eq!(failed.counters.failed, 2, "{failed:?}");
    let list = run(&app, &fixed, "invoices").await;
    assert_eq!(list.status, RunStatus::Succeeded, "{list:?}");
    assert_eq!(
        failures(&app).await,
        vec![],
        "the records are stored, by another stream: their failures are superseded"
    );
    assert_eq!(stored_ids(&app).await.len(), 7);
}

#[tokio::test]
async fn a_fetcher_that_dies_fails_the_walk() {
    let app = spawn_app(14).await;
    let path = app.dir.path().join("edge.toml");
    // Pages of 5 and 4 records: the fetcher dies with pages behind and ahead of it.
    let text = edge_text(&["invoices", "full"])
        .replace("${VENDOR_URL}", &app.vendor.base_url())
        .replace("limit = \"100\"", "limit = \"5\"");
    std::fs::write(&path, text).unwrap();
    let config = app.dir.path().join("edge-idem.toml");
    std::fs::write(
        &config,
        format!(
            "connectors = [{:?}]\n[notify]\ntransport = \"log\"\n",
            path.display().to_string()
        ),
    )
    .unwrap();
    let idem = |stream: &str, panic_at: Option<&str>| {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_idem"));
        command
            .arg("--config")
            .arg(&config)
            .args(["--log-format", "json", "run", "--no-notify", stream])
            .env("DATABASE_URL", &app.database_url)
            .env_remove("IDEM_CRASH_AT")
            .env_remove("IDEM_PANIC_AT")
            .kill_on_drop(true);
        if let Some(point) = panic_at {
            command.env("IDEM_PANIC_AT", point);
        }
        command.output()
    };
    let first = idem("edge.full", None).await.unwrap();
    assert_eq!(first.status.code(), Some(0), "{}", stderr(&first));
    assert_eq!(stored_ids(&app).await.len(), 14);

    // One invoice is gone; the fetcher task dies while fetching page 2 of 4.
    assert!(app.vendor.remove_invoice("in_000002"));
    let died = idem("edge.full", Some("fetch_page:2")).await.unwrap();
    assert_eq!(died.status.code(), Some(1), "{}", stderr(&died));
    assert!(
        stderr(&died).contains("fetcher panicked"),
        "{}",
        stderr(&died)
    );
    let deleted: i64 =
        sqlx::query_scalar("SELECT count(*) FROM edge_invoices WHERE deleted_at IS NOT NULL")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(deleted, 0, "an incomplete walk marked deletions");
    let (status, resume): (String, Option<Value>) = sqlx::query_as(
        "SELECT r.status, c.resume FROM idem_runs r JOIN idem_checkpoints c ON c.stream = r.stream
         WHERE r.stream = 'full' ORDER BY r.started_at DESC LIMIT 1",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(status, "failed");
    assert!(resume.is_some(), "the dead walk was counted complete");

    // On a high-water-mark stream the mark does not move either.
    let died = idem("edge.invoices", Some("fetch_page:2")).await.unwrap();
    assert_eq!(died.status.code(), Some(1), "{}", stderr(&died));
    let mark: Option<Option<chrono::DateTime<chrono::Utc>>> = sqlx::query_scalar(
        "SELECT high_water_mark FROM idem_checkpoints WHERE stream = 'invoices'",
    )
    .fetch_optional(&app.pool)
    .await
    .unwrap();
    assert_eq!(mark.flatten(), None, "the mark moved after a dead fetcher");
    let done = idem("edge.invoices", None).await.unwrap();
    assert_eq!(done.status.code(), Some(0), "{}", stderr(&done));
}

#[tokio::test]
async fn a_changed_column_type_stops_the_run_and_says_how_to_migrate() {
    let app = spawn_app(3).await;
    let connector = edge_connector(&app, &["invoices"]);
    let first = run(&app, &connector, "invoices").await;
    assert_eq!(first.status, RunStatus::Succeeded, "{first:?}");
    // `amount_due` becomes numeric and `memo` jsonb in the connector file.
    let changed = edge_text(&["invoices"])
        .replace(
            "name = \"amount_due\"\npointer = \"/amount_due\"\ntype = \"bigint\"",
            "name = \"amount_due\"\npointer = \"/amount_due\"\ntype = \"numeric\"",
        )
        .replace(
            "name = \"memo\"\npointer = \"/memo\"\ntype = \"text\"",
            "name = \"memo\"\npointer = \"/memo\"\ntype = \"jsonb\"",
        );
    let base = app.vendor.base_url();
    let connector = idem::connector::parse(Path::new("edge.toml"), &changed, &|name| {
        (name == "VENDOR_URL").then(|| base.clone())
    })
    .unwrap();
    let source = idem::http::HttpSource::new(
        idem::http::VendorClient::new(connector.clone()),
        connector.stream("invoices").unwrap().clone(),
    );
    let err = idem::run::run_stream(
        &app.pool,
        &connector,
        "invoices",
        source,
        &idem::run::RunOptions::new(Mode::Regular, false),
    )
    .await
    .expect_err("a run over a drifted table must not start");
    let message = err.to_string();
    for expected in [
        "column amount_due is bigint in Postgres but the connector declares numeric",
        "ALTER TABLE \"edge_invoices\" ALTER COLUMN \"amount_due\" TYPE numeric USING \"amount_due\"::numeric;",
        "column memo is text in Postgres but the connector declares jsonb",
    ] {
        assert!(message.contains(expected), "{message}");
    }
    // After the migration the user runs, the stream runs again.
    for statement in [
        "ALTER TABLE \"edge_invoices\" ALTER COLUMN \"amount_due\" TYPE numeric USING \"amount_due\"::numeric",
        "ALTER TABLE \"edge_invoices\" ALTER COLUMN \"memo\" TYPE jsonb USING \"memo\"::jsonb",
    ] {
        sqlx::query(statement).execute(&app.pool).await.unwrap();
    }
    let after = run(&app, &connector, "invoices").await;
    assert_eq!(after.status, RunStatus::Succeeded, "{after:?}");
}

#[tokio::test]
async fn an_invalid_time_format_is_refused_when_the_connector_is_loaded() {
    let app = spawn_app(0).await;
    let text = edge_text(&["invoices"]).replace(
        "updated_at = { pointer = \"/updated\", format = \"unix_seconds\" }",
        "updated_at = { pointer = \"/updated\", format = \"%Y-%m-%d %Q\" }",
    );
    let base = app.vendor.base_url();
    let issues = idem::connector::parse(Path::new("edge.toml"), &text, &|name| {
        (name == "VENDOR_URL").then(|| base.clone())
    })
    .expect_err("a chrono format with an unknown specifier is refused");
    assert!(issues.to_string().contains("%Q"), "{issues}");
}

#[tokio::test]
async fn a_vendor_error_holding_a_nul_is_still_recorded_as_the_runs_error() {
    let app = spawn_app(3).await;
    let connector = edge_connector(&app, &["invoices"]);
    app.vendor.inject(idem_fakes::Fault::new(
        "/v1/invoices",
        1,
        idem_fakes::FaultKind::Status {
            code: 400,
            retry_after: None,
            body: Some("{\"error\": \"no such param\u{0}\"}".into()),
        },
    ));
    let failed = run(&app, &connector, "invoices").await;
    assert_eq!(failed.status, RunStatus::Failed, "{failed:?}");
    let (status, error): (String, Option<String>) =
        sqlx::query_as("SELECT status, error FROM idem_runs WHERE stream = 'invoices'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(status, "failed");
    assert!(error.is_some_and(|e| e.contains("no such param")));
}

#[tokio::test]
async fn a_record_postgres_refuses_for_a_reason_idem_cannot_foresee_fails_alone() {
    let app = spawn_app(6).await;
    let connector = edge_connector(&app, &["invoices"]);
    let first = run(&app, &connector, "invoices").await;
    assert_eq!(first.status, RunStatus::Succeeded, "{first:?}");
    // A constraint of the user's own: normalization cannot know it.
    sqlx::query(
        "ALTER TABLE edge_invoices ADD CONSTRAINT no_negative_amounts CHECK (amount_due >= 0)",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    app.vendor
        .update_invoice("in_000002", |inv| inv["amount_due"] = json!(-5));
    app.vendor
        .update_invoice("in_000004", |inv| inv["status"] = json!("paid"));
    app.vendor.insert_invoice(invoice("in_000007", json!({})));
    let second = run(&app, &connector, "invoices").await;
    assert_eq!(second.status, RunStatus::Partial, "{second:?}");
    assert_eq!(
        (
            second.counters.failed,
            second.counters.updated,
            second.counters.inserted
        ),
        (1, 1, 1),
        "{second:?}"
    );
    assert_eq!(stored(&app, "in_000004").await["status"], "paid");
    assert_eq!(stored_ids(&app).await.len(), 7);
    let stored_failures = failures(&app).await;
    assert_eq!(stored_failures.len(), 1, "{stored_failures:#?}");
    assert_eq!(stored_failures[0].0, "in_000002");
    assert!(
        stored_failures[0].1.contains("no_negative_amounts"),
        "{stored_failures:#?}"
    );
    // The retry of the stored failure is refused again; the stream still runs.
    let third = run(&app, &connector, "invoices").await;
    assert_eq!(third.status, RunStatus::Partial, "{third:?}");
    assert_eq!(failures(&app).await[0].2, 2);
}
