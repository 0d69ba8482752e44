//! Partitioned streams: one stream walked once per connected account, each account with
//! its own checkpoint, lock and resume point, all of them into one table.

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use chrono::{DateTime, Utc};
use idem::connector::Connector;
use idem::run::{Mode, RunError, RunOptions, RunReport, StreamRunner};
use idem_fakes::DEFAULT_CLOCK;

use crate::helpers::{TestApp, spawn_app, stderr, stdout};

const ACCOUNTS: [&str; 3] = ["acct_eu", "acct_us", "acct_uk"];

/// The shipped partitioned connector, pointed at this test's fake vendor.
fn accounts_connector(app: &TestApp) -> Connector {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("connectors/demo_accounts.toml");
    idem::connector::load_file_with(&path, &|name| app.env(name)).expect("demo_accounts loads")
}

/// Seeds each account at its own time, so that each account's mark is its own.
fn seed(app: &TestApp, counts: [usize; 3]) {
    for (i, (account, n)) in ACCOUNTS.iter().zip(counts).enumerate() {
        app.vendor.set_clock(DEFAULT_CLOCK + 1000 * i as i64);
        app.vendor.seed_charges(account, n);
    }
}

async fn run_partition(app: &TestApp, connector: &Connector, partition: &str) -> RunReport {
    run_partition_result(app, connector, partition)
        .await
        .expect("the run starts")
}

async fn run_partition_result(
    app: &TestApp,
    connector: &Connector,
    partition: &str,
) -> Result<RunReport, RunError> {
    let spec = connector.stream("charges").expect("charges").clone();
    StreamRunner::default()
        .run_one(
            &app.pool,
            &app.database_url,
            connector,
            "charges",
            &spec,
            partition,
            &RunOptions::new(Mode::Regular, false),
        )
        .await
}

/// Each partition's regular checkpoint mark, by partition.
async fn marks(app: &TestApp) -> BTreeMap<String, Option<DateTime<Utc>>> {
    sqlx::query_as(
        "SELECT partition, high_water_mark FROM idem_checkpoints
         WHERE source_system = 'demo_accounts' AND stream = 'charges' AND scope = 'main'",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap()
    .into_iter()
    .collect()
}

fn at(unix: i64) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(unix, 0)
}

/// `demo_charges` holds exactly every account's charges at the vendor, each once.
async fn assert_rows_match_vendor(app: &TestApp) {
    let stored: Vec<(String, serde_json::Value)> =
        sqlx::query_as("SELECT source_id, data FROM demo_charges ORDER BY source_id")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    let mut truth: Vec<(String, serde_json::Value)> = ACCOUNTS
        .iter()
        .flat_map(|a| app.vendor.charges(a))
        .map(|c| (c["id"].as_str().unwrap().to_string(), c))
        .collect();
    truth.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        stored.len(),
        truth.len(),
        "row count differs from the vendor's"
    );
    assert!(stored == truth, "stored charges differ from the vendor's");
    let distinct = app
        .count("SELECT count(DISTINCT source_id) FROM demo_charges")
        .await;
    assert_eq!(distinct as usize, truth.len(), "duplicates in demo_charges");
}

/// The real binary with a config listing only the partitioned connector.
fn accounts_command(app: &TestApp, args: &[&str]) -> tokio::process::Command {
    accounts_command_with(app, "", args)
}

/// [`accounts_command`] with more idem.toml text (e.g. a `[partitions.…]` override).
fn accounts_command_with(app: &TestApp, extra: &str, args: &[&str]) -> tokio::process::Command {
    let config = app.dir.path().join("accounts-idem.toml");
    let connector = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("connectors/demo_accounts.toml");
    std::fs::write(
        &config,
        format!(
            "connectors = [{:?}]\n[notify]\ntransport = \"log\"\n{extra}",
            connector.display().to_string()
        ),
    )
    .unwrap();
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_idem"));
    command
        .arg("--config")
        .arg(&config)
        .arg("--log-format")
        .arg("json")
        .args(args)
        .env("DATABASE_URL", &app.database_url)
        .env("DEMO_BILLING_URL", app.vendor.base_url())
        .env_remove("IDEM_CRASH_AT")
        .kill_on_drop(true);
    command
}

/// `idem run demo_accounts.charges --partition <partition> --no-notify`.
fn run_partition_args(partition: &str) -> [&str; 5] {
    [
        "run",
        "demo_accounts.charges",
        "--partition",
        partition,
        "--no-notify",
    ]
}

async fn accounts_idem(app: &TestApp, args: &[&str]) -> Output {
    tokio::time::timeout(
        Duration::from_secs(120),
        accounts_command(app, args).output(),
    )
    .await
    .expect("idem finishes within 2 minutes")
    .expect("idem runs")
}

#[tokio::test]
async fn partitions_keep_separate_checkpoints() {
    let app = spawn_app(0).await;
    seed(&app, [120, 50, 7]);
    let connector = accounts_connector(&app);

    // The first run walks every account; each gets its own checkpoint at its own mark.
    for (account, n) in ACCOUNTS.iter().zip([120, 50, 7]) {
        let report = run_partition(&app, &connector, account).await;
        assert_eq!(report.partition.as_deref(), Some(*account));
        assert_eq!(report.counters.inserted, n, "{account}");
    }
    assert_rows_match_vendor(&app).await;
    let first = marks(&app).await;
    assert_eq!(
        first,
        BTreeMap::from([
            ("acct_eu".to_string(), at(DEFAULT_CLOCK - 1)),
            ("acct_uk".to_string(), at(DEFAULT_CLOCK + 2000 - 1)),
            ("acct_us".to_string(), at(DEFAULT_CLOCK + 1000 - 1)),
        ]),
        "one checkpoint per account, each at its own account's newest change"
    );

    // Two charges change in one account: the next run writes only those two, and only
    // that account's checkpoint moves.
    app.vendor.set_clock(DEFAULT_CLOCK + 5000);
    let us = app.vendor.charges("acct_us");
    for charge in &us[..2] {
        let id = charge["id"].as_str().unwrap();
        assert!(
            app.vendor
                .update_charge("acct_us", id, |c| c["status"] = "refunded".into())
        );
    }
    let mut written = BTreeMap::new();
    for account in ACCOUNTS {
        let c = run_partition(&app, &connector, account).await.counters;
        written.insert(account, (c.inserted, c.updated));
    }
    assert_eq!(
        written,
        BTreeMap::from([
            ("acct_eu", (0, 0)),
            ("acct_uk", (0, 0)),
            ("acct_us", (0, 2))
        ])
    );
    let second = marks(&app).await;
    assert_eq!(second["acct_us"], at(DEFAULT_CLOCK + 5000));
    assert_eq!(second["acct_eu"], first["acct_eu"]);
    assert_eq!(second["acct_uk"], first["acct_uk"]);
    assert_rows_match_vendor(&app).await;

    // Each account's runs are its own rows.
    let runs: i64 = app
        .count("SELECT count(DISTINCT partition) FROM idem_runs WHERE stream = 'charges'")
        .await;
    assert_eq!(runs, 3);
}

#[tokio::test]
async fn a_partition_runs_while_another_partition_of_the_stream_holds_its_lock() {
    let app = spawn_app(0).await;
    seed(&app, [30, 40, 0]);
    let connector = accounts_connector(&app);
    let held = idem::store::StreamLock::try_acquire(
        &app.database_url,
        "demo_accounts",
        "charges",
        "acct_eu",
    )
    .await
    .unwrap()
    .expect("the lock of acct_eu is free");

    let us = run_partition(&app, &connector, "acct_us").await;
    assert_eq!(us.counters.inserted, 40, "another account is not blocked");
    match run_partition_result(&app, &connector, "acct_eu").await {
        Err(RunError::Locked { stream, .. }) => assert_eq!(stream, "charges#acct_eu"),
        other => panic!("the locked account must not run: {other:?}"),
    }
    // The binary says so with its "locked" exit code, and writes nothing for it.
    let locked = accounts_idem(&app, &run_partition_args("acct_eu")).await;
    assert_eq!(locked.status.code(), Some(75), "{}", stderr(&locked));
    assert!(
        stderr(&locked).contains("charges#acct_eu"),
        "{}",
        stderr(&locked)
    );
    assert_eq!(app.count("SELECT count(*) FROM demo_charges").await, 40);

    // A scheduled run of the whole stream walks the free accounts and leaves the held
    // one to its holder.
    let all = StreamRunner::default()
        .run(
            &app.pool,
            &app.database_url,
            &connector,
            "charges",
            &RunOptions::new(Mode::Regular, false),
        )
        .await
        .expect("the free accounts run");
    assert_eq!(all.counters.inserted + all.counters.updated, 0);
    assert_eq!(
        app.count("SELECT count(*) FROM idem_runs WHERE partition = 'acct_eu'")
            .await,
        0
    );
    assert_eq!(
        app.count("SELECT count(*) FROM idem_runs WHERE partition = 'acct_uk'")
            .await,
        1
    );

    held.release().await;
    let eu = run_partition(&app, &connector, "acct_eu").await;
    assert_eq!(eu.counters.inserted, 30);
    assert_rows_match_vendor(&app).await;
}

#[tokio::test]
async fn an_unknown_partition_is_refused_with_the_known_ones() {
    let app = spawn_app(0).await;
    seed(&app, [1, 1, 1]);
    for args in [
        &run_partition_args("acct_xx")[..],
        &[
            "checkpoint",
            "reset",
            "demo_accounts.charges",
            "--partition",
            "acct_xx",
            "--yes",
        ][..],
    ] {
        let output = accounts_idem(&app, args).await;
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            stderr(&output)
        );
        let message = stderr(&output);
        assert!(
            message.contains("unknown partition 'acct_xx'")
                && message.contains("acct_eu, acct_us, acct_uk"),
            "{args:?}: {message}"
        );
    }
    assert_eq!(app.count("SELECT count(*) FROM idem_runs").await, 0);
}

#[tokio::test]
async fn a_kill_inside_one_partition_resumes_that_partition_without_duplicates() {
    let app = spawn_app(0).await;
    // 350 charges in acct_us: four pages of 100.
    seed(&app, [150, 350, 20]);
    let done = accounts_idem(&app, &run_partition_args("acct_eu")).await;
    assert_eq!(done.status.code(), Some(0), "{}", stderr(&done));
    let eu_mark = marks(&app).await["acct_eu"];

    let crashed = accounts_command(&app, &run_partition_args("acct_us"))
        .env("IDEM__IMPORT__TRANSACTION_RECORDS", "1")
        .env("IDEM_CRASH_AT", "page_after_commit:2")
        .output()
        .await
        .unwrap();
    assert_eq!(crashed.status.signal(), Some(9), "{}", stderr(&crashed));
    assert_eq!(
        app.count("SELECT count(*) FROM demo_charges").await,
        150 + 200
    );
    let resume_pages: i64 = app
        .count(
            "SELECT (resume->>'pages')::bigint FROM idem_checkpoints
             WHERE partition = 'acct_us' AND scope = 'main'",
        )
        .await;
    assert_eq!(resume_pages, 2, "acct_us resumes after its committed pages");

    // The next run of every account: acct_us picks up after its second page.
    let resumed = accounts_idem(&app, &["run", "--no-notify", "--json"]).await;
    assert_eq!(resumed.status.code(), Some(0), "{}", stderr(&resumed));
    let reports: Vec<serde_json::Value> = serde_json::from_str(&stdout(&resumed)).unwrap();
    let fetched: BTreeMap<String, u64> = reports
        .iter()
        .map(|r| {
            (
                r["partition"].as_str().unwrap().to_string(),
                r["counters"]["fetched"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(fetched["acct_us"], 150, "only the pages after the kill");
    assert_eq!(
        reports
            .iter()
            .map(|r| r["counters"]["inserted"].as_u64().unwrap())
            .sum::<u64>(),
        150 + 20
    );
    assert_rows_match_vendor(&app).await;
    assert_eq!(marks(&app).await["acct_eu"], eu_mark, "acct_eu untouched");
}

#[tokio::test]
async fn status_and_metrics_show_each_partition() {
    let app = spawn_app(0).await;
    seed(&app, [3, 4, 5]);
    let ran = accounts_idem(&app, &["run", "--no-notify"]).await;
    assert_eq!(ran.status.code(), Some(0), "{}", stderr(&ran));
    for account in ACCOUNTS {
        assert!(
            stdout(&ran).contains(&format!("demo_accounts.charges#{account} run: succeeded")),
            "{}",
            stdout(&ran)
        );
    }

    let text = stdout(&accounts_idem(&app, &["status"]).await);
    let json: serde_json::Value =
        serde_json::from_str(&stdout(&accounts_idem(&app, &["status", "--json"]).await)).unwrap();
    let metrics = idem::serve::render_metrics(&app.pool).await.unwrap();
    assert_eq!(
        json["partitions"]["demo_accounts.charges"],
        serde_json::json!(ACCOUNTS)
    );
    for account in ACCOUNTS {
        assert!(text.contains(&format!("charges#{account}")), "{text}");
        assert!(
            json["checkpoints"]
                .as_array()
                .unwrap()
                .iter()
                .any(|cp| cp["partition"] == account),
            "{json}"
        );
        assert!(
            json["runs"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["partition"] == account && r["status"] == "succeeded"),
            "{json}"
        );
        assert!(
            metrics.contains(&format!(
                "idem_runs_total{{source_system=\"demo_accounts\",stream=\"charges\",partition=\"{account}\",mode=\"run\",status=\"succeeded\"}} 1"
            )),
            "{metrics}"
        );
    }
}

#[tokio::test]
async fn idem_toml_chooses_the_accounts_of_a_deployment() {
    let app = spawn_app(0).await;
    seed(&app, [3, 4, 5]);
    let only_us = "[partitions.demo_accounts]\ncharges = [\"acct_us\"]\n";
    let ran = accounts_command_with(&app, only_us, &["run", "--no-notify"])
        .output()
        .await
        .unwrap();
    assert_eq!(ran.status.code(), Some(0), "{}", stderr(&ran));
    assert_eq!(app.count("SELECT count(*) FROM demo_charges").await, 4);
    assert_eq!(
        app.count("SELECT count(*) FROM idem_runs WHERE partition <> 'acct_us'")
            .await,
        0
    );

    // A value unsafe for a URL or a lock key is refused before anything runs.
    let bad = "[partitions.demo_accounts]\ncharges = [\"acct us\", \"acct_us\", \"acct_us\"]\n";
    let checked = accounts_command_with(&app, bad, &["check"])
        .output()
        .await
        .unwrap();
    assert_eq!(checked.status.code(), Some(2), "{}", stderr(&checked));
    let message = stderr(&checked) + &stdout(&checked);
    assert!(message.contains("'acct us' contains ' '"), "{message}");
    assert!(message.contains("'acct_us' is listed twice"), "{message}");
}

#[tokio::test]
async fn a_replay_of_one_partition_repairs_it_and_leaves_the_others_alone() {
    let app = spawn_app(0).await;
    seed(&app, [3, 4, 5]);
    let ran = accounts_idem(&app, &["run", "--no-notify"]).await;
    assert_eq!(ran.status.code(), Some(0), "{}", stderr(&ran));
    let before = marks(&app).await;
    // Drift: someone edited one acct_us row in the table.
    let drifted = app.vendor.charges("acct_us")[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    sqlx::query(
        "UPDATE demo_charges SET data = jsonb_set(data, '{amount}', '0') WHERE source_id = $1",
    )
    .bind(&drifted)
    .execute(&app.pool)
    .await
    .unwrap();

    let from = DateTime::from_timestamp(DEFAULT_CLOCK - 86_400, 0)
        .unwrap()
        .to_rfc3339();
    let to = DateTime::from_timestamp(DEFAULT_CLOCK + 86_400, 0)
        .unwrap()
        .to_rfc3339();
    let replayed = accounts_idem(
        &app,
        &[
            "replay",
            "demo_accounts.charges",
            "--partition",
            "acct_us",
            "--from",
            &from,
            "--to",
            &to,
            "--no-notify",
        ],
    )
    .await;
    assert_eq!(replayed.status.code(), Some(0), "{}", stderr(&replayed));
    let out = stdout(&replayed);
    assert!(
        out.contains(
            "demo_accounts.charges#acct_us replay: succeeded: 4 fetched, 0 inserted, 1 updated"
        ),
        "{out}"
    );
    assert!(
        !out.contains("acct_eu") && !out.contains("acct_uk"),
        "{out}"
    );
    assert_rows_match_vendor(&app).await;
    assert_eq!(
        marks(&app).await,
        before,
        "a replay moves no regular checkpoint"
    );
    assert_eq!(
        app.count("SELECT count(*) FROM idem_checkpoints WHERE scope <> 'main'")
            .await,
        0,
        "the finished replay leaves no resume point"
    );
}

#[tokio::test]
async fn checkpoint_commands_act_on_one_partition_or_on_all() {
    let app = spawn_app(0).await;
    seed(&app, [3, 4, 5]);
    let ran = accounts_idem(&app, &["run", "--no-notify"]).await;
    assert_eq!(ran.status.code(), Some(0), "{}", stderr(&ran));
    let before = marks(&app).await;

    let shown = accounts_idem(
        &app,
        &[
            "checkpoint",
            "show",
            "demo_accounts.charges",
            "--partition",
            "acct_us",
        ],
    )
    .await;
    let lines: Vec<String> = stdout(&shown).lines().map(str::to_string).collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].starts_with("demo_accounts.charges#acct_us [main]"),
        "{lines:?}"
    );

    let set = accounts_idem(
        &app,
        &[
            "checkpoint",
            "set",
            "demo_accounts.charges",
            "--partition",
            "acct_us",
            "--high-water-mark",
            "2020-01-01T00:00:00Z",
        ],
    )
    .await;
    assert_eq!(set.status.code(), Some(0), "{}", stderr(&set));
    let after = marks(&app).await;
    assert_eq!(after["acct_us"], at(1_577_836_800));
    assert_eq!(after["acct_eu"], before["acct_eu"]);
    assert_eq!(after["acct_uk"], before["acct_uk"]);

    // Without --partition, every partition of the stream.
    let reset = accounts_idem(
        &app,
        &["checkpoint", "reset", "demo_accounts.charges", "--yes"],
    )
    .await;
    assert_eq!(reset.status.code(), Some(0), "{}", stderr(&reset));
    assert_eq!(stdout(&reset).lines().count(), 3, "{}", stdout(&reset));
    assert!(marks(&app).await.values().all(Option::is_none));
}

#[tokio::test]
async fn a_bad_record_is_a_failure_of_its_own_partition() {
    let app = spawn_app(0).await;
    seed(&app, [3, 4, 5]);
    let bad = app.vendor.charges("acct_uk")[1]["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        app.vendor
            .update_charge("acct_uk", &bad, |c| c["amount"] = "lots".into())
    );
    let ran = accounts_idem(&app, &["run", "--no-notify"]).await;
    assert_eq!(ran.status.code(), Some(3), "{}", stderr(&ran));
    let failures: Vec<(String, String)> =
        sqlx::query_as("SELECT partition, record_key FROM idem_failures")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert_eq!(failures, [("acct_uk".to_string(), bad.clone())]);
    let metrics = idem::serve::render_metrics(&app.pool).await.unwrap();
    assert!(
        metrics.contains(
            "idem_record_failures{source_system=\"demo_accounts\",stream=\"charges\",partition=\"acct_uk\"} 1"
        ),
        "{metrics}"
    );
    let status = stdout(&accounts_idem(&app, &["status"]).await);
    assert!(status.contains("1 failed record(s) waiting"), "{status}");
    assert!(
        status.contains(&format!("demo_accounts.charges#acct_uk {bad}")),
        "{status}"
    );

    // Fixed at the vendor, the record is stored by its partition's next run and the
    // failure goes.
    app.vendor.set_clock(DEFAULT_CLOCK + 9000);
    assert!(
        app.vendor
            .update_charge("acct_uk", &bad, |c| c["amount"] = 5.into())
    );
    let again = accounts_idem(&app, &run_partition_args("acct_uk")).await;
    assert_eq!(again.status.code(), Some(0), "{}", stderr(&again));
    assert_eq!(app.count("SELECT count(*) FROM idem_failures").await, 0);
    assert_rows_match_vendor(&app).await;
}
