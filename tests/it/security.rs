//! A hostile or careless vendor cannot make idem leak or break: echoed credentials are
//! redacted everywhere, credentials never leave `base_url`'s host, responses are bounded,
//! mail recipients are validated by every transport, NULs in vendor text are harmless.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use idem::config::{HttpEmailSettings, NotifySettings, TransportKind};
use idem::connector::Connector;
use idem::duration::HumanDuration;
use idem::ledger::dispatch::{DispatchSettings, Dispatcher};
use idem::ledger::transport::AnyTransport;
use idem::run::{Mode, RunStatus};
use idem_fakes::{ApiKeyPlace, FakeVendor, Fault, FaultKind, SmtpSink};

use crate::helpers::{TestApp, spawn_app, spawn_app_with, stderr, stdout};

/// Every public table's rows that contain `needle`, as "table: count".
async fn tables_holding(app: &TestApp, needle: &str) -> Vec<String> {
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT quote_ident(table_name) FROM information_schema.tables WHERE table_schema = 'public'",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    let mut holding = Vec::new();
    for table in tables {
        let found: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM {table} t WHERE strpos(t::text, $1) > 0"
        ))
        .bind(needle)
        .fetch_one(&app.pool)
        .await
        .unwrap();
        if found > 0 {
            holding.push(format!("{table}: {found}"));
        }
    }
    holding
}

fn connector_text(system: &str, auth: &str, extra: &str, stream: &str) -> String {
    format!(
        "source_system = \"{system}\"\nbase_url = \"${{VENDOR_URL}}\"\n{auth}\n{extra}\n[http]\nmax_attempts = 2\ninitial_backoff = \"10ms\"\n{stream}"
    )
}

fn base64(input: &str) -> String {
    idem::redact::base64(input.as_bytes())
}

// ---------------------------------------------------------------------------------------
// Redaction
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_vendor_error_that_echoes_credentials_is_redacted() {
    const TOKEN: &str = "tok_ECHOED_bearer_71c2";
    const USER: &str = "idem-user";
    const PASSWORD: &str = "pw_ECHOED/basic+93d1";
    const HEADER_KEY: &str = "hk_ECHOED_header_5e0a";
    const QUERY_KEY: &str = "qk_ECHOED query&7f3b";
    const CLIENT_SECRET: &str = "cs_ECHOED_oauth_2b8c";
    const EXTRA: &str = "xh_ECHOED_extra_64d9";
    const URL_PASSWORD: &str = "up_ECHOED_url_4e1f";
    const DB_PASSWORD: &str = "dbpw_ECHOED_9a7c";
    let app = spawn_app(5).await;
    app.vendor
        .require_oauth2("idem", CLIENT_SECRET, Duration::from_secs(600));
    // Every API request is answered 400 with the request quoted back, headers and all.
    app.vendor
        .inject(Fault::new("/v1", 100, FaultKind::EchoRequest { code: 400 }));
    let stream = "[streams.items]\npath = \"/v1/invoices\"\nrecords = \"/data\"\nid = \"/id\"\ntable = \"items\"\n";
    let kinds = [
        (
            "bearer",
            "[auth]\nkind = \"bearer\"\ntoken = \"${T_TOKEN}\"",
            "",
        ),
        (
            "basic",
            "[auth]\nkind = \"basic\"\nusername = \"idem-user\"\npassword = \"${T_PASSWORD}\"",
            "",
        ),
        (
            "header_key",
            "[auth]\nkind = \"api_key\"\nheader = \"X-Api-Key\"\nvalue = \"${T_HEADER_KEY}\"",
            "[headers]\nX-Extra-Secret = \"${T_EXTRA}\"",
        ),
        (
            "query_key",
            "[auth]\nkind = \"api_key\"\nquery_param = \"key_param\"\nvalue = \"${T_QUERY_KEY}\"",
            "",
        ),
        (
            "oauth",
            "[auth]\nkind = \"oauth2_client_credentials\"\ntoken_url = \"${VENDOR_URL}/oauth/token\"\nclient_id = \"idem\"\nclient_secret = \"${T_CLIENT_SECRET}\"",
            "",
        ),
    ];
    let files: Vec<String> = kinds
        .iter()
        .map(|(name, auth, extra)| {
            let path = app.dir.path().join(format!("{name}.toml"));
            std::fs::write(
                &path,
                connector_text(&format!("{name}_vendor"), auth, extra, stream),
            )
            .unwrap();
            path.display().to_string()
        })
        .collect();
    // A password in base_url itself.
    let mut files = files;
    let userinfo = app.dir.path().join("userinfo.toml");
    std::fs::write(
        &userinfo,
        connector_text("userinfo_vendor", "", "", stream).replace(
            "${VENDOR_URL}",
            &format!("http://idem:${{T_URL_PASSWORD}}@{}", app.vendor.addr()),
        ),
    )
    .unwrap();
    files.push(userinfo.display().to_string());
    std::fs::write(
        &app.config_path,
        format!("connectors = {files:?}\n[notify]\ntransport = \"log\"\n"),
    )
    .unwrap();
    let idem = |args: &[&str]| {
        let mut command = app.command(args);
        command
            .env("VENDOR_URL", app.vendor.base_url())
            .env("T_TOKEN", TOKEN)
            .env("T_PASSWORD", PASSWORD)
            .env("T_HEADER_KEY", HEADER_KEY)
            .env("T_QUERY_KEY", QUERY_KEY)
            .env("T_CLIENT_SECRET", CLIENT_SECRET)
            .env("T_EXTRA", EXTRA)
            .env("T_URL_PASSWORD", URL_PASSWORD)
            .env("RUST_LOG", "debug");
        command
    };
    let run = idem(&["run", "--no-notify", "--json"])
        .output()
        .await
        .unwrap();
    assert_eq!(run.status.code(), Some(1), "{}", stderr(&run));
    let run_text = idem(&["run", "--no-notify"]).output().await.unwrap();
    assert_eq!(run_text.status.code(), Some(1), "{}", stderr(&run_text));
    let status = idem(&["status"]).output().await.unwrap();
    assert_eq!(status.status.code(), Some(0), "{}", stderr(&status));
    let status_json = idem(&["status", "--json"]).output().await.unwrap();
    assert_eq!(
        status_json.status.code(),
        Some(0),
        "{}",
        stderr(&status_json)
    );

    // The vendor did quote every credential back: the redaction had something to do.
    let sent = app.vendor.requests();
    let issued: Vec<String> = sent
        .iter()
        .filter(|r| r.path.starts_with("/v1"))
        .filter_map(|r| r.authorization.clone())
        .filter_map(|a| a.strip_prefix("Bearer ").map(str::to_string))
        .filter(|t| t != TOKEN)
        .collect();
    assert_eq!(issued.len(), 2, "one OAuth2 token per run: {issued:?}");
    let errors: Vec<(String, String)> =
        sqlx::query_as("SELECT DISTINCT ON (source_system) source_system, error FROM idem_runs ORDER BY source_system, started_at")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert_eq!(errors.len(), kinds.len() + 1, "{errors:?}");
    for (system, error) in &errors {
        assert!(
            error.contains("HTTP 400") && error.contains("request headers"),
            "{system}: the vendor's error is kept: {error}"
        );
        assert!(error.contains("***"), "{system}: nothing masked: {error}");
    }
    // A database password, in the URL's userinfo or as `?password=`, is not shown by
    // the connection error.
    // (Both at once: the pool keeps retrying a refused connection for its 10 s timeout.)
    let (userinfo, query) = tokio::join!(
        idem(&["status"])
            .env(
                "DATABASE_URL",
                format!("postgres://postgres:{DB_PASSWORD}@127.0.0.1:1/idem"),
            )
            .output(),
        idem(&["status"])
            .env(
                "DATABASE_URL",
                format!("postgres://postgres@127.0.0.1:1/idem?password={DB_PASSWORD}"),
            )
            .output()
    );
    let mut db_errors = Vec::new();
    for failed in [userinfo.unwrap(), query.unwrap()] {
        assert_ne!(failed.status.code(), Some(0));
        let text = stderr(&failed);
        assert!(text.contains("127.0.0.1:1"), "{text}");
        db_errors.push(text);
    }
    let mut secrets = vec![
        DB_PASSWORD.to_string(),
        URL_PASSWORD.to_string(),
        base64(&format!("idem:{URL_PASSWORD}")),
        TOKEN.to_string(),
        PASSWORD.to_string(),
        base64(&format!("{USER}:{PASSWORD}")),
        HEADER_KEY.to_string(),
        QUERY_KEY.to_string(),
        url::form_urlencoded::byte_serialize(QUERY_KEY.as_bytes()).collect(),
        CLIENT_SECRET.to_string(),
        EXTRA.to_string(),
        "ECHOED".to_string(),
    ];
    secrets.extend(issued);
    let run_errors: String = errors
        .iter()
        .map(|(_, e)| e.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    for secret in &secrets {
        for (what, text) in [
            ("run --json", stdout(&run)),
            ("run logs", stderr(&run)),
            ("run", stdout(&run_text)),
            ("status", stdout(&status)),
            ("status logs", stderr(&status)),
            ("status --json", stdout(&status_json)),
            ("idem_runs.error", run_errors.clone()),
            ("database connection errors", db_errors.join("\n")),
        ] {
            assert!(
                !text.contains(secret.as_str()),
                "{what} leaks {secret}:\n{text}"
            );
        }
        let holding = tables_holding(&app, secret).await;
        assert!(holding.is_empty(), "tables hold {secret}: {holding:?}");
    }
    // The vendor's terminal escapes are shown escaped, never interpreted.
    let printed = stdout(&run_text);
    assert!(printed.contains("bad request"), "{printed}");
    assert!(
        !printed.contains('\u{1b}'),
        "run prints raw escapes: {printed:?}"
    );
    let shown = stdout(&status);
    assert!(shown.contains("bad request"), "{shown}");
    assert!(
        !shown.contains('\u{1b}') && !shown.contains('\u{7}') && !shown.contains('\r'),
        "status prints raw control characters: {shown:?}"
    );
    assert!(shown.contains("\\u{1b}[31m"), "{shown}");
}

#[tokio::test]
async fn a_nul_in_a_vendor_error_is_recorded_not_fatal() {
    let app = spawn_app(5).await;
    let connector = app.demo_connector_variant("fast_retry", |text| {
        text.replace(
            "[rate_limit]",
            "[http]\nmax_attempts = 2\ninitial_backoff = \"10ms\"\n\n[rate_limit]",
        )
    });
    // "hello", gzipped: binary, with NULs, as a vendor sends when it ignores Accept-Encoding.
    let gzip = vec![
        0x1f, 0x8b, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x03, 0xcb, 0x48, 0xcd, 0xc9, 0xc9,
        0x07, 0x00, 0x86, 0xa6, 0x10, 0x36, 0x05, 0x00, 0x00, 0x00,
    ];
    // (content type, body, status, requests it answers: 503 is retried once).
    let cases: [(&str, Vec<u8>, u16, usize); 3] = [
        (
            "application/json",
            b"{\"error\": \"bad\0request\"}".to_vec(),
            400,
            1,
        ),
        ("application/json", gzip, 422, 1),
        ("text/plain", b"upstream\0down".to_vec(), 503, 2),
    ];
    for (content_type, body, code, times) in cases {
        app.vendor.inject(Fault::new(
            "/v1/invoices",
            times,
            FaultKind::RawBody {
                code,
                content_type: content_type.into(),
                body,
            },
        ));
        let report = app
            .run_connector(&connector, "invoices", Mode::Regular, false)
            .await;
        assert_eq!(report.status, RunStatus::Failed, "{report:?}");
        let error = report.error.clone().unwrap_or_default();
        assert!(error.contains(&format!("HTTP {code}")), "{error}");
        assert!(!error.contains('\0'), "{error:?}");
        let (status, stored): (String, Option<String>) =
            sqlx::query_as("SELECT status, error FROM idem_runs WHERE id = $1")
                .bind(report.run_id.expect("a recorded run"))
                .fetch_one(&app.pool)
                .await
                .unwrap();
        assert_eq!(status, "failed", "HTTP {code}: the run's end was recorded");
        let stored = stored.expect("the vendor's error is kept");
        assert!(stored.contains(&format!("HTTP {code}")), "{stored}");
        if code == 400 {
            assert!(stored.contains("badrequest"), "{stored}");
        }
    }
    assert_eq!(
        app.count("SELECT count(*) FROM idem_runs WHERE status = 'running'")
            .await,
        0
    );
    let status = app.idem(&["status"]).await;
    assert_eq!(status.status.code(), Some(0), "{}", stderr(&status));
    assert!(stdout(&status).contains("HTTP 422"), "{}", stdout(&status));
    // Once the vendor is healthy again, the stream imports everything.
    let report = app.run_invoices(Mode::Regular).await;
    assert_eq!(report.status, RunStatus::Succeeded, "{report:?}");
    app.assert_matches_vendor().await;
}

// ---------------------------------------------------------------------------------------
// Credentials stay with their host
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_never_leave_the_base_url_host() {
    const HEADER_KEY: &str = "hk_HOSTBOUND_header_a1";
    const EXTRA: &str = "xh_HOSTBOUND_extra_b2";
    const QUERY_KEY: &str = "qk_HOSTBOUND_query_c3";
    const TOKEN: &str = "tok_HOSTBOUND_bearer_d4";
    let secrets = [HEADER_KEY, EXTRA, QUERY_KEY, TOKEN, "HOSTBOUND"];
    let app = spawn_app(25).await;
    // The vendor's next links repeat a query API key, and point at another host.
    app.vendor
        .require_api_key(ApiKeyPlace::Query("api_key".into()), QUERY_KEY);
    let other = FakeVendor::start_on(SocketAddr::from(([127, 0, 0, 2], 0)))
        .await
        .expect("bind 127.0.0.2 (Linux routes all of 127/8 to loopback)");
    other.seed_invoices(25);
    app.vendor.set_link_base(&other.base_url());

    let auths = [
        (
            "header",
            "[auth]\nkind = \"api_key\"\nheader = \"X-Api-Key\"\nvalue = \"${H_KEY}\"\n[headers]\nX-Extra-Secret = \"${H_EXTRA}\"",
        ),
        (
            "query",
            "[auth]\nkind = \"api_key\"\nquery_param = \"api_key\"\nvalue = \"${H_QUERY_KEY}\"",
        ),
        (
            "bearer",
            "[auth]\nkind = \"bearer\"\ntoken = \"${H_TOKEN}\"",
        ),
    ];
    let paths = [
        (
            "next_link",
            "path = \"/paged/next_url\"\nparams = { per_page = \"10\" }\nrecords = \"/items\"\npagination = { kind = \"next_url\", pointer = \"/next\" }",
        ),
        (
            "link_header",
            "path = \"/paged/link\"\nparams = { per_page = \"10\" }\nrecords = \"/items\"\npagination = { kind = \"link_header\" }",
        ),
        (
            "redirect",
            "path = \"/paged/page\"\nparams = { per_page = \"10\" }\nrecords = \"/items\"\npagination = { kind = \"page_number\", page_size = 10 }",
        ),
    ];
    let env = |name: &str| match name {
        "VENDOR_URL" => Some(app.vendor.base_url()),
        "H_KEY" => Some(HEADER_KEY.into()),
        "H_EXTRA" => Some(EXTRA.into()),
        "H_QUERY_KEY" => Some(QUERY_KEY.into()),
        "H_TOKEN" => Some(TOKEN.into()),
        _ => None,
    };
    for (auth_name, auth) in auths {
        for (path_name, stream) in paths {
            for mode in ["refuse", "without_credentials"] {
                let system = format!("{auth_name}_{path_name}_{mode}");
                let text = format!(
                    "source_system = \"{system}\"\nbase_url = \"${{VENDOR_URL}}\"\n[http]\nmax_attempts = 1\ncross_host = \"{mode}\"\n{auth}\n[streams.items]\n{stream}\nid = \"/id\"\ntable = \"items\"\n"
                );
                let path = app.dir.path().join(format!("{system}.toml"));
                let connector: Connector = idem::connector::parse(&path, &text, &env)
                    .unwrap_or_else(|issues| panic!("{system}: {issues}"));
                if path_name == "redirect" {
                    app.vendor.inject(Fault::new(
                        "/paged/page",
                        1,
                        FaultKind::Redirect {
                            code: 307,
                            to_base: other.base_url(),
                        },
                    ));
                }
                let ours_before = app.vendor.requests().len();
                let theirs_before = other.requests().len();
                let report = app
                    .run_connector(&connector, "items", Mode::Regular, false)
                    .await;
                let ours = &app.vendor.requests()[ours_before..];
                let theirs = &other.requests()[theirs_before..];
                // Our host got the credentials (the runs are real, authenticated walks).
                let carried = |r: &idem_fakes::RecordedRequest| {
                    let text = format!("{:?} {:?}", r.query, r.headers);
                    secrets[..4].iter().any(|s| text.contains(s))
                };
                assert!(!ours.is_empty() && ours.iter().all(carried), "{system}");
                // The other host never did, whatever way it was reached.
                for request in theirs {
                    let text = format!("{:?} {:?}", request.query, request.headers);
                    for secret in secrets {
                        assert!(
                            !text.contains(secret),
                            "{system}: {secret} reached the other host: {text}"
                        );
                    }
                }
                let error = report.error.clone().unwrap_or_default();
                for secret in secrets {
                    assert!(!error.contains(secret), "{system}: {error}");
                }
                match mode {
                    "refuse" => {
                        assert_eq!(report.status, RunStatus::Failed, "{system}: {report:?}");
                        assert!(
                            error.contains("another host than base_url")
                                && error.contains(&other.base_url()),
                            "{system}: {error}"
                        );
                        assert!(theirs.is_empty(), "{system}: the other host was called");
                    }
                    _ => {
                        assert_eq!(report.status, RunStatus::Succeeded, "{system}: {report:?}");
                        assert!(
                            !theirs.is_empty(),
                            "{system}: the other host was never used"
                        );
                        let rows = app
                            .count(&format!(
                                "SELECT count(*) FROM items WHERE source_system = '{system}'"
                            ))
                            .await;
                        assert_eq!(rows, 25, "{system}");
                    }
                }
            }
        }
    }
    // Even when cross-host links may be followed, a URL that itself carries a credential
    // (a Location quoting the token) is never sent there.
    let text = format!(
        "source_system = \"leaky_redirect\"\nbase_url = \"${{VENDOR_URL}}\"\n[http]\nmax_attempts = 1\ncross_host = \"without_credentials\"\n{}\n[streams.items]\n{}\nid = \"/id\"\ntable = \"items\"\n",
        auths[2].1, paths[2].1
    );
    let connector = idem::connector::parse(&app.dir.path().join("leaky.toml"), &text, &env)
        .expect("the connector loads");
    app.vendor.inject(Fault::new(
        "/paged/page",
        1,
        FaultKind::Redirect {
            code: 302,
            to_base: format!("{}/paged/page?leak={TOKEN}&x=", other.base_url()),
        },
    ));
    let theirs_before = other.requests().len();
    let report = app
        .run_connector(&connector, "items", Mode::Regular, false)
        .await;
    assert_eq!(report.status, RunStatus::Failed, "{report:?}");
    let error = report.error.unwrap_or_default();
    assert!(error.contains("still carries a credential"), "{error}");
    assert!(!error.contains(TOKEN), "{error}");
    assert_eq!(other.requests().len(), theirs_before);

    for secret in secrets {
        let holding = tables_holding(&app, secret).await;
        assert!(holding.is_empty(), "tables hold {secret}: {holding:?}");
    }
}

// ---------------------------------------------------------------------------------------
// Mail recipients and ledger keys
// ---------------------------------------------------------------------------------------

async fn insert_row(app: &TestApp, key: &str, recipient: &str) {
    sqlx::query(
        "INSERT INTO idem_ledger (key, channel, recipient, subject, body, message_id, source_system, stream, source_id, rule)
         VALUES ($1, 'email', $2, 'Invoice overdue', 'Please pay.', '<' || md5($1) || '@idem.local>', 'demo_billing', 'invoices', $1, 'overdue_reminder')",
    )
    .bind(key)
    .bind(recipient)
    .execute(&app.pool)
    .await
    .unwrap();
}

async fn row_outcome(app: &TestApp, key: &str) -> (String, Option<String>, i32) {
    sqlx::query_as("SELECT status, last_error, attempts FROM idem_ledger WHERE key = $1")
        .bind(key)
        .fetch_one(&app.pool)
        .await
        .unwrap_or_else(|e| panic!("{key}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_mail_recipients_are_validated_like_smtp() {
    let app = spawn_app_with(0, "").await;
    let sink = SmtpSink::start().await;
    let recipients = [
        ("good", "ok@example.com"),
        (
            "header_injection",
            "victim@example.test\r\nBcc: attacker@evil.example",
        ),
        ("comma_list", "victim@example.test,attacker@evil.example"),
        ("comma_space", "victim@example.test, attacker@evil.example"),
        ("semicolon", "victim@example.test;attacker@evil.example"),
        ("display_name", "Victim <victim@example.test>"),
        ("empty", ""),
        ("no_at", "not-an-address"),
        ("two_at", "a@b@example.test"),
    ];
    let http_settings = NotifySettings {
        transport: TransportKind::Http,
        http: Some(HttpEmailSettings {
            url: format!("{}/email/send", app.vendor.base_url()),
            token: None,
        }),
        retry_backoff: HumanDuration(Duration::from_millis(10)),
        max_attempts: 2,
        ..NotifySettings::default()
    };
    let smtp_settings = NotifySettings {
        transport: TransportKind::Smtp,
        smtp: Some(idem::config::SmtpSettings {
            host: sink.addr().ip().to_string(),
            port: Some(sink.addr().port()),
            tls: idem::config::SmtpTls::None,
            username: None,
            password: None,
        }),
        retry_backoff: HumanDuration(Duration::from_millis(10)),
        ..NotifySettings::default()
    };
    let mut outcomes = Vec::new();
    for (name, settings) in [("http", &http_settings), ("smtp", &smtp_settings)] {
        for (case, recipient) in recipients {
            insert_row(&app, &format!("email:reminder:{name}_{case}"), recipient).await;
        }
        let transport = AnyTransport::from_settings(settings).unwrap();
        let dispatcher = Dispatcher::new(
            &app.pool,
            &transport,
            DispatchSettings::from_config(settings),
        );
        let report = dispatcher.run_once().await.unwrap();
        assert_eq!(
            (report.sent, report.failed),
            (1, recipients.len() as u64 - 1),
            "{name}: {report:?}"
        );
        let mut statuses = Vec::new();
        for (case, _) in recipients {
            let (status, error, attempts) =
                row_outcome(&app, &format!("email:reminder:{name}_{case}")).await;
            if case != "good" {
                assert!(
                    error
                        .as_deref()
                        .is_some_and(|e| e.starts_with("invalid recipient")),
                    "{name} {case}: {error:?}"
                );
                assert_eq!(attempts, 1, "{name} {case}");
            }
            statuses.push((case, status));
        }
        outcomes.push(statuses);
    }
    assert_eq!(outcomes[0], outcomes[1], "HTTP and SMTP classify alike");
    let emails = app.vendor.emails();
    assert_eq!(
        emails.iter().map(|e| e.to.as_str()).collect::<Vec<_>>(),
        ["ok@example.com"],
        "only the valid recipient got mail through the HTTP provider"
    );
    let smtp_to: Vec<Vec<String>> = sink.messages().into_iter().map(|m| m.to).collect();
    assert_eq!(smtp_to, [vec!["ok@example.com".to_string()]]);

    // A key that cannot travel as a header fails for good, instead of being retried as
    // "ambiguous" forever.
    let transport = AnyTransport::from_settings(&http_settings).unwrap();
    let dispatcher = Dispatcher::new(
        &app.pool,
        &transport,
        DispatchSettings::from_config(&http_settings),
    );
    let bad_key = "email:reminder:in_1\r\nX-Injected: yes";
    insert_row(&app, bad_key, "ok2@example.com").await;
    dispatcher.run_once().await.unwrap();
    let (status, error, attempts) = row_outcome(&app, bad_key).await;
    assert_eq!((status.as_str(), attempts), ("failed", 1), "{error:?}");
    assert!(
        error
            .as_deref()
            .is_some_and(|e| e.contains("cannot be sent as a header")),
        "{error:?}"
    );

    // Ambiguous answers are retried under the same key only up to max_attempts (2).
    let key = "email:reminder:ambiguous";
    insert_row(&app, key, "ok3@example.com").await;
    app.vendor.inject(Fault::status("/email", 2, 502, None));
    let mut rounds = 0;
    loop {
        dispatcher.run_once().await.unwrap();
        rounds += 1;
        let (status, _, attempts) = row_outcome(&app, key).await;
        if status != "pending" {
            assert_eq!((status.as_str(), attempts), ("needs_review", 2));
            break;
        }
        assert!(
            rounds < 5,
            "still pending after {rounds} rounds ({attempts} attempts)"
        );
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    assert_eq!(app.vendor.emails().len(), 1);

    // A provider that quotes the request (and its token) back in an error: the ledger row
    // keeps the reason, redacted.
    const MAIL_TOKEN: &str = "mt_PROVIDER_token_e5f6";
    let with_token = NotifySettings {
        http: Some(HttpEmailSettings {
            url: format!("{}/email/send", app.vendor.base_url()),
            token: Some(MAIL_TOKEN.into()),
        }),
        ..http_settings.clone()
    };
    let transport = AnyTransport::from_settings(&with_token).unwrap();
    let dispatcher = Dispatcher::new(
        &app.pool,
        &transport,
        DispatchSettings::from_config(&with_token),
    );
    let echoed = "email:reminder:echoed";
    insert_row(&app, echoed, "ok4@example.com").await;
    app.vendor.inject(Fault::new(
        "/email",
        1,
        FaultKind::EchoRequest { code: 400 },
    ));
    dispatcher.run_once().await.unwrap();
    let (status, error, _) = row_outcome(&app, echoed).await;
    let error = error.unwrap_or_default();
    assert_eq!(status, "failed", "{error}");
    assert!(
        error.contains("HTTP 400") && error.contains("Bearer ***"),
        "{error}"
    );
    assert!(tables_holding(&app, MAIL_TOKEN).await.is_empty());
}

// ---------------------------------------------------------------------------------------
// Bounded input
// ---------------------------------------------------------------------------------------

/// Runs the real binary to its end and returns (exit code, stdout, stderr, peak RSS in
/// KiB) of that process alone (`wait4`), while this process keeps serving the vendor.
pub(crate) async fn run_measured(
    app: &TestApp,
    args: &[&str],
    env: &[(&str, String)],
) -> (i32, String, String, i64) {
    let out = app.dir.path().join("measured.out");
    let err = app.dir.path().join("measured.err");
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_idem"));
    command
        .arg("--config")
        .arg(&app.config_path)
        .arg("--log-format")
        .arg("json")
        .args(args)
        .env("DATABASE_URL", &app.database_url)
        .env_remove("IDEM_CRASH_AT")
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap());
    for (name, value) in env {
        command.env(name, value);
    }
    let child = command.spawn().expect("idem starts");
    let pid = child.id() as libc::pid_t;
    let (code, max_rss_kib) = tokio::task::spawn_blocking(move || {
        let mut status = 0;
        // SAFETY: plain syscall on our own child, with valid out-pointers.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        assert_eq!(waited, pid, "wait4");
        drop(child);
        (libc::WEXITSTATUS(status), usage.ru_maxrss)
    })
    .await
    .unwrap();
    (
        code,
        std::fs::read_to_string(out).unwrap(),
        std::fs::read_to_string(err).unwrap(),
        max_rss_kib,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_over_the_size_cap_fails_the_page_with_bounded_memory() {
    let app = spawn_app(0).await;
    let connector: PathBuf = app.dir.path().join("big.toml");
    std::fs::write(
        &connector,
        "source_system = \"big\"\nbase_url = \"${VENDOR_URL}\"\n[http]\nmax_attempts = 1\n[streams.items]\npath = \"/v1/invoices\"\nrecords = \"/data\"\nid = \"/id\"\ntable = \"items\"\n",
    )
    .unwrap();
    std::fs::write(
        &app.config_path,
        format!(
            "connectors = [{:?}]\n[notify]\ntransport = \"log\"\n",
            connector.display().to_string()
        ),
    )
    .unwrap();
    // 1 GiB of records, streamed without a length: only reading it tells how big it is.
    const BODY: u64 = 1 << 30;
    app.vendor.inject(Fault::new(
        "/v1/invoices",
        1,
        FaultKind::HugeBody { bytes: BODY },
    ));
    let (code, out, err, max_rss_kib) = run_measured(
        &app,
        &["run", "--no-notify", "--json"],
        &[("VENDOR_URL", app.vendor.base_url())],
    )
    .await;
    assert_eq!(code, 1, "{err}");
    assert!(
        out.contains("max_response_bytes (67108864 bytes)")
            && out.contains(&format!("{}/v1/invoices", app.vendor.base_url())),
        "the error names the URL and the limit: {out}"
    );
    let error: String = sqlx::query_scalar("SELECT error FROM idem_runs")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert!(error.contains("max_response_bytes"), "{error}");
    assert_eq!(app.count("SELECT count(*) FROM items").await, 0);
    // The default cap is 64 MiB; reading up to it (buffer growth included) plus idem's own
    // footprint stays far below the body's 1 GiB.
    let peak_mib = max_rss_kib / 1024;
    println!("peak RSS reading a 1 GiB body against the 64 MiB cap: {peak_mib} MiB");
    assert!(peak_mib < 300, "peak RSS {peak_mib} MiB");

    // A cap below an ordinary page fails it as well, from its Content-Length.
    app.vendor.seed_invoices(50);
    let small = app.demo_connector_variant("small_cap", |text| {
        text.replace(
            "[rate_limit]",
            "[http]\nmax_response_bytes = 2000\n\n[rate_limit]",
        )
    });
    let report = app
        .run_connector(&small, "invoices", Mode::Regular, false)
        .await;
    assert_eq!(report.status, RunStatus::Failed, "{report:?}");
    let error = report.error.unwrap_or_default();
    assert!(
        error.contains("max_response_bytes (2000 bytes)") && error.contains("/v1/invoices"),
        "{error}"
    );
    assert_eq!(app.count("SELECT count(*) FROM demo_invoices").await, 0);
}

// ---------------------------------------------------------------------------------------
// Config hygiene
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_plaintext_secret_in_a_file_others_can_read_is_flagged() {
    use std::os::unix::fs::PermissionsExt;
    let app = spawn_app(0).await;
    let connector = app.dir.path().join("plain.toml");
    std::fs::write(
        &connector,
        "source_system = \"plain\"\nbase_url = \"http://127.0.0.1:9\"\n[auth]\nkind = \"bearer\"\ntoken = \"sk_live_plaintext\"\n[streams.items]\npath = \"/v1/invoices\"\nid = \"/id\"\ntable = \"items\"\n",
    )
    .unwrap();
    std::fs::write(
        &app.config_path,
        format!(
            "connectors = [{:?}]\n[notify]\ntransport = \"log\"\n",
            connector.display().to_string()
        ),
    )
    .unwrap();
    let set_mode = |mode: u32| {
        std::fs::set_permissions(&connector, std::fs::Permissions::from_mode(mode)).unwrap()
    };
    set_mode(0o644);
    let check = app.idem(&["check"]).await;
    assert_eq!(check.status.code(), Some(0), "{}", stderr(&check));
    let out = stdout(&check);
    assert!(
        out.contains("plain.toml holds a plaintext secret (auth.token)")
            && out.contains("mode 0644"),
        "{out}"
    );
    assert!(!out.contains("sk_live_plaintext"), "{out}");
    // The same warning at start-up of any command, in the log.
    let status = app.idem(&["status"]).await;
    assert!(
        stderr(&status).contains("holds a plaintext secret"),
        "{}",
        stderr(&status)
    );
    set_mode(0o600);
    let check = app.idem(&["check"]).await;
    assert_eq!(check.status.code(), Some(0), "{}", stderr(&check));
    assert!(!stdout(&check).contains("plaintext"), "{}", stdout(&check));
}
