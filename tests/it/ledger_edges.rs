//! Reminders at the edges: a reason that is gone cancels the send, a slow send keeps its
//! lease, an "in progress" answer is retried under the same key, keys of two sources
//! never collide, and the log transport says it delivered nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use idem::config::{HttpEmailSettings, NotifySettings, SmtpSettings, SmtpTls, TransportKind};
use idem::connector::Connector;
use idem::duration::HumanDuration;
use idem::ledger::dispatch::{DispatchReport, DispatchSettings, Dispatcher};
use idem::ledger::transport::AnyTransport;
use idem::run::{Mode, RunStatus};
use idem_fakes::SmtpSink;
use serde_json::json;

use crate::helpers::{TestApp, spawn_app_with, stderr, stdout};
use crate::ledger::{sequential, smtp_notify};

/// Invoice ids the reminder rule should pick: open and due more than 3 days ago.
fn overdue_ids(app: &TestApp) -> BTreeSet<String> {
    let cutoff = chrono::Utc::now().timestamp() - 3 * 86_400;
    app.vendor
        .invoices()
        .iter()
        .filter(|inv| {
            inv["status"] == "open" && inv["due_date"].as_i64().is_some_and(|due| due < cutoff)
        })
        .map(|inv| inv["id"].as_str().unwrap().to_string())
        .collect()
}

fn number_of(app: &TestApp, id: &str) -> String {
    app.vendor
        .invoices()
        .iter()
        .find(|inv| inv["id"] == id)
        .map(|inv| inv["number"].as_str().unwrap().to_string())
        .unwrap_or_else(|| panic!("no invoice {id}"))
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

async fn row_of(app: &TestApp, source_id: &str) -> (String, String, Option<String>, String) {
    sqlx::query_as(
        "SELECT key, status, last_outcome, body FROM idem_ledger WHERE source_id = $1 AND key NOT LIKE '%#collision%'",
    )
    .bind(source_id)
    .fetch_one(&app.pool)
    .await
    .unwrap_or_else(|e| panic!("ledger row of {source_id}: {e}"))
}

async fn status_counts(app: &TestApp) -> BTreeMap<String, i64> {
    sqlx::query_as::<_, (String, i64)>("SELECT status, count(*) FROM idem_ledger GROUP BY status")
        .fetch_all(&app.pool)
        .await
        .unwrap()
        .into_iter()
        .collect()
}

fn http_settings(app: &TestApp) -> NotifySettings {
    NotifySettings {
        transport: TransportKind::Http,
        http: Some(HttpEmailSettings {
            url: format!("{}/email/send", app.vendor.base_url()),
            token: None,
        }),
        retry_backoff: HumanDuration(Duration::from_millis(10)),
        ..NotifySettings::default()
    }
}

async fn dispatch(app: &TestApp, settings: &NotifySettings) -> DispatchReport {
    let transport = AnyTransport::from_settings(settings).unwrap();
    Dispatcher::new(
        &app.pool,
        &transport,
        DispatchSettings::from_config(settings),
    )
    .run_once()
    .await
    .unwrap()
}

async fn insert_pending_rows(app: &TestApp, count: i64) {
    sqlx::query(
        "INSERT INTO idem_ledger (key, channel, recipient, subject, body, message_id, source_system, stream, source_id, rule)
         SELECT 'demo_billing/invoices/email:reminder:in_' || n, 'email', 'customer' || n || '@example.com',
                'Invoice INV-' || n || ' is overdue', 'Please pay.', '<' || n || '@idem.local>', 'demo_billing', 'invoices',
                'in_' || n, 'overdue_reminder'
         FROM generate_series(1, $1) AS n",
    )
    .bind(count)
    .execute(&app.pool)
    .await
    .unwrap();
}

async fn run_full(app: &TestApp, connector: &Connector) {
    let report = app
        .run_connector(connector, "invoices", Mode::Regular, false)
        .await;
    assert_eq!(report.status, RunStatus::Succeeded, "{report:?}");
}

#[tokio::test]
async fn a_reminder_whose_condition_no_longer_holds_is_cancelled_not_sent() {
    let sink = SmtpSink::start().await;
    let app = spawn_app_with(60, &smtp_notify(sink.addr())).await;
    // A full walk, so an invoice gone at the vendor is marked deleted.
    let connector = app.demo_connector_variant("full", |text| {
        text.replace(
            "kind = \"high_water_mark\"\nparam = \"updated[gte]\"\nparam_to = \"updated[lt]\"\nformat = \"unix_seconds\"\noverlap = \"15m\"",
            "kind = \"full\"\nmark_deleted = true",
        )
        .replace("sorted = false\n", "")
    });
    let overdue = overdue_ids(&app);
    assert!(overdue.len() > 5);
    run_full(&app, &connector).await;
    assert_eq!(
        status_counts(&app).await.get("pending").copied(),
        Some(overdue.len() as i64)
    );
    let mut picks = overdue.iter().cloned();
    let (paid, deleted, flipped) = (
        picks.next().unwrap(),
        picks.next().unwrap(),
        picks.next().unwrap(),
    );
    let (paid_number, deleted_number, flipped_number) = (
        number_of(&app, &paid),
        number_of(&app, &deleted),
        number_of(&app, &flipped),
    );
    let frozen_body = row_of(&app, &flipped).await.3;

    // Between the row's creation and the send: one invoice is paid, one is deleted at the
    // vendor, and one is paid and then reopened with another amount.
    app.vendor
        .update_invoice(&paid, |inv| inv["status"] = json!("paid"));
    assert!(app.vendor.remove_invoice(&deleted));
    app.vendor
        .update_invoice(&flipped, |inv| inv["status"] = json!("paid"));
    run_full(&app, &connector).await;
    app.vendor.update_invoice(&flipped, |inv| {
        inv["status"] = json!("open");
        inv["amount_due"] = json!(99_999);
    });
    run_full(&app, &connector).await;

    let notify = app.idem(&["notify"]).await;
    assert_eq!(notify.status.code(), Some(0), "{}", stderr(&notify));
    assert!(
        stdout(&notify).contains("2 cancelled"),
        "{}",
        stdout(&notify)
    );

    let received = mails_per_invoice(
        sink.messages()
            .into_iter()
            .map(|m| m.subject.unwrap_or_default()),
    );
    assert!(
        !received.contains_key(&paid_number),
        "a paid invoice was reminded"
    );
    assert!(
        !received.contains_key(&deleted_number),
        "a deleted invoice was reminded"
    );
    assert_eq!(received.get(&flipped_number), Some(&1), "{received:?}");
    assert_eq!(received.len(), overdue.len() - 2, "{received:?}");
    assert!(received.values().all(|n| *n == 1), "{received:?}");
    // The reopened invoice's reminder went out as frozen, not re-rendered.
    let flipped_mail = sink
        .messages()
        .into_iter()
        .find(|m| m.subject.as_deref().unwrap_or("").contains(&flipped_number))
        .unwrap();
    assert!(
        !flipped_mail.data.contains("999.99"),
        "{}",
        flipped_mail.data
    );
    assert_eq!(row_of(&app, &flipped).await.3, frozen_body);

    let (paid_key, paid_status, paid_outcome, _) = row_of(&app, &paid).await;
    assert_eq!(paid_status, "cancelled");
    assert_eq!(paid_outcome.as_deref(), Some("condition_no_longer_holds"));
    let (deleted_key, deleted_status, deleted_outcome, _) = row_of(&app, &deleted).await;
    assert_eq!(deleted_status, "cancelled");
    assert_eq!(deleted_outcome.as_deref(), Some("record_deleted"));
    let listed = app.idem(&["ledger", "list", "--status", "cancelled"]).await;
    let listed = stdout(&listed);
    assert!(
        listed
            .lines()
            .any(|l| l.contains(&paid_key) && l.contains("condition_no_longer_holds")),
        "{listed}"
    );
    assert!(
        listed
            .lines()
            .any(|l| l.contains(&deleted_key) && l.contains("record_deleted")),
        "{listed}"
    );

    // Cancelled stays cancelled: another pass sends nothing.
    let again = app.idem(&["notify"]).await;
    assert_eq!(again.status.code(), Some(0), "{}", stderr(&again));
    assert_eq!(sink.messages().len(), overdue.len() - 2);
}

/// The shipped Stripe connector with a reminder rule on its events stream.
fn stripe_with_reminders(app: &TestApp) -> Connector {
    let shipped = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("connectors/stripe.toml");
    let mut text = std::fs::read_to_string(shipped).unwrap();
    text.push_str(
        r#"
[[streams.invoices.notifications]]
name = "overdue_reminder"
key = "email:reminder:{{ source_id }}:stage1"
to = "customer_email"
subject = "Invoice {{ number }} is overdue"
body = "Invoice {{ number }} is still open."
when = [
  { column = "status", eq = "open" },
  { column = "due_date", older_than = "3d" },
]
"#,
    );
    let path = app.dir.path().join("stripe_reminders.toml");
    std::fs::write(&path, text).unwrap();
    let base = app.vendor.base_url();
    idem::connector::load_file_with(&path, &|env| match env {
        "STRIPE_API_KEY" => Some("sk_test_demo".into()),
        "STRIPE_BASE_URL" => Some(base.clone()),
        _ => None,
    })
    .unwrap_or_else(|issues| panic!("{issues}"))
}

#[tokio::test]
async fn an_invoice_paid_later_in_the_same_backlog_gets_no_reminder() {
    let app = spawn_app_with(30, "").await;
    let connector = stripe_with_reminders(&app);
    let first = app
        .run_connector(&connector, "invoices", Mode::Regular, false)
        .await;
    assert_eq!(first.status, RunStatus::Succeeded, "{first:?}");
    let settings = http_settings(&app);
    let seeded = dispatch(&app, &settings).await;
    assert_eq!(seeded.sent as usize, overdue_ids(&app).len());
    let mails_before = app.vendor.emails().len();

    // A backlog of three pages of events: an invoice is created open and overdue at its
    // start and paid at its end; a second one stays open.
    let due = chrono::Utc::now().timestamp() - 10 * 86_400;
    let invoice = |id: &str, number: &str| {
        json!({"id": id, "object": "invoice", "number": number, "customer": "cus_0001",
               "customer_email": format!("{id}@example.com"), "status": "open",
               "amount_due": 12_300, "currency": "usd", "due_date": due})
    };
    app.vendor
        .insert_invoice(invoice("in_900001", "INV-PAID-LATER"));
    app.vendor
        .insert_invoice(invoice("in_900002", "INV-STILL-OPEN"));
    for n in 0..150 {
        app.vendor
            .update_invoice("in_000001", |inv| inv["amount_due"] = json!(1_000 + n));
    }
    app.vendor
        .update_invoice("in_900001", |inv| inv["status"] = json!("paid"));

    // Page by page, as a slow vendor's backlog commits (a transaction also closes after
    // `[import] transaction_time`): the open version commits before the paid one is read.
    let page_by_page = idem::run::RunOptions {
        batching: idem::writer::Batching {
            max_records: 1,
            ..Default::default()
        },
        ..idem::run::RunOptions::new(Mode::Regular, false)
    };
    let backlog = app
        .run_connector_with(&connector, "invoices", &page_by_page)
        .await;
    assert_eq!(backlog.status, RunStatus::Succeeded, "{backlog:?}");
    assert!(
        backlog.counters.pages >= 2,
        "the backlog spans pages: {backlog:?}"
    );
    // The reminder was made while the invoice was open, on the backlog's first page.
    let (key, status, _, _) = row_of(&app, "in_900001").await;
    assert_eq!(status, "pending");

    let report = dispatch(&app, &settings).await;
    assert_eq!((report.sent, report.cancelled), (1, 1), "{report:?}");
    let new_mails: Vec<String> = app.vendor.emails()[mails_before..]
        .iter()
        .map(|e| e.subject.clone())
        .collect();
    assert_eq!(
        new_mails,
        vec!["Invoice INV-STILL-OPEN is overdue".to_string()]
    );
    let (_, status, outcome, _) = row_of(&app, "in_900001").await;
    assert_eq!(
        (status.as_str(), outcome.as_deref()),
        ("cancelled", Some("condition_no_longer_holds"))
    );
    let listed = app.idem(&["ledger", "list", "--status", "cancelled"]).await;
    assert!(
        stdout(&listed)
            .lines()
            .any(|l| l.contains(&key) && l.contains("condition_no_longer_holds")),
        "{}",
        stdout(&listed)
    );
}

fn slow_smtp_settings(addr: std::net::SocketAddr, batch_size: u32) -> NotifySettings {
    NotifySettings {
        transport: TransportKind::Smtp,
        smtp: Some(SmtpSettings {
            host: addr.ip().to_string(),
            port: Some(addr.port()),
            tls: SmtpTls::None,
            username: None,
            password: None,
        }),
        send_timeout: HumanDuration(Duration::from_millis(400)),
        lease: HumanDuration(Duration::from_millis(1_400)),
        retry_backoff: HumanDuration(Duration::from_millis(10)),
        batch_size,
        // One send at a time: the batch must outlast its claim.
        concurrency: 1,
        ..NotifySettings::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_slower_than_the_lease_is_sent_once() {
    let sink = SmtpSink::start().await;
    // Each message takes 100 ms: the first dispatcher's batch of 40 outlasts its 1.4 s
    // claim by far.
    sink.set_delay(Duration::from_millis(100));
    let app = spawn_app_with(0, "").await;
    insert_pending_rows(&app, 40).await;
    let notify_settings = slow_smtp_settings(sink.addr(), 40);
    let timer_settings = slow_smtp_settings(sink.addr(), 5);
    let transport = AnyTransport::from_settings(&notify_settings).unwrap();
    // `idem notify`: one pass over everything.
    let notify = Dispatcher::new(
        &app.pool,
        &transport,
        DispatchSettings::from_config(&notify_settings),
    );
    // `serve`'s timer: a pass every 100 ms.
    let timer = Dispatcher::new(
        &app.pool,
        &transport,
        DispatchSettings::from_config(&timer_settings),
    );
    let ticking = async {
        let mut total = DispatchReport::default();
        let started = tokio::time::Instant::now();
        tokio::time::sleep(Duration::from_millis(50)).await;
        loop {
            let pass = timer.run_once().await.unwrap();
            total.sent += pass.sent;
            total.recovered_leases += pass.recovered_leases;
            total.needs_review += pass.needs_review;
            let open = app
                .count("SELECT count(*) FROM idem_ledger WHERE status IN ('pending', 'sending')")
                .await;
            if open == 0 || started.elapsed() > Duration::from_secs(30) {
                return total;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let (first, second) = tokio::join!(notify.run_once(), ticking);
    let first = first.unwrap();

    // Rows of the first batch whose claim expired before their turn were taken over (by
    // the timer, or returned by the first dispatcher at the end of its pass) and sent by
    // the timer, while the rows being sent kept their renewed lease.
    assert!(
        first.recovered_leases + second.recovered_leases > 0 && first.sent > 0 && second.sent > 0,
        "the timer should have taken over rows whose claim expired: {first:?} {second:?}"
    );
    assert_eq!(first.sent + second.sent, 40, "{first:?} {second:?}");
    let messages = sink.messages();
    let distinct: BTreeSet<_> = messages.iter().map(|m| m.message_id.clone()).collect();
    assert_eq!(messages.len(), 40, "a row was sent twice");
    assert_eq!(distinct.len(), 40);
    assert_eq!(
        status_counts(&app).await,
        BTreeMap::from([("sent".to_string(), 40)]),
        "a delivered row must not land in needs_review"
    );
}

#[tokio::test]
async fn an_in_progress_answer_is_retried_under_the_same_key() {
    let app = spawn_app_with(0, "").await;
    insert_pending_rows(&app, 1).await;
    // The provider takes 800 ms a message; we wait 200 ms.
    app.vendor.set_email_delay(Duration::from_millis(800));
    let settings = NotifySettings {
        send_timeout: HumanDuration(Duration::from_millis(200)),
        lease: HumanDuration(Duration::from_millis(1_200)),
        ..http_settings(&app)
    };

    let timed_out = dispatch(&app, &settings).await;
    assert_eq!(timed_out.retry_later, 1, "{timed_out:?}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The first request is still being worked on: the provider answers 409.
    let in_progress = dispatch(&app, &settings).await;
    assert_eq!(
        (in_progress.retry_later, in_progress.failed),
        (1, 0),
        "{in_progress:?}"
    );
    let (status, outcome): (String, Option<String>) =
        sqlx::query_as("SELECT status, last_outcome FROM idem_ledger")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(
        (status.as_str(), outcome.as_deref()),
        ("pending", Some("in_progress"))
    );
    tokio::time::sleep(Duration::from_millis(900)).await;
    let done = dispatch(&app, &settings).await;
    assert_eq!(done.sent, 1, "{done:?}");

    assert_eq!(app.vendor.emails().len(), 1, "delivered more than once");
    let sends: Vec<_> = app
        .vendor
        .requests()
        .into_iter()
        .filter(|r| r.path == "/email/send")
        .collect();
    assert_eq!(sends.len(), 3);
    assert!(sends.iter().any(|r| r.status == 409), "{sends:?}");
    let keys: BTreeSet<_> = sends.iter().map(|r| r.idempotency_key.clone()).collect();
    assert_eq!(
        keys,
        BTreeSet::from([Some(
            "demo_billing/invoices/email:reminder:in_1".to_string()
        )])
    );
    assert_eq!(
        status_counts(&app).await,
        BTreeMap::from([("sent".to_string(), 1)])
    );
}

#[tokio::test]
async fn ledger_keys_of_two_sources_never_collide() {
    let app = spawn_app_with(60, "").await;
    // A second billing system whose invoice ids are the same strings, with the same
    // key template.
    let other = app.demo_connector_variant("other", |text| {
        text.replace(
            "source_system = \"demo_billing\"",
            "source_system = \"other_billing\"",
        )
        .replace("table = \"demo_invoices\"", "table = \"other_invoices\"")
    });
    let overdue = overdue_ids(&app);
    app.run_invoices(Mode::Regular).await;
    app.run_connector(&other, "invoices", Mode::Regular, false)
        .await;
    // Nothing is retried forever: a second run of each adds no row.
    app.run_invoices(Mode::Regular).await;
    app.run_connector(&other, "invoices", Mode::Regular, false)
        .await;
    assert_eq!(
        app.count("SELECT count(*) FROM idem_ledger").await,
        2 * overdue.len() as i64
    );

    let report = dispatch(&app, &http_settings(&app)).await;
    assert_eq!(report.sent as usize, 2 * overdue.len(), "{report:?}");
    let received = mails_per_invoice(app.vendor.emails().into_iter().map(|e| e.subject));
    assert_eq!(received.len(), overdue.len());
    assert!(
        received.values().all(|n| *n == 2),
        "each source reminds once: {received:?}"
    );
    let keys: BTreeSet<String> = app
        .vendor
        .emails()
        .into_iter()
        .filter_map(|e| e.idempotency_key)
        .collect();
    assert_eq!(keys.len(), 2 * overdue.len());
    assert!(keys.iter().all(
        |k| k.starts_with("demo_billing/invoices/") || k.starts_with("other_billing/invoices/")
    ));
}

#[tokio::test]
async fn a_key_template_that_collides_is_reported_once_not_retried() {
    let app = spawn_app_with(60, "").await;
    // Every record renders the same key: "in_00".
    let connector = app.demo_connector_variant("colliding", |text| {
        text.replace(
            "key = \"email:reminder:{{ source_id }}:stage1\"",
            "key = \"email:reminder:{{ source_id[:5] }}\"",
        )
    });
    let overdue = overdue_ids(&app);
    for _ in 0..2 {
        let report = app
            .run_connector(&connector, "invoices", Mode::Regular, false)
            .await;
        assert_eq!(report.status, RunStatus::Succeeded, "{report:?}");
    }
    let counts = status_counts(&app).await;
    assert_eq!(counts.get("pending").copied(), Some(1), "{counts:?}");
    assert_eq!(
        counts.get("failed").copied(),
        Some(overdue.len() as i64 - 1),
        "{counts:?}"
    );
    assert_eq!(
        app.count("SELECT count(*) FROM idem_ledger WHERE status = 'failed' AND last_outcome = 'key_collision'")
            .await,
        overdue.len() as i64 - 1
    );
    let listed = app.idem(&["ledger", "list", "--status", "failed"]).await;
    assert!(
        stdout(&listed).contains(
            "key_collision: ledger key 'demo_billing/invoices/email:reminder:in_00' is already used"
        ),
        "{}",
        stdout(&listed)
    );
}

#[tokio::test]
async fn the_log_transport_delivers_nothing_and_its_rows_can_be_requeued() {
    let app = spawn_app_with(60, "[notify]\ntransport = \"log\"\n").await;
    let overdue = overdue_ids(&app);
    let check = app.idem(&["check"]).await;
    assert_eq!(check.status.code(), Some(0), "{}", stderr(&check));
    assert!(
        stdout(&check).contains("transport = log: NOTHING IS DELIVERED"),
        "{}",
        stdout(&check)
    );
    let run = app.idem(&["run"]).await;
    assert_eq!(run.status.code(), Some(0), "{}", stderr(&run));
    assert!(
        stdout(&run).contains("NOTHING WAS DELIVERED"),
        "{}",
        stdout(&run)
    );
    assert_eq!(
        app.count("SELECT count(*) FROM idem_ledger WHERE status = 'sent' AND transport = 'log'")
            .await,
        overdue.len() as i64
    );
    let refused = app.idem(&["ledger", "requeue", "--transport", "log"]).await;
    assert_eq!(
        refused.status.code(),
        Some(2),
        "requeue to the log again is refused"
    );

    // A real transport is configured; one invoice was paid meanwhile.
    let paid = overdue.iter().next().unwrap().clone();
    app.vendor
        .update_invoice(&paid, |inv| inv["status"] = json!("paid"));
    let config = std::fs::read_to_string(&app.config_path).unwrap().replace(
        "[notify]\ntransport = \"log\"\n",
        "[notify]\ntransport = \"http\"\nretry_backoff = \"10ms\"\n\n[notify.http]\nurl = \"${DEMO_BILLING_URL}/email/send\"\n",
    );
    std::fs::write(&app.config_path, config).unwrap();
    let check = app.idem(&["check"]).await;
    assert!(
        stdout(&check).contains("transport = http: exactly once"),
        "{}",
        stdout(&check)
    );
    let requeued = app.idem(&["ledger", "requeue", "--transport", "log"]).await;
    assert_eq!(requeued.status.code(), Some(0), "{}", stderr(&requeued));
    assert!(
        stdout(&requeued).contains(&format!("{} row(s)", overdue.len())),
        "{}",
        stdout(&requeued)
    );
    let run = app.idem(&["run"]).await;
    assert_eq!(run.status.code(), Some(0), "{}", stderr(&run));
    assert!(
        !stdout(&run).contains("NOTHING WAS DELIVERED"),
        "{}",
        stdout(&run)
    );
    assert_eq!(app.vendor.emails().len(), overdue.len() - 1);
    let (_, status, outcome, _) = row_of(&app, &paid).await;
    assert_eq!(
        (status.as_str(), outcome.as_deref()),
        ("cancelled", Some("condition_no_longer_holds"))
    );
}

#[tokio::test]
async fn a_lease_shorter_than_a_send_is_refused() {
    let app = spawn_app_with(0, "[notify]\nsend_timeout = \"30s\"\nlease = \"30s\"\n").await;
    let check = app.idem(&["check"]).await;
    assert_eq!(check.status.code(), Some(2), "{}", stdout(&check));
    assert!(
        stderr(&check).contains("lease = \"30s\" is shorter than send_timeout"),
        "{}",
        stderr(&check)
    );
    let notify = app.idem(&["notify"]).await;
    assert_eq!(notify.status.code(), Some(2), "{}", stderr(&notify));
}

#[tokio::test]
async fn rows_made_before_keys_were_namespaced_are_not_sent_again() {
    let app = spawn_app_with(60, "[notify]\ntransport = \"http\"\nretry_backoff = \"10ms\"\nconcurrency = 1\n\n[notify.http]\nurl = \"${DEMO_BILLING_URL}/email/send\"\n").await;
    let overdue = overdue_ids(&app);
    let old = overdue.iter().next().unwrap().clone();
    // A reminder sent by an earlier version, under the key format of the time.
    sqlx::query(
        "INSERT INTO idem_ledger (key, channel, recipient, subject, body, message_id, source_system, stream, source_id, rule, status, sent_at)
         VALUES ($1, 'email', 'x@example.com', 'old', 'old', '<old@idem.local>', 'demo_billing', 'invoices', $2, 'overdue_reminder', 'sent', now())",
    )
    .bind(format!("email:reminder:{old}:stage1"))
    .bind(&old)
    .execute(&app.pool)
    .await
    .unwrap();
    let run = app.idem(&["run"]).await;
    assert_eq!(run.status.code(), Some(0), "{}", stderr(&run));
    assert_eq!(
        app.count(&format!(
            "SELECT count(*) FROM idem_ledger WHERE source_id = '{old}'"
        ))
        .await,
        1
    );
    let emails = app.vendor.emails();
    assert_eq!(emails.len(), overdue.len() - 1);
    assert!(
        emails
            .iter()
            .all(|e| !e.subject.contains(&number_of(&app, &old)))
    );
}

#[tokio::test]
async fn a_kill_between_marking_in_flight_and_sending_never_sends_twice() {
    use std::os::unix::process::ExitStatusExt;
    // HTTP with keys: the row is retried under its key and delivered once.
    let app = spawn_app_with(60, "[notify]\ntransport = \"http\"\nretry_backoff = \"10ms\"\nconcurrency = 1\n\n[notify.http]\nurl = \"${DEMO_BILLING_URL}/email/send\"\n").await;
    let overdue = overdue_ids(&app);
    let crashed = app
        .command(&["run"])
        .env("IDEM_CRASH_AT", "notify_before_send:2")
        .output()
        .await
        .unwrap();
    assert_eq!(crashed.status.signal(), Some(9), "{}", stderr(&crashed));
    assert_eq!(app.vendor.emails().len(), 1);
    let in_flight: String = sqlx::query_scalar(
        "SELECT key FROM idem_ledger WHERE status = 'sending' AND in_flight_since IS NOT NULL",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    // The lease was renewed for a whole send: nobody may take it before it expires.
    let notify = app.idem(&["notify"]).await;
    assert_eq!(notify.status.code(), Some(0), "{}", stderr(&notify));
    let status: String = sqlx::query_scalar("SELECT status FROM idem_ledger WHERE key = $1")
        .bind(&in_flight)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(status, "sending", "a live lease was taken over");
    sqlx::query("UPDATE idem_ledger SET lease_expires_at = now() - interval '1 second' WHERE status = 'sending'")
        .execute(&app.pool)
        .await
        .unwrap();
    let notify = app.idem(&["notify"]).await;
    assert_eq!(notify.status.code(), Some(0), "{}", stderr(&notify));
    let received = mails_per_invoice(app.vendor.emails().into_iter().map(|e| e.subject));
    assert_eq!(received.len(), overdue.len());
    assert!(received.values().all(|n| *n == 1), "{received:?}");

    // SMTP: the outcome is unknown to idem, so a person decides; nothing is sent twice.
    let sink = SmtpSink::start().await;
    let app = spawn_app_with(60, &sequential(&smtp_notify(sink.addr()))).await;
    let crashed = app
        .command(&["run"])
        .env("IDEM_CRASH_AT", "notify_before_send:2")
        .output()
        .await
        .unwrap();
    assert_eq!(crashed.status.signal(), Some(9), "{}", stderr(&crashed));
    sqlx::query("UPDATE idem_ledger SET lease_expires_at = now() - interval '1 second' WHERE status = 'sending'")
        .execute(&app.pool)
        .await
        .unwrap();
    let notify = app.idem(&["notify"]).await;
    assert_eq!(notify.status.code(), Some(3), "{}", stderr(&notify));
    assert_eq!(
        status_counts(&app).await,
        BTreeMap::from([
            ("needs_review".to_string(), 1),
            ("sent".to_string(), overdue.len() as i64 - 1)
        ])
    );
    assert_eq!(sink.messages().len(), overdue.len() - 1);
}

#[tokio::test]
async fn a_row_whose_condition_cannot_be_evaluated_waits_for_a_person() {
    let app = spawn_app_with(60, "").await;
    let overdue = overdue_ids(&app);
    app.run_invoices(Mode::Regular).await;
    // Someone changed the table by hand under one row's frozen condition.
    let broken = overdue.iter().next().unwrap().clone();
    sqlx::query(
        "UPDATE idem_ledger SET condition = jsonb_set(condition, '{0,column}', '\"no_such_column\"') WHERE source_id = $1",
    )
    .bind(&broken)
    .execute(&app.pool)
    .await
    .unwrap();
    let report = dispatch(&app, &http_settings(&app)).await;
    assert_eq!(
        (report.sent as usize, report.needs_review),
        (overdue.len() - 1, 1),
        "{report:?}"
    );
    let (_, status, outcome, _) = row_of(&app, &broken).await;
    assert_eq!(
        (status.as_str(), outcome.as_deref()),
        ("needs_review", Some("unverifiable"))
    );
    assert_eq!(app.vendor.emails().len(), overdue.len() - 1);
}
