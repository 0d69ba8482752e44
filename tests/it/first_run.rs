//! A first run that explains itself: a missing database is created when the role may,
//! or the error names the command to run; `/readyz` says whether migrations are applied.

use std::time::Duration;

use sqlx::{Connection, PgConnection};

use crate::helpers::admin_url;

fn url_for(database: &str, user: Option<&str>) -> String {
    let mut url = url::Url::parse(&admin_url()).unwrap();
    url.set_path(&format!("/{database}"));
    if let Some(user) = user {
        url.set_username(user).unwrap();
    }
    url.to_string()
}

async fn idem(database_url: &str, args: &[&str]) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("idem.toml");
    let connector =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("connectors/demo_billing.toml");
    std::fs::write(
        &config,
        format!("connectors = [{:?}]\n", connector.display().to_string()),
    )
    .unwrap();
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_idem"))
        .arg("--config")
        .arg(&config)
        .args(args)
        .env("DATABASE_URL", database_url)
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .unwrap()
        .unwrap()
}

async fn admin() -> PgConnection {
    PgConnection::connect(&admin_url()).await.unwrap()
}

#[tokio::test]
async fn first_run_creates_the_database_or_names_the_command() {
    let database = format!("idem_first_{}", uuid::Uuid::new_v4().simple());
    let url = url_for(&database, None);

    let status = idem(&url, &["status"]).await;
    assert_eq!(status.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&status.stderr);
    assert!(
        stderr.contains(&format!(
            "database \"{database}\" does not exist yet: run `idem migrate`"
        )),
        "{stderr}"
    );

    let migrate = idem(&url, &["migrate"]).await;
    let stderr = String::from_utf8_lossy(&migrate.stderr);
    assert_eq!(migrate.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains(&format!("created database \"{database}\"")),
        "{stderr}"
    );
    let again = idem(&url, &["migrate"]).await;
    assert_eq!(again.status.code(), Some(0));
    assert!(!String::from_utf8_lossy(&again.stderr).contains("created database"));
    let mut db = PgConnection::connect(&url).await.unwrap();
    let tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_tables WHERE tablename IN ('idem_runs', 'idem_ledger', 'idem_console_actions')",
    )
    .fetch_one(&mut db)
    .await
    .unwrap();
    assert_eq!(tables, 3);
    db.close().await.unwrap();
    sqlx::query(&format!("DROP DATABASE \"{database}\" WITH (FORCE)"))
        .execute(&mut admin().await)
        .await
        .unwrap();
}

#[tokio::test]
async fn first_run_without_createdb_says_what_an_admin_must_run() {
    let role = format!(
        "idem_nocreate_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let mut admin = admin().await;
    sqlx::query(&format!("CREATE ROLE {role} LOGIN NOCREATEDB"))
        .execute(&mut admin)
        .await
        .unwrap();
    let database = format!("idem_first_{}", uuid::Uuid::new_v4().simple());
    let run = idem(&url_for(&database, Some(&role)), &["run"]).await;
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("role \"{role}\" may not create it"))
            && stderr.contains(&format!("CREATE DATABASE \"{database}\" OWNER \"{role}\";"))
            && stderr.contains("then run `idem migrate`"),
        "{stderr}"
    );
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&database)
            .fetch_one(&mut admin)
            .await
            .unwrap();
    assert!(!exists);
    sqlx::query(&format!("DROP ROLE {role}"))
        .execute(&mut admin)
        .await
        .unwrap();
}
