//! `idem serve`: schedules run, health and metrics answer, SIGTERM stops it cleanly.

use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::helpers::spawn_app_with;

const SERVE_CONFIG: &str = r#"[notify]
transport = "log"

[serve]
listen = "127.0.0.1:0"
notify_every = "200ms"
schedules = [{ streams = ["demo_billing.invoices"], every = "300ms" }]
"#;

#[tokio::test]
async fn serve_runs_on_schedule_reports_health_and_metrics_and_stops_on_sigterm() {
    let app = spawn_app_with(150, SERVE_CONFIG).await;
    let mut child = app
        .command(&["serve"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let banner = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let health_url = banner
        .split_whitespace()
        .map(|w| w.trim_end_matches(','))
        .find(|w| w.ends_with("/healthz"))
        .expect("banner names /healthz")
        .to_string();
    let metrics_url = health_url.replace("/healthz", "/metrics");

    let wait_for = |sql: &'static str, want: i64| {
        let app = &app;
        async move {
            let started = tokio::time::Instant::now();
            while app.count(sql).await < want {
                assert!(
                    started.elapsed() < Duration::from_secs(20),
                    "timed out waiting for: {sql} >= {want}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    wait_for(
        "SELECT count(*) FROM idem_runs WHERE status = 'succeeded'",
        2,
    )
    .await;
    assert_eq!(app.count("SELECT count(*) FROM demo_invoices").await, 150);

    let health = reqwest::get(&health_url).await.unwrap();
    assert_eq!(health.status(), 200);
    let metrics = reqwest::get(&metrics_url)
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(r#"idem_records_total{source_system="demo_billing",stream="invoices",outcome="inserted"} 150"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"idem_runs_total{source_system="demo_billing",stream="invoices",mode="run",status="succeeded"}"#), "{metrics}");

    // The schedule keeps running: a change at the vendor lands without anyone asking.
    app.vendor
        .update_invoice("in_000007", |inv| inv["amount_due"] = json!(4242));
    wait_for(
        "SELECT count(*) FROM demo_invoices WHERE amount_due = 4242",
        1,
    )
    .await;

    // SAFETY: kill(2) with a pid we spawned has no memory-safety preconditions.
    unsafe {
        libc::kill(child.id().unwrap() as i32, libc::SIGTERM);
    }
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .expect("serve stops after SIGTERM")
        .unwrap();
    assert_eq!(status.code(), Some(0));
    assert_eq!(
        app.count("SELECT count(*) FROM idem_runs WHERE status = 'running'")
            .await,
        0
    );
    app.assert_matches_vendor().await;
}
