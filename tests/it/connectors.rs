//! Declarative connectors against real vendor API shapes: every pagination kind, every
//! auth kind, retries, malformed answers, deletions, the HubSpot 10k search cap, secrets
//! that never leak, `idem check` on broken files, and the shipped Stripe/HubSpot files.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use idem::connector::Connector;
use idem::http::{HttpSource, VendorClient};
use idem::run::{self, Mode, RunOptions, RunReport, RunStatus};
use idem_fakes::{ApiKeyPlace, Fault, FaultKind};
use serde_json::json;

use crate::helpers::{TestApp, spawn_app, stderr, stdout};

/// A connector file's text, `${VENDOR_URL}` pointing at the app's fake vendor.
fn load(app: &TestApp, text: &str) -> Connector {
    load_with(app, text, &[])
}

fn load_with(app: &TestApp, text: &str, env: &[(&str, &str)]) -> Connector {
    let base = app.vendor.base_url();
    idem::connector::parse(Path::new("test_connector.toml"), text, &|name| {
        if name == "VENDOR_URL" {
            return Some(base.clone());
        }
        env.iter()
            .find(|(key, _)| *key == name)
            .map(|(_, value)| value.to_string())
    })
    .unwrap_or_else(|issues| panic!("{issues}"))
}

/// A one-stream connector `vendor.items` into table `items` with `stream` appended to
/// `[streams.items]` (and its sub-tables after it).
fn one_stream(head: &str, stream: &str) -> String {
    format!(
        "source_system = \"vendor\"\nbase_url = \"${{VENDOR_URL}}\"\n{head}\n\n[http]\ninitial_backoff = \"10ms\"\nmax_backoff = \"50ms\"\n\n[streams.items]\ntable = \"items\"\nid = \"/id\"\n{stream}\n"
    )
}

const BEARER: &str = "[auth]\nkind = \"bearer\"\ntoken = \"sk_test_demo\"";

async fn run_items(app: &TestApp, connector: &Connector) -> RunReport {
    app.run_connector(connector, "items", Mode::Regular, false)
        .await
}

/// Runs `stream` with a client the caller keeps (token caches survive between runs).
async fn run_with_client(app: &TestApp, client: &Arc<VendorClient>, stream: &str) -> RunReport {
    let connector = client.connector().clone();
    let source = HttpSource::new(
        client.clone(),
        connector.stream(stream).expect("stream").clone(),
    );
    run::run_stream(
        &app.pool,
        &connector,
        stream,
        source,
        &RunOptions::new(Mode::Regular, false),
    )
    .await
    .expect("the run starts")
}

async fn rows(app: &TestApp, table: &str) -> i64 {
    app.count(&format!("SELECT count(*) FROM \"{table}\""))
        .await
}

async fn distinct_rows(app: &TestApp, table: &str) -> i64 {
    app.count(&format!(
        "SELECT count(DISTINCT (source_system, source_id)) FROM \"{table}\""
    ))
    .await
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

fn queries(app: &TestApp, path: &str) -> Vec<String> {
    app.vendor
        .requests()
        .into_iter()
        .filter(|r| r.path == path)
        .map(|r| r.query.unwrap_or_default())
        .collect()
}

fn statuses(app: &TestApp, path: &str) -> Vec<u16> {
    app.vendor
        .requests()
        .into_iter()
        .filter(|r| r.path.starts_with(path))
        .map(|r| r.status)
        .collect()
}

fn succeeded(report: &RunReport, rows: u64) {
    assert_eq!(report.status, RunStatus::Succeeded, "{report:?}");
    assert_eq!(report.counters.inserted, rows, "{report:?}");
}

// ---------------------------------------------------------------------------------------
// Pagination kinds
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn stripe_style_list_is_walked_with_the_last_records_id_until_has_more_is_false() {
    let app = spawn_app(25).await;
    let connector = load(
        &app,
        &one_stream(
            BEARER,
            "path = \"/v1/invoices\"\nparams = { limit = \"10\" }\nrecords = \"/data\"\n[streams.items.pagination]\nkind = \"last_record\"\nparam = \"starting_after\"\nhas_more = \"/has_more\"",
        ),
    );
    succeeded(&run_items(&app, &connector).await, 25);
    assert_eq!(rows(&app, "items").await, 25);
    assert_eq!(
        queries(&app, "/v1/invoices"),
        [
            "limit=10",
            "limit=10&starting_after=in_000010",
            "limit=10&starting_after=in_000020"
        ]
    );
}

#[tokio::test]
async fn hubspot_search_is_paged_with_the_body_cursor_paging_next_after() {
    let app = spawn_app(0).await;
    app.vendor.seed_contacts(35);
    let connector = load(
        &app,
        &one_stream(
            BEARER,
            "path = \"/crm/v3/objects/contacts/search\"\nmethod = \"POST\"\nparams = { limit = 10 }\nrecords = \"/results\"\nbody = { sorts = [{ propertyName = \"hs_object_id\", direction = \"ASCENDING\" }] }\n[streams.items.pagination]\nkind = \"body_cursor\"\ncursor = \"/paging/next/after\"\nparam = \"after\"",
        ),
    );
    succeeded(&run_items(&app, &connector).await, 35);
    assert_eq!(rows(&app, "items").await, 35);
    let searches: Vec<_> = app
        .vendor
        .requests()
        .into_iter()
        .filter(|r| r.path == "/crm/v3/objects/contacts/search")
        .collect();
    assert_eq!(searches.len(), 4, "35 contacts at 10 a page");
    assert!(
        searches
            .iter()
            .all(|r| r.method == "POST" && r.status == 200)
    );
}

#[tokio::test]
async fn next_url_in_the_body_is_followed_until_it_is_null() {
    let app = spawn_app(25).await;
    let connector = load(
        &app,
        &one_stream(
            "",
            "path = \"/paged/next_url\"\nparams = { per_page = \"10\" }\nrecords = \"/items\"\npagination = { kind = \"next_url\", pointer = \"/next\" }",
        ),
    );
    succeeded(&run_items(&app, &connector).await, 25);
    assert_eq!(
        queries(&app, "/paged/next_url"),
        [
            "per_page=10",
            "per_page=10&after=in_000010",
            "per_page=10&after=in_000020"
        ]
    );
}

#[tokio::test]
async fn link_header_rel_next_is_followed_until_absent() {
    let app = spawn_app(25).await;
    let connector = load(
        &app,
        &one_stream(
            "",
            "path = \"/paged/link\"\nparams = { per_page = \"10\" }\nrecords = \"/items\"\npagination = { kind = \"link_header\" }",
        ),
    );
    succeeded(&run_items(&app, &connector).await, 25);
    assert_eq!(
        queries(&app, "/paged/link"),
        ["per_page=10", "per_page=10&page=2", "per_page=10&page=3"]
    );
}

#[tokio::test]
async fn page_numbers_count_up_until_a_short_page() {
    let app = spawn_app(25).await;
    let connector = load(
        &app,
        &one_stream(
            "",
            "path = \"/paged/page\"\nparams = { per_page = \"10\" }\nrecords = \"/items\"\npagination = { kind = \"page_number\", page_size = 10 }",
        ),
    );
    succeeded(&run_items(&app, &connector).await, 25);
    assert_eq!(
        queries(&app, "/paged/page"),
        [
            "per_page=10&page=1",
            "per_page=10&page=2",
            "per_page=10&page=3"
        ]
    );
}

#[tokio::test]
async fn offsets_step_by_the_page_length_until_an_empty_page() {
    // 30 records at 10 a page: the fourth request sees an empty page and stops.
    let app = spawn_app(30).await;
    let connector = load(
        &app,
        &one_stream(
            "",
            "path = \"/paged/offset\"\nrecords = \"/items\"\npagination = { kind = \"offset\", limit = 10 }",
        ),
    );
    succeeded(&run_items(&app, &connector).await, 30);
    assert_eq!(
        queries(&app, "/paged/offset"),
        [
            "offset=0&limit=10",
            "offset=10&limit=10",
            "offset=20&limit=10",
            "offset=30&limit=10"
        ]
    );
}

#[tokio::test]
async fn a_vendor_returning_the_same_cursor_twice_stops_the_stream_instead_of_looping() {
    let app = spawn_app(25).await;
    let connector = load(
        &app,
        &one_stream(
            "",
            "path = \"/paged/stuck\"\nparams = { per_page = \"10\" }\nrecords = \"/items\"\npagination = { kind = \"body_cursor\", cursor = \"/next_cursor\", param = \"cursor\" }",
        ),
    );
    let report = tokio::time::timeout(Duration::from_secs(10), run_items(&app, &connector))
        .await
        .expect("the run stops on its own");
    assert_eq!(report.status, RunStatus::Failed);
    let error = report.error.unwrap_or_default();
    assert!(
        error.contains("same cursor 'abc' twice") && error.contains("/paged/stuck"),
        "{error}"
    );
    assert_eq!(app.vendor.request_count("/paged/stuck"), 2);
    assert_eq!(rows(&app, "items").await, 10, "the first page stays");
}

// ---------------------------------------------------------------------------------------
// Auth
// ---------------------------------------------------------------------------------------

/// Three pages of invoices with `auth`, every request accepted.
async fn assert_auth_accepted(app: &TestApp, auth: &str, env: &[(&str, &str)]) {
    let connector = load_with(
        app,
        &one_stream(
            auth,
            "path = \"/v1/invoices\"\nparams = { limit = \"10\" }\nrecords = \"/data\"\npagination = { kind = \"last_record\", param = \"starting_after\", has_more = \"/has_more\" }",
        ),
        env,
    );
    succeeded(&run_items(app, &connector).await, 25);
    assert_eq!(statuses(app, "/v1/invoices"), [200, 200, 200]);
}

#[tokio::test]
async fn bearer_token_from_the_environment_authenticates_every_page() {
    let app = spawn_app(25).await;
    app.vendor.require_bearer("tok_from_env");
    assert_auth_accepted(
        &app,
        "[auth]\nkind = \"bearer\"\ntoken = \"${VENDOR_TOKEN}\"",
        &[("VENDOR_TOKEN", "tok_from_env")],
    )
    .await;
}

#[tokio::test]
async fn basic_auth_authenticates_every_page() {
    let app = spawn_app(25).await;
    app.vendor.require_basic("acme", "pa:ss");
    assert_auth_accepted(
        &app,
        "[auth]\nkind = \"basic\"\nusername = \"acme\"\npassword = \"${VENDOR_PASSWORD}\"",
        &[("VENDOR_PASSWORD", "pa:ss")],
    )
    .await;
}

#[tokio::test]
async fn api_key_in_a_header_authenticates_every_page() {
    let app = spawn_app(25).await;
    app.vendor
        .require_api_key(ApiKeyPlace::Header("x-api-key".into()), "key_123");
    assert_auth_accepted(
        &app,
        "[auth]\nkind = \"api_key\"\nheader = \"X-Api-Key\"\nvalue = \"key_123\"",
        &[],
    )
    .await;
}

#[tokio::test]
async fn api_key_in_the_query_authenticates_every_page_but_is_never_shown() {
    let app = spawn_app(25).await;
    app.vendor
        .require_api_key(ApiKeyPlace::Query("api_key".into()), "key_456");
    assert_auth_accepted(
        &app,
        "[auth]\nkind = \"api_key\"\nquery_param = \"api_key\"\nvalue = \"key_456\"",
        &[],
    )
    .await;
    assert!(
        queries(&app, "/v1/invoices")
            .iter()
            .all(|q| q.contains("api_key=key_456"))
    );
    // With the key refused, the error names the URL without the key.
    app.vendor
        .require_api_key(ApiKeyPlace::Query("api_key".into()), "rotated");
    let connector = load(
        &app,
        &one_stream(
            "[auth]\nkind = \"api_key\"\nquery_param = \"api_key\"\nvalue = \"key_456\"",
            "path = \"/v1/invoices\"\nrecords = \"/data\"",
        ),
    );
    let report = run_items(&app, &connector).await;
    assert_eq!(report.status, RunStatus::Failed);
    let error = report.error.unwrap_or_default();
    assert!(
        error.contains("HTTP 401") && error.contains("/v1/invoices"),
        "{error}"
    );
    assert!(!error.contains("key_456"), "{error}");
}

#[tokio::test]
async fn oauth2_token_is_fetched_once_cached_across_pages_and_fetched_again_after_a_401() {
    let app = spawn_app(25).await;
    app.vendor
        .require_oauth2("idem-client", "cs_live_123", Duration::from_secs(3600));
    let connector = load_with(
        &app,
        &one_stream(
            "[auth]\nkind = \"oauth2_client_credentials\"\ntoken_url = \"${VENDOR_URL}/oauth/token\"\nclient_id = \"idem-client\"\nclient_secret = \"${VENDOR_CLIENT_SECRET}\"",
            "path = \"/v1/invoices\"\nparams = { limit = \"10\" }\nrecords = \"/data\"\npagination = { kind = \"last_record\", param = \"starting_after\", has_more = \"/has_more\" }",
        ),
        &[("VENDOR_CLIENT_SECRET", "cs_live_123")],
    );
    let client = VendorClient::new(connector);
    succeeded(&run_with_client(&app, &client, "items").await, 25);
    assert_eq!(app.vendor.request_count("/oauth/token"), 1);
    assert_eq!(statuses(&app, "/v1/invoices"), [200, 200, 200]);

    // The vendor revokes every token: the next request gets a 401, the client fetches a
    // new token once and carries on.
    app.vendor.expire_all_tokens();
    let second = run_with_client(&app, &client, "items").await;
    assert_eq!(second.status, RunStatus::Succeeded, "{second:?}");
    assert_eq!(app.vendor.request_count("/oauth/token"), 2);
    assert_eq!(
        statuses(&app, "/v1/invoices"),
        [200, 200, 200, 401, 200, 200, 200]
    );
}

// ---------------------------------------------------------------------------------------
// Retries and failures
// ---------------------------------------------------------------------------------------

fn invoices_stream(head: &str) -> String {
    one_stream(
        &format!("{BEARER}\n{head}"),
        "path = \"/v1/invoices\"\nparams = { limit = \"10\" }\nrecords = \"/data\"\npagination = { kind = \"last_record\", param = \"starting_after\", has_more = \"/has_more\" }",
    )
}

#[tokio::test]
async fn rate_limited_request_waits_what_retry_after_asks_then_succeeds() {
    let app = spawn_app(25).await;
    app.vendor
        .inject(Fault::status("/v1/invoices", 1, 429, Some("1")));
    let connector = load(&app, &invoices_stream(""));
    succeeded(&run_items(&app, &connector).await, 25);
    let requests: Vec<_> = app
        .vendor
        .requests()
        .into_iter()
        .filter(|r| r.path == "/v1/invoices")
        .collect();
    assert_eq!(
        requests.iter().map(|r| r.status).collect::<Vec<_>>(),
        [429, 200, 200, 200]
    );
    let gap = requests[1].received - requests[0].received;
    assert!(
        gap >= Duration::from_millis(950),
        "retried after {gap:?}, before the 1 s the vendor asked for"
    );
}

#[tokio::test]
async fn a_burst_of_server_errors_shorter_than_max_attempts_is_absorbed() {
    let app = spawn_app(25).await;
    app.vendor
        .inject(Fault::status("/v1/invoices", 3, 503, None));
    let connector = load(&app, &invoices_stream("")); // max_attempts defaults to 5
    succeeded(&run_items(&app, &connector).await, 25);
    assert_eq!(
        statuses(&app, "/v1/invoices"),
        [503, 503, 503, 200, 200, 200]
    );
}

#[tokio::test]
async fn a_response_slower_than_the_timeout_is_retried_as_a_timeout() {
    let app = spawn_app(25).await;
    app.vendor.inject(Fault::new(
        "/v1/invoices",
        1,
        FaultKind::Delay(Duration::from_secs(2)),
    ));
    let connector = load(&app, &invoices_stream("")).clone();
    let mut connector = connector;
    connector.spec.http.timeout = idem::duration::HumanDuration(Duration::from_millis(300));
    let started = Instant::now();
    succeeded(&run_items(&app, &connector).await, 25);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the client waited for the slow answer instead of timing out"
    );
    assert_eq!(app.vendor.request_count("/v1/invoices"), 4);
}

#[tokio::test]
async fn a_client_error_stops_the_stream_at_once_naming_the_url_and_the_vendors_words() {
    let app = spawn_app(25).await;
    app.vendor.inject_at(
        2,
        Fault::new(
            "/v1/invoices",
            1,
            FaultKind::Status {
                code: 403,
                retry_after: None,
                body: Some(r#"{"error":{"message":"Your plan does not include invoices"}}"#.into()),
            },
        ),
    );
    let connector = load(&app, &invoices_stream(""));
    let report = run_items(&app, &connector).await;
    assert_eq!(report.status, RunStatus::Failed);
    let error = report.error.unwrap_or_default();
    assert!(
        error.contains("GET ")
            && error.contains("/v1/invoices?limit=10&starting_after=in_000010")
            && error.contains("HTTP 403")
            && error.contains("Your plan does not include invoices"),
        "{error}"
    );
    assert_eq!(statuses(&app, "/v1/invoices"), [200, 403], "not retried");
    assert_eq!(rows(&app, "items").await, 10, "the first page stays");
}

#[tokio::test]
async fn a_malformed_page_stops_the_run_keeps_earlier_pages_and_holds_the_checkpoint() {
    for (fault, expected) in [
        (FaultKind::MalformedJson, "the body is not JSON"),
        (
            FaultKind::WrongShape,
            "records pointer '/data' points at an object, not an array",
        ),
    ] {
        let app = spawn_app(250).await;
        // The demo connector: 100 invoices a page, high-water mark over an unsorted list.
        app.vendor
            .inject_at(2, Fault::new("/v1/invoices", 1, fault.clone()));
        let report = app.run_invoices(Mode::Regular).await;
        assert_eq!(report.status, RunStatus::Failed, "{fault:?}");
        let error = report.error.unwrap_or_default();
        assert!(
            error.contains("malformed response from")
                && error.contains("/v1/invoices?limit=100&starting_after=in_000100")
                && error.contains(expected),
            "{fault:?}: {error}"
        );
        assert_eq!(rows(&app, "demo_invoices").await, 100, "{fault:?}");
        let (_, mark, resume) = checkpoint(&app, "demo_billing", "invoices").await;
        assert_eq!(
            mark, None,
            "{fault:?}: the mark moved past an unfinished walk"
        );
        assert_eq!(
            resume.as_ref().and_then(|r| r["pages"].as_i64()),
            Some(1),
            "{fault:?}"
        );

        let retry = app.run_invoices(Mode::Regular).await;
        assert_eq!(retry.status, RunStatus::Succeeded, "{fault:?}: {retry:?}");
        app.assert_matches_vendor().await;
        assert!(
            checkpoint(&app, "demo_billing", "invoices")
                .await
                .1
                .is_some()
        );
    }
}

#[tokio::test]
async fn records_repeated_across_pages_are_stored_once() {
    let app = spawn_app(250).await;
    app.vendor
        .inject(Fault::new("/v1/invoices", 3, FaultKind::DuplicateRecords));
    let report = app.run_invoices(Mode::Regular).await;
    assert_eq!(report.status, RunStatus::Succeeded, "{report:?}");
    assert_eq!(report.counters.fetched, 252, "two pages repeated a record");
    assert_eq!(report.counters.inserted, 250);
    app.assert_matches_vendor().await;
}

#[tokio::test]
async fn records_changed_while_the_sync_walks_are_caught_by_the_next_run() {
    let app = spawn_app(300).await;
    // While page 2 is served: change a record already read, one on a later page, and add
    // one at the end; while page 3 is served, change one on page 2.
    app.vendor.on_request(2, |data| {
        data.update_invoice("in_000005", |inv| inv["amount_due"] = json!(1));
        data.update_invoice("in_000290", |inv| inv["status"] = json!("void"));
        data.insert_invoice(json!({"id": "in_000301", "amount_due": 5, "status": "open"}));
    });
    app.vendor.on_request(3, |data| {
        data.update_invoice("in_000150", |inv| inv["amount_due"] = json!(2));
    });
    let first = app.run_invoices(Mode::Regular).await;
    assert_eq!(first.status, RunStatus::Succeeded, "{first:?}");
    let second = app.run_invoices(Mode::Regular).await;
    assert_eq!(second.status, RunStatus::Succeeded, "{second:?}");
    app.assert_matches_vendor().await;
    assert!(second.counters.fetched < 300, "{second:?}");
}

#[tokio::test]
async fn full_walk_marks_records_removed_at_the_vendor_as_deleted_and_a_failed_walk_marks_none() {
    let app = spawn_app(25).await;
    let connector = load(
        &app,
        &format!(
            "{}\n[streams.items.incremental]\nkind = \"full\"\nmark_deleted = true\n",
            invoices_stream("")
        ),
    );
    succeeded(&run_items(&app, &connector).await, 25);
    let deleted = || app.count("SELECT count(*) FROM items WHERE deleted_at IS NOT NULL");
    assert_eq!(deleted().await, 0);
    assert!(app.vendor.remove_invoice("in_000007"));

    // A walk that fails on its second page marks nothing.
    let before = app.vendor.requests().len();
    app.vendor
        .inject_at(before + 2, Fault::status("/v1/invoices", 1, 400, None));
    let failed = run_items(&app, &connector).await;
    assert_eq!(failed.status, RunStatus::Failed, "{failed:?}");
    assert_eq!(deleted().await, 0);

    // The run that resumes it cannot know what disappeared before it started: still none.
    let resumed = run_items(&app, &connector).await;
    assert_eq!(resumed.status, RunStatus::Succeeded, "{resumed:?}");
    assert_eq!(deleted().await, 0);

    // A complete walk from the first page marks exactly the removed record.
    let complete = run_items(&app, &connector).await;
    assert_eq!(complete.status, RunStatus::Succeeded, "{complete:?}");
    assert_eq!(complete.counters.deleted, 1, "{complete:?}");
    let gone: Vec<String> =
        sqlx::query_scalar("SELECT source_id FROM items WHERE deleted_at IS NOT NULL")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert_eq!(gone, ["in_000007"]);
    assert_eq!(
        rows(&app, "items").await,
        25,
        "deleted rows are kept, marked"
    );
}

// ---------------------------------------------------------------------------------------
// Secrets
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn secrets_never_reach_logs_errors_status_or_the_database() {
    const TOKEN: &str = "sk_live_SECRETbearer_9f8e7d";
    const CLIENT_SECRET: &str = "cs_SECREToauth_1a2b3c";
    const QUERY_KEY: &str = "qk_SECRETquery_4d5e6f";
    let app = spawn_app(25).await;
    // The API wants the query key: the bearer connector is refused (401). The `/paged`
    // endpoints repeat the key in their next links, as many vendors do.
    app.vendor
        .require_api_key(ApiKeyPlace::Query("api_key".into()), QUERY_KEY);
    app.vendor
        .inject(Fault::status("/v1/customers", 10, 500, None));
    // The walk by next link fails on its second page, so its next link is kept in the
    // checkpoint for the next run.
    app.vendor.inject(Fault::status(
        "/paged/next_url?per_page=10&after=",
        2,
        500,
        None,
    ));
    let write = |name: &str, text: String| {
        let path = app.dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let head = |system: &str, auth: &str| {
        format!(
            "source_system = \"{system}\"\nbase_url = \"${{VENDOR_URL}}\"\n{auth}\n[http]\nmax_attempts = 2\ninitial_backoff = \"10ms\"\n"
        )
    };
    let stream = |path: &str| {
        format!(
            "[streams.items]\npath = \"{path}\"\nrecords = \"/data\"\nid = \"/id\"\ntable = \"{}\"\n",
            path.trim_start_matches("/v1/")
        )
    };
    let files: Vec<PathBuf> = vec![
        write(
            "bearer.toml",
            head(
                "bearer_vendor",
                "[auth]\nkind = \"bearer\"\ntoken = \"${VENDOR_TOKEN}\"",
            ) + &stream("/v1/invoices"),
        ),
        write(
            "oauth.toml",
            head(
                "oauth_vendor",
                "[auth]\nkind = \"oauth2_client_credentials\"\ntoken_url = \"${VENDOR_URL}/oauth/token\"\nclient_id = \"idem\"\nclient_secret = \"${VENDOR_CLIENT_SECRET}\"",
            ) + &stream("/v1/invoices"),
        ),
        write(
            "query.toml",
            head(
                "query_vendor",
                "[auth]\nkind = \"api_key\"\nquery_param = \"api_key\"\nvalue = \"${VENDOR_QUERY_KEY}\"",
            ) + &stream("/v1/customers"),
        ),
        write(
            "link.toml",
            head(
                "link_vendor",
                "[auth]\nkind = \"api_key\"\nquery_param = \"api_key\"\nvalue = \"${VENDOR_QUERY_KEY}\"",
            ) + "[streams.items]\npath = \"/paged/next_url\"\nparams = { per_page = \"10\" }\nrecords = \"/items\"\nid = \"/id\"\ntable = \"paged\"\npagination = { kind = \"next_url\", pointer = \"/next\" }\n",
        ),
    ];
    std::fs::write(
        &app.config_path,
        format!(
            "connectors = {:?}\n[notify]\ntransport = \"log\"\n",
            files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
        ),
    )
    .unwrap();
    let idem = |args: &[&str]| {
        let mut command = app.command(args);
        command
            .env("VENDOR_URL", app.vendor.base_url())
            .env("VENDOR_TOKEN", TOKEN)
            .env("VENDOR_CLIENT_SECRET", CLIENT_SECRET)
            .env("VENDOR_QUERY_KEY", QUERY_KEY)
            .env("RUST_LOG", "debug");
        command
    };
    let run = idem(&["run", "--no-notify", "--json"])
        .output()
        .await
        .unwrap();
    assert_eq!(run.status.code(), Some(1), "{}", stderr(&run));
    let status = idem(&["status", "--json"]).output().await.unwrap();
    assert_eq!(status.status.code(), Some(0), "{}", stderr(&status));
    let errors: Vec<String> =
        sqlx::query_scalar::<_, Option<String>>("SELECT error FROM idem_runs ORDER BY started_at")
            .fetch_all(&app.pool)
            .await
            .unwrap()
            .into_iter()
            .flatten()
            .collect();
    assert_eq!(errors.len(), 4, "{errors:?}");
    assert!(errors.iter().any(|e| e.contains("HTTP 401")), "{errors:?}");
    assert!(
        errors.iter().any(|e| e.contains("OAuth2 token request")),
        "{errors:?}"
    );
    assert!(errors.iter().any(|e| e.contains("HTTP 500")), "{errors:?}");
    // The vendor's next link repeated the key; idem kept the link without it, and sent
    // the key again itself (same host) when following it.
    let resume: String = sqlx::query_scalar(
        "SELECT resume::text FROM idem_checkpoints WHERE source_system = 'link_vendor'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert!(resume.contains("after=in_000010"), "{resume}");
    let second_pages: Vec<String> = app
        .vendor
        .requests()
        .into_iter()
        .filter(|r| r.path == "/paged/next_url")
        .filter_map(|r| r.query)
        .filter(|q| q.contains("after="))
        .collect();
    assert_eq!(second_pages.len(), 2, "{second_pages:?}");
    assert!(
        second_pages
            .iter()
            .all(|q| q.matches(&format!("api_key={QUERY_KEY}")).count() == 1),
        "the key is sent once, by idem: {second_pages:?}"
    );
    // The requests did carry the secrets.
    let sent = app.vendor.requests();
    assert!(
        sent.iter()
            .any(|r| r.authorization.as_deref() == Some(&format!("Bearer {TOKEN}")[..]))
    );
    assert!(
        sent.iter()
            .any(|r| r.query.as_deref().unwrap_or("").contains(QUERY_KEY))
    );

    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT quote_ident(table_name) FROM information_schema.tables WHERE table_schema = 'public'",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    for secret in [TOKEN, CLIENT_SECRET, QUERY_KEY, "SECRET"] {
        for (what, text) in [
            ("run stdout", stdout(&run)),
            ("run stderr (logs)", stderr(&run)),
            ("status --json", stdout(&status)),
            ("status stderr", stderr(&status)),
            ("run errors", errors.join("\n")),
        ] {
            assert!(!text.contains(secret), "{what} leaks {secret}:\n{text}");
        }
        for table in &tables {
            let found = app
                .count(&format!(
                    "SELECT count(*) FROM {table} t WHERE t::text LIKE '%{secret}%'"
                ))
                .await;
            assert_eq!(found, 0, "table {table} holds {secret}");
        }
    }
    // The kept link still works: the next run resumes from it, with the key added back.
    let resumed = idem(&["run", "--no-notify", "link_vendor"])
        .output()
        .await
        .unwrap();
    assert_eq!(resumed.status.code(), Some(0), "{}", stderr(&resumed));
    assert!(!stderr(&resumed).contains(QUERY_KEY));
    assert_eq!(app.count("SELECT count(*) FROM paged").await, 25);
}

// ---------------------------------------------------------------------------------------
// idem check
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn idem_check_names_file_stream_and_field_of_every_mistake_and_exits_2() {
    let app = spawn_app(0).await;
    let good_stream = "path = \"/v1/invoices\"\nrecords = \"/data\"\ntable = \"items\"\n";
    let cases: [(&str, String, &str, &str); 6] = [
        (
            "unknown_key.toml",
            format!("[streams.items]\nid = \"/id\"\n{good_stream}pagesize = 10\n"),
            "field 'pagesize (line",
            "unknown field `pagesize`",
        ),
        (
            "missing_id.toml",
            format!("[streams.items]\n{good_stream}"),
            "field 'id (line",
            "missing field `id`",
        ),
        (
            "bad_pointer.toml",
            format!("[streams.items]\nid = \"id\"\n{good_stream}"),
            "field 'id'",
            "'id' is not a JSON pointer: it must be empty or start with '/'",
        ),
        (
            "bad_duration.toml",
            format!(
                "[streams.items]\nid = \"/id\"\n{good_stream}updated_at = {{ pointer = \"/updated\" }}\n[streams.items.incremental]\nkind = \"high_water_mark\"\nparam = \"updated[gte]\"\noverlap = \"15 minutes\"\n"
            ),
            "field 'incremental.overlap (line",
            "15 minutes",
        ),
        (
            "unknown_pagination.toml",
            format!(
                "[streams.items]\nid = \"/id\"\n{good_stream}[streams.items.pagination]\nkind = \"cursor_magic\"\n"
            ),
            "field 'pagination.kind (line",
            "unknown variant `cursor_magic`",
        ),
        (
            "undefined_env.toml",
            format!("[streams.items]\nid = \"/id\"\n{good_stream}"),
            "field 'base_url'",
            "environment variable UNDEFINED_VENDOR_URL_X is not set",
        ),
    ];
    let mut paths = Vec::new();
    for (name, body, _, _) in &cases {
        let base = if *name == "undefined_env.toml" {
            "${UNDEFINED_VENDOR_URL_X}"
        } else {
            "http://127.0.0.1:1"
        };
        let path = app.dir.path().join(name);
        std::fs::write(
            &path,
            format!(
                "source_system = \"vendor_{}\"\nbase_url = \"{base}\"\n{body}",
                name.trim_end_matches(".toml")
            ),
        )
        .unwrap();
        paths.push(path.display().to_string());
    }
    std::fs::write(&app.config_path, format!("connectors = {paths:?}\n")).unwrap();
    let check = app.idem(&["check"]).await;
    assert_eq!(check.status.code(), Some(2), "{}", stderr(&check));
    let text = stderr(&check);
    assert!(text.contains("6 configuration errors"), "{text}");
    for (name, _, field, message) in &cases {
        let line = text
            .lines()
            .find(|line| line.contains(name))
            .unwrap_or_else(|| panic!("no message for {name}:\n{text}"));
        let stream = if *name == "undefined_env.toml" {
            ""
        } else {
            "stream 'items'"
        };
        assert!(
            line.contains(stream) && line.contains(field) && line.contains(message),
            "{name}: expected stream, {field:?} and {message:?} in:\n{line}"
        );
        assert_eq!(
            text.lines().filter(|line| line.contains(name)).count(),
            1,
            "{name}: one message per mistake:\n{text}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// The shipped connector files
// ---------------------------------------------------------------------------------------

fn shipped(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("connectors")
        .join(name)
}

#[test]
fn shipped_stripe_and_hubspot_connectors_pass_validation() {
    let env = |name: &str| match name {
        "STRIPE_API_KEY" => Some("sk_test_x".to_string()),
        "HUBSPOT_TOKEN" => Some("pat-na1-x".to_string()),
        _ => None,
    };
    let stripe = idem::connector::load_file_with(&shipped("stripe.toml"), &env)
        .unwrap_or_else(|issues| panic!("{issues}"));
    assert_eq!(stripe.base_url, "https://api.stripe.com");
    assert!(stripe.stream("invoices").is_some() && stripe.stream("customers").is_some());
    let hubspot = idem::connector::load_file_with(&shipped("hubspot.toml"), &env)
        .unwrap_or_else(|issues| panic!("{issues}"));
    assert_eq!(hubspot.base_url, "https://api.hubapi.com");
    assert!(hubspot.stream("leads").is_some());
    // Without the secrets, both say which variable is missing.
    let missing = idem::connector::load_file_with(&shipped("stripe.toml"), &|_| None)
        .unwrap_err()
        .to_string();
    assert!(missing.contains("STRIPE_API_KEY"), "{missing}");
}

fn shipped_with(app: &TestApp, name: &str) -> Connector {
    let base = app.vendor.base_url();
    idem::connector::load_file_with(&shipped(name), &|env| match env {
        "STRIPE_API_KEY" | "HUBSPOT_TOKEN" => Some("sk_test_demo".into()),
        "STRIPE_BASE_URL" | "HUBSPOT_BASE_URL" => Some(base.clone()),
        _ => None,
    })
    .unwrap_or_else(|issues| panic!("{issues}"))
}

#[tokio::test]
async fn hubspot_contacts_beyond_the_10k_search_cap_all_land_with_the_shipped_connector() {
    let app = spawn_app(0).await;
    app.vendor.seed_contacts(10_250);
    let mut connector = shipped_with(&app, "hubspot.toml");
    // HubSpot's search allows a few requests a second; the fake has no such limit, and
    // this test would take 13 s at the real pace.
    connector.spec.rate_limit = None;
    let report = app
        .run_connector(&connector, "leads", Mode::Regular, false)
        .await;
    assert_eq!(report.status, RunStatus::Succeeded, "{report:?}");
    assert_eq!(rows(&app, "hubspot_leads").await, 10_250);
    assert_eq!(distinct_rows(&app, "hubspot_leads").await, 10_250);
    let searches = statuses(&app, "/crm/v3/objects/contacts/search");
    assert!(
        searches.iter().all(|s| *s == 200),
        "a search request was refused: {:?}",
        searches.iter().filter(|s| **s != 200).collect::<Vec<_>>()
    );
    let newest = app
        .vendor
        .contacts()
        .iter()
        .filter_map(|c| c["properties"]["lastmodifieddate"].as_str())
        .filter_map(|t| t.parse::<DateTime<Utc>>().ok())
        .max();
    assert_eq!(checkpoint(&app, "hubspot", "leads").await.1, newest);

    // One contact changes: the next run asks from the mark and reads a handful.
    app.vendor.update_contact("1007", |c| {
        c["properties"]["lifecyclestage"] = json!("customer")
    });
    let before = searches.len();
    let second = app
        .run_connector(&connector, "leads", Mode::Regular, false)
        .await;
    assert_eq!(second.status, RunStatus::Succeeded, "{second:?}");
    assert_eq!(second.counters.updated, 1, "{second:?}");
    assert!(second.counters.fetched < 100, "{second:?}");
    assert_eq!(
        statuses(&app, "/crm/v3/objects/contacts/search").len() - before,
        1
    );
    let stage: String =
        sqlx::query_scalar("SELECT lifecycle_stage FROM hubspot_leads WHERE source_id = '1007'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(stage, "customer");
}

#[tokio::test]
async fn stripe_invoice_changes_come_from_the_events_feed_newest_version_wins() {
    let app = spawn_app(30).await;
    let connector = shipped_with(&app, "stripe.toml");
    let first = app
        .run_connector(&connector, "invoices", Mode::Regular, false)
        .await;
    assert_eq!(first.status, RunStatus::Succeeded, "{first:?}");
    assert_eq!(rows(&app, "stripe_invoices").await, 30);
    assert_eq!(
        checkpoint(&app, "stripe", "invoices").await.0.as_deref(),
        Some("evt_000030")
    );

    // Two changes to one invoice and one to another, all in one page of events.
    app.vendor
        .update_invoice("in_000003", |inv| inv["status"] = json!("uncollectible"));
    app.vendor
        .update_invoice("in_000003", |inv| inv["status"] = json!("paid"));
    app.vendor
        .update_invoice("in_000010", |inv| inv["amount_due"] = json!(4242));
    let second = app
        .run_connector(&connector, "invoices", Mode::Regular, false)
        .await;
    assert_eq!(second.status, RunStatus::Succeeded, "{second:?}");
    assert_eq!(
        second.counters.fetched, 3,
        "only the new events: {second:?}"
    );
    let events = queries(&app, "/v1/events");
    assert!(
        events
            .get(2)
            .is_some_and(|q| q.contains("ending_before=evt_000030")),
        "{events:?}"
    );
    let status: String =
        sqlx::query_scalar("SELECT status FROM stripe_invoices WHERE source_id = 'in_000003'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(status, "paid", "an older event overwrote a newer one");
    let amount: i64 =
        sqlx::query_scalar("SELECT amount_due FROM stripe_invoices WHERE source_id = 'in_000010'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(amount, 4242);
    assert_eq!(
        checkpoint(&app, "stripe", "invoices").await.0.as_deref(),
        Some("evt_000033")
    );

    let customers = app
        .run_connector(&connector, "customers", Mode::Regular, false)
        .await;
    assert_eq!(customers.status, RunStatus::Succeeded, "{customers:?}");
    assert!(rows(&app, "stripe_customers").await > 0);
}

#[tokio::test]
async fn stripe_events_cursor_never_skips_changes_when_a_run_fails_midway() {
    let app = spawn_app(30).await;
    let connector = shipped_with(&app, "stripe.toml");
    let first = app
        .run_connector(&connector, "invoices", Mode::Regular, false)
        .await;
    assert_eq!(first.status, RunStatus::Succeeded, "{first:?}");
    // 250 changes: three pages of 100 events towards the present.
    for n in 0..250 {
        let id = format!("in_{:06}", n % 30 + 1);
        app.vendor
            .update_invoice(&id, |inv| inv["amount_due"] = json!(10_000 + n));
    }
    let before = app.vendor.requests().len();
    app.vendor
        .inject_at(before + 2, Fault::status("/v1/events", 1, 400, None));
    let failed = app
        .run_connector(&connector, "invoices", Mode::Regular, false)
        .await;
    assert_eq!(failed.status, RunStatus::Failed, "{failed:?}");
    assert_eq!(failed.counters.fetched, 100, "{failed:?}");
    let (cursor, _, resume) = checkpoint(&app, "stripe", "invoices").await;
    assert_eq!(
        cursor.as_deref(),
        Some("evt_000130"),
        "the cursor is committed with the page that reached it, never past it"
    );
    assert_eq!(
        resume.as_ref().and_then(|r| r["next_page"].as_str()),
        Some("evt_000130"),
        "{resume:?}"
    );

    let resumed = app
        .run_connector(&connector, "invoices", Mode::Regular, false)
        .await;
    assert_eq!(resumed.status, RunStatus::Succeeded, "{resumed:?}");
    assert!(
        queries(&app, "/v1/events")
            .last()
            .is_some_and(|q| q.contains("ending_before=evt_000280")),
    );
    assert_eq!(
        checkpoint(&app, "stripe", "invoices").await.0.as_deref(),
        Some("evt_000280")
    );
    app.assert_table_matches_vendor("stripe_invoices").await;
}

#[tokio::test]
async fn stripe_history_is_backfilled_by_created_windows_into_the_events_table() {
    let app = spawn_app(60).await;
    let connector = shipped_with(&app, "stripe.toml");
    let created: Vec<i64> = app
        .vendor
        .invoices()
        .iter()
        .map(|inv| inv["created"].as_i64().unwrap())
        .collect();
    let at = |secs: i64| DateTime::<Utc>::from_timestamp(secs, 0).unwrap();
    let (first, last) = (created[0], created[created.len() - 1]);
    let middle = created[25];
    // Two adjacent half-open windows: [first, middle) and [middle, last + 1).
    for (from, to) in [(first, middle), (middle, last + 1)] {
        let mode = Mode::Replay {
            from: at(from),
            to: at(to),
            label: format!("{from}..{to}"),
            restart: false,
        };
        let report = app
            .run_connector(&connector, "invoices_backfill", mode, false)
            .await;
        assert_eq!(report.status, RunStatus::Succeeded, "{report:?}");
    }
    assert_eq!(
        rows(&app, "stripe_invoices").await,
        60,
        "a window overlapped or left a gap"
    );
    assert_eq!(distinct_rows(&app, "stripe_invoices").await, 60);
    let windows: Vec<String> = queries(&app, "/v1/invoices");
    assert!(
        windows
            .iter()
            .any(|q| q.contains(&format!("created%5Bgte%5D={middle}"))
                || q.contains(&format!("created[gte]={middle}"))),
        "{windows:?}"
    );

    // The events feed then keeps the same rows current; the seed's events re-read by its
    // first run change nothing.
    let events = app
        .run_connector(&connector, "invoices", Mode::Regular, false)
        .await;
    assert_eq!(events.status, RunStatus::Succeeded, "{events:?}");
    assert_eq!(
        (events.counters.inserted, events.counters.updated),
        (0, 0),
        "{events:?}"
    );
    app.vendor
        .update_invoice("in_000005", |inv| inv["status"] = json!("void"));
    let change = app
        .run_connector(&connector, "invoices", Mode::Regular, false)
        .await;
    assert_eq!(change.counters.updated, 1, "{change:?}");
    app.assert_table_matches_vendor("stripe_invoices").await;
}
