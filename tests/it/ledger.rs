//! The notification ledger: a reminder goes out once per invoice and stage, whatever
//! crashes, reruns, races or outages happen.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use idem::config::{NotifySettings, SmtpSettings, SmtpTls, TransportKind};
use idem::duration::HumanDuration;
use idem::ledger::dispatch::{DispatchSettings, Dispatcher};
use idem::ledger::transport::AnyTransport;
use idem_fakes::SmtpSink;

use crate::helpers::{TestApp, spawn_app_with, stderr, stdout};

pub(crate) fn smtp_notify(addr: std::net::SocketAddr) -> String {
    format!(
        "[notify]\ntransport = \"smtp\"\nfrom = \"billing@test.example\"\nretry_backoff = \"10ms\"\n\n[notify.smtp]\nhost = \"{}\"\nport = {}\ntls = \"none\"\n",
        addr.ip(),
        addr.port()
    )
}

/// `notify` with one send at a time, for tests that count exactly which send a crash hit.
pub(crate) fn sequential(notify: &str) -> String {
    notify.replacen("[notify]\n", "[notify]\nconcurrency = 1\n", 1)
}

/// The invoices the reminder rule should pick: open and due more than 3 days ago.
fn overdue_numbers(app: &TestApp) -> BTreeSet<String> {
    let cutoff = chrono::Utc::now().timestamp() - 3 * 86_400;
    app.vendor
        .invoices()
        .iter()
        .filter(|inv| {
            inv["status"] == "open" && inv["due_date"].as_i64().is_some_and(|due| due < cutoff)
        })
        .map(|inv| inv["number"].as_str().unwrap().to_string())
        .collect()
}

/// How many mails each invoice number received (subject "Invoice INV-… is overdue").
fn mails_per_invoice(subjects: impl Iterator<Item = String>) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for subject in subjects {
        let number = subject.split_whitespace().nth(1).unwrap_or("").to_string();
        *counts.entry(number).or_insert(0) += 1;
    }
    counts
}

async fn ledger_status_counts(app: &TestApp) -> BTreeMap<String, i64> {
    sqlx::query_as::<_, (String, i64)>("SELECT status, count(*) FROM idem_ledger GROUP BY status")
        .fetch_all(&app.pool)
        .await
        .unwrap()
        .into_iter()
        .collect()
}

#[tokio::test]
async fn overdue_invoices_get_one_reminder_each() {
    let sink = SmtpSink::start().await;
    let app = spawn_app_with(120, &smtp_notify(sink.addr())).await;
    let overdue = overdue_numbers(&app);
    assert!(overdue.len() > 10, "the seed should have overdue invoices");

    let first = app.idem(&["run"]).await;
    assert_eq!(first.status.code(), Some(0), "{}", stderr(&first));
    let again = app.idem(&["run"]).await;
    assert_eq!(again.status.code(), Some(0), "{}", stderr(&again));
    for _ in 0..2 {
        let notify = app.idem(&["notify"]).await;
        assert_eq!(notify.status.code(), Some(0), "{}", stderr(&notify));
        assert!(stdout(&notify).contains("0 sent"), "{}", stdout(&notify));
    }

    let received = mails_per_invoice(
        sink.messages()
            .into_iter()
            .map(|m| m.subject.unwrap_or_default()),
    );
    assert_eq!(
        received.keys().cloned().collect::<BTreeSet<_>>(),
        overdue,
        "reminded invoices differ from the overdue ones"
    );
    assert!(
        received.values().all(|count| *count == 1),
        "an invoice got more than one reminder: {received:?}"
    );
    // Paid invoices got none; every mail carries the Message-ID derived from its key.
    let paid: Vec<String> = app
        .vendor
        .invoices()
        .iter()
        .filter(|i| i["status"] == "paid")
        .map(|i| i["number"].as_str().unwrap().to_string())
        .collect();
    assert!(paid.iter().all(|n| !received.contains_key(n)));
    for mail in sink.messages() {
        assert!(
            mail.message_id
                .as_deref()
                .is_some_and(|id| id.ends_with("@idem.local>")),
            "{mail:?}"
        );
    }
    assert_eq!(
        ledger_status_counts(&app).await.get("sent").copied(),
        Some(overdue.len() as i64)
    );
}

#[tokio::test]
async fn crash_after_the_provider_accepted_is_not_resent_through_the_idempotent_http_api() {
    // One send at a time, so "the third send" is exactly three messages (concurrent
    // sends: concurrent_dispatch_killed_mid_batch_sends_each_reminder_at_most_once).
    let notify = "[notify]\ntransport = \"http\"\nretry_backoff = \"10ms\"\nconcurrency = 1\n\n[notify.http]\nurl = \"${DEMO_BILLING_URL}/email/send\"\n";
    let app = spawn_app_with(120, notify).await;
    let overdue = overdue_numbers(&app);

    let crashed = app
        .command(&["run"])
        .env("IDEM_CRASH_AT", "notify_after_send:3")
        .output()
        .await
        .unwrap();
    assert_eq!(crashed.status.signal(), Some(9), "{}", stderr(&crashed));
    assert_eq!(
        app.vendor.emails().len(),
        3,
        "three messages reached the provider before the crash"
    );
    let in_flight = app.count("SELECT count(*) FROM idem_ledger WHERE status = 'sending' AND in_flight_since IS NOT NULL").await;
    assert_eq!(in_flight, 1, "the third row was in flight");

    // Time passes: the dead dispatcher's lease expires.
    sqlx::query("UPDATE idem_ledger SET lease_expires_at = now() - interval '1 second' WHERE status = 'sending'").execute(&app.pool).await.unwrap();
    let notify = app.idem(&["notify"]).await;
    assert_eq!(notify.status.code(), Some(0), "{}", stderr(&notify));

    let delivered = mails_per_invoice(app.vendor.emails().into_iter().map(|e| e.subject));
    assert_eq!(delivered.keys().cloned().collect::<BTreeSet<_>>(), overdue);
    assert!(delivered.values().all(|count| *count == 1), "{delivered:?}");
    assert_eq!(
        ledger_status_counts(&app).await.get("sent").copied(),
        Some(overdue.len() as i64)
    );
    // The retried row went out under its ledger key.
    let keys: BTreeSet<String> = app
        .vendor
        .requests()
        .iter()
        .filter(|r| r.path == "/email/send")
        .filter_map(|r| r.idempotency_key.clone())
        .collect();
    assert_eq!(keys.len(), overdue.len());
    assert!(keys.iter().all(
        |k| k.starts_with("demo_billing/invoices/email:reminder:in_") && k.ends_with(":stage1")
    ));
}

#[tokio::test]
async fn crash_after_smtp_accepted_goes_to_needs_review_and_is_never_resent() {
    let sink = SmtpSink::start().await;
    let app = spawn_app_with(120, &sequential(&smtp_notify(sink.addr()))).await;
    let overdue = overdue_numbers(&app);

    let crashed = app
        .command(&["run"])
        .env("IDEM_CRASH_AT", "notify_after_send:2")
        .output()
        .await
        .unwrap();
    assert_eq!(crashed.status.signal(), Some(9), "{}", stderr(&crashed));
    assert_eq!(sink.messages().len(), 2);
    let in_flight: String = sqlx::query_scalar(
        "SELECT key FROM idem_ledger WHERE status = 'sending' AND in_flight_since IS NOT NULL",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();

    sqlx::query("UPDATE idem_ledger SET lease_expires_at = now() - interval '1 second' WHERE status = 'sending'").execute(&app.pool).await.unwrap();
    let notify = app.idem(&["notify"]).await;
    assert_eq!(
        notify.status.code(),
        Some(3),
        "rows needing review are reported: {}",
        stderr(&notify)
    );
    assert!(
        stdout(&notify).contains("1 need review"),
        "{}",
        stdout(&notify)
    );
    let notify = app.idem(&["notify"]).await;
    assert_eq!(notify.status.code(), Some(0), "{}", stderr(&notify));
    let received = mails_per_invoice(
        sink.messages()
            .into_iter()
            .map(|m| m.subject.unwrap_or_default()),
    );
    assert_eq!(received.keys().cloned().collect::<BTreeSet<_>>(), overdue);
    assert!(received.values().all(|count| *count == 1), "{received:?}");
    let status: String = sqlx::query_scalar("SELECT status FROM idem_ledger WHERE key = $1")
        .bind(&in_flight)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(status, "needs_review");
    let listed = app
        .idem(&["ledger", "list", "--status", "needs_review"])
        .await;
    assert!(stdout(&listed).contains(&in_flight), "{}", stdout(&listed));

    // An operator checks the mailbox and confirms it went out.
    let resolved = app
        .idem(&["ledger", "resolve", &in_flight, "--as", "sent"])
        .await;
    assert_eq!(resolved.status.code(), Some(0), "{}", stderr(&resolved));
    assert_eq!(
        ledger_status_counts(&app).await.get("sent").copied(),
        Some(overdue.len() as i64)
    );
    let again = app
        .idem(&["ledger", "resolve", &in_flight, "--as", "retry"])
        .await;
    assert_eq!(
        again.status.code(),
        Some(2),
        "a sent row cannot be re-sent: {}",
        stderr(&again)
    );
    assert_eq!(sink.messages().len(), overdue.len());
}

pub(crate) async fn insert_pending_rows(app: &TestApp, count: i64) {
    sqlx::query(
        "INSERT INTO idem_ledger (key, channel, recipient, subject, body, message_id, source_system, stream, source_id, rule)
         SELECT 'email:reminder:in_' || n, 'email', 'customer' || n || '@example.com', 'Invoice INV-' || n || ' is overdue', 'Please pay.',
                '<' || n || '@idem.local>', 'demo_billing', 'invoices', 'in_' || n, 'overdue_reminder'
         FROM generate_series(1, $1) AS n",
    )
    .bind(count)
    .execute(&app.pool)
    .await
    .unwrap();
}

pub(crate) fn smtp_settings(addr: std::net::SocketAddr) -> NotifySettings {
    NotifySettings {
        transport: TransportKind::Smtp,
        smtp: Some(SmtpSettings {
            host: addr.ip().to_string(),
            port: Some(addr.port()),
            tls: SmtpTls::None,
            username: None,
            password: None,
        }),
        retry_backoff: HumanDuration(Duration::from_millis(10)),
        batch_size: 7,
        ..NotifySettings::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_dispatchers_racing_send_every_row_exactly_once() {
    let sink = SmtpSink::start().await;
    let app = spawn_app_with(0, "").await;
    insert_pending_rows(&app, 500).await;
    let settings = smtp_settings(sink.addr());
    let transport = AnyTransport::from_settings(&settings).unwrap();
    let first = Dispatcher::new(
        &app.pool,
        &transport,
        DispatchSettings::from_config(&settings),
    );
    let second = Dispatcher::new(
        &app.pool,
        &transport,
        DispatchSettings::from_config(&settings),
    );
    let (a, b) = tokio::join!(first.run_once(), second.run_once());
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.sent + b.sent, 500);
    assert!(
        a.sent > 0 && b.sent > 0,
        "both dispatchers should have worked: {a:?} {b:?}"
    );
    let messages = sink.messages();
    assert_eq!(messages.len(), 500);
    let distinct: BTreeSet<_> = messages.iter().map(|m| m.message_id.clone()).collect();
    assert_eq!(distinct.len(), 500, "a row was sent twice");
    assert_eq!(
        ledger_status_counts(&app).await.get("sent").copied(),
        Some(500)
    );
}

#[tokio::test]
async fn smtp_outage_keeps_rows_pending_and_sends_them_when_it_is_back() {
    let sink = SmtpSink::start().await;
    let addr = sink.addr();
    sink.stop().await;
    let app = spawn_app_with(0, "").await;
    insert_pending_rows(&app, 20).await;
    let settings = smtp_settings(addr);
    let transport = AnyTransport::from_settings(&settings).unwrap();
    let dispatcher = Dispatcher::new(
        &app.pool,
        &transport,
        DispatchSettings::from_config(&settings),
    );

    let down = dispatcher.run_once().await.unwrap();
    assert_eq!(
        (down.sent, down.retry_later, down.failed, down.needs_review),
        (0, 20, 0, 0)
    );
    assert_eq!(
        ledger_status_counts(&app).await.get("pending").copied(),
        Some(20),
        "rows were lost or given up"
    );
    assert_eq!(
        app.count("SELECT max(attempts)::bigint FROM idem_ledger")
            .await,
        1,
        "a pass retried a row it had just rescheduled"
    );

    let sink = SmtpSink::start_on(addr).await.unwrap();
    // Let the short retry backoff pass.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let back = dispatcher.run_once().await.unwrap();
    assert_eq!(back.sent, 20);
    assert_eq!(sink.messages().len(), 20);
    assert_eq!(dispatcher.run_once().await.unwrap().sent, 0);
    assert_eq!(sink.messages().len(), 20);
}

#[tokio::test]
async fn provider_answers_decide_retry_failure_or_success() {
    let app = spawn_app_with(0, "").await;
    insert_pending_rows(&app, 3).await;
    let settings = NotifySettings {
        transport: TransportKind::Http,
        http: Some(idem::config::HttpEmailSettings {
            url: format!("{}/email/send", app.vendor.base_url()),
            token: None,
        }),
        retry_backoff: HumanDuration(Duration::from_millis(10)),
        ..NotifySettings::default()
    };
    let transport = AnyTransport::from_settings(&settings).unwrap();
    let dispatcher = Dispatcher::new(
        &app.pool,
        &transport,
        DispatchSettings::from_config(&settings),
    );

    // Throttled: definitely not sent, retried no earlier than Retry-After.
    app.vendor
        .inject(idem_fakes::Fault::status("/email", 1, 429, Some("30")));
    // Refused for good.
    app.vendor
        .inject(idem_fakes::Fault::status("/email", 1, 400, None));
    let report = dispatcher.run_once().await.unwrap();
    assert_eq!(
        (report.sent, report.retry_later, report.failed),
        (1, 1, 1),
        "{report:?}"
    );
    let (status, wait): (String, f64) = sqlx::query_as(
        "SELECT status, extract(epoch FROM next_attempt_at - now())::float8 FROM idem_ledger WHERE last_outcome = 'not_sent'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(status, "pending");
    assert!(wait > 25.0, "Retry-After was not honored: retry in {wait}s");
    assert_eq!(app.count("SELECT count(*) FROM idem_ledger WHERE status = 'failed' AND last_error LIKE '%HTTP 400%'").await, 1);
    assert_eq!(app.vendor.emails().len(), 1);
}

#[tokio::test]
async fn templates_can_use_the_raw_record() {
    let app = spawn_app_with(30, "").await;
    let connector = app.demo_connector_variant("raw", |text| {
        text.replace(
            "subject = \"Invoice {{ number }} is overdue\"",
            "subject = \"Invoice {{ data.number }} for {{ data.customer_name }} is overdue\"",
        )
    });
    app.run_connector(&connector, "invoices", idem::run::Mode::Regular, false)
        .await;
    let subjects: Vec<String> = sqlx::query_scalar("SELECT subject FROM idem_ledger ORDER BY key")
        .fetch_all(&app.pool)
        .await
        .unwrap();
    assert!(!subjects.is_empty());
    assert!(
        subjects
            .iter()
            .all(|s| s.starts_with("Invoice INV-") && s.contains("for Customer ")),
        "{subjects:?}"
    );
}
