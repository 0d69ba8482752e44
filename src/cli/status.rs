//! `idem status`: checkpoints, recent runs and stored failures per stream, as text or JSON.

use serde_json::json;
use sqlx::PgPool;

use super::EXIT_OK;
use crate::connector::Connector;
use crate::duration::HumanDuration;
use crate::store;

pub(super) async fn status(
    pool: &PgPool,
    connectors: &[Connector],
    lag_alert: HumanDuration,
    json: bool,
) -> anyhow::Result<u8> {
    let checkpoints = store::state::list_checkpoints(pool, None).await?;
    let runs = store::state::recent_runs(pool, None, 5).await?;
    let failures: Vec<(String, String, String, String, i32)> = sqlx::query_as(
        "SELECT source_system, CASE WHEN partition = '' THEN stream ELSE stream || '#' || partition END,
                record_key, error, attempts FROM idem_failures ORDER BY 1, 2, 3",
    )
    .fetch_all(pool)
    .await?;
    let ledger = crate::ledger::counts_by_status(pool).await?;
    if json {
        let value = json!({
            "streams": connectors.iter().flat_map(|c| c.spec.streams.keys().map(move |s| format!("{}.{s}", c.spec.source_system))).collect::<Vec<_>>(),
            "partitions": connectors.iter().flat_map(|c| c.spec.streams.iter().filter_map(move |(s, spec)| {
                spec.partitions.as_ref().map(|p| (format!("{}.{s}", c.spec.source_system), json!(p.values)))
            })).collect::<serde_json::Map<_, _>>(),
            "checkpoints": checkpoints,
            "runs": runs,
            "failures": failures.iter().map(|(ss, st, key, error, attempts)| json!({
                "source_system": ss, "stream": st, "record_key": key, "error": error, "attempts": attempts })).collect::<Vec<_>>(),
            "ledger": ledger.iter().map(|(s, n)| (s.clone(), json!(n))).collect::<serde_json::Map<_, _>>(),
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(EXIT_OK);
    }
    let rows = crate::console::overview(pool, connectors, lag_alert, &Default::default()).await?;
    // Vendor text (cursors, errors) cannot drive the terminal; the table's own newlines stay.
    for line in crate::console::table::render(&rows).lines() {
        println!("{}", crate::redact::for_terminal(line));
    }
    if runs.iter().any(|r| r.error.is_some()) {
        println!("Last errors");
        for r in runs.iter().filter(|r| r.error.is_some()).take(5) {
            println!(
                "  {}.{} {} {} {}: {}",
                r.source_system,
                r.stream,
                r.mode,
                r.status,
                r.started_at.to_rfc3339(),
                crate::redact::for_terminal(&crate::redact::redact(
                    r.error.as_deref().unwrap_or_default()
                ))
            );
        }
    }
    println!("Record failures: {}", failures.len());
    for (ss, st, key, error, attempts) in failures.iter().take(20) {
        println!(
            "  {ss}.{st} {} (attempts {attempts}): {}",
            crate::redact::for_terminal(key),
            crate::redact::for_terminal(&crate::redact::redact(error))
        );
    }
    let counts: Vec<String> = ledger.iter().map(|(s, n)| format!("{s} {n}")).collect();
    println!(
        "Ledger: {}",
        if counts.is_empty() {
            "empty".to_string()
        } else {
            counts.join(", ")
        }
    );
    Ok(EXIT_OK)
}
