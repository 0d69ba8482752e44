//! The operator console of `idem serve`, over HTTP against the real binary: pages render
//! from real runs, every action needs the admin token and a matching CSRF token, a
//! resolve changes the ledger row and records who, when and why.

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use idem_fakes::SmtpSink;
use reqwest::StatusCode;
use reqwest::redirect::Policy;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::helpers::{TestApp, spawn_app_with, stderr};
use crate::ledger::{sequential, smtp_notify};

const TOKEN: &str = "console-admin-token-7f3a";

/// `idem serve` with the console, no schedules (runs only when a test asks).
struct Served {
    base: String,
    client: reqwest::Client,
    _child: tokio::process::Child,
}

async fn serve(app: &TestApp, with_token: bool) -> Served {
    let mut config = std::fs::read_to_string(&app.config_path).unwrap();
    config.push_str("\n[serve]\nlisten = \"127.0.0.1:0\"\nnotify_every = \"1h\"\n");
    if with_token {
        config.push_str("admin_token = \"${IDEM_TEST_ADMIN_TOKEN}\"\n");
    }
    std::fs::write(&app.config_path, config).unwrap();
    let mut child = app
        .command(&["serve"])
        .env("IDEM_TEST_ADMIN_TOKEN", TOKEN)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let banner = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("serve prints its banner")
        .unwrap()
        .expect("a banner line");
    // Keep reading what serve prints after its banner: a closed pipe would kill it.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let health = banner
        .split_whitespace()
        .map(|w| w.trim_end_matches(','))
        .find(|w| w.ends_with("/healthz"))
        .expect("banner names /healthz")
        .to_string();
    Served {
        base: health.trim_end_matches("/healthz").to_string(),
        client: reqwest::Client::builder()
            .redirect(Policy::none())
            .build()
            .unwrap(),
        _child: child,
    }
}

impl Served {
    async fn get(&self, path: &str, cookie: Option<&str>) -> (StatusCode, String) {
        let mut request = self.client.get(format!("{}{path}", self.base));
        if let Some(cookie) = cookie {
            request = request.header("cookie", cookie);
        }
        let response = request.send().await.unwrap();
        (response.status(), response.text().await.unwrap())
    }

    async fn post(
        &self,
        path: &str,
        cookie: Option<&str>,
        form: &[(&str, &str)],
        origin: Option<&str>,
    ) -> reqwest::Response {
        let mut request = self.client.post(format!("{}{path}", self.base)).form(form);
        if let Some(cookie) = cookie {
            request = request.header("cookie", cookie);
        }
        if let Some(origin) = origin {
            request = request.header("origin", origin);
        }
        request.send().await.unwrap()
    }

    /// Signs in; returns the session cookie and the page's CSRF token.
    async fn sign_in(&self, operator: &str) -> (String, String) {
        let response = self
            .post(
                "/login",
                None,
                &[("operator", operator), ("token", TOKEN)],
                Some(&self.base),
            )
            .await;
        assert_eq!(response.status(), StatusCode::SEE_OTHER);
        let set_cookie = response
            .headers()
            .get("set-cookie")
            .expect("a session cookie")
            .to_str()
            .unwrap()
            .to_string();
        assert!(set_cookie.contains("HttpOnly") && set_cookie.contains("SameSite=Strict"));
        assert!(
            !set_cookie.contains(TOKEN),
            "the cookie must not be the token"
        );
        let cookie = set_cookie.split(';').next().unwrap().to_string();
        let (_, page) = self.get("/", Some(&cookie)).await;
        let csrf = page
            .split("name=\"csrf\" value=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .unwrap_or_else(|| panic!("a signed-in page carries the CSRF token: {page}"))
            .to_string();
        (cookie, csrf)
    }
}

async fn wait_until(app: &TestApp, sql: &str, want: i64) {
    let started = tokio::time::Instant::now();
    while app.count(sql).await < want {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "timed out waiting for: {sql} >= {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn console_pages_render_from_real_runs() {
    let app = spawn_app_with(150, "[notify]\ntransport = \"log\"\n").await;
    // One record the destination refuses, carrying a credential-looking field.
    app.vendor.update_invoice("in_000003", |inv| {
        inv["amount_due"] = json!("lots");
        inv["api_key"] = json!("sk_live_must_not_show");
    });
    let run = app.idem(&["run"]).await;
    assert_eq!(run.status.code(), Some(3), "{}", stderr(&run));
    let served = serve(&app, false).await;

    let (status, index) = served.get("/", None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(index.contains("demo_billing.invoices"), "{index}");
    assert!(
        index.contains(">partial<"),
        "last run status shown: {index}"
    );
    assert!(index.contains(">150<"), "records in shown: {index}");
    assert!(index.contains(">149<"), "inserted shown: {index}");
    assert!(
        index.contains("1 failed record(s) waiting") && index.contains("class=\"trouble\""),
        "a stream with failures stands out: {index}"
    );
    assert!(index.contains("read-only"), "{index}");
    assert!(
        !index.contains("name=\"csrf\""),
        "no action forms without a session"
    );

    let (status, page) = served.get("/streams/demo_billing/invoices", None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("in_000003"), "the failure is listed: {page}");
    assert!(page.contains("amount_due"), "its error and payload: {page}");
    assert!(
        page.contains("{\n  &quot;amount_due&quot;: &quot;lots&quot;,\n"),
        "payload is pretty JSON, escaped: {page}"
    );
    assert!(
        page.contains("&quot;api_key&quot;: &quot;***&quot;"),
        "credential-looking fields are redacted: {page}"
    );
    assert!(page.contains("main"), "checkpoint scope: {page}");
    for leaked in ["sk_live_must_not_show", "sk_test_demo"] {
        assert!(!page.contains(leaked), "{leaked} must not reach the page");
    }
    let (status, ledger) = served.get("/ledger", None).await;
    assert_eq!(status, StatusCode::OK);
    let sent = app
        .count("SELECT count(*) FROM idem_ledger WHERE status = 'sent'")
        .await;
    assert!(sent > 0, "the demo data has overdue invoices");
    assert_eq!(
        ledger.matches("<span class=\"pill sent\">").count() as i64,
        sent,
        "{ledger}"
    );
    let (_, filtered) = served.get("/ledger?status=needs_review", None).await;
    assert!(filtered.contains("No rows match."), "{filtered}");
    let (status, _) = served.get("/streams/demo_billing/nope", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, ready) = served.get("/readyz", None).await;
    assert_eq!((status, ready.as_str()), (StatusCode::OK, "ready\n"));
    // A schema behind the binary (a migration missing) is alive but not ready.
    sqlx::query("DELETE FROM _sqlx_migrations WHERE version = 20261202000001")
        .execute(&app.pool)
        .await
        .unwrap();
    let (status, ready) = served.get("/readyz", None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        ready.contains("console actions") && ready.contains("idem migrate"),
        "{ready}"
    );
    let (status, _) = served.get("/healthz", None).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn console_actions_require_the_admin_token() {
    let app = spawn_app_with(400, "[notify]\ntransport = \"log\"\n").await;
    let served = serve(&app, true).await;
    let runs = "SELECT count(*) FROM idem_runs";

    let anonymous = served
        .post(
            "/streams/demo_billing/invoices/run",
            None,
            &[("csrf", "x")],
            None,
        )
        .await;
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    let wrong = served
        .post(
            "/login",
            None,
            &[("operator", "mallory"), ("token", "guess")],
            None,
        )
        .await;
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    assert!(wrong.headers().get("set-cookie").is_none());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(app.count(runs).await, 0, "nothing ran without the token");

    let (cookie, csrf) = served.sign_in("alice").await;
    let started = served
        .post(
            "/streams/demo_billing/invoices/run",
            Some(&cookie),
            &[("csrf", &csrf)],
            None,
        )
        .await;
    assert_eq!(started.status(), StatusCode::SEE_OTHER);
    wait_until(
        &app,
        "SELECT count(*) FROM idem_runs WHERE status = 'succeeded'",
        1,
    )
    .await;
    app.assert_matches_vendor().await;
    let (_, page) = served
        .get("/streams/demo_billing/invoices", Some(&cookie))
        .await;
    assert!(
        page.contains("started a run of demo_billing.invoices"),
        "{page}"
    );
    let logged: (String, String) = sqlx::query_as(
        "SELECT operator, action FROM idem_console_actions WHERE target = 'stream:demo_billing.invoices'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(logged, ("alice".to_string(), "run".to_string()));

    // A click while the stream runs (here: a nightly `idem run` in another process) says so
    // and starts nothing.
    let mut nightly = app.spawn_slow_nightly_run().await;
    // Its run is recorded once it holds the lock (the console's own run is finished).
    wait_until(
        &app,
        "SELECT count(*) FROM idem_runs WHERE status = 'running'",
        1,
    )
    .await;
    let before = app.count(runs).await;
    let clicked = served
        .post(
            "/streams/demo_billing/invoices/replay",
            Some(&cookie),
            &[("csrf", &csrf), ("since", "7d")],
            None,
        )
        .await;
    assert_eq!(clicked.status(), StatusCode::SEE_OTHER);
    let (_, page) = served
        .get("/streams/demo_billing/invoices", Some(&cookie))
        .await;
    assert!(
        page.contains("is running now") && page.contains("nothing was queued"),
        "{page}"
    );
    assert_eq!(app.count(runs).await, before, "no second run was recorded");
    let _ = nightly.kill().await;
}

#[tokio::test]
async fn console_refuses_csrf() {
    let app = spawn_app_with(20, "[notify]\ntransport = \"log\"\n").await;
    let served = serve(&app, true).await;
    let (cookie, csrf) = served.sign_in("bob").await;
    let path = "/streams/demo_billing/invoices/run";

    let missing = served.post(path, Some(&cookie), &[], None).await;
    assert_eq!(missing.status(), StatusCode::FORBIDDEN);
    let forged = served
        .post(path, Some(&cookie), &[("csrf", "0000")], None)
        .await;
    assert_eq!(forged.status(), StatusCode::FORBIDDEN);
    let cross_site = served
        .post(
            path,
            Some(&cookie),
            &[("csrf", &csrf)],
            Some("https://evil.example"),
        )
        .await;
    assert_eq!(cross_site.status(), StatusCode::FORBIDDEN);
    let body = cross_site.text().await.unwrap();
    assert!(body.contains("CSRF"), "{body}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(app.count("SELECT count(*) FROM idem_runs").await, 0);
    assert_eq!(
        app.count("SELECT count(*) FROM idem_console_actions").await,
        0
    );
}

#[tokio::test]
async fn console_resolve_changes_the_row_with_who_and_note() {
    let sink = SmtpSink::start().await;
    let app = spawn_app_with(120, &sequential(&smtp_notify(sink.addr()))).await;
    // A dispatcher killed right after the SMTP server accepted a message: that row's
    // outcome is unknown and it goes to needs_review.
    let crashed = app
        .command(&["run"])
        .env("IDEM_CRASH_AT", "notify_after_send:2")
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
    let key: String =
        sqlx::query_scalar("SELECT key FROM idem_ledger WHERE status = 'needs_review'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    let status_of = |key: String| {
        let pool = app.pool.clone();
        async move {
            sqlx::query_scalar::<_, String>("SELECT status FROM idem_ledger WHERE key = $1")
                .bind(key)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };

    let served = serve(&app, true).await;
    let (_, index) = served.get("/", None).await;
    assert!(index.contains("1 ledger row(s) need review"), "{index}");
    let (_, review) = served.get("/ledger?status=needs_review", None).await;
    // Keys are namespaced `source/stream/...`; the template escapes `/` in HTML.
    assert!(review.contains(&key.replace('/', "&#x2f;")), "{review}");

    let (cookie, csrf) = served.sign_in("carol").await;
    let without_token = served
        .post(
            "/ledger/resolve",
            None,
            &[
                ("csrf", &csrf),
                ("key", &key),
                ("resolution", "sent"),
                ("note", "x"),
            ],
            None,
        )
        .await;
    assert_eq!(without_token.status(), StatusCode::UNAUTHORIZED);
    let without_note = served
        .post(
            "/ledger/resolve",
            Some(&cookie),
            &[
                ("csrf", &csrf),
                ("key", &key),
                ("resolution", "sent"),
                ("note", "  "),
            ],
            None,
        )
        .await;
    assert_eq!(without_note.status(), StatusCode::SEE_OTHER);
    assert_eq!(
        status_of(key.clone()).await,
        "needs_review",
        "a note is required"
    );

    let resolved = served
        .post(
            "/ledger/resolve",
            Some(&cookie),
            &[
                ("csrf", &csrf),
                ("key", &key),
                ("resolution", "sent"),
                ("note", "found it in the SMTP sink's log"),
            ],
            Some(&served.base),
        )
        .await;
    assert_eq!(resolved.status(), StatusCode::SEE_OTHER);
    assert_eq!(status_of(key.clone()).await, "sent");
    let (operator, note, outcome): (String, String, String) = sqlx::query_as(
        "SELECT operator, note, outcome FROM idem_console_actions WHERE action = 'resolve' AND target = $1",
    )
    .bind(format!("ledger:{key}"))
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(
        (operator.as_str(), note.as_str(), outcome.as_str()),
        ("carol", "found it in the SMTP sink's log", "now sent")
    );
    let (_, ledger) = served
        .get(&format!("/ledger?key={key}"), Some(&cookie))
        .await;
    assert!(
        ledger.contains("resolved by carol at")
            && ledger.contains("found it in the SMTP sink&#x27;s log"),
        "{ledger}"
    );
    // Resolving again is refused by the ledger (the row is sent) and says so.
    let again = served
        .post(
            "/ledger/resolve",
            Some(&cookie),
            &[
                ("csrf", &csrf),
                ("key", &key),
                ("resolution", "retry"),
                ("note", "oops"),
            ],
            None,
        )
        .await;
    assert_eq!(again.status(), StatusCode::SEE_OTHER);
    assert_eq!(status_of(key.clone()).await, "sent");
}
