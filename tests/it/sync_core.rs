//! The idempotent sync core: one stream from the vendor into Postgres, safe to run twice,
//! after a crash, or twice at once.

use std::os::unix::process::ExitStatusExt;

use chrono::{DateTime, Utc};
use idem::run::{Mode, RunStatus};
use idem_fakes::Fault;
use serde_json::json;

use crate::helpers::{spawn_app, stderr, stdout};

async fn high_water_mark(app: &crate::helpers::TestApp) -> Option<DateTime<Utc>> {
    sqlx::query_scalar("SELECT high_water_mark FROM idem_checkpoints WHERE source_system = 'demo_billing' AND stream = 'invoices' AND scope = 'main'")
        .fetch_optional(&app.pool)
        .await
        .unwrap()
        .flatten()
}

#[tokio::test]
async fn nightly_invoice_import_is_idempotent() {
    let app = spawn_app(1000).await;
    let first = app.idem(&["run", "--no-notify"]).await;
    assert_eq!(first.status.code(), Some(0), "{}", stderr(&first));
    assert!(
        stdout(&first).contains("1000 fetched, 1000 inserted, 0 updated, 0 unchanged"),
        "{}",
        stdout(&first)
    );
    app.assert_matches_vendor().await;
    let versions_before: Vec<(String, String)> =
        sqlx::query_as("SELECT source_id, xmin::text FROM demo_invoices ORDER BY source_id")
            .fetch_all(&app.pool)
            .await
            .unwrap();

    // A full re-walk, not only the overlap: forget the checkpoint first.
    let reset = app
        .idem(&["checkpoint", "reset", "demo_billing.invoices", "--yes"])
        .await;
    assert_eq!(reset.status.code(), Some(0), "{}", stderr(&reset));
    let second = app.idem(&["run", "--no-notify", "--json"]).await;
    assert_eq!(second.status.code(), Some(0), "{}", stderr(&second));
    let report: serde_json::Value = serde_json::from_slice(&second.stdout).unwrap();
    let counters = &report[0]["counters"];
    assert_eq!(
        (
            counters["fetched"].as_u64(),
            counters["inserted"].as_u64(),
            counters["updated"].as_u64(),
            counters["unchanged"].as_u64()
        ),
        (Some(1000), Some(0), Some(0), Some(1000))
    );

    // Unchanged rows were not rewritten (same xmin) and not even locked (xmax stays 0):
    // a locked row would dirty its page and write WAL.
    let versions_after: Vec<(String, String)> =
        sqlx::query_as("SELECT source_id, xmin::text FROM demo_invoices ORDER BY source_id")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert_eq!(versions_before, versions_after);
    assert_eq!(
        app.count("SELECT count(*) FROM demo_invoices WHERE xmax <> '0'")
            .await,
        0,
        "rows were locked by the re-run"
    );
    sqlx::query("SELECT pg_stat_clear_snapshot()")
        .execute(&app.pool)
        .await
        .unwrap();
    let (inserts, updates): (i64, i64) = sqlx::query_as(
        "SELECT n_tup_ins, n_tup_upd FROM pg_stat_user_tables WHERE relname = 'demo_invoices'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!((inserts, updates), (1000, 0), "the re-run wrote tuples");
    let runs = app
        .count("SELECT count(*) FROM idem_runs WHERE status = 'succeeded'")
        .await;
    assert_eq!(runs, 2);
}

#[tokio::test]
async fn high_water_mark_run_picks_up_late_updates_inside_the_overlap_and_ties_at_the_mark() {
    let app = spawn_app(300).await;
    let first = app.run_invoices(Mode::Regular).await;
    assert_eq!(
        (first.status, first.counters.inserted),
        (RunStatus::Succeeded, 300)
    );
    let mark = high_water_mark(&app)
        .await
        .expect("a mark after the first run");

    // Late: stamped 5 minutes before the stored mark (inside the 15m overlap).
    app.vendor.update_invoice("in_000010", |inv| {
        inv["amount_due"] = json!(777);
        inv["updated"] = json!(mark.timestamp() - 300);
    });
    // A tie: stamped exactly at the mark.
    app.vendor.update_invoice("in_000020", |inv| {
        inv["status"] = json!("void");
        inv["updated"] = json!(mark.timestamp());
    });
    // Ordinary: stamped after the mark.
    app.vendor
        .update_invoice("in_000030", |inv| inv["status"] = json!("paid"));

    let second = app.run_invoices(Mode::Regular).await;
    assert_eq!(second.status, RunStatus::Succeeded);
    assert_eq!(
        (second.counters.inserted, second.counters.updated),
        (0, 3),
        "{second:?}"
    );
    assert!(
        second.counters.fetched < 300,
        "the second run re-read everything: {second:?}"
    );
    app.assert_matches_vendor().await;
    let amount: i64 =
        sqlx::query_scalar("SELECT amount_due FROM demo_invoices WHERE source_id = 'in_000010'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(amount, 777);
    assert!(
        high_water_mark(&app).await.unwrap() >= mark,
        "the mark moved backwards"
    );
}

#[tokio::test]
async fn crash_mid_page_resumes_without_duplicates() {
    for crash_at in [
        "page_before_commit:4",
        "page_after_commit:7",
        "page_before_commit:1",
    ] {
        let app = spawn_app(1000).await;
        let crashed = app
            .command(&["run", "--no-notify"])
            // One page per transaction, so the kill lands between known pages.
            .env("IDEM__IMPORT__TRANSACTION_RECORDS", "1")
            .env("IDEM_CRASH_AT", crash_at)
            .output()
            .await
            .unwrap();
        assert_eq!(
            crashed.status.signal(),
            Some(9),
            "{crash_at}: the process should have been killed: {}",
            stderr(&crashed)
        );
        let committed_pages: i64 = match crash_at {
            "page_before_commit:4" => 3,
            "page_after_commit:7" => 7,
            _ => 0,
        };
        assert_eq!(
            app.count("SELECT count(*) FROM demo_invoices").await,
            committed_pages * 100,
            "{crash_at}"
        );
        // The checkpoint never runs ahead of the data: its resume point is the last committed page.
        let resume_pages: Option<i64> = sqlx::query_scalar(
            "SELECT (resume->>'pages')::bigint FROM idem_checkpoints WHERE scope = 'main'",
        )
        .fetch_optional(&app.pool)
        .await
        .unwrap()
        .flatten();
        assert_eq!(resume_pages.unwrap_or(0), committed_pages, "{crash_at}");
        // The vendor's list is not sorted by `updated`: no mark before the walk completes.
        assert_eq!(
            high_water_mark(&app).await,
            None,
            "{crash_at}: the mark moved mid-walk"
        );

        // The vendor moves on while we are down.
        app.vendor
            .update_invoice("in_000050", |inv| inv["amount_due"] = json!(4242));
        let requests_before = app.vendor.request_count("/v1/invoices");
        let rerun = app.idem(&["run", "--no-notify", "--json"]).await;
        assert_eq!(
            rerun.status.code(),
            Some(0),
            "{crash_at}: {}",
            stderr(&rerun)
        );
        assert_eq!(
            app.count("SELECT count(*) FROM demo_invoices").await,
            1000,
            "{crash_at}"
        );
        assert_eq!(
            app.count("SELECT count(DISTINCT source_id) FROM demo_invoices")
                .await,
            1000,
            "{crash_at}"
        );
        let rerun_requests = app.vendor.request_count("/v1/invoices") - requests_before;
        assert!(
            rerun_requests as i64 <= 10 - committed_pages + 1,
            "{crash_at}: rerun did not resume ({rerun_requests} requests)"
        );
        assert_eq!(
            app.count("SELECT count(*) FROM idem_runs WHERE status = 'abandoned'")
                .await,
            1,
            "{crash_at}"
        );
        // A third run after the resumed one catches the update made while we were down
        // (it was behind the resume point) and leaves everything else alone.
        let third = app.run_invoices(Mode::Regular).await;
        assert_eq!(third.status, RunStatus::Succeeded);
        app.assert_matches_vendor().await;
    }
}

#[tokio::test]
async fn a_second_concurrent_run_exits_75_and_writes_nothing() {
    let app = spawn_app(500).await;
    let first = app.spawn_slow_nightly_run().await;
    let second = app.idem(&["run", "--no-notify"]).await;
    assert_eq!(second.status.code(), Some(75), "{}", stderr(&second));
    assert!(
        stderr(&second).contains("another run"),
        "{}",
        stderr(&second)
    );
    assert_eq!(
        app.count("SELECT count(*) FROM idem_runs").await,
        1,
        "the locked-out run recorded itself"
    );
    let first = first.wait_with_output().await.unwrap();
    assert_eq!(first.status.code(), Some(0), "{}", stderr(&first));
    app.assert_matches_vendor().await;
}

#[tokio::test]
async fn a_bad_record_is_isolated_and_cleared_when_fixed_at_the_vendor() {
    let app = spawn_app(250).await;
    app.vendor.update_invoice("in_000042", |inv| {
        inv["amount_due"] = json!("twelve dollars")
    });
    let first = app.idem(&["run", "--no-notify"]).await;
    assert_eq!(first.status.code(), Some(3), "{}", stderr(&first));
    assert_eq!(app.count("SELECT count(*) FROM demo_invoices").await, 249);
    let (key, error, attempts): (String, String, i32) =
        sqlx::query_as("SELECT record_key, error, attempts FROM idem_failures")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(key, "in_000042");
    assert!(
        error.contains("amount_due") && error.contains("twelve dollars"),
        "{error}"
    );
    assert_eq!(attempts, 1);
    let status = app.idem(&["status"]).await;
    assert!(stdout(&status).contains("in_000042"), "{}", stdout(&status));

    app.vendor
        .update_invoice("in_000042", |inv| inv["amount_due"] = json!(1200));
    let second = app.idem(&["run", "--no-notify"]).await;
    assert_eq!(second.status.code(), Some(0), "{}", stderr(&second));
    assert_eq!(app.count("SELECT count(*) FROM idem_failures").await, 0);
    app.assert_matches_vendor().await;
}

#[tokio::test]
async fn dry_run_reports_changes_and_writes_nothing() {
    let app = spawn_app(120).await;
    let report = app
        .run_connector(&app.connector(), "invoices", Mode::Regular, true)
        .await;
    assert_eq!(
        (report.counters.fetched, report.counters.inserted),
        (120, 120)
    );
    assert_eq!(app.count("SELECT count(*) FROM idem_runs").await, 0);
    assert_eq!(app.count("SELECT count(*) FROM idem_checkpoints").await, 0);
    assert_eq!(
        app.count("SELECT count(*) FROM pg_tables WHERE tablename = 'demo_invoices'")
            .await,
        0
    );

    app.run_invoices(Mode::Regular).await;
    app.vendor
        .update_invoice("in_000001", |inv| inv["status"] = json!("paid"));
    let output = app.idem(&["run", "--dry-run"]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(
        stdout(&output).contains("dry run (nothing written)")
            && stdout(&output).contains("1 updated"),
        "{}",
        stdout(&output)
    );
    let status: String =
        sqlx::query_scalar("SELECT status FROM demo_invoices WHERE source_id = 'in_000001'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_ne!(status, "paid", "dry run wrote");
}

#[tokio::test]
async fn a_vendor_outage_fails_the_run_naming_the_url_and_the_next_run_recovers() {
    let app = spawn_app(300).await;
    let connector = app.demo_connector_variant("fast", |connector_text| {
        connector_text.replace(
            "[rate_limit]",
            "[http]\nmax_attempts = 2\ninitial_backoff = \"10ms\"\n\n[rate_limit]",
        )
    });
    let first = app
        .run_connector(&connector, "invoices", Mode::Regular, false)
        .await;
    assert_eq!(first.counters.inserted, 300);

    app.vendor
        .update_invoice("in_000001", |inv| inv["amount_due"] = json!(1));
    app.vendor
        .inject(Fault::status("/v1/invoices", 2, 500, None));
    let failed = app
        .run_connector(&connector, "invoices", Mode::Regular, false)
        .await;
    assert_eq!(failed.status, RunStatus::Failed);
    let error = failed.error.clone().unwrap_or_default();
    assert!(
        error.contains("HTTP 500") && error.contains("/v1/invoices"),
        "{error}"
    );
    assert!(!error.contains("sk_test_demo"), "secret in error: {error}");
    let run_status: String =
        sqlx::query_scalar("SELECT status FROM idem_runs ORDER BY started_at DESC LIMIT 1")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(run_status, "failed");

    let recovered = app
        .run_connector(&connector, "invoices", Mode::Regular, false)
        .await;
    assert_eq!(recovered.status, RunStatus::Succeeded, "{recovered:?}");
    assert_eq!(recovered.counters.updated, 1);
    app.assert_matches_vendor().await;
}
