//! Concurrent dispatch: with several sends in flight, a SIGKILL mid-batch still sends each
//! reminder exactly once over the keyed HTTP API and at most once over SMTP, and only rows
//! whose send had really started wait for a person.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::ExitStatusExt;

use idem::ledger::dispatch::{DispatchSettings, Dispatcher};
use idem::ledger::transport::AnyTransport;
use idem_fakes::SmtpSink;

use crate::helpers::{TestApp, spawn_app_with, stderr};
use crate::ledger::{insert_pending_rows, smtp_notify, smtp_settings};

const CONCURRENCY: usize = 6;

fn concurrent(notify: &str) -> String {
    notify.replacen(
        "[notify]\n",
        &format!("[notify]\nconcurrency = {CONCURRENCY}\nbatch_size = 10\n"),
        1,
    )
}

/// Every ledger row: key -> (status, message_id, in flight).
async fn rows(app: &TestApp) -> BTreeMap<String, (String, String, bool)> {
    sqlx::query_as::<_, (String, String, String, bool)>(
        "SELECT key, status, message_id, in_flight_since IS NOT NULL FROM idem_ledger",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap()
    .into_iter()
    .map(|(key, status, id, in_flight)| (key, (status, id, in_flight)))
    .collect()
}

/// Runs `idem run` with a crash point; returns once the killed process's database sessions
/// are gone. A statement it sent just before the kill (a commit marking a row in flight,
/// an outcome) still completes after its death: the state is read after that.
async fn run_killed_at(app: &TestApp, crash_at: &str) {
    let t0: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    let crashed = app
        .command(&["run"])
        .env("IDEM_CRASH_AT", crash_at)
        .output()
        .await
        .unwrap();
    assert_eq!(crashed.status.signal(), Some(9), "{}", stderr(&crashed));
    for _ in 0..500 {
        let left = app
            .count(&format!(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()
                 AND pid <> pg_backend_pid() AND backend_start >= '{}'",
                t0.to_rfc3339()
            ))
            .await;
        if left == 0 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("the killed process's database sessions did not end");
}

async fn expire_leases(app: &TestApp) {
    sqlx::query("UPDATE idem_ledger SET lease_expires_at = now() - interval '1 second' WHERE status = 'sending'")
        .execute(&app.pool)
        .await
        .unwrap();
}

/// Kills `idem run` at `crash_at` with SMTP and checks what survives.
async fn smtp_killed_at(crash_at: &str) {
    let sink = SmtpSink::start().await;
    let app = spawn_app_with(120, &concurrent(&smtp_notify(sink.addr()))).await;
    run_killed_at(&app, crash_at).await;
    let at_crash = rows(&app).await;
    let in_flight: BTreeSet<String> = at_crash
        .iter()
        .filter(|(_, (status, _, in_flight))| status == "sending" && *in_flight)
        .map(|(key, _)| key.clone())
        .collect();
    assert!(
        !in_flight.is_empty() && in_flight.len() <= CONCURRENCY,
        "{crash_at}: between 1 and {CONCURRENCY} rows in flight, got {in_flight:?}"
    );
    let claimed_not_started = at_crash
        .values()
        .filter(|(status, _, in_flight)| status == "sending" && !*in_flight)
        .count();
    assert!(
        claimed_not_started > 0,
        "{crash_at}: the kill should land mid-batch, with claimed rows not yet started"
    );

    expire_leases(&app).await;
    let notify = app.idem(&["notify"]).await;
    assert_eq!(notify.status.code(), Some(3), "{}", stderr(&notify));
    let after = rows(&app).await;
    let to_review: BTreeSet<String> = after
        .iter()
        .filter(|(_, (status, _, _))| status == "needs_review")
        .map(|(key, _)| key.clone())
        .collect();
    assert_eq!(
        to_review, in_flight,
        "{crash_at}: exactly the rows whose send had started wait for a person"
    );
    let mut received: BTreeMap<String, usize> = BTreeMap::new();
    for mail in sink.messages() {
        *received
            .entry(mail.message_id.unwrap_or_default())
            .or_default() += 1;
    }
    assert!(
        received.values().all(|n| *n == 1),
        "{crash_at}: a message went out twice: {received:?}"
    );
    for (key, (status, message_id, _)) in &after {
        let got = received.get(message_id).copied().unwrap_or(0);
        match status.as_str() {
            "sent" => assert_eq!(got, 1, "{crash_at}: {key} is sent but was not received"),
            "needs_review" => assert!(got <= 1),
            other => panic!("{crash_at}: {key} is {other}"),
        }
    }
    assert_eq!(received.len(), sink.messages().len());
}

#[tokio::test]
async fn concurrent_dispatch_killed_mid_batch_sends_each_reminder_at_most_once() {
    // HTTP with keys: every row is delivered exactly once after the restart.
    for crash_at in ["notify_after_send:4", "notify_before_send:4"] {
        let app = spawn_app_with(
            120,
            &concurrent("[notify]\ntransport = \"http\"\nretry_backoff = \"10ms\"\n\n[notify.http]\nurl = \"${DEMO_BILLING_URL}/email/send\"\n"),
        )
        .await;
        run_killed_at(&app, crash_at).await;
        let at_crash = rows(&app).await;
        let in_flight = at_crash
            .values()
            .filter(|(status, _, in_flight)| status == "sending" && *in_flight)
            .count();
        assert!(
            (1..=CONCURRENCY).contains(&in_flight),
            "{crash_at}: {in_flight} rows in flight"
        );
        expire_leases(&app).await;
        let notify = app.idem(&["notify"]).await;
        assert_eq!(notify.status.code(), Some(0), "{}", stderr(&notify));
        let after = rows(&app).await;
        assert!(after.len() > 10, "the fixture should owe many reminders");
        assert!(
            after.values().all(|(status, _, _)| status == "sent"),
            "{crash_at}: {after:?}"
        );
        let mut delivered: BTreeMap<String, usize> = BTreeMap::new();
        for email in app.vendor.emails() {
            *delivered
                .entry(email.idempotency_key.unwrap_or_default())
                .or_default() += 1;
        }
        assert_eq!(
            delivered.keys().cloned().collect::<BTreeSet<_>>(),
            after.keys().cloned().collect::<BTreeSet<_>>(),
            "{crash_at}"
        );
        assert!(
            delivered.values().all(|n| *n == 1),
            "{crash_at}: {delivered:?}"
        );
    }
    // SMTP: at most once; the rows in flight at the kill, and only they, need review.
    smtp_killed_at("notify_after_send:4").await;
    smtp_killed_at("notify_before_send:4").await;
}

#[tokio::test]
async fn a_kept_smtp_connection_closed_by_the_server_is_replaced_not_ambiguous() {
    let sink = SmtpSink::start().await;
    let addr = sink.addr();
    let app = spawn_app_with(0, "").await;
    insert_pending_rows(&app, 3).await;
    let settings = smtp_settings(addr);
    let transport = AnyTransport::from_settings(&settings).unwrap();
    let dispatcher = Dispatcher::new(
        &app.pool,
        &transport,
        DispatchSettings::from_config(&settings),
    );
    assert_eq!(dispatcher.run_once().await.unwrap().sent, 3);
    // The relay restarts: every connection the transport kept is closed under it.
    let before = sink.stop().await;
    let sink = SmtpSink::start_on(addr).await.unwrap();
    sqlx::query("UPDATE idem_ledger SET status = 'pending', sent_at = NULL")
        .execute(&app.pool)
        .await
        .unwrap();
    let report = dispatcher.run_once().await.unwrap();
    assert_eq!(
        (report.sent, report.needs_review, report.retry_later),
        (3, 0, 0),
        "a closed kept connection is not an ambiguous send: {report:?}"
    );
    assert_eq!(before.len(), 3);
    assert_eq!(sink.messages().len(), 3);
}
