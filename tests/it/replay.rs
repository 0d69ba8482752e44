//! Replays: re-read a window to repair drift, with nothing duplicated, nothing re-sent and
//! the nightly checkpoint untouched.

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;

use chrono::Utc;
use idem_fakes::SmtpSink;
use serde_json::json;

use crate::helpers::{TestApp, spawn_app_with, stderr, stdout};
use crate::ledger::smtp_notify;

/// A vendor whose invoices were all updated 3 to 4 days ago, so "last week" covers them.
async fn app_with_recent_invoices(invoices: usize, notify_toml: &str) -> TestApp {
    let app = spawn_app_with(0, notify_toml).await;
    app.vendor.set_clock(Utc::now().timestamp() + 27 * 86_400);
    app.vendor.seed_invoices(invoices);
    app
}

async fn main_checkpoint(app: &TestApp) -> (Option<chrono::DateTime<Utc>>, bool) {
    sqlx::query_as(
        "SELECT high_water_mark, resume IS NOT NULL FROM idem_checkpoints WHERE scope = 'main'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap()
}

/// Every ledger row's identity, frozen payload, state and version.
async fn ledger_rows(app: &TestApp) -> Vec<(String, String, String, String, String, String)> {
    sqlx::query_as(
        "SELECT key, subject, body, message_id, status, xmin::text FROM idem_ledger ORDER BY key",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap()
}

async fn row_versions(app: &TestApp) -> BTreeMap<String, String> {
    sqlx::query_as::<_, (String, String)>("SELECT source_id, xmin::text FROM demo_invoices")
        .fetch_all(&app.pool)
        .await
        .unwrap()
        .into_iter()
        .collect()
}

#[tokio::test]
async fn replay_last_week_repairs_drift_and_sends_nothing_twice() {
    let sink = SmtpSink::start().await;
    let app = app_with_recent_invoices(150, &smtp_notify(sink.addr())).await;
    // A few open invoices fell due ten days ago.
    let (ten_days_ago, three_days_ago) = (
        Utc::now().timestamp() - 10 * 86_400,
        Utc::now().timestamp() - 3 * 86_400,
    );
    for n in [1, 2, 4, 5, 7, 8, 10, 11] {
        app.vendor.update_invoice(&format!("in_{n:06}"), |inv| {
            inv["due_date"] = json!(ten_days_ago);
            inv["updated"] = json!(three_days_ago);
        });
    }
    let first = app.idem(&["run"]).await;
    assert_eq!(first.status.code(), Some(0), "{}", stderr(&first));
    let reminders = sink.messages().len();
    assert!(reminders > 0);
    let checkpoint_before = main_checkpoint(&app).await;

    // Drift on our side: a typed column edited by hand (the stored hash still matches), the
    // raw data edited, a row deleted.
    sqlx::query("UPDATE demo_invoices SET amount_due = 1 WHERE source_id = 'in_000005'")
        .execute(&app.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE demo_invoices SET data = jsonb_set(data, '{status}', '\"void\"') WHERE source_id = 'in_000006'").execute(&app.pool).await.unwrap();
    sqlx::query("DELETE FROM demo_invoices WHERE source_id = 'in_000008'")
        .execute(&app.pool)
        .await
        .unwrap();
    // Drift at the vendor: changes stamped yesterday.
    let yesterday = Utc::now().timestamp() - 86_400;
    app.vendor.update_invoice("in_000010", |inv| {
        inv["amount_due"] = json!(99_900);
        inv["updated"] = json!(yesterday);
    });
    app.vendor.update_invoice("in_000011", |inv| {
        inv["status"] = json!("paid");
        inv["updated"] = json!(yesterday);
    });
    let touched = [
        "in_000005",
        "in_000006",
        "in_000008",
        "in_000010",
        "in_000011",
    ];
    let versions_before = row_versions(&app).await;
    let ledger_before = ledger_rows(&app).await;

    let replay = app
        .idem(&["replay", "demo_billing.invoices", "--since", "7d", "--json"])
        .await;
    assert_eq!(replay.status.code(), Some(0), "{}", stderr(&replay));
    let report: serde_json::Value = serde_json::from_slice(&replay.stdout).unwrap();
    let counters = &report[0]["counters"];
    assert_eq!(
        (
            counters["fetched"].as_u64(),
            counters["inserted"].as_u64(),
            counters["updated"].as_u64()
        ),
        (Some(150), Some(1), Some(4)),
        "{report}"
    );

    app.assert_matches_vendor().await;
    let amount: i64 =
        sqlx::query_scalar("SELECT amount_due FROM demo_invoices WHERE source_id = 'in_000005'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_ne!(amount, 1, "the hand-edited typed column was not repaired");
    let versions_after = row_versions(&app).await;
    for (id, version) in &versions_before {
        if !touched.contains(&id.as_str()) {
            assert_eq!(
                Some(version),
                versions_after.get(id),
                "untouched row {id} was rewritten"
            );
        }
    }
    assert_eq!(sink.messages().len(), reminders, "a replay sent email");
    // Ledger rows are frozen: in_000010's amount changed, yet its reminder keeps the payload
    // it was sent with (an insert is ON CONFLICT DO NOTHING, never DO UPDATE).
    assert_eq!(
        ledger_rows(&app).await,
        ledger_before,
        "a replay rewrote ledger rows"
    );
    assert_eq!(
        main_checkpoint(&app).await,
        checkpoint_before,
        "the replay moved the regular checkpoint"
    );
    let (mode, from, to): (
        String,
        Option<chrono::DateTime<Utc>>,
        Option<chrono::DateTime<Utc>>,
    ) = sqlx::query_as(
        "SELECT mode, window_from, window_to FROM idem_runs ORDER BY started_at DESC LIMIT 1",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(mode, "replay");
    let window = to.unwrap() - from.unwrap();
    assert_eq!(window.num_days(), 7);
    let status = app.idem(&["status"]).await;
    assert!(
        stdout(&status).contains("replay succeeded"),
        "{}",
        stdout(&status)
    );
    // The next nightly run finds nothing left to do.
    let nightly = app.idem(&["run"]).await;
    assert!(
        stdout(&nightly).contains("0 inserted, 0 updated") && stdout(&nightly).contains("0 sent"),
        "{}",
        stdout(&nightly)
    );
}

#[tokio::test]
async fn a_killed_replay_resumes_from_its_last_committed_page() {
    let app = app_with_recent_invoices(1000, "[notify]\ntransport = \"log\"\n").await;
    assert_eq!(
        app.run_invoices(idem::run::Mode::Regular)
            .await
            .counters
            .inserted,
        1000
    );
    sqlx::query("UPDATE demo_invoices SET amount_due = 0")
        .execute(&app.pool)
        .await
        .unwrap();
    let checkpoint_before = main_checkpoint(&app).await;

    let args = [
        "replay",
        "demo_billing.invoices",
        "--since",
        "7d",
        "--no-notify",
    ];
    let killed = app
        .command(&args)
        // One page per transaction, so the kill lands between known pages.
        .env("IDEM__IMPORT__TRANSACTION_RECORDS", "1")
        .env("IDEM_CRASH_AT", "page_after_commit:4")
        .output()
        .await
        .unwrap();
    assert_eq!(killed.status.signal(), Some(9), "{}", stderr(&killed));
    assert_eq!(
        app.count("SELECT count(*) FROM demo_invoices WHERE amount_due = 0")
            .await,
        600,
        "four pages were repaired"
    );

    let requests_before = app.vendor.request_count("/v1/invoices");
    let rerun = app.idem(&args).await;
    assert_eq!(rerun.status.code(), Some(0), "{}", stderr(&rerun));
    let pages_fetched = app.vendor.request_count("/v1/invoices") - requests_before;
    assert!(
        pages_fetched <= 7,
        "the rerun restarted instead of resuming: {pages_fetched} pages"
    );
    assert_eq!(
        app.count("SELECT count(*) FROM demo_invoices WHERE amount_due = 0")
            .await,
        0
    );
    app.assert_matches_vendor().await;
    assert_eq!(main_checkpoint(&app).await, checkpoint_before);
    assert_eq!(
        app.count("SELECT count(*) FROM idem_checkpoints WHERE scope <> 'main'")
            .await,
        0,
        "a finished replay left its resume point"
    );
}

#[tokio::test]
async fn a_replay_started_while_the_nightly_run_holds_the_lock_exits_75() {
    let app = app_with_recent_invoices(500, "[notify]\ntransport = \"log\"\n").await;
    let nightly = app.spawn_slow_nightly_run().await;
    let replay = app
        .idem(&["replay", "demo_billing.invoices", "--since", "7d"])
        .await;
    assert_eq!(replay.status.code(), Some(75), "{}", stderr(&replay));
    assert_eq!(
        app.count("SELECT count(*) FROM idem_runs WHERE mode = 'replay'")
            .await,
        0
    );
    let nightly = nightly.wait_with_output().await.unwrap();
    assert_eq!(nightly.status.code(), Some(0), "{}", stderr(&nightly));
}

#[tokio::test]
async fn a_column_added_to_the_connector_is_filled_by_a_replay() {
    let app = app_with_recent_invoices(250, "[notify]\ntransport = \"log\"\n").await;
    app.run_invoices(idem::run::Mode::Regular).await;
    let checkpoint_before = main_checkpoint(&app).await;

    let connector = app.demo_connector_variant("extended", |text| {
        text.replacen(
            "[[streams.invoices.columns]]",
            "[[streams.invoices.columns]]\nname = \"customer_name\"\npointer = \"/customer_name\"\ntype = \"text\"\n\n[[streams.invoices.columns]]",
            1,
        )
    });
    let now = Utc::now();
    let mode = idem::run::Mode::Replay {
        from: now - chrono::Duration::days(7),
        to: now,
        label: "test".into(),
        restart: false,
    };
    let report = app.run_connector(&connector, "invoices", mode, false).await;
    assert_eq!(
        (report.counters.inserted, report.counters.updated),
        (0, 250),
        "{report:?}"
    );
    assert_eq!(
        app.count("SELECT count(*) FROM demo_invoices WHERE customer_name IS NULL")
            .await,
        0
    );
    assert_eq!(
        app.count(
            "SELECT count(*) FROM demo_invoices WHERE customer_name = data->>'customer_name'"
        )
        .await,
        250
    );
    assert_eq!(main_checkpoint(&app).await, checkpoint_before);
}

#[tokio::test]
async fn replaying_a_stream_the_vendor_cannot_filter_skips_records_outside_the_window() {
    let app = app_with_recent_invoices(300, "[notify]\ntransport = \"log\"\n").await;
    let connector = app.demo_connector_variant("full", |text| {
        let start = text.find("[streams.invoices.incremental]").unwrap();
        let end = start + text[start..].find("[[streams.invoices.columns]]").unwrap();
        let full = format!(
            "{}[streams.invoices.incremental]\nkind = \"full\"\n\n{}",
            &text[..start],
            &text[end..]
        );
        full
    });

    let mut updated: Vec<i64> = app
        .vendor
        .invoices()
        .iter()
        .map(|inv| inv["updated"].as_i64().unwrap())
        .collect();
    updated.sort();
    let cut = updated[150];
    let at = |secs: i64| chrono::DateTime::<Utc>::from_timestamp(secs, 0).unwrap();
    let inside = updated.iter().filter(|u| **u >= cut).count() as u64;
    let mode = idem::run::Mode::Replay {
        from: at(cut),
        to: at(updated[299] + 1),
        label: "tail".into(),
        restart: false,
    };
    let report = app.run_connector(&connector, "invoices", mode, false).await;
    assert_eq!(
        report.counters.fetched, 300,
        "the whole list is walked: {report:?}"
    );
    assert_eq!(report.counters.inserted, inside, "{report:?}");
    assert_eq!(report.skipped_outside_window, 300 - inside);
    assert_eq!(
        app.count(&format!(
            "SELECT count(*) FROM demo_invoices WHERE (data->>'updated')::bigint < {cut}"
        ))
        .await,
        0
    );
    // No query carried a window: the vendor was asked for everything.
    assert!(
        app.vendor
            .requests()
            .iter()
            .all(|r| !r.query.as_deref().unwrap_or("").contains("updated"))
    );
}

#[tokio::test]
async fn an_operator_can_show_set_and_reset_the_checkpoint() {
    let app = app_with_recent_invoices(200, "[notify]\ntransport = \"log\"\n").await;
    app.run_invoices(idem::run::Mode::Regular).await;
    let (mark, _) = main_checkpoint(&app).await;
    let mark = mark.expect("a mark after the first run");

    let shown = app
        .idem(&["checkpoint", "show", "demo_billing.invoices"])
        .await;
    assert_eq!(shown.status.code(), Some(0), "{}", stderr(&shown));
    assert!(
        stdout(&shown).contains(&mark.to_rfc3339()),
        "{}",
        stdout(&shown)
    );

    // Moving the mark back is allowed by hand (and only by hand): the next run re-reads
    // from there, and the re-read records are no-ops.
    let earlier = mark - chrono::Duration::days(2);
    let set = app
        .idem(&[
            "checkpoint",
            "set",
            "demo_billing.invoices",
            "--high-water-mark",
            &earlier.to_rfc3339(),
        ])
        .await;
    assert_eq!(set.status.code(), Some(0), "{}", stderr(&set));
    assert_eq!(main_checkpoint(&app).await.0, Some(earlier));
    let rerun = app.run_invoices(idem::run::Mode::Regular).await;
    assert_eq!(
        (
            rerun.counters.fetched,
            rerun.counters.inserted,
            rerun.counters.updated
        ),
        (200, 0, 0),
        "{rerun:?}"
    );
    assert_eq!(
        main_checkpoint(&app).await.0,
        Some(mark),
        "the run should bring the mark back to the data"
    );

    // Reset asks first; without a terminal and without --yes it refuses and changes nothing.
    let refused = app
        .idem(&["checkpoint", "reset", "demo_billing.invoices"])
        .await;
    assert_eq!(refused.status.code(), Some(2), "{}", stderr(&refused));
    assert!(stderr(&refused).contains("--yes"), "{}", stderr(&refused));
    assert_eq!(main_checkpoint(&app).await.0, Some(mark));
}
