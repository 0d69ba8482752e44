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
        let versions_before = row_versions(&app).await;

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
        let versions_after = row_versions(&app).await;
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

/// The run's counters from `idem run --json` after resetting the checkpoint: a full walk.
async fn full_walk_counters(app: &TestApp) -> (i64, i64, i64, i64) {
    let reset = app
        .idem(&["checkpoint", "reset", "demo_billing.invoices", "--yes"])
        .await;
    assert_eq!(reset.status.code(), Some(0), "{}", stderr(&reset));
    let run = app.idem(&["run", "--no-notify", "--json"]).await;
    assert_eq!(run.status.code(), Some(0), "{}", stderr(&run));
    let report: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    let c = &report[0]["counters"];
    let n = |k: &str| c[k].as_i64().unwrap_or(-1);
    (n("fetched"), n("inserted"), n("updated"), n("unchanged"))
}

/// Each row's id and version (`xmin` changes whenever Postgres writes the row).
async fn row_versions(app: &TestApp) -> Vec<(String, String)> {
    sqlx::query_as("SELECT source_id, xmin::text FROM demo_invoices ORDER BY source_id")
        .fetch_all(&app.pool)
        .await
        .unwrap()
}

/// The same records written another way (every object's keys reversed, spaces after the
/// separators) are the same records: a full re-walk writes no row, and a real change
/// made alongside is still written.
#[tokio::test]
async fn a_vendor_that_reorders_its_json_keys_rewrites_no_row() {
    let app = spawn_app(250).await;
    let first = app.idem(&["run", "--no-notify"]).await;
    assert_eq!(first.status.code(), Some(0), "{}", stderr(&first));
    let before = row_versions(&app).await;

    app.vendor.reverse_key_order();
    assert_eq!(full_walk_counters(&app).await, (250, 0, 0, 250));
    assert_eq!(before, row_versions(&app).await, "no row was rewritten");

    app.vendor
        .update_invoice("in_000007", |invoice| invoice["amount_due"] = 4242.into());
    assert_eq!(full_walk_counters(&app).await, (250, 0, 1, 249));
    assert_eq!(
        app.count("SELECT count(*) FROM demo_invoices WHERE amount_due = 4242")
            .await,
        1
    );
    app.assert_matches_vendor().await;
}

/// Tables written before content hashes carried a version byte hold 16-byte hashes of
/// the record serialized with sorted keys. The first walk after the upgrade compares
/// those the old way: an unchanged record gets its new hash and nothing else (same data,
/// same `last_changed_at`), a changed one is written; the walk after that touches no row.
#[tokio::test]
async fn rows_hashed_by_an_earlier_version_are_not_rewritten_after_the_upgrade() {
    let app = spawn_app(250).await;
    let first = app.idem(&["run", "--no-notify"]).await;
    assert_eq!(first.status.code(), Some(0), "{}", stderr(&first));

    // The table as an earlier idem left it.
    let connector = app.connector();
    let stream = connector.stream("invoices").expect("invoices stream");
    let fingerprint = idem::normalize::mapping_fingerprint(&stream.columns);
    let stored: Vec<(String, String)> =
        sqlx::query_as("SELECT source_id, data::text FROM demo_invoices")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    let (ids, legacy): (Vec<String>, Vec<Vec<u8>>) = stored
        .iter()
        .map(|(id, data)| {
            let hash = idem::normalize::legacy_hash(&fingerprint, data).expect("stored JSON");
            (id.clone(), hash)
        })
        .unzip();
    sqlx::query(
        "UPDATE demo_invoices t SET content_hash = u.hash
         FROM unnest($1::text[], $2::bytea[]) AS u(id, hash) WHERE t.source_id = u.id",
    )
    .bind(&ids)
    .bind(&legacy)
    .execute(&app.pool)
    .await
    .unwrap();
    let snapshot = "SELECT source_id, data::text, last_changed_at::text FROM demo_invoices
                    WHERE source_id <> 'in_000042' ORDER BY source_id";
    let before: Vec<(String, String, String)> =
        sqlx::query_as(snapshot).fetch_all(&app.pool).await.unwrap();
    app.vendor
        .update_invoice("in_000042", |invoice| invoice["amount_due"] = 4242.into());

    assert_eq!(full_walk_counters(&app).await, (250, 0, 1, 249));
    let after: Vec<(String, String, String)> =
        sqlx::query_as(snapshot).fetch_all(&app.pool).await.unwrap();
    assert_eq!(
        before, after,
        "unchanged rows keep their data and change time"
    );
    assert_eq!(
        app.count(&format!(
            "SELECT count(*) FROM demo_invoices
             WHERE octet_length(content_hash) = 17 AND get_byte(content_hash, 0) = {}",
            idem::normalize::HASH_VERSION
        ))
        .await,
        250,
        "every row now has a versioned hash"
    );
    app.assert_matches_vendor().await;

    let versions = row_versions(&app).await;
    assert_eq!(full_walk_counters(&app).await, (250, 0, 0, 250));
    assert_eq!(
        versions,
        row_versions(&app).await,
        "the next walk writes nothing"
    );
}
