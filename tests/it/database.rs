//! idem in a database it shares and reaches over a network: no lock when nothing changed,
//! bounded schema changes, named sessions, TLS with verification (against a disposable
//! Postgres cluster whose certificate a CA made here signs), and connection errors.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use idem::store::SessionSettings;
use idem_fakes::{Fault, FaultKind};
use sqlx::{Connection, PgConnection};

use crate::helpers::{TestApp, spawn_app, stderr, stdout};

/// The demo connector with one more typed column, and idem.toml pointing at it.
fn with_new_column(app: &TestApp, database_toml: &str) -> PathBuf {
    app.demo_connector_variant("demo_billing_more", |text| {
        text.replacen(
            "[[streams.invoices.columns]]\nname = \"number\"",
            "[[streams.invoices.columns]]\nname = \"vendor_ref\"\npointer = \"/id\"\ntype = \"text\"\n\n[[streams.invoices.columns]]\nname = \"number\"",
            1,
        )
    });
    let path = app.dir.path().join("demo_billing_more.toml");
    write_config(app, &path, database_toml);
    path
}

fn write_config(app: &TestApp, connector: &Path, database_toml: &str) {
    std::fs::write(
        &app.config_path,
        format!(
            "connectors = [{:?}]\n[notify]\ntransport = \"log\"\n[database]\n{database_toml}",
            connector.display().to_string()
        ),
    )
    .expect("write idem.toml");
}

/// A session like an analyst's: a transaction that has read the table and stays open.
async fn open_reader(app: &TestApp) -> (PgConnection, i32) {
    let mut analyst = PgConnection::connect(&app.database_url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut analyst).await.unwrap();
    let _: i64 = sqlx::query_scalar("SELECT count(*) FROM demo_invoices")
        .fetch_one(&mut analyst)
        .await
        .unwrap();
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut analyst)
        .await
        .unwrap();
    (analyst, pid)
}

async fn column_exists(app: &TestApp, column: &str) -> bool {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_name = 'demo_invoices' AND column_name = $1)",
    )
    .bind(column)
    .fetch_one(&app.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn an_unchanged_run_never_blocks_readers() {
    let app = spawn_app(500).await;
    let first = app.idem(&["run", "--no-notify"]).await;
    assert_eq!(first.status.code(), Some(0), "{}", stderr(&first));
    app.vendor
        .update_invoice("in_000007", |inv| inv["amount_due"] = 4242.into());
    let (mut analyst, _) = open_reader(&app).await;

    // The nightly run starts while the analyst's transaction is open, its pages slow;
    // once it is recorded it is past its start-up (where DDL used to queue).
    app.vendor.inject(Fault::new(
        "/v1/invoices",
        5,
        FaultKind::Delay(Duration::from_millis(400)),
    ));
    let run = app
        .command(&["run", "--no-notify"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while app.count("SELECT count(*) FROM idem_runs").await < 2 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the second run never got past its start-up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut dashboard = PgConnection::connect(&app.database_url).await.unwrap();
    sqlx::query("SET statement_timeout = '2s'")
        .execute(&mut dashboard)
        .await
        .unwrap();
    let answered = Instant::now();
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM demo_invoices")
        .fetch_one(&mut dashboard)
        .await
        .expect("a dashboard's SELECT is answered while the run goes");
    assert_eq!(rows, 500);
    assert!(answered.elapsed() < Duration::from_secs(1));
    let locks: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)
         WHERE l.relation = 'demo_invoices'::regclass AND l.mode = 'AccessExclusiveLock'",
    )
    .fetch_one(&mut dashboard)
    .await
    .unwrap();
    assert_eq!(locks, 0, "a run with nothing to change took a table lock");

    let run = run.wait_with_output().await.unwrap();
    assert_eq!(run.status.code(), Some(0), "{}", stderr(&run));
    // The analyst's transaction was never disturbed.
    let still: i64 = sqlx::query_scalar("SELECT count(*) FROM demo_invoices")
        .fetch_one(&mut analyst)
        .await
        .unwrap();
    assert_eq!(still, 500);
    sqlx::query("COMMIT").execute(&mut analyst).await.unwrap();
    app.assert_matches_vendor().await;
}

#[tokio::test]
async fn a_schema_change_that_cannot_get_its_lock_fails_clearly() {
    let app = spawn_app(120).await;
    let first = app.idem(&["run", "--no-notify"]).await;
    assert_eq!(first.status.code(), Some(0), "{}", stderr(&first));
    with_new_column(&app, "lock_timeout = \"300ms\"\nddl_attempts = 2\n");
    app.vendor
        .update_invoice("in_000003", |inv| inv["amount_due"] = 777.into());
    let runs_before = app.count("SELECT count(*) FROM idem_runs").await;
    let requests_before = app.vendor.request_count("/v1/invoices");
    let (mut analyst, analyst_pid) = open_reader(&app).await;

    let started = Instant::now();
    let blocked = app.idem(&["run", "--no-notify"]).await;
    let took = started.elapsed();
    let text = stderr(&blocked);
    assert_eq!(blocked.status.code(), Some(1), "{text}");
    assert!(
        took < Duration::from_secs(5),
        "2 attempts of 300ms took {took:?}"
    );
    assert!(text.contains("table demo_invoices"), "{text}");
    assert!(text.contains(&format!("pid {analyst_pid}")), "{text}");
    assert!(text.contains("idle in transaction"), "{text}");
    assert!(text.contains("nothing was fetched or written"), "{text}");
    assert!(
        text.contains("ALTER TABLE \"demo_invoices\" ADD COLUMN IF NOT EXISTS \"vendor_ref\" text"),
        "{text}"
    );
    assert_eq!(app.vendor.request_count("/v1/invoices"), requests_before);
    assert_eq!(
        app.count("SELECT count(*) FROM idem_runs").await,
        runs_before
    );
    assert_eq!(
        app.count("SELECT count(*) FROM demo_invoices WHERE (data->>'amount_due')::bigint = 777")
            .await,
        0
    );
    assert!(!column_exists(&app, "vendor_ref").await);

    sqlx::query("COMMIT").execute(&mut analyst).await.unwrap();
    let rerun = app.idem(&["run", "--no-notify"]).await;
    assert_eq!(rerun.status.code(), Some(0), "{}", stderr(&rerun));
    assert!(column_exists(&app, "vendor_ref").await);
    app.assert_matches_vendor().await;
    // The new column fills as records come in again (a replay fills it for all).
    assert_eq!(
        app.count("SELECT count(*) FROM demo_invoices WHERE source_id = 'in_000003' AND vendor_ref = 'in_000003' AND amount_due = 777")
            .await,
        1
    );
}

#[tokio::test]
async fn ddl_never_reports_the_missing_column() {
    let app = spawn_app(40).await;
    let first = app.idem(&["run", "--no-notify"]).await;
    assert_eq!(first.status.code(), Some(0), "{}", stderr(&first));
    with_new_column(&app, "ddl = \"never\"\n");
    let statement = "ALTER TABLE \"demo_invoices\" ADD COLUMN IF NOT EXISTS \"vendor_ref\" text";

    let refused = app.idem(&["run", "--no-notify"]).await;
    let text = stderr(&refused);
    assert_eq!(refused.status.code(), Some(1), "{text}");
    assert!(text.contains(statement), "{text}");
    assert!(text.contains("ddl = \"never\""), "{text}");
    assert!(!column_exists(&app, "vendor_ref").await);

    let check = app.idem(&["check"]).await;
    assert_eq!(check.status.code(), Some(1), "{}", stderr(&check));
    assert!(stdout(&check).contains(statement), "{}", stdout(&check));

    // A role that may alter the table runs the explicit step; the same run then goes
    // through without any DDL of its own.
    let migrate = app.idem(&["migrate", "--tables"]).await;
    assert_eq!(migrate.status.code(), Some(0), "{}", stderr(&migrate));
    assert!(stdout(&migrate).contains(statement), "{}", stdout(&migrate));
    assert!(column_exists(&app, "vendor_ref").await);
    let again = app.idem(&["migrate", "--tables"]).await;
    assert!(
        stdout(&again).contains("table demo_invoices: up to date"),
        "{}",
        stdout(&again)
    );
    let after = app.idem(&["run", "--no-notify"]).await;
    assert_eq!(after.status.code(), Some(0), "{}", stderr(&after));
    let check = app.idem(&["check"]).await;
    assert_eq!(check.status.code(), Some(0), "{}", stdout(&check));
    assert!(
        stdout(&check).contains("grants: all in place"),
        "{}",
        stdout(&check)
    );
}

#[tokio::test]
async fn check_names_the_missing_grants() {
    let app = spawn_app(10).await;
    let first = app.idem(&["run", "--no-notify"]).await;
    assert_eq!(first.status.code(), Some(0), "{}", stderr(&first));
    // Every bookkeeping table but the ledger, whichever tables later migrations add.
    let bookkeeping = app.idem_tables(&["idem_ledger"]).await;
    let role = app
        .role_with(
            "idem_reader",
            &[
                "GRANT SELECT ON demo_invoices, _sqlx_migrations TO {role}".into(),
                format!(
                    "GRANT SELECT, INSERT, UPDATE, DELETE ON {} TO {{role}}",
                    bookkeeping.join(", ")
                ),
                "GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role}".into(),
            ],
        )
        .await;
    let url = role.url.clone();
    let check = app
        .command(&["check"])
        .env("DATABASE_URL", &url)
        .output()
        .await
        .unwrap();
    let text = stdout(&check);
    role.drop_role(&app).await;
    assert_eq!(check.status.code(), Some(1), "{text}{}", stderr(&check));
    assert!(text.contains("grants: 2 missing"), "{text}");
    assert!(
        text.contains("GRANT SELECT, INSERT, UPDATE, DELETE ON idem_ledger"),
        "{text}"
    );
    assert!(
        text.contains("GRANT INSERT, UPDATE ON demo_invoices"),
        "{text}"
    );
}

#[tokio::test]
async fn a_role_with_only_the_documented_grants_runs_the_nightly_import() {
    // README, "Grants": after `idem migrate` by the schema's owner, a role with no CREATE
    // anywhere, DML on idem's tables and the destination table, and SELECT on
    // `_sqlx_migrations` runs the import.
    let app = spawn_app(30).await;
    let first = app.idem(&["migrate", "--tables"]).await;
    assert_eq!(first.status.code(), Some(0), "{}", stderr(&first));
    let bookkeeping = app.idem_tables(&[]).await;
    let role = app
        .role_with(
            "idem_runner",
            &[
                format!(
                    "GRANT SELECT, INSERT, UPDATE, DELETE ON {} TO {{role}}",
                    bookkeeping.join(", ")
                ),
                "GRANT SELECT ON _sqlx_migrations TO {role}".into(),
                "GRANT SELECT, INSERT, UPDATE ON demo_invoices TO {role}".into(),
                "GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role}".into(),
            ],
        )
        .await;
    let url = role.url.clone();
    let run_as_role = || {
        let mut command = app.command(&["run", "--no-notify"]);
        command.env("DATABASE_URL", &url);
        command
    };
    // An upgrade brought a migration this role may not apply: it says who must.
    sqlx::query(
        "DELETE FROM _sqlx_migrations WHERE version = (SELECT max(version) FROM _sqlx_migrations)",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    let refused = run_as_role().output().await.unwrap();
    let migrate = app.idem(&["migrate"]).await;
    let run = run_as_role().output().await.unwrap();
    let rows = app.count("SELECT count(*) FROM demo_invoices").await;
    role.drop_role(&app).await;
    assert_eq!(refused.status.code(), Some(1), "{}", stderr(&refused));
    assert!(
        stderr(&refused).contains("run `idem migrate` once as a role with CREATE on the schema"),
        "{}",
        stderr(&refused)
    );
    assert_eq!(migrate.status.code(), Some(0), "{}", stderr(&migrate));
    assert_eq!(run.status.code(), Some(0), "{}", stderr(&run));
    assert_eq!(rows, 30);
}

#[tokio::test]
async fn an_older_idem_refuses_a_database_a_newer_one_migrated() {
    let app = spawn_app(5).await;
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
         VALUES (99991231000000, 'from a newer idem', true, '\\x00', 0)",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    let run = app.idem(&["run", "--no-notify"]).await;
    assert_eq!(run.status.code(), Some(1), "{}", stderr(&run));
    assert!(
        stderr(&run).contains("99991231000000"),
        "the error should name the unknown migration: {}",
        stderr(&run)
    );
    // Nothing was written: not even the destination table was created.
    assert_eq!(
        app.count("SELECT count(*) FROM pg_tables WHERE tablename = 'demo_invoices'")
            .await,
        0
    );
}

#[tokio::test]
async fn idem_sessions_are_named_in_pg_stat_activity() {
    let app = spawn_app(500).await;
    let run = app.spawn_slow_nightly_run().await;
    let run_id: uuid::Uuid = sqlx::query_scalar("SELECT id FROM idem_runs")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    let database = app.database_url.rsplit('/').next().unwrap().to_string();
    let wanted = format!("idem demo_billing.invoices {run_id}");
    let started = Instant::now();
    let names = loop {
        let names: Vec<String> = sqlx::query_scalar(
            "SELECT application_name FROM pg_stat_activity
             WHERE datname = $1 AND application_name LIKE 'idem %' ORDER BY 1",
        )
        .bind(&database)
        .fetch_all(&app.pool)
        .await
        .unwrap();
        if names.contains(&wanted) && names.iter().any(|n| n == "idem run") {
            break names;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "sessions seen: {names:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(names.iter().all(|n| n.starts_with("idem ")), "{names:?}");
    let run = run.wait_with_output().await.unwrap();
    assert_eq!(run.status.code(), Some(0), "{}", stderr(&run));

    // The limits each session carries.
    let settings = SessionSettings {
        application_name: "idem limits".into(),
        statement_timeout: Duration::from_millis(1500),
        idle_in_transaction_timeout: Duration::from_secs(7),
        connect_timeout: Duration::from_secs(5),
    };
    let pool = idem::store::connect_with(&app.database_url, 1, &settings)
        .await
        .unwrap();
    let (name, statement, idle): (String, String, String) = sqlx::query_as(
        "SELECT current_setting('application_name'), current_setting('statement_timeout'), current_setting('idle_in_transaction_session_timeout')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        (name.as_str(), statement.as_str(), idle.as_str()),
        ("idem limits", "1500ms", "7s")
    );
    let stuck = sqlx::query("SELECT pg_sleep(3)").execute(&pool).await;
    assert!(
        stuck.is_err_and(|e| e.to_string().contains("statement timeout")),
        "a statement outlived statement_timeout"
    );
    pool.close().await;
}

// ---- TLS ----------------------------------------------------------------------------

/// A disposable Postgres cluster with `ssl = on` and a certificate for `names`, signed
/// by a CA made for it. Stopped when dropped.
struct TlsCluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    as_user: Option<String>,
}

impl TlsCluster {
    fn start(names: &[&str]) -> TlsCluster {
        let bin = postgres_bin();
        let dir = tempfile::Builder::new()
            .prefix("idem-tls-pg")
            .tempdir_in("/tmp")
            .unwrap();
        // initdb and postgres refuse to run as root.
        let as_user = (unsafe { libc::geteuid() } == 0).then(|| "postgres".to_string());

        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "idem test CA");
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
        let server_key = rcgen::KeyPair::generate().unwrap();
        let server_params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let server = server_params.signed_by(&server_key, &ca).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.path().join("server.crt"), server.pem()).unwrap();
        std::fs::write(dir.path().join("server.key"), server_key.serialize_pem()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            dir.path().join("server.key"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        if let Some(user) = &as_user {
            for file in ["", "server.crt", "server.key"] {
                let status = Command::new("chown")
                    .arg(user)
                    .arg(dir.path().join(file))
                    .status()
                    .unwrap();
                assert!(status.success(), "chown {file}");
            }
        }
        let data = dir.path().join("data");
        let cluster = |program: &str| {
            let path = bin.join(program);
            match &as_user {
                Some(user) => {
                    let mut command = Command::new("runuser");
                    command.args(["-u", user, "--"]).arg(path);
                    command
                }
                None => Command::new(path),
            }
        };
        let initdb = cluster("initdb")
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .output()
            .unwrap();
        assert!(initdb.status.success(), "initdb: {}", stderr(&initdb));
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let options = format!(
            "-p {port} -k {dir} -c listen_addresses=127.0.0.1 -c fsync=off -c ssl=on -c ssl_cert_file={dir}/server.crt -c ssl_key_file={dir}/server.key",
            dir = dir.path().display()
        );
        let started = cluster("pg_ctl")
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(dir.path().join("postgres.log"))
            .args(["-w", "-t", "30", "-o", &options, "start"])
            .output()
            .unwrap();
        assert!(
            started.status.success(),
            "pg_ctl start: {} {}",
            stderr(&started),
            std::fs::read_to_string(dir.path().join("postgres.log")).unwrap_or_default()
        );
        TlsCluster {
            dir,
            bin,
            port,
            as_user,
        }
    }

    fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    fn url(&self, query: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres?{query}",
            self.port
        )
    }
}

impl Drop for TlsCluster {
    fn drop(&mut self) {
        let pg_ctl = self.bin.join("pg_ctl");
        let data = self.dir.path().join("data");
        let mut command = match &self.as_user {
            Some(user) => {
                let mut command = Command::new("runuser");
                command.args(["-u", user, "--"]).arg(pg_ctl);
                command
            }
            None => Command::new(pg_ctl),
        };
        let _ = command
            .arg("-D")
            .arg(data)
            .args(["-m", "immediate", "-w", "stop"])
            .output();
    }
}

/// The folder of initdb and pg_ctl (the newest installed major version).
fn postgres_bin() -> PathBuf {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|dirs| {
            dirs.filter_map(|d| d.ok().map(|d| d.path().join("bin")))
                .filter(|bin| bin.join("initdb").exists() && bin.join("pg_ctl").exists())
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
        .pop()
        .expect("initdb and pg_ctl under /usr/lib/postgresql/*/bin (install postgresql)")
}

#[tokio::test]
async fn connects_to_postgres_over_verified_tls() {
    let cluster = TlsCluster::start(&["127.0.0.1", "localhost"]);
    let app = spawn_app(150).await;
    let url = cluster.url(&format!(
        "sslmode=verify-full&sslrootcert={}",
        cluster.ca().display()
    ));
    let run = app
        .command(&["run", "--no-notify"])
        .env("DATABASE_URL", &url)
        .output()
        .await
        .unwrap();
    assert_eq!(run.status.code(), Some(0), "{}", stderr(&run));

    let pool = idem::store::connect(&url, 1).await.unwrap();
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM demo_invoices")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, 150);
    let (ssl, version): (bool, Option<String>) =
        sqlx::query_as("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(ssl, "the session is not encrypted");
    assert!(version.is_some_and(|v| v.starts_with("TLSv1.")));
    pool.close().await;

    let check = app
        .command(&["check"])
        .env("DATABASE_URL", &url)
        .output()
        .await
        .unwrap();
    let text = stdout(&check);
    assert_eq!(check.status.code(), Some(0), "{text}{}", stderr(&check));
    assert!(text.contains("TLS TLSv1.3"), "{text}");
    assert!(
        text.contains("certificate verified (CA and host name)"),
        "{text}"
    );
}

#[tokio::test]
async fn a_wrong_server_certificate_is_refused() {
    let cluster = TlsCluster::start(&["db.example.internal"]);
    let app = spawn_app(20).await;
    let url = cluster.url(&format!(
        "sslmode=verify-full&sslrootcert={}",
        cluster.ca().display()
    ));
    let run = app
        .command(&["run", "--no-notify"])
        .env("DATABASE_URL", &url)
        .output()
        .await
        .unwrap();
    let text = stderr(&run);
    assert_eq!(run.status.code(), Some(1), "{text}");
    assert!(
        text.contains(&format!("127.0.0.1:{}, database postgres", cluster.port)),
        "{text}"
    );
    assert!(text.contains("not valid for name"), "{text}");
    assert!(text.contains("a host name the certificate lists"), "{text}");
    assert_eq!(app.vendor.request_count("/v1/invoices"), 0);

    let unverified = idem::store::connect(&cluster.url("sslmode=require"), 1)
        .await
        .unwrap();
    // Nothing reached the server: not even idem's migrations.
    let tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_tables WHERE tablename IN ('demo_invoices', '_sqlx_migrations', 'idem_runs')",
    )
    .fetch_one(&unverified)
    .await
    .unwrap();
    assert_eq!(tables, 0);
    unverified.close().await;
}

#[tokio::test]
async fn connection_errors_name_the_cause_once() {
    let app = spawn_app(1).await;
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cluster = TlsCluster::start(&["127.0.0.1"]);
    let missing = format!("no_such_db_{}", uuid::Uuid::new_v4().simple());
    let cases = [
        (
            format!("postgres://postgres@127.0.0.1:{closed_port}/billing"),
            format!("127.0.0.1:{closed_port}, database billing"),
            "refused",
            "Is Postgres running",
        ),
        (
            cluster.url("sslmode=verify-full"),
            format!("127.0.0.1:{}, database postgres", cluster.port),
            "UnknownIssuer",
            "set sslrootcert=",
        ),
        (
            format!(
                "{}?sslmode=disable",
                app.database_url.replace(
                    &app.database_url.rsplit('/').next().unwrap().to_string(),
                    &missing
                )
            ),
            format!("database \"{missing}\""),
            "does not exist",
            "run `idem migrate`",
        ),
    ];
    // `status`, not `migrate`: migrate would create the missing database.
    for (url, place, cause, hint) in cases {
        let migrate = app
            .command(&["status"])
            .env("DATABASE_URL", &url)
            .output()
            .await
            .unwrap();
        let text = stderr(&migrate);
        assert_eq!(migrate.status.code(), Some(1), "{text}");
        let error = text
            .lines()
            .find(|line| line.starts_with("error:"))
            .unwrap_or_else(|| panic!("no error line:\n{text}"));
        assert_eq!(text.matches("error:").count(), 1, "{text}");
        assert!(error.contains(&place), "{place} missing: {error}");
        assert_eq!(error.matches(cause).count(), 1, "{cause} not once: {error}");
        assert!(error.contains(hint), "{hint} missing: {error}");
        assert!(!error.contains("error occurred while"), "{error}");
    }
}

#[tokio::test]
async fn a_vendor_ca_file_is_read_when_the_connector_loads() {
    let app = spawn_app(1).await;
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = params.self_signed(&key).unwrap();
    std::fs::write(app.dir.path().join("corp-ca.pem"), ca.pem()).unwrap();
    let connector = app.demo_connector_variant("behind_proxy", |text| {
        format!("{text}\n[http]\nca_file = \"corp-ca.pem\"\n")
    });
    assert_eq!(connector.ca_certificates.len(), 1);

    let path = app.dir.path().join("missing_ca.toml");
    let text = std::fs::read_to_string(app.dir.path().join("behind_proxy.toml")).unwrap();
    std::fs::write(&path, text.replace("corp-ca.pem", "nowhere.pem")).unwrap();
    write_config(&app, &path, "");
    let check = app.idem(&["check"]).await;
    assert_eq!(check.status.code(), Some(2), "{}", stderr(&check));
    assert!(
        stderr(&check).contains("http.ca_file") && stderr(&check).contains("nowhere.pem"),
        "{}",
        stderr(&check)
    );
}

/// The columns of `demo_invoices` that lead an index, other than the key's.
async fn indexed_columns(app: &TestApp) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT a.attname::text FROM pg_index i
         JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
         WHERE i.indrelid = 'demo_invoices'::regclass AND NOT i.indisunique
         ORDER BY 1",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_walks_end_reads_new_and_overdue_rows_through_indexes_the_run_builds() {
    let app = spawn_app(40).await;
    let first = app.idem(&["run", "--no-notify"]).await;
    assert_eq!(first.status.code(), Some(0), "{}", stderr(&first));
    // last_changed_at: rows written since the last pass; due_date: the demo rule's
    // `older_than` column, rows that crossed the threshold since.
    assert_eq!(indexed_columns(&app).await, ["due_date", "last_changed_at"]);
}

#[tokio::test]
async fn ddl_never_runs_without_the_indexes_and_names_them_for_the_owner() {
    let app = spawn_app(40).await;
    let first = app.idem(&["run", "--no-notify"]).await;
    assert_eq!(first.status.code(), Some(0), "{}", stderr(&first));
    for name in [
        "demo_invoices_due_date_idx",
        "demo_invoices_last_changed_at_idx",
    ] {
        sqlx::query(&format!("DROP INDEX \"{name}\""))
            .execute(&app.pool)
            .await
            .unwrap();
    }
    let shipped = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("connectors/demo_billing.toml");
    write_config(&app, &shipped, "ddl = \"never\"\n");
    app.vendor
        .update_invoice("in_000002", |inv| inv["amount_due"] = 4242.into());

    let run = app.idem(&["run", "--no-notify"]).await;
    let text = stderr(&run);
    assert_eq!(run.status.code(), Some(0), "{text}");
    // The log line is JSON, its quotes escaped.
    for statement in [
        r#"CREATE INDEX IF NOT EXISTS \"demo_invoices_last_changed_at_idx\" ON \"demo_invoices\" (\"last_changed_at\")"#,
        r#"CREATE INDEX IF NOT EXISTS \"demo_invoices_due_date_idx\" ON \"demo_invoices\" (\"due_date\")"#,
    ] {
        assert!(text.contains(statement), "{text}");
    }
    assert!(text.contains(r#"ddl = \"never\""#), "{text}");
    assert!(indexed_columns(&app).await.is_empty());
    app.assert_matches_vendor().await;

    // `idem migrate --tables` is the owner's way to apply them; it prints what it did.
    let migrate = app.idem(&["migrate", "--tables"]).await;
    assert_eq!(migrate.status.code(), Some(0), "{}", stderr(&migrate));
    assert!(
        stdout(&migrate).contains("CREATE INDEX IF NOT EXISTS \"demo_invoices_due_date_idx\""),
        "{}",
        stdout(&migrate)
    );
    assert_eq!(indexed_columns(&app).await, ["due_date", "last_changed_at"]);
    let again = app.idem(&["run", "--no-notify"]).await;
    assert_eq!(again.status.code(), Some(0), "{}", stderr(&again));
    assert!(
        !stderr(&again).contains("CREATE INDEX"),
        "{}",
        stderr(&again)
    );
}

/// When the destination table's statistics were last taken (`None`: never).
async fn analyzed_at(app: &TestApp) -> Option<String> {
    sqlx::query_scalar(
        "SELECT COALESCE(last_analyze, last_autoanalyze)::text FROM pg_stat_user_tables WHERE relname = 'demo_invoices'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_first_import_leaves_statistics_for_the_planner_and_a_no_op_run_does_not_retake_them() {
    let app = spawn_app(1_200).await;
    // A table autovacuum leaves alone (off, or not come round yet) has none otherwise; the
    // walk's end would plan its rule pass blind.
    let migrate = app.idem(&["migrate", "--tables"]).await;
    assert_eq!(migrate.status.code(), Some(0), "{}", stderr(&migrate));
    sqlx::query("ALTER TABLE demo_invoices SET (autovacuum_enabled = false)")
        .execute(&app.pool)
        .await
        .unwrap();
    let first = app.idem(&["run", "--no-notify"]).await;
    assert_eq!(first.status.code(), Some(0), "{}", stderr(&first));
    let taken = analyzed_at(&app).await;
    assert!(
        taken.is_some(),
        "a 1,200-row import left the table without statistics"
    );

    let again = app.idem(&["run", "--no-notify"]).await;
    assert_eq!(again.status.code(), Some(0), "{}", stderr(&again));
    assert_eq!(analyzed_at(&app).await, taken);
}

#[tokio::test]
async fn a_refused_connection_fails_the_run_at_once_naming_the_cause() {
    let app = spawn_app(1).await;
    // A port nothing listens on: the pool's own sessions would retry it until their
    // acquire timeout (10 s); the run must not wait for them.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let started = Instant::now();
    let out = app
        .command(&["run", "--no-notify"])
        .env(
            "DATABASE_URL",
            format!("postgresql://postgres@127.0.0.1:{port}/nowhere"),
        )
        .output()
        .await
        .unwrap();
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("Connection refused"), "{text}");
    assert!(text.contains(&format!("127.0.0.1:{port}")), "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?} to report a refused connection",
        started.elapsed()
    );
}
