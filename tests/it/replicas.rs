//! Several `idem serve` processes of the real binary against one database: they share the
//! schedule and the vendor's rate limit, stop within their grace, take over a dead
//! replica's streams, and log lines carry only their own span's fields.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use idem_fakes::{Fault, FaultKind};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Child;

use crate::helpers::{TestApp, spawn_app, spawn_app_with};

/// A connector of `streams` streams, all reading the fake vendor's invoices into tables
/// of their own, `page` records a page, with a rate limit.
fn fleet_connector(app: &TestApp, streams: usize, page: usize, rate: u32, burst: u32) -> String {
    let mut text = format!(
        "source_system = \"fleet\"\nbase_url = \"${{DEMO_BILLING_URL}}\"\n\n[auth]\nkind = \"bearer\"\ntoken = \"sk_test_demo\"\n\n[rate_limit]\nrequests_per_second = {rate}\nburst = {burst}\n"
    );
    for n in 0..streams {
        text.push_str(&format!(
            r#"
[streams.s{n:02}]
path = "/v1/invoices"
params = {{ limit = "{page}" }}
records = "/data"
id = "/id"
table = "fleet_s{n:02}"

[streams.s{n:02}.pagination]
kind = "last_record"
param = "starting_after"
has_more = "/has_more"

[[streams.s{n:02}.columns]]
name = "number"
pointer = "/number"
type = "text"
"#
        ));
    }
    let path = app.dir.path().join("fleet.toml");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// Rewrites idem.toml: the fleet connector, one schedule of all its streams.
fn fleet_config(app: &TestApp, connector: &str, every: &str, extra_serve: &str) {
    std::fs::write(
        &app.config_path,
        format!(
            "connectors = [{connector:?}]\n[notify]\ntransport = \"log\"\n\n[serve]\nlisten = \"127.0.0.1:0\"\nnotify_every = \"500ms\"\nheartbeat_every = \"200ms\"\nschedules = [{{ streams = [\"fleet\"], every = \"{every}\" }}]\n{extra_serve}"
        ),
    )
    .unwrap();
}

/// One `idem serve` process and the log lines it wrote.
struct Replica {
    child: Child,
    logs: Arc<Mutex<Vec<String>>>,
    metrics_url: String,
}

impl Replica {
    async fn start(app: &TestApp, instance: &str) -> Replica {
        let mut child = app
            .command(&["serve"])
            .env("IDEM__SERVE__INSTANCE", instance)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let banner = tokio::time::timeout(Duration::from_secs(30), stdout.next_line())
            .await
            .expect("serve prints its banner")
            .unwrap()
            .unwrap_or_default();
        assert!(banner.contains(instance), "{banner}");
        let metrics_url = banner
            .split_whitespace()
            .map(|w| w.trim_end_matches(','))
            .find(|w| w.ends_with("/metrics"))
            .expect("banner names /metrics")
            .to_string();
        tokio::spawn(async move { while let Ok(Some(_)) = stdout.next_line().await {} });
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = logs.clone();
        let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
        tokio::spawn(async move {
            while let Ok(Some(line)) = stderr.next_line().await {
                sink.lock().unwrap().push(line);
            }
        });
        Replica {
            child,
            logs,
            metrics_url,
        }
    }

    fn signal(&self, signal: i32) {
        // SAFETY: kill(2) with a pid we spawned has no memory-safety preconditions.
        unsafe {
            libc::kill(self.child.id().unwrap() as i32, signal);
        }
    }

    /// SIGTERM, then the time it took to exit and its exit code.
    async fn terminate(&mut self) -> (Duration, Option<i32>) {
        let asked = tokio::time::Instant::now();
        self.signal(libc::SIGTERM);
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("serve exits after SIGTERM")
            .unwrap();
        (asked.elapsed(), status.code())
    }
}

async fn wait_until(app: &TestApp, sql: &str, want: i64, within: Duration) {
    let started = tokio::time::Instant::now();
    while app.count(sql).await < want {
        assert!(
            started.elapsed() < within,
            "timed out waiting for: {sql} >= {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs of one stream that overlapped in time (must be none).
async fn overlapping_runs(app: &TestApp) -> i64 {
    app.count(
        "SELECT count(*) FROM idem_runs a JOIN idem_runs b
           ON a.source_system = b.source_system AND a.stream = b.stream AND a.id < b.id
          AND a.started_at < COALESCE(b.finished_at, now()) AND b.started_at < COALESCE(a.finished_at, now())",
    )
    .await
}

#[tokio::test]
async fn replicas_share_the_schedule() {
    let app = spawn_app(30).await;
    let connector = fleet_connector(&app, 12, 100, 1000, 100);
    fleet_config(&app, &connector, "1s", "");
    let mut replicas = Vec::new();
    for n in 0..3 {
        replicas.push(Replica::start(&app, &format!("replica-{n}")).await);
    }
    wait_until(
        &app,
        "SELECT count(*) FROM idem_runs",
        1,
        Duration::from_secs(20),
    )
    .await;
    // A few periods.
    tokio::time::sleep(Duration::from_millis(4300)).await;
    // Per-process counters add up across replicas to the deployment's runs; the gauges
    // read from tables are the same on every replica.
    let mut started_by_replicas = 0;
    for (n, replica) in replicas.iter().enumerate() {
        let text = reqwest::get(&replica.metrics_url)
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(text.contains("idem_live_instances 3"), "{text}");
        let prefix = format!("idem_process_runs_started_total{{instance=\"replica-{n}\"}} ");
        let line = text
            .lines()
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_else(|| panic!("no {prefix}in {text}"));
        started_by_replicas += line[prefix.len()..].parse::<i64>().unwrap();
    }
    let recorded = app.count("SELECT count(*) FROM idem_runs").await;
    // Runs still in progress are recorded but not yet counted (at most 3 replicas × 2 workers).
    assert!(
        started_by_replicas <= recorded && started_by_replicas >= recorded - 6 - 3,
        "replicas counted {started_by_replicas} runs started; {recorded} recorded"
    );
    for replica in &mut replicas {
        let (_, code) = replica.terminate().await;
        assert_eq!(code, Some(0));
    }
    let elapsed: f64 = sqlx::query_scalar(
        "SELECT EXTRACT(EPOCH FROM max(COALESCE(finished_at, now())) - min(started_at))::float8 FROM idem_runs",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    let per_stream: Vec<(String, i64)> = sqlx::query_as(
        "SELECT stream, count(*) FROM idem_runs WHERE source_system = 'fleet' GROUP BY stream ORDER BY stream",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(per_stream.len(), 12, "{per_stream:?}");
    // One run at the start and one per period after it, give or take one.
    let expected = elapsed.floor() as i64 + 1;
    for (stream, runs) in &per_stream {
        assert!(
            (runs - expected).abs() <= 1,
            "{stream} ran {runs} times in {elapsed:.1}s of 1s periods (expected {expected} ± 1): {per_stream:?}"
        );
    }
    // The work spreads: every replica ran some.
    let instances: Vec<(String, i64)> = sqlx::query_as(
        "SELECT instance, count(*) FROM idem_runs GROUP BY instance ORDER BY instance",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(instances.len(), 3, "{instances:?}");
    assert!(
        instances.iter().all(|(_, n)| *n >= 3),
        "work did not spread: {instances:?}"
    );
    assert_eq!(overlapping_runs(&app).await, 0);
    assert_eq!(
        app.count(
            "SELECT count(*) FROM idem_runs WHERE status NOT IN ('succeeded', 'interrupted')"
        )
        .await,
        0
    );
    for n in 0..12 {
        app.assert_table_matches_vendor(&format!("fleet_s{n:02}"))
            .await;
    }
}

#[tokio::test]
async fn the_rate_limit_holds_across_replicas() {
    let app = spawn_app(60).await;
    // Ten pages a walk, six streams, every second: far more than ten requests a second
    // are wanted, so the limit is what paces the vendor.
    let connector = fleet_connector(&app, 6, 6, 10, 3);
    fleet_config(&app, &connector, "1s", "");
    let mut replicas = Vec::new();
    for n in 0..3 {
        replicas.push(Replica::start(&app, &format!("paced-{n}")).await);
    }
    // Every replica has seen the others' heartbeats (and so taken its third).
    wait_until(
        &app,
        "SELECT count(*) FROM idem_instances",
        3,
        Duration::from_secs(20),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let from = std::time::Instant::now();
    let window = Duration::from_secs(3);
    tokio::time::sleep(window).await;
    let to = std::time::Instant::now();
    for replica in &mut replicas {
        replica.terminate().await;
    }
    let requests = app
        .vendor
        .requests()
        .into_iter()
        .filter(|r| r.path == "/v1/invoices" && r.received >= from && r.received < to)
        .count() as f64;
    let seconds = (to - from).as_secs_f64();
    // The declared rate over the window, plus its burst.
    let allowed = 10.0 * seconds + 3.0;
    assert!(
        requests <= allowed,
        "{requests} vendor requests in {seconds:.1}s across 3 replicas; declared 10/s with burst 3 allows {allowed}"
    );
    assert!(
        requests >= 10.0 * seconds * 0.6,
        "only {requests} requests in {seconds:.1}s: the limit was not exercised"
    );
    assert_eq!(overlapping_runs(&app).await, 0);
}

#[tokio::test]
async fn sigterm_during_dispatch_exits_within_the_grace_period() {
    let app = spawn_app_with(
        1,
        "[notify]\ntransport = \"http\"\nsend_timeout = \"1s\"\nlease = \"20s\"\nbatch_size = 50\n\n[notify.http]\nurl = \"${DEMO_BILLING_URL}/email/send\"\n\n[serve]\nlisten = \"127.0.0.1:0\"\nnotify_every = \"100ms\"\nshutdown_grace = \"3s\"\n",
    )
    .await;
    // A slow mail API and hundreds of due reminders.
    app.vendor.set_email_delay(Duration::from_millis(60));
    sqlx::query(
        "INSERT INTO idem_ledger (key, channel, recipient, subject, body, message_id, source_system, stream, source_id, rule)
         SELECT 'demo_billing/invoices/email:reminder:in_' || n, 'email', 'customer' || n || '@example.com',
                'Invoice INV-' || n || ' is overdue', 'Please pay.', '<' || n || '@idem.local>', 'demo_billing', 'invoices',
                'in_' || n, 'overdue_reminder'
         FROM generate_series(1, 300) AS n",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    let mut replica = Replica::start(&app, "draining").await;
    let started = tokio::time::Instant::now();
    while app.vendor.emails().len() < 5 {
        assert!(started.elapsed() < Duration::from_secs(20), "nothing sent");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (took, code) = replica.terminate().await;
    assert_eq!(code, Some(0));
    assert!(
        took < Duration::from_secs(3),
        "took {took:?} to exit; the grace is 3s"
    );
    let sent_by_then = app.vendor.emails().len();
    assert!(
        sent_by_then < 250,
        "the whole pass was sent after SIGTERM ({sent_by_then})"
    );
    // Unsent claimed rows were released at once, not left to their 20 s lease.
    assert_eq!(
        app.count("SELECT count(*) FROM idem_ledger WHERE status = 'sending'")
            .await,
        0
    );
    assert_eq!(
        app.count("SELECT count(*) FROM idem_ledger WHERE status = 'sent'")
            .await,
        sent_by_then as i64
    );
    // The rest goes out on the next pass, and nothing twice.
    let output = app.idem(&["notify"]).await;
    assert!(output.status.success(), "{output:?}");
    let emails = app.vendor.emails();
    assert_eq!(emails.len(), 300);
    let mut keys: Vec<_> = emails.iter().map(|e| e.idempotency_key.clone()).collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), 300, "a reminder was sent twice");
    let posts = app
        .vendor
        .requests()
        .into_iter()
        .filter(|r| r.path == "/email/send")
        .count();
    assert_eq!(posts, 300, "a reminder was posted twice");
    assert!(
        replica
            .logs
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("released for another replica")),
        "no release logged"
    );
}

#[tokio::test]
async fn a_dead_replicas_streams_run_at_their_next_due_time() {
    let app = spawn_app(20).await;
    let connector = fleet_connector(&app, 4, 100, 1000, 100);
    fleet_config(&app, &connector, "1s", "");
    // Every page takes a while, so runs are in progress when a replica dies.
    app.vendor.inject(Fault::new(
        "/v1/invoices",
        10_000,
        FaultKind::Delay(Duration::from_millis(300)),
    ));
    let mut doomed = Replica::start(&app, "doomed").await;
    let mut survivor = Replica::start(&app, "survivor").await;
    wait_until(
        &app,
        "SELECT count(*) FROM idem_runs WHERE instance = 'doomed' AND status = 'running'",
        1,
        Duration::from_secs(20),
    )
    .await;
    doomed.signal(libc::SIGKILL);
    doomed.child.wait().await.unwrap();
    let due: Vec<(String, f64)> = sqlx::query_as(
        "SELECT stream, EXTRACT(EPOCH FROM next_due_at)::float8 FROM idem_schedule ORDER BY stream",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    // Its run in progress is marked abandoned promptly (three missed heartbeats), not
    // when the stream next runs.
    wait_until(
        &app,
        "SELECT count(*) FROM idem_runs WHERE instance = 'doomed' AND status = 'abandoned'",
        1,
        Duration::from_secs(3),
    )
    .await;
    // Every stream runs again at its next due time, on the survivor.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    for (stream, due_at) in &due {
        let next: Option<f64> = sqlx::query_scalar(
            "SELECT EXTRACT(EPOCH FROM min(started_at))::float8 FROM idem_runs
             WHERE stream = $1 AND started_at >= to_timestamp($2) - interval '100 milliseconds'",
        )
        .bind(stream)
        .bind(due_at)
        .fetch_one(&app.pool)
        .await
        .unwrap();
        let next = next.unwrap_or_else(|| panic!("{stream} never ran after the replica died"));
        assert!(
            next - due_at < 0.8,
            "{stream} was due at {due_at} and started at {next}"
        );
    }
    assert_eq!(
        app.count(
            "SELECT count(*) FROM idem_runs WHERE instance = 'doomed' AND status = 'running'"
        )
        .await,
        0
    );
    // A deploy stops the survivor mid-run: the run is `interrupted`, not `failed`, and
    // nothing is logged at ERROR.
    wait_until(
        &app,
        "SELECT count(*) FROM idem_runs WHERE instance = 'survivor' AND status = 'running'",
        1,
        Duration::from_secs(10),
    )
    .await;
    let (_, code) = survivor.terminate().await;
    assert_eq!(code, Some(0));
    assert!(
        app.count(
            "SELECT count(*) FROM idem_runs WHERE instance = 'survivor' AND status = 'interrupted'"
        )
        .await
            >= 1
    );
    assert_eq!(
        app.count("SELECT count(*) FROM idem_runs WHERE status IN ('failed', 'running')")
            .await,
        0
    );
    let errors: Vec<String> = survivor
        .logs
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("\"level\":\"ERROR\""))
        .cloned()
        .collect();
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(overlapping_runs(&app).await, 0);
}

#[tokio::test]
async fn log_lines_carry_only_their_own_span_fields() {
    // The demo connector makes reminders for overdue invoices; the mail API is slow, so
    // sends are awaited while runs log on the same threads.
    let app = spawn_app_with(
        120,
        "[notify]\ntransport = \"http\"\nretry_backoff = \"50ms\"\n\n[notify.http]\nurl = \"${DEMO_BILLING_URL}/email/send\"\n\n[serve]\nlisten = \"127.0.0.1:0\"\nnotify_every = \"100ms\"\nschedules = [{ streams = [\"demo_billing.invoices\"], every = \"200ms\" }]\n",
    )
    .await;
    app.vendor.set_email_delay(Duration::from_millis(15));
    // Some sends fail for a while: their retries are logged under the reminder's span.
    app.vendor
        .inject(Fault::status("/email/send", 5, 503, None));
    let mut replica = Replica::start(&app, "spans-0").await;
    wait_until(
        &app,
        "SELECT count(*) FROM idem_runs WHERE status = 'succeeded'",
        4,
        Duration::from_secs(20),
    )
    .await;
    while app
        .count("SELECT count(*) FROM idem_ledger WHERE status = 'sent'")
        .await
        < 10
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    replica.terminate().await;
    let logs = replica.logs.lock().unwrap().clone();
    let (mut run_lines, mut notify_lines) = (0, 0);
    for line in &logs {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        let spans = value["spans"].as_array().cloned().unwrap_or_default();
        let names: Vec<&str> = spans.iter().filter_map(|s| s["name"].as_str()).collect();
        // Every line names its instance.
        assert!(
            spans.iter().any(|s| s["instance"] == "spans-0"),
            "a line without the instance id: {line}"
        );
        let keys: Vec<&serde_json::Value> = spans
            .iter()
            .filter_map(|s| s.get("key"))
            .chain(value["span"].get("key"))
            .collect();
        let message = value["fields"]["message"].as_str().unwrap_or_default();
        if names.contains(&"run") || message.contains("run finished") {
            run_lines += 1;
            assert!(
                keys.is_empty() && !names.contains(&"notify"),
                "a run's line carries a reminder's fields: {line}"
            );
        }
        if names.contains(&"notify") {
            notify_lines += 1;
            assert!(
                !names.contains(&"run") && !names.contains(&"scheduled"),
                "a reminder's line inside a run's span: {line}"
            );
        }
        if !keys.is_empty() {
            assert!(
                names.contains(&"notify"),
                "a line outside any reminder carries a key: {line}"
            );
        }
    }
    assert!(
        run_lines > 0 && notify_lines > 0,
        "{run_lines} run lines, {notify_lines} reminder lines: {logs:?}"
    );
}

#[tokio::test]
async fn check_warns_when_replicas_would_exhaust_max_connections() {
    let app = spawn_app(1).await;
    let max: String = sqlx::query_scalar("SHOW max_connections")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    let max: u32 = max.parse().unwrap();
    let connector = fleet_connector(&app, 1, 100, 10, 1);
    // Two workers and the default pool (workers + 3): 7 connections a replica.
    let replicas = max / 7 + 1;
    fleet_config(
        &app,
        &connector,
        "1m",
        &format!("workers = 2\nreplicas = {replicas}\n"),
    );
    let output = app.idem(&["check"]).await;
    assert!(output.status.success(), "{output:?}");
    let stdout = crate::helpers::stdout(&output);
    assert!(
        stdout.contains(&format!("max_connections = {max}")),
        "{stdout}"
    );
    fleet_config(&app, &connector, "1m", "workers = 2\nreplicas = 2\n");
    let output = app.idem(&["check"]).await;
    assert!(
        !crate::helpers::stdout(&output).contains("max_connections ="),
        "{output:?}"
    );
}

#[tokio::test]
async fn a_run_longer_than_every_is_skipped_and_counted_not_doubled() {
    let app = spawn_app(30).await;
    // One stream, every 200 ms, whose walk takes longer than that (three slow pages).
    let connector = fleet_connector(&app, 1, 10, 1000, 100);
    fleet_config(&app, &connector, "200ms", "workers = 3\n");
    app.vendor.inject(Fault::new(
        "/v1/invoices",
        10_000,
        FaultKind::Delay(Duration::from_millis(150)),
    ));
    let sessions = || async {
        // The statistics are flushed about once a second.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        sqlx::query_scalar::<_, i64>(
            "SELECT sessions FROM pg_stat_database WHERE datname = current_database()",
        )
        .fetch_one(&app.pool)
        .await
        .unwrap()
    };
    let sessions_before = sessions().await;
    let mut replica = Replica::start(&app, "skipper").await;
    let started = tokio::time::Instant::now();
    let skips = loop {
        let text = reqwest::get(&replica.metrics_url)
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let prefix = "idem_process_lock_skips_total{instance=\"skipper\"} ";
        let skips: i64 = text
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no lock skip counter in {text}"))
            .parse()
            .unwrap();
        let succeeded = app
            .count("SELECT count(*) FROM idem_runs WHERE status = 'succeeded'")
            .await;
        if (skips >= 12 && succeeded >= 1) || started.elapsed() > Duration::from_secs(15) {
            break skips;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    replica.terminate().await;
    assert!(skips >= 12, "only {skips} lock skips counted");
    // A skipped period opens no Postgres session: the replica's sessions are its pool
    // (workers + 3, or `[notify] concurrency` + 1 = 9 when larger: each send in flight
    // has a connection), the probe session opened before it, and one lock session per run.
    let opened = sessions().await - sessions_before;
    let runs = app.count("SELECT count(*) FROM idem_runs").await;
    let pool = 9;
    assert!(
        opened <= runs + pool + 2,
        "{opened} sessions for {runs} runs and {skips} skips"
    );
    assert_eq!(overlapping_runs(&app).await, 0);
    // A skip is routine: not a WARN line per attempt.
    let logs = replica.logs.lock().unwrap().clone();
    assert!(
        !logs
            .iter()
            .any(|l| l.contains("still running") || l.contains("already running")),
        "a lock skip was logged at INFO or above: {logs:?}"
    );
    assert!(
        app.count("SELECT count(*) FROM idem_runs WHERE status = 'succeeded'")
            .await
            >= 1
    );
}

#[tokio::test]
async fn a_lock_held_in_another_database_is_not_this_streams() {
    use sqlx::Connection;
    let app = spawn_app(1).await;
    // The same stream's lock, held in another database of the server (another idem, or
    // another test): advisory locks are per database.
    let mut elsewhere = sqlx::PgConnection::connect(&crate::helpers::admin_url())
        .await
        .unwrap();
    let key = idem::store::lock_key("demo_billing", "invoices", "");
    let taken: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, hashtext($2))")
        .bind(idem::store::LOCK_CLASS)
        .bind(&key)
        .fetch_one(&mut elsewhere)
        .await
        .unwrap();
    assert!(taken);
    assert!(
        !idem::store::stream_lock_held(&app.pool, "demo_billing", "invoices", "")
            .await
            .unwrap(),
        "a lock in another database was taken for this stream's"
    );
    // The run is not skipped for it either.
    let report = app.run_invoices(idem::run::Mode::Regular).await;
    assert_eq!(report.status, idem::run::RunStatus::Succeeded);
    // Held here, it is seen.
    let here =
        idem::store::StreamLock::try_acquire(&app.database_url, "demo_billing", "invoices", "")
            .await
            .unwrap()
            .expect("free in this database");
    assert!(
        idem::store::stream_lock_held(&app.pool, "demo_billing", "invoices", "")
            .await
            .unwrap()
    );
    here.release().await;
    let _ = elsewhere.close().await;
}
