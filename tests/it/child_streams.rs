//! Child streams: invoice line items beyond the ten an invoice carries inline, walked per
//! changed invoice, crash safe across the two levels, with deletions kept within a parent.

use std::collections::BTreeSet;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;

use idem::connector::Connector;
use idem::run::{Mode, RunOptions, RunReport, RunStatus, StreamRunner};
use idem_fakes::Fault;

use crate::helpers::{TestApp, spawn_app, stderr};

/// The demo connector with line items (`connectors/demo_billing_lines.toml`), its
/// `line_items` read `limit` a page.
fn lines_connector(app: &TestApp, limit: &str) -> (Connector, PathBuf) {
    let shipped =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("connectors/demo_billing_lines.toml");
    let text = std::fs::read_to_string(shipped).expect("read the demo connector");
    let from = "path = \"/v1/invoices/{parent.id}/lines\"\nparams = { limit = \"100\" }";
    assert!(text.contains(from));
    let path = app.dir.path().join(format!("lines_{limit}.toml"));
    let text = text.replace(
        from,
        &format!("path = \"/v1/invoices/{{parent.id}}/lines\"\nparams = {{ limit = \"{limit}\" }}"),
    );
    std::fs::write(&path, text).expect("write the connector");
    // The real binary reads this file too.
    std::fs::write(
        &app.config_path,
        format!(
            "connectors = [{:?}]\n[notify]\ntransport = \"log\"\n",
            path.display().to_string()
        ),
    )
    .expect("write idem.toml");
    let connector =
        idem::connector::load_file_with(&path, &|name| app.env(name)).expect("it loads");
    (connector, path)
}

/// A run of `demo_billing.invoices` as the CLI and `serve` do it: the parent walk, then
/// the children it owes.
async fn run_with_children(app: &TestApp, connector: &Connector) -> RunReport {
    StreamRunner::default()
        .run(
            &app.pool,
            &app.database_url,
            connector,
            "invoices",
            &RunOptions::new(Mode::Regular, false),
        )
        .await
        .expect("the run starts")
}

/// The ids of invoice `invoice`'s stored, not deleted, line items.
async fn stored_lines(app: &TestApp, invoice: &str) -> BTreeSet<String> {
    sqlx::query_scalar(
        "SELECT source_id FROM demo_invoice_lines WHERE parent_source_id = $1 AND deleted_at IS NULL",
    )
    .bind(invoice)
    .fetch_all(&app.pool)
    .await
    .unwrap()
    .into_iter()
    .collect()
}

fn vendor_lines(app: &TestApp, invoice: &str) -> BTreeSet<String> {
    app.vendor
        .invoice_lines(invoice)
        .expect("the invoice exists")
        .iter()
        .map(|l| l["id"].as_str().unwrap().to_string())
        .collect()
}

/// The ids of the seeded invoices with more than ten lines.
fn long_invoices(app: &TestApp) -> Vec<String> {
    app.vendor
        .invoices()
        .into_iter()
        .filter(|i| i["lines"]["has_more"] == true)
        .map(|i| i["id"].as_str().unwrap().to_string())
        .collect()
}

/// Every line item of every long invoice is stored once, not deleted, as the vendor has
/// it, and nothing is owed any more.
async fn assert_lines_match_vendor(app: &TestApp, context: &str) {
    let mut total = 0;
    for invoice in long_invoices(app) {
        let truth = vendor_lines(app, &invoice);
        assert_eq!(
            stored_lines(app, &invoice).await,
            truth,
            "{context}: lines of {invoice}"
        );
        total += truth.len() as i64;
    }
    assert_eq!(
        app.count("SELECT count(*) FROM demo_invoice_lines WHERE deleted_at IS NULL")
            .await,
        total,
        "{context}: line items"
    );
    assert_eq!(
        app.count("SELECT count(DISTINCT source_id) FROM demo_invoice_lines")
            .await,
        app.count("SELECT count(*) FROM demo_invoice_lines").await,
        "{context}: duplicates"
    );
    assert_eq!(
        app.count("SELECT count(*) FROM idem_child_queue").await,
        0,
        "{context}: children still owed"
    );
}

#[tokio::test]
async fn child_streams_follow_changed_parents_only() {
    let app = spawn_app(20).await;
    app.vendor.seed_long_invoices(3, 25);
    let (connector, _) = lines_connector(&app, "100");

    let first = run_with_children(&app, &connector).await;
    assert_eq!(first.status, RunStatus::Succeeded, "{first:?}");
    assert_eq!(first.children.len(), 1, "{first:?}");
    assert_eq!(first.children[0].status, RunStatus::Succeeded);
    assert_eq!(first.children[0].counters.inserted, 75);
    // Only the three invoices whose inline list is incomplete (`lines.has_more`).
    assert_eq!(app.vendor.line_item_requests(), 3);
    assert_lines_match_vendor(&app, "first run").await;

    // Nothing changed at the vendor: no child request at all, no child run.
    let second = run_with_children(&app, &connector).await;
    assert_eq!(second.status, RunStatus::Succeeded);
    assert!(second.children.is_empty(), "{second:?}");
    assert_eq!(app.vendor.line_item_requests(), 3);

    // One long invoice gains a line, and a short one changes: only the long one's lines
    // are read again (one page of 26).
    let changed = long_invoices(&app)[1].clone();
    let new_line = app.vendor.add_invoice_line(&changed).unwrap();
    app.vendor
        .update_invoice("in_000002", |inv| inv["amount_due"] = 1.into());
    let third = run_with_children(&app, &connector).await;
    assert_eq!(third.status, RunStatus::Succeeded);
    assert_eq!(third.counters.updated, 2, "{third:?}");
    assert_eq!(app.vendor.line_item_requests(), 4);
    let requests = app.vendor.requests();
    let last = requests
        .iter()
        .rev()
        .find(|r| r.path.ends_with("/lines"))
        .unwrap();
    assert_eq!(last.path, format!("/v1/invoices/{changed}/lines"));
    assert_eq!(third.children[0].counters.inserted, 1);
    assert_eq!(third.children[0].counters.unchanged, 25);
    let parent: String =
        sqlx::query_scalar("SELECT parent_source_id FROM demo_invoice_lines WHERE source_id = $1")
            .bind(&new_line)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(parent, changed);
    assert_lines_match_vendor(&app, "third run").await;
}

#[tokio::test]
async fn a_crash_between_parent_and_children_loses_no_child() {
    // Two long invoices of 15 lines, read 10 a page: four child pages after one parent
    // page. Every commit boundary of the two levels, one kill each.
    let mut points: Vec<String> = [
        "page_before_commit:1",
        "page_after_commit:1",
        "walk_end_before_commit:1",
        "walk_end_after_commit:1",
        "run_after_finish:1",
        "child_run_after_finish:1",
    ]
    .iter()
    .map(|p| p.to_string())
    .collect();
    for page in 1..=4 {
        points.push(format!("child_page_before_commit:{page}"));
        points.push(format!("child_page_after_commit:{page}"));
    }
    for crash_at in &points {
        let app = spawn_app(3).await;
        app.vendor.seed_long_invoices(2, 15);
        lines_connector(&app, "10");
        let crashed = app
            .command(&["run", "--no-notify"])
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
        // The vendor moves on while idem is down: a long invoice loses a line.
        let moved = long_invoices(&app)[0].clone();
        let gone = vendor_lines(&app, &moved).into_iter().next().unwrap();
        assert!(app.vendor.remove_invoice_line(&moved, &gone));

        let rerun = app.idem(&["run", "--no-notify"]).await;
        assert_eq!(
            rerun.status.code(),
            Some(0),
            "{crash_at}: {}",
            stderr(&rerun)
        );
        app.assert_matches_vendor().await;
        assert_lines_match_vendor(&app, crash_at).await;
        // And a run after that has nothing left to do at the second level.
        let before = app.vendor.line_item_requests();
        let quiet = app.idem(&["run", "--no-notify"]).await;
        assert_eq!(
            quiet.status.code(),
            Some(0),
            "{crash_at}: {}",
            stderr(&quiet)
        );
        assert_eq!(app.vendor.line_item_requests(), before, "{crash_at}");
    }
}

#[tokio::test]
async fn children_removed_at_the_vendor_are_marked_deleted_within_their_parent() {
    let app = spawn_app(0).await;
    app.vendor.seed_long_invoices(2, 12);
    let (connector, _) = lines_connector(&app, "5");
    run_with_children(&app, &connector).await;
    let invoices = long_invoices(&app);
    let (a, b) = (invoices[0].clone(), invoices[1].clone());
    assert_eq!(stored_lines(&app, &a).await.len(), 12);

    // A line disappears from A, and reading A's lines fails after the first page: an
    // incomplete walk marks nothing.
    let gone = vendor_lines(&app, &a).into_iter().next_back().unwrap();
    assert!(app.vendor.remove_invoice_line(&a, &gone));
    app.vendor.inject(Fault::status(
        format!("/v1/invoices/{a}/lines?limit=5&starting_after="),
        1,
        400,
        None,
    ));
    let failed = run_with_children(&app, &connector).await;
    assert_eq!(failed.children[0].status, RunStatus::Failed, "{failed:?}");
    assert_eq!(
        app.count("SELECT count(*) FROM demo_invoice_lines WHERE deleted_at IS NOT NULL")
            .await,
        0
    );
    assert_eq!(app.count("SELECT count(*) FROM idem_child_queue").await, 1);

    // The vendor recovers: the next run walks A's lines again, completely, and marks the
    // removed one deleted — only it, and none of B's.
    let recovered = run_with_children(&app, &connector).await;
    assert_eq!(recovered.children[0].status, RunStatus::Succeeded);
    assert_eq!(recovered.children[0].counters.deleted, 1);
    let deleted: Vec<(String, String)> = sqlx::query_as(
        "SELECT source_id, parent_source_id FROM demo_invoice_lines WHERE deleted_at IS NOT NULL",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(deleted, vec![(gone, a.clone())]);
    assert_eq!(stored_lines(&app, &b).await, vendor_lines(&app, &b));
    assert_lines_match_vendor(&app, "after the recovery").await;
}

#[tokio::test]
async fn a_missing_parent_answers_404_without_failing_the_run() {
    let app = spawn_app(0).await;
    app.vendor.seed_long_invoices(2, 12);
    let (connector, _) = lines_connector(&app, "100");
    run_with_children(&app, &connector).await;
    let invoices = long_invoices(&app);
    let (a, b) = (invoices[0].clone(), invoices[1].clone());

    // A changes, and is gone by the time its lines are read; B changes too.
    app.vendor.add_invoice_line(&a);
    app.vendor.add_invoice_line(&b);
    app.vendor.inject(Fault::status(
        format!("/v1/invoices/{a}/lines"),
        1,
        404,
        None,
    ));
    let run = run_with_children(&app, &connector).await;
    assert_eq!(run.status, RunStatus::Succeeded, "{run:?}");
    let child = &run.children[0];
    assert_eq!(child.status, RunStatus::Succeeded, "{child:?}");
    assert_eq!(child.error, None);
    // `on_missing = "delete_children"`: A's twelve stored lines are marked deleted,
    // B's are all there (with its new one), and nothing is owed any more.
    assert_eq!(child.counters.deleted, 12);
    assert!(stored_lines(&app, &a).await.is_empty());
    assert_eq!(stored_lines(&app, &b).await, vendor_lines(&app, &b));
    assert_eq!(app.count("SELECT count(*) FROM idem_child_queue").await, 0);
    let status: String = sqlx::query_scalar(
        "SELECT status FROM idem_runs WHERE stream = 'line_items' ORDER BY started_at DESC LIMIT 1",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(status, "succeeded");
}

#[tokio::test]
async fn stripe_invoice_lines_are_a_child_of_both_invoice_streams() {
    let app = spawn_app(10).await;
    app.vendor.seed_long_invoices(2, 30);
    let base = app.vendor.base_url();
    let stripe = idem::connector::load_file_with(
        &PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("connectors/stripe.toml"),
        &|env| match env {
            "STRIPE_API_KEY" => Some("sk_test_demo".into()),
            "STRIPE_BASE_URL" => Some(base.clone()),
            _ => None,
        },
    )
    .unwrap_or_else(|issues| panic!("{issues}"));
    let mut runner = StreamRunner::default();
    let options = RunOptions::new(Mode::Regular, false);
    // The backfill finds both long invoices and owes their lines.
    let backfill = runner
        .run(
            &app.pool,
            &app.database_url,
            &stripe,
            "invoices_backfill",
            &options,
        )
        .await
        .unwrap();
    assert_eq!(backfill.status, RunStatus::Succeeded, "{backfill:?}");
    assert_eq!(backfill.children.len(), 1);
    assert_eq!(backfill.children[0].stream, "invoice_lines");
    assert_eq!(backfill.children[0].counters.inserted, 60);
    // The events feed then brings the same invoices, unchanged: no line request.
    let before = app.vendor.line_item_requests();
    let events = runner
        .run(&app.pool, &app.database_url, &stripe, "invoices", &options)
        .await
        .unwrap();
    assert_eq!(events.status, RunStatus::Succeeded, "{events:?}");
    assert_eq!(app.vendor.line_item_requests(), before);
    // A line added at the vendor arrives through the events feed.
    let invoice = long_invoices(&app)[0].clone();
    let line = app.vendor.add_invoice_line(&invoice).unwrap();
    let events = runner
        .run(&app.pool, &app.database_url, &stripe, "invoices", &options)
        .await
        .unwrap();
    assert_eq!(events.children[0].counters.inserted, 1, "{events:?}");
    let parent: String = sqlx::query_scalar(
        "SELECT parent_source_id FROM stripe_invoice_lines WHERE source_id = $1",
    )
    .bind(&line)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(parent, invoice);
    assert_eq!(
        app.count("SELECT count(*) FROM stripe_invoice_lines").await,
        61
    );
}

#[test]
fn child_stream_mistakes_are_named_before_any_request() {
    let check = |streams: &str| {
        let text = format!(
            "source_system = \"demo\"\nbase_url = \"http://127.0.0.1:1\"\n[streams.invoices]\npath = \"/v1/invoices\"\nid = \"/id\"\ntable = \"invoices\"\n{streams}"
        );
        match idem::connector::parse(std::path::Path::new("demo.toml"), &text, &|_| None) {
            Ok(_) => String::new(),
            Err(issues) => issues.to_string(),
        }
    };
    let unknown = check(
        "[streams.lines]\npath = \"/v1/invoices/{parent.id}/lines\"\nid = \"/id\"\ntable = \"lines\"\n[streams.lines.parent]\nstreams = [\"invoice\"]\n",
    );
    assert!(
        unknown.contains("stream 'lines': field 'parent.streams'")
            && unknown.contains("unknown parent stream 'invoice'"),
        "{unknown}"
    );
    let grandchild = check(
        "[streams.lines]\npath = \"/v1/invoices/{parent.id}/lines\"\nid = \"/id\"\ntable = \"lines\"\n[streams.lines.parent]\nstreams = [\"invoices\"]\n[streams.taxes]\npath = \"/v1/lines/{parent.id}/taxes\"\nid = \"/id\"\ntable = \"taxes\"\n[streams.taxes.parent]\nstreams = [\"lines\"]\n",
    );
    assert!(
        grandchild.contains("'lines' is itself a child stream"),
        "{grandchild}"
    );
    let orphan = check(
        "[streams.lines]\npath = \"/v1/invoices/{parent.id}/lines\"\nid = \"/id\"\ntable = \"lines\"\n",
    );
    assert!(
        orphan.contains("stream 'lines': field 'path': templates {parent…} need a [streams.<name>.parent] section"),
        "{orphan}"
    );
    let typo = check(
        "[streams.lines]\npath = \"/v1/invoices/{parent.key}/lines\"\nid = \"/id\"\ntable = \"lines\"\n[streams.lines.parent]\nstreams = [\"invoices\"]\n",
    );
    assert!(typo.contains("unknown template '{parent.key}'"), "{typo}");
    assert_eq!(
        check(
            "[streams.lines]\npath = \"/v1/invoices/{parent.id}/lines\"\nid = \"/id\"\ntable = \"lines\"\n[streams.lines.parent]\nstreams = [\"invoices\"]\nwhen = [{ pointer = \"/lines/has_more\", eq = true }]\n"
        ),
        ""
    );
}

#[tokio::test]
async fn a_replay_walks_the_children_of_every_parent_it_reads() {
    let app = spawn_app(5).await;
    app.vendor.seed_long_invoices(3, 12);
    let (connector, _) = lines_connector(&app, "100");
    run_with_children(&app, &connector).await;
    assert_eq!(app.vendor.line_item_requests(), 3);
    let invoice = long_invoices(&app)[2].clone();
    let at = |secs: i64| chrono::DateTime::<chrono::Utc>::from_timestamp(secs, 0).unwrap();
    let replay = StreamRunner::default()
        .run(
            &app.pool,
            &app.database_url,
            &connector,
            "invoices",
            &RunOptions::new(
                Mode::Replay {
                    from: at(0),
                    to: at(app.vendor.invoices()[0]["updated"].as_i64().unwrap() + 86_400 * 400),
                    label: "all".into(),
                    restart: false,
                },
                false,
            ),
        )
        .await
        .unwrap();
    assert_eq!(replay.status, RunStatus::Succeeded, "{replay:?}");
    // Every long invoice read, unchanged or not, has its lines read again, as no-ops.
    assert_eq!(app.vendor.line_item_requests(), 6);
    let child = &replay.children[0];
    assert_eq!((child.counters.unchanged, child.counters.inserted), (36, 0));
    assert_eq!(
        stored_lines(&app, &invoice).await,
        vendor_lines(&app, &invoice)
    );
    assert_lines_match_vendor(&app, "after the replay").await;
}

#[tokio::test]
async fn a_bad_line_item_is_isolated_and_the_rest_of_its_page_commits() {
    let app = spawn_app(0).await;
    app.vendor.seed_long_invoices(1, 12);
    let (connector, _) = lines_connector(&app, "100");
    let invoice = long_invoices(&app)[0].clone();
    let mut lines = app.vendor.invoice_lines(&invoice).unwrap();
    lines[4]["amount"] = serde_json::json!("twelve dollars");
    let bad = lines[4]["id"].as_str().unwrap().to_string();
    assert!(app.vendor.set_invoice_lines(&invoice, lines.clone()));
    let run = run_with_children(&app, &connector).await;
    let child = &run.children[0];
    assert_eq!(child.status, RunStatus::Partial, "{child:?}");
    assert_eq!((child.counters.inserted, child.counters.failed), (11, 1));
    let failed: Vec<(String, String)> =
        sqlx::query_as("SELECT stream, record_key FROM idem_failures")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert_eq!(failed, vec![("line_items".to_string(), bad.clone())]);
    assert_eq!(app.count("SELECT count(*) FROM idem_child_queue").await, 0);

    // The vendor fixes the line (the invoice changes with it): stored, failure cleared.
    lines[4]["amount"] = serde_json::json!(1200);
    assert!(app.vendor.set_invoice_lines(&invoice, lines));
    let fixed = run_with_children(&app, &connector).await;
    assert_eq!(fixed.children[0].status, RunStatus::Succeeded);
    assert_eq!(app.count("SELECT count(*) FROM idem_failures").await, 0);
    assert_lines_match_vendor(&app, "after the fix").await;
}

#[tokio::test]
async fn hubspot_lead_companies_are_stored_per_lead_with_ids_unique_within_it() {
    let app = spawn_app(0).await;
    app.vendor.seed_contacts(6);
    let base = app.vendor.base_url();
    let hubspot = idem::connector::load_file_with(
        &PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("connectors/hubspot.toml"),
        &|env| match env {
            "HUBSPOT_TOKEN" => Some("sk_test_demo".into()),
            "HUBSPOT_BASE_URL" => Some(base.clone()),
            _ => None,
        },
    )
    .unwrap_or_else(|issues| panic!("{issues}"));
    let mut runner = StreamRunner::default();
    let options = RunOptions::new(Mode::Regular, false);
    let run = runner
        .run(&app.pool, &app.database_url, &hubspot, "leads", &options)
        .await
        .unwrap();
    assert_eq!(run.status, RunStatus::Succeeded, "{run:?}");
    assert_eq!(run.children[0].counters.inserted, 6, "{run:?}");
    let stored: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT source_id, parent_source_id, company_id FROM hubspot_lead_companies ORDER BY source_id",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    let expected: Vec<(String, String, i64)> = app
        .vendor
        .contacts()
        .iter()
        .map(|c| {
            let id = c["id"].as_str().unwrap().to_string();
            let company: i64 = c["properties"]["company"]
                .as_str()
                .unwrap()
                .trim_start_matches("Company ")
                .parse::<i64>()
                .unwrap()
                + 9000;
            (format!("{id}/{company}"), id, company)
        })
        .collect();
    assert_eq!(stored, expected);

    // A lead moves to another company: its old association is marked deleted, its new one
    // stored; no other lead's associations are read.
    let before = app
        .vendor
        .requests()
        .iter()
        .filter(|r| r.path.contains("/associations/"))
        .count();
    app.vendor.update_contact("1002", |c| {
        c["properties"]["company"] = serde_json::json!("Company 049")
    });
    let run = runner
        .run(&app.pool, &app.database_url, &hubspot, "leads", &options)
        .await
        .unwrap();
    let child = &run.children[0];
    assert_eq!(
        (child.counters.inserted, child.counters.deleted),
        (1, 1),
        "{run:?}"
    );
    let after = app
        .vendor
        .requests()
        .iter()
        .filter(|r| r.path.contains("/associations/"))
        .count();
    assert_eq!(after - before, 1);
    let live: Vec<String> = sqlx::query_scalar(
        "SELECT source_id FROM hubspot_lead_companies WHERE parent_source_id = '1002' AND deleted_at IS NULL",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(live, vec!["1002/9049".to_string()]);
}
