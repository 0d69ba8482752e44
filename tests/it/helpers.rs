//! `spawn_app()`: a fresh database, a seeded fake vendor, a config pointing at both, and
//! ways to run idem in-process or as the real binary.

use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use idem::connector::Connector;
use idem::http::{HttpSource, VendorClient};
use idem::run::{self, Mode, RunOptions, RunReport};
use idem_fakes::{FakeVendor, Fault, FaultKind};
use sqlx::{Connection, PgConnection, PgPool};

/// The server tests create their databases on: `DATABASE_URL`, or the local default.
pub fn admin_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

fn url_for(database: &str) -> String {
    let mut url = url::Url::parse(&admin_url()).expect("DATABASE_URL is a URL");
    url.set_path(&format!("/{database}"));
    url.to_string()
}

pub struct TestApp {
    pub vendor: FakeVendor,
    pub pool: PgPool,
    pub database_url: String,
    database: String,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
}

/// A fresh database and a fake vendor with `invoices` seeded; idem.toml uses the shipped
/// demo connector and the log transport.
pub async fn spawn_app(invoices: usize) -> TestApp {
    spawn_app_with(invoices, "[notify]\ntransport = \"log\"\n").await
}

pub async fn spawn_app_with(invoices: usize, notify_toml: &str) -> TestApp {
    let vendor = FakeVendor::start().await;
    vendor.require_bearer("sk_test_demo");
    vendor.seed_invoices(invoices);
    let database = format!("idem_test_{}", uuid::Uuid::new_v4().simple());
    let mut admin = PgConnection::connect(&admin_url())
        .await
        .expect("connect to the test Postgres (see README: scripts/test.sh)");
    sqlx::query(&format!("CREATE DATABASE \"{database}\""))
        .execute(&mut admin)
        .await
        .expect("create test database");
    admin.close().await.ok();
    let database_url = url_for(&database);
    let pool = idem::store::connect(&database_url, 4)
        .await
        .expect("connect to the test database");
    idem::store::migrate(&pool).await.expect("migrate");
    let dir = tempfile::tempdir().expect("tempdir");
    let connector = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("connectors/demo_billing.toml");
    let config_path = dir.path().join("idem.toml");
    std::fs::write(
        &config_path,
        format!(
            "connectors = [{:?}]\n{notify_toml}",
            connector.display().to_string()
        ),
    )
    .expect("write idem.toml");
    TestApp {
        vendor,
        pool,
        database_url,
        database,
        dir,
        config_path,
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        let database = self.database.clone();
        // Drop the database on a thread of its own: Drop cannot await. FORCE ends this
        // test's pooled connections; closing the pool here could wait on this very runtime.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                if let Ok(mut admin) = PgConnection::connect(&admin_url()).await {
                    let _ = sqlx::query(&format!(
                        "DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)"
                    ))
                    .execute(&mut admin)
                    .await;
                }
            })
        })
        .join();
    }
}

impl TestApp {
    /// The env a subprocess or an in-process load sees.
    pub fn env(&self, name: &str) -> Option<String> {
        match name {
            "DEMO_BILLING_URL" => Some(self.vendor.base_url()),
            "DATABASE_URL" => Some(self.database_url.clone()),
            _ => std::env::var(name).ok(),
        }
    }

    pub fn connector(&self) -> Connector {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("connectors/demo_billing.toml");
        idem::connector::load_file_with(&path, &|name| self.env(name))
            .expect("demo connector loads")
    }

    /// The demo connector with its text changed by `edit` (which must change it), as a
    /// variant a test runs in-process.
    pub fn demo_connector_variant(
        &self,
        name: &str,
        edit: impl FnOnce(&str) -> String,
    ) -> Connector {
        let shipped =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("connectors/demo_billing.toml");
        let text = std::fs::read_to_string(shipped).expect("read the demo connector");
        let changed = edit(&text);
        assert_ne!(changed, text, "the variant {name} changes nothing");
        let path = self.dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, changed).expect("write the connector variant");
        idem::connector::load_file_with(&path, &|var| self.env(var)).expect("the variant loads")
    }

    /// One run of `demo_billing.invoices` in this process.
    pub async fn run_invoices(&self, mode: Mode) -> RunReport {
        self.run_connector(&self.connector(), "invoices", mode, false)
            .await
    }

    pub async fn run_connector(
        &self,
        connector: &Connector,
        stream: &str,
        mode: Mode,
        dry_run: bool,
    ) -> RunReport {
        self.run_connector_with(connector, stream, &RunOptions::new(mode, dry_run))
            .await
    }

    /// `run_connector` with options of the test's own (e.g. one page per transaction).
    pub async fn run_connector_with(
        &self,
        connector: &Connector,
        stream: &str,
        options: &RunOptions,
    ) -> RunReport {
        let source = HttpSource::new(
            VendorClient::new(connector.clone()),
            connector.stream(stream).expect("stream").clone(),
        );
        run::run_stream(&self.pool, connector, stream, source, options)
            .await
            .expect("the run starts")
    }

    /// The real binary, with this app's config, database and vendor.
    pub fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_idem"));
        command
            .arg("--config")
            .arg(&self.config_path)
            .arg("--log-format")
            .arg("json")
            .args(args)
            .env("DATABASE_URL", &self.database_url)
            .env("DEMO_BILLING_URL", self.vendor.base_url())
            .env_remove("IDEM_CRASH_AT")
            .kill_on_drop(true);
        command
    }

    pub async fn idem(&self, args: &[&str]) -> Output {
        tokio::time::timeout(Duration::from_secs(120), self.command(args).output())
            .await
            .expect("idem finishes within 2 minutes")
            .expect("idem runs")
    }

    /// Starts `idem run` as a process whose pages are slow (the vendor delays them), and
    /// returns once it holds the stream's lock (its run is recorded), so another run can
    /// collide with it.
    pub async fn spawn_slow_nightly_run(&self) -> tokio::process::Child {
        self.vendor.inject(Fault::new(
            "/v1/invoices",
            5,
            FaultKind::Delay(Duration::from_millis(400)),
        ));
        let child = self
            .command(&["run", "--no-notify"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("idem starts");
        let started = tokio::time::Instant::now();
        while self.count("SELECT count(*) FROM idem_runs").await == 0 {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "the slow run never started"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        child
    }

    /// The bookkeeping tables `idem migrate` made here (`idem_*`), but `except`.
    pub async fn idem_tables(&self, except: &[&str]) -> Vec<String> {
        let all: Vec<String> = sqlx::query_scalar(
            "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' AND tablename LIKE 'idem\\_%'",
        )
        .fetch_all(&self.pool)
        .await
        .unwrap();
        all.into_iter()
            .filter(|t| !except.contains(&t.as_str()))
            .collect()
    }

    /// A login role without superuser, CREATEDB or CREATE on the schema, given `grants`
    /// (statements where `{role}` stands for its name). Roles outlive the test's database:
    /// [`TestRole::drop_role`] revokes and drops it.
    pub async fn role_with(&self, prefix: &str, grants: &[String]) -> TestRole {
        let name = format!("{prefix}_{}", uuid::Uuid::new_v4().simple());
        let mut statements = vec![
            format!("CREATE ROLE {name} LOGIN"),
            format!("REVOKE CREATE ON SCHEMA public FROM {name}"),
        ];
        statements.extend(grants.iter().map(|g| g.replace("{role}", &name)));
        for statement in statements {
            sqlx::query(&statement).execute(&self.pool).await.unwrap();
        }
        let url = self
            .database_url
            .replacen("postgres@", &format!("{name}@"), 1);
        TestRole { name, url }
    }

    pub async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sql)
            .fetch_one(&self.pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// Asserts `demo_invoices` holds exactly the vendor's invoices, each once.
    pub async fn assert_matches_vendor(&self) {
        self.assert_table_matches_vendor("demo_invoices").await;
    }

    /// Asserts `table` holds exactly the vendor's invoices (as raw `data`), each once.
    pub async fn assert_table_matches_vendor(&self, table: &str) {
        let stored: Vec<(String, serde_json::Value)> = sqlx::query_as(&format!(
            "SELECT source_id, data FROM {table} ORDER BY source_id"
        ))
        .fetch_all(&self.pool)
        .await
        .expect("read invoices");
        let truth: Vec<(String, serde_json::Value)> = self
            .vendor
            .invoices()
            .into_iter()
            .map(|inv| (inv["id"].as_str().unwrap().to_string(), inv))
            .collect();
        assert_eq!(
            stored.len(),
            truth.len(),
            "row count differs from the vendor's"
        );
        for ((id, data), (truth_id, truth_data)) in stored.iter().zip(&truth) {
            assert_eq!(id, truth_id);
            assert!(
                data == truth_data,
                "invoice {id} differs from the vendor's: stored updated={} amount_due={} status={}, vendor updated={} amount_due={} status={}",
                data["updated"],
                data["amount_due"],
                data["status"],
                truth_data["updated"],
                truth_data["amount_due"],
                truth_data["status"]
            );
        }
        let distinct = self
            .count(&format!(
                "SELECT count(DISTINCT (source_system, source_id)) FROM {table}"
            ))
            .await;
        assert_eq!(distinct as usize, truth.len(), "duplicates in {table}");
    }
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A role made by [`TestApp::role_with`], and the `DATABASE_URL` that logs in as it.
pub struct TestRole {
    pub name: String,
    pub url: String,
}

impl TestRole {
    pub async fn drop_role(self, app: &TestApp) {
        let role = self.name;
        for statement in [
            format!("REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {role}"),
            format!("REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM {role}"),
            format!("DROP ROLE {role}"),
        ] {
            sqlx::query(&statement).execute(&app.pool).await.unwrap();
        }
    }
}
