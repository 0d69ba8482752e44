//! Cursors, marks and stream ownership at the edges: feed walks killed at every boundary
//! of their end, position-paged searches whose sort moves under them, a host clock ahead
//! of the vendor's, and a run whose lock connection dies while it writes.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use chrono::{DateTime, Utc};
use idem::connector::Connector;
use idem::run::{Mode, RunStatus};
use idem_fakes::{Fault, FaultKind};
use serde_json::json;

use crate::helpers::{TestApp, spawn_app, stderr};

fn shipped(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("connectors")
        .join(name)
}

/// A shipped connector file (with its text changed by `edit`) pointing at the fake vendor.
fn shipped_variant(app: &TestApp, name: &str, edit: impl FnOnce(&str) -> String) -> Connector {
    let text = std::fs::read_to_string(shipped(name)).expect("read the shipped connector");
    let base = app.vendor.base_url();
    let mut connector = idem::connector::parse(Path::new(name), &edit(&text), &|env| match env {
        "STRIPE_API_KEY" | "HUBSPOT_TOKEN" => Some("sk_test_demo".into()),
        "STRIPE_BASE_URL" | "HUBSPOT_BASE_URL" => Some(base.clone()),
        _ => None,
    })
    .unwrap_or_else(|issues| panic!("{issues}"));
    // The real vendors allow a few requests a second; the fake has no such limit.
    connector.spec.rate_limit = None;
    connector
}

/// The real binary with the shipped Stripe connector as its only one.
fn stripe_command(app: &TestApp, args: &[&str]) -> tokio::process::Command {
    let config = app.dir.path().join("stripe-idem.toml");
    std::fs::write(
        &config,
        format!(
            "connectors = [{:?}]\n[notify]\ntransport = \"log\"\n",
            shipped("stripe.toml").display().to_string()
        ),
    )
    .expect("write the stripe config");
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_idem"));
    command
        .arg("--config")
        .arg(&config)
        .arg("--log-format")
        .arg("json")
        .args(args)
        .env("DATABASE_URL", &app.database_url)
        .env("STRIPE_API_KEY", "sk_test_demo")
        .env("STRIPE_BASE_URL", app.vendor.base_url())
        .env_remove("IDEM_CRASH_AT")
        .kill_on_drop(true);
    command
}

async fn finish(command: &mut tokio::process::Command) -> Output {
    tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .expect("idem finishes within a minute")
        .expect("idem runs")
}

/// Waits until no session holds an advisory lock in the test's database: a process killed
/// a moment ago still holds its stream lock until Postgres notices the closed socket and
/// ends its backend, and a run started in that moment is turned away (`Locked`).
async fn wait_for_the_killed_runs_lock(app: &TestApp) {
    for _ in 0..200 {
        let held: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database
             WHERE d.datname = current_database() AND l.locktype = 'advisory'",
        )
        .fetch_one(&app.pool)
        .await
        .unwrap();
        if held == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the killed run's stream lock was not released within 10 s");
}

async fn checkpoint(
    app: &TestApp,
    source_system: &str,
    stream: &str,
) -> (
    Option<String>,
    Option<DateTime<Utc>>,
    Option<serde_json::Value>,
) {
    sqlx::query_as(
        "SELECT cursor, high_water_mark, resume FROM idem_checkpoints WHERE source_system = $1 AND stream = $2 AND scope = 'main'",
    )
    .bind(source_system)
    .bind(stream)
    .fetch_optional(&app.pool)
    .await
    .unwrap()
    .unwrap_or((None, None, None))
}

/// Asserts `hubspot_leads` holds exactly the vendor's contacts, each at the vendor's
/// version (its `lastmodifieddate`).
async fn assert_leads_match_vendor(app: &TestApp) {
    let stored: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT source_id, data->'properties'->>'lastmodifieddate' FROM hubspot_leads ORDER BY length(source_id), source_id",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    let truth: Vec<(String, Option<String>)> = app
        .vendor
        .contacts()
        .iter()
        .map(|c| {
            (
                c["id"].as_str().unwrap().to_string(),
                c["properties"]["lastmodifieddate"]
                    .as_str()
                    .map(str::to_string),
            )
        })
        .collect();
    let missing: Vec<&String> = truth
        .iter()
        .filter(|t| !stored.iter().any(|s| s.0 == t.0))
        .map(|t| &t.0)
        .collect();
    assert!(missing.is_empty(), "contacts never stored: {missing:?}");
    assert_eq!(stored, truth, "stored contacts differ from the vendor's");
}

#[tokio::test]
async fn an_events_walk_interrupted_at_any_boundary_loses_no_event() {
    // The walk below is four pages: three of events and the empty one that ends it.
    for crash_at in [
        "page_before_commit:3",
        "page_after_commit:3",
        "page_before_commit:4",
        "page_after_commit:4",
        "walk_end_before_commit:1",
        "walk_end_after_commit:1",
        "run_after_finish:1",
    ] {
        let app = spawn_app(30).await;
        let stripe = shipped_variant(&app, "stripe.toml", str::to_string);
        let first = app
            .run_connector(&stripe, "invoices", Mode::Regular, false)
            .await;
        assert_eq!(first.status, RunStatus::Succeeded, "{first:?}");
        assert_eq!(
            checkpoint(&app, "stripe", "invoices").await.0.as_deref(),
            Some("evt_000030")
        );
        // 250 events: pages ending before evt_000030, evt_000130, evt_000230, evt_000280.
        for n in 0..250 {
            let id = format!("in_{:06}", n % 30 + 1);
            app.vendor
                .update_invoice(&id, |inv| inv["amount_due"] = json!(10_000 + n));
        }
        let crashed = finish(
            stripe_command(&app, &["run", "stripe.invoices", "--no-notify"])
                // One page per transaction, so each boundary above is a commit.
                .env("IDEM__IMPORT__TRANSACTION_RECORDS", "1")
                .env("IDEM_CRASH_AT", crash_at),
        )
        .await;
        assert_eq!(
            crashed.status.signal(),
            Some(9),
            "{crash_at}: the process should have been killed: {}",
            stderr(&crashed)
        );
        wait_for_the_killed_runs_lock(&app).await;

        // While idem is down: each invoice but one changes once, then one invoice changes
        // more than a page of times, so the newest page alone holds only that one.
        for n in 2..=30 {
            let id = format!("in_{n:06}");
            app.vendor
                .update_invoice(&id, |inv| inv["amount_due"] = json!(50_000 + n));
        }
        for n in 0..121 {
            app.vendor
                .update_invoice("in_000001", |inv| inv["amount_due"] = json!(60_000 + n));
        }
        let requests_before = app.vendor.requests().len();
        let resumed = app
            .run_connector(&stripe, "invoices", Mode::Regular, false)
            .await;
        assert_eq!(
            resumed.status,
            RunStatus::Succeeded,
            "{crash_at}: {resumed:?}"
        );
        let asked: Vec<String> = app.vendor.requests()[requests_before..]
            .iter()
            .filter(|r| r.path == "/v1/events")
            .map(|r| r.query.clone().unwrap_or_default())
            .collect();
        assert!(
            asked.iter().all(|q| q.contains("ending_before=evt_")),
            "{crash_at}: the resumed walk asked the feed without a cursor (newest page only): {asked:?}"
        );
        assert_eq!(
            checkpoint(&app, "stripe", "invoices").await.0.as_deref(),
            Some("evt_000430"),
            "{crash_at}"
        );
        app.assert_table_matches_vendor("stripe_invoices").await;
    }
}

/// Contact ids "1001".."1000+n" with a given `lastmodifieddate`.
fn set_modified(app: &TestApp, ids: std::ops::RangeInclusive<usize>, at: &str) {
    for id in ids {
        let at = at.to_string();
        app.vendor.update_contact(&id.to_string(), move |c| {
            c["properties"]["lastmodifieddate"] = json!(at)
        });
    }
}

#[tokio::test]
async fn a_record_moved_during_an_offset_paged_walk_is_not_skipped() {
    let app = spawn_app(0).await;
    app.vendor.seed_contacts(1000);
    let hubspot = shipped_variant(&app, "hubspot.toml", str::to_string);
    // Search pages are 200 long and sorted by lastmodifieddate. Before page 2 is served, a
    // contact of page 1 is edited: it moves to the end of the sort and every later contact
    // shifts down one place, so "after = 200" would start one contact too late.
    app.vendor.on_request(2, |data| {
        data.update_contact("1011", |c| {
            c["properties"]["lifecyclestage"] = json!("customer")
        });
    });
    let report = app
        .run_connector(&hubspot, "leads", Mode::Regular, false)
        .await;
    assert_eq!(report.status, RunStatus::Succeeded, "{report:?}");
    assert_leads_match_vendor(&app).await;
    let newest = app
        .vendor
        .contacts()
        .iter()
        .filter_map(|c| c["properties"]["lastmodifieddate"].as_str())
        .filter_map(|t| t.parse::<DateTime<Utc>>().ok())
        .max();
    assert_eq!(checkpoint(&app, "hubspot", "leads").await.1, newest);

    // More than a page shares one instant (a bulk import): the walk pages within the tie,
    // and a tied contact edited after it was read makes the tie be read again.
    let app = spawn_app(0).await;
    app.vendor.seed_contacts(500);
    set_modified(&app, 1101..=1450, "2026-11-01T00:00:00.000Z");
    // Request 1: 150 older contacts and 50 of the tie; request 2: the tie's first 200;
    // before request 3 (after = 200 within the tie) a tied contact already read moves.
    app.vendor.on_request(3, |data| {
        data.update_contact("1120", |c| c["properties"]["company"] = json!("Moved Inc"));
    });
    let hubspot = shipped_variant(&app, "hubspot.toml", str::to_string);
    let report = app
        .run_connector(&hubspot, "leads", Mode::Regular, false)
        .await;
    assert_eq!(report.status, RunStatus::Succeeded, "{report:?}");
    assert_leads_match_vendor(&app).await;
    let company: String =
        sqlx::query_scalar("SELECT company FROM hubspot_leads WHERE source_id = '1120'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(company, "Moved Inc");
    let searches = app.vendor.request_count("/crm/v3/objects/contacts/search");
    assert!(
        searches < 10,
        "the walk did not terminate promptly: {searches} searches"
    );

    // A tie longer than the vendor's per-query cap cannot be walked without skipping: the
    // run stops, says why, and does not loop.
    let app = spawn_app(0).await;
    app.vendor.seed_contacts(500);
    set_modified(&app, 1101..=1450, "2026-11-01T00:00:00.000Z");
    let capped = shipped_variant(&app, "hubspot.toml", |text| {
        text.replace(
            "max_results_per_query = 10000",
            "max_results_per_query = 300",
        )
    });
    let report = app
        .run_connector(&capped, "leads", Mode::Regular, false)
        .await;
    assert_eq!(report.status, RunStatus::Failed, "{report:?}");
    let error = report.error.unwrap_or_default();
    assert!(
        error.contains("share the updated_at 2026-11-01T00:00:00+00:00"),
        "{error}"
    );
    assert!(app.vendor.request_count("/crm/v3/objects/contacts/search") <= 3);
}

#[tokio::test]
async fn the_mark_never_passes_the_walk_start_when_the_host_clock_is_ahead_of_the_vendor() {
    let app = spawn_app(1000).await;
    // The vendor's clock is ten minutes behind this host's (and the database's).
    let vendor_now = Utc::now().timestamp() - 600;
    app.vendor.set_clock(vendor_now);
    // A one-second overlap, so that only the mark decides what the next run reads.
    let connector = app.demo_connector_variant("short_overlap", |text| {
        text.replace("overlap = \"15m\"", "overlap = \"1s\"")
    });
    // While page 3 is served: an invoice of page 1 (already read) changes, then one of
    // page 10 (read later in this walk, with a newer time).
    app.vendor.on_request(3, move |data| {
        data.set_clock(vendor_now + 60);
        data.update_invoice("in_000005", |inv| inv["amount_due"] = json!(5555));
        data.set_clock(vendor_now + 120);
        data.update_invoice("in_000950", |inv| inv["amount_due"] = json!(9595));
    });
    let first = app
        .run_connector(&connector, "invoices", Mode::Regular, false)
        .await;
    assert_eq!(first.status, RunStatus::Succeeded, "{first:?}");
    let mark = checkpoint(&app, "demo_billing", "invoices")
        .await
        .1
        .expect("a mark");
    assert!(
        mark.timestamp() <= vendor_now,
        "the mark {mark} passed the walk's start by the vendor's clock ({vendor_now})"
    );
    let second = app
        .run_connector(&connector, "invoices", Mode::Regular, false)
        .await;
    assert_eq!(second.status, RunStatus::Succeeded, "{second:?}");
    app.assert_matches_vendor().await;
}

/// The server process of the connection holding idem's lock on a stream, checking that
/// it is idem's two-key lock.
async fn lock_holder(app: &TestApp) -> i32 {
    let locks: Vec<(i32, i64, i32)> = sqlx::query_as(
        "SELECT pid, classid::bigint, objsubid::int FROM pg_locks
         WHERE locktype = 'advisory' AND granted
           AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(locks.len(), 1, "one stream lock expected: {locks:?}");
    let (pid, class, subid) = locks[0];
    assert_eq!(
        (class, subid),
        (i64::from(idem::store::LOCK_CLASS), 2),
        "the lock is not idem's two-key (class, key) advisory lock"
    );
    pid
}

#[tokio::test]
async fn a_run_that_lost_its_stream_lock_commits_nothing_more() {
    let app = spawn_app(1000).await;
    // The first run's second page takes a while to arrive.
    app.vendor.inject_at(
        2,
        Fault::new("/v1/invoices", 1, FaultKind::Delay(Duration::from_secs(4))),
    );
    let first = app
        .command(&["run", "--no-notify"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("idem starts");
    let started = tokio::time::Instant::now();
    while app
        .count("SELECT coalesce(max(pages), 0) FROM idem_runs")
        .await
        < 1
    {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no page committed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let first_run: uuid::Uuid = sqlx::query_scalar("SELECT id FROM idem_runs")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    // The lock's connection dies (an idle timeout, a proxy, an operator).
    let pid = lock_holder(&app).await;
    let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert!(killed);
    // A second run can now take the stream, and completes while the first one waits.
    let second = app.run_invoices(Mode::Regular).await;
    assert_eq!(second.status, RunStatus::Succeeded, "{second:?}");

    let first = tokio::time::timeout(Duration::from_secs(30), first.wait_with_output())
        .await
        .expect("the first run ends")
        .unwrap();
    assert_eq!(first.status.code(), Some(1), "{}", stderr(&first));
    assert!(
        stderr(&first).contains("no longer owns demo_billing.invoices"),
        "{}",
        stderr(&first)
    );
    let (pages, status): (i64, String) =
        sqlx::query_as("SELECT pages, status FROM idem_runs WHERE id = $1")
            .bind(first_run)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(
        (pages, status.as_str()),
        (1, "failed"),
        "the run that lost the stream committed pages after the takeover"
    );
    let (last_run, resume): (Option<uuid::Uuid>, Option<serde_json::Value>) = sqlx::query_as(
        "SELECT last_run_id, resume FROM idem_checkpoints WHERE source_system = 'demo_billing' AND stream = 'invoices' AND scope = 'main'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(
        last_run, second.run_id,
        "the checkpoint was written by the lost run"
    );
    assert_eq!(resume, None, "the lost run left a resume point behind");
    app.assert_matches_vendor().await;
}

#[tokio::test]
async fn checkpoint_reset_and_set_exit_75_while_a_run_holds_the_stream() {
    let app = spawn_app(500).await;
    let run = app.spawn_slow_nightly_run().await;
    let reset = app
        .idem(&["checkpoint", "reset", "demo_billing.invoices", "--yes"])
        .await;
    assert_eq!(reset.status.code(), Some(75), "{}", stderr(&reset));
    assert!(stderr(&reset).contains("in progress"), "{}", stderr(&reset));
    let set = app
        .idem(&[
            "checkpoint",
            "set",
            "demo_billing.invoices",
            "--high-water-mark",
            "2020-01-01T00:00:00Z",
        ])
        .await;
    assert_eq!(set.status.code(), Some(75), "{}", stderr(&set));
    let run = run.wait_with_output().await.unwrap();
    assert_eq!(run.status.code(), Some(0), "{}", stderr(&run));
    let (_, mark, resume) = checkpoint(&app, "demo_billing", "invoices").await;
    assert!(
        mark.is_some() && resume.is_none(),
        "the run's checkpoint was touched"
    );

    // Once the run is over, both work.
    let set = app
        .idem(&[
            "checkpoint",
            "set",
            "demo_billing.invoices",
            "--high-water-mark",
            "2020-01-01T00:00:00Z",
        ])
        .await;
    assert_eq!(set.status.code(), Some(0), "{}", stderr(&set));
    assert_eq!(
        checkpoint(&app, "demo_billing", "invoices").await.1,
        Some("2020-01-01T00:00:00Z".parse().unwrap())
    );
    let reset = app
        .idem(&["checkpoint", "reset", "demo_billing.invoices", "--yes"])
        .await;
    assert_eq!(reset.status.code(), Some(0), "{}", stderr(&reset));
    assert_eq!(checkpoint(&app, "demo_billing", "invoices").await.1, None);

    // `idem check` says what the lock needs from a connection pooler.
    let check = app.idem(&["check"]).await;
    assert_eq!(check.status.code(), Some(0), "{}", stderr(&check));
    assert!(
        crate::helpers::stdout(&check).contains("not a transaction-pooling proxy"),
        "{}",
        crate::helpers::stdout(&check)
    );
}

#[tokio::test]
async fn a_replay_of_a_newest_first_feed_reads_the_whole_window() {
    let app = spawn_app(30).await;
    let stripe = shipped_variant(&app, "stripe.toml", str::to_string);
    let first = app
        .run_connector(&stripe, "invoices", Mode::Regular, false)
        .await;
    assert_eq!(first.status, RunStatus::Succeeded, "{first:?}");
    // 150 more events, all about one invoice: the feed's newest page holds nothing else.
    for n in 0..150 {
        app.vendor
            .update_invoice("in_000001", |inv| inv["amount_due"] = json!(70_000 + n));
    }
    // The table drifts: every row is lost.
    sqlx::query("DELETE FROM stripe_invoices")
        .execute(&app.pool)
        .await
        .unwrap();
    let week = Mode::Replay {
        from: "2026-11-13T00:00:00Z".parse().unwrap(),
        to: "2026-11-21T00:00:00Z".parse().unwrap(),
        label: "last-week".into(),
        restart: false,
    };
    let replay = app
        .run_connector(&stripe, "invoices", week.clone(), false)
        .await;
    assert_eq!(replay.status, RunStatus::Succeeded, "{replay:?}");
    assert_eq!(replay.counters.fetched, 180, "{replay:?}");
    app.assert_table_matches_vendor("stripe_invoices").await;
    assert_eq!(
        checkpoint(&app, "stripe", "invoices").await.0.as_deref(),
        Some("evt_000030"),
        "a replay moved the stream's cursor"
    );
    assert!(
        app.vendor.requests().iter().any(|r| r
            .query
            .as_deref()
            .unwrap_or("")
            .contains("starting_after=evt_")),
        "the replay never paged back"
    );

    // A feed that cannot be paged back cannot be replayed: the replay says so.
    let forward_only = shipped_variant(&app, "stripe.toml", |text| {
        text.replace("backward_param = \"starting_after\"", "")
    });
    let refused = app
        .run_connector(&forward_only, "invoices", week, false)
        .await;
    assert_eq!(refused.status, RunStatus::Failed, "{refused:?}");
    assert!(
        refused
            .error
            .as_deref()
            .unwrap_or("")
            .contains("backward_param"),
        "{refused:?}"
    );
}
