//! Multi-page transactions: a kill between pages of one transaction loses exactly that
//! transaction's pages (and, with two writer connections, any later ones), never more,
//! and the next run re-reads them — as no-ops where nothing changed.

use std::os::unix::process::ExitStatusExt;

use crate::helpers::{TestApp, spawn_app, stderr};

/// Kills `idem run` while page 5 sits written but uncommitted in the transaction that
/// holds pages 4-6 (300 records per transaction, 100 per page). Returns the pages whose
/// commit the checkpoint records.
async fn run_killed_inside_a_transaction(app: &TestApp, writers: &str, args: &[&str]) -> i64 {
    let crashed = app
        .command(args)
        .env("IDEM__IMPORT__TRANSACTION_RECORDS", "300")
        .env("IDEM__IMPORT__WRITER_CONNECTIONS", writers)
        .env("IDEM_CRASH_AT", "page_written:5")
        .output()
        .await
        .unwrap();
    assert_eq!(
        crashed.status.signal(),
        Some(9),
        "the process should have been killed: {}",
        stderr(&crashed)
    );
    let pages: Option<i64> = sqlx::query_scalar(
        "SELECT (resume->>'pages')::bigint FROM idem_checkpoints WHERE scope = 'main'",
    )
    .fetch_optional(&app.pool)
    .await
    .unwrap()
    .flatten();
    let pages = pages.unwrap_or(0);
    if writers == "1" {
        assert_eq!(
            pages, 3,
            "one writer: the first transaction (pages 1-3) committed"
        );
    } else {
        // Two writers: the first transaction may still have been waiting to commit.
        assert!(
            pages == 0 || pages == 3,
            "the checkpoint names a transaction boundary: {pages}"
        );
    }
    pages
}

#[tokio::test]
async fn crash_between_pages_of_one_transaction_loses_only_uncommitted_pages() {
    for writers in ["1", "2"] {
        let app = spawn_app(1000).await;
        let committed =
            run_killed_inside_a_transaction(&app, writers, &["run", "--no-notify"]).await;
        // The checkpoint is never ahead of the data, and the data never ahead of it: the
        // rows are exactly those of the committed pages (pages hold ids in order).
        assert_eq!(
            app.count("SELECT count(*) FROM demo_invoices").await,
            committed * 100,
            "writers={writers}"
        );
        assert_eq!(
            app.count("SELECT count(*) FROM demo_invoices WHERE source_id > 'in_000300'")
                .await,
            0,
            "writers={writers}: pages 4 and 5 were written but never committed"
        );

        let requests_before = app.vendor.request_count("/v1/invoices");
        let rerun = app.idem(&["run", "--no-notify", "--json"]).await;
        assert_eq!(rerun.status.code(), Some(0), "{}", stderr(&rerun));
        let report: serde_json::Value = serde_json::from_slice(&rerun.stdout).unwrap();
        assert_eq!(
            report[0]["counters"]["inserted"].as_i64(),
            Some(1000 - committed * 100),
            "writers={writers}: the rerun resumed after the last committed page"
        );
        let rerun_requests = app.vendor.request_count("/v1/invoices") - requests_before;
        assert!(
            rerun_requests as i64 <= 10 - committed + 1,
            "writers={writers}: rerun did not resume ({rerun_requests} requests)"
        );
        assert_eq!(
            app.count("SELECT count(DISTINCT source_id) FROM demo_invoices")
                .await,
            1000
        );
        app.assert_matches_vendor().await;
    }
}

#[tokio::test]
async fn crash_inside_a_transaction_of_a_no_op_rewalk_rereads_its_pages_as_no_ops() {
    for writers in ["1", "2"] {
        let app = spawn_app(1000).await;
        let first = app.idem(&["run", "--no-notify"]).await;
        assert_eq!(first.status.code(), Some(0), "{}", stderr(&first));
        let reset = app
            .idem(&["checkpoint", "reset", "demo_billing.invoices", "--yes"])
            .await;
        assert_eq!(reset.status.code(), Some(0), "{}", stderr(&reset));
        let versions_before: Vec<(String, String)> =
            sqlx::query_as("SELECT source_id, xmin::text FROM demo_invoices ORDER BY source_id")
                .fetch_all(&app.pool)
                .await
                .unwrap();

        let committed =
            run_killed_inside_a_transaction(&app, writers, &["run", "--no-notify"]).await;
        let rerun = app.idem(&["run", "--no-notify", "--json"]).await;
        assert_eq!(rerun.status.code(), Some(0), "{}", stderr(&rerun));
        let report: serde_json::Value = serde_json::from_slice(&rerun.stdout).unwrap();
        let counters = &report[0]["counters"];
        assert_eq!(
            (
                counters["fetched"].as_i64(),
                counters["inserted"].as_i64(),
                counters["updated"].as_i64(),
                counters["unchanged"].as_i64()
            ),
            (
                Some(1000 - committed * 100),
                Some(0),
                Some(0),
                Some(1000 - committed * 100)
            ),
            "writers={writers}: the lost pages are re-read as no-ops"
        );
        let versions_after: Vec<(String, String)> =
            sqlx::query_as("SELECT source_id, xmin::text FROM demo_invoices ORDER BY source_id")
                .fetch_all(&app.pool)
                .await
                .unwrap();
        assert_eq!(
            versions_before, versions_after,
            "writers={writers}: no row was rewritten"
        );
        let resume: Option<serde_json::Value> =
            sqlx::query_scalar("SELECT resume FROM idem_checkpoints WHERE scope = 'main'")
                .fetch_one(&app.pool)
                .await
                .unwrap();
        assert_eq!(resume, None, "the walk completed");
    }
}
