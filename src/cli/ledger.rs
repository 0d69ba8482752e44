//! `idem notify` and `idem ledger`: one pass of the dispatcher over due reminders, and the
//! operator's commands on ledger rows (list, show, requeue, resolve).

use sqlx::PgPool;

use super::{EXIT_OK, EXIT_PARTIAL, LedgerCommand, connect, usage};
use crate::config::Settings;
use crate::ledger::dispatch::{DispatchReport, DispatchSettings, Dispatcher};
use crate::ledger::transport::AnyTransport;

pub(super) async fn notify_command(settings: &Settings, json: bool) -> anyhow::Result<u8> {
    let transport =
        AnyTransport::from_settings(&settings.notify).map_err(|e| usage(e.to_string()))?;
    let pool = connect(settings).await?;
    let report = notify(&pool, settings, &transport).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{}", notify_summary(&report));
    }
    Ok(if report.failed + report.needs_review > 0 {
        EXIT_PARTIAL
    } else {
        EXIT_OK
    })
}

pub(super) async fn notify(
    pool: &PgPool,
    settings: &Settings,
    transport: &AnyTransport,
) -> anyhow::Result<DispatchReport> {
    let dispatcher = Dispatcher::new(
        pool,
        transport,
        DispatchSettings::from_config(&settings.notify),
    );
    let bar = crate::progress::NotifyBar::start(pool).await;
    let report = dispatcher.run_once().await;
    if let Some(bar) = bar {
        bar.finish();
    }
    Ok(report?)
}

pub(super) fn notify_summary(report: &DispatchReport) -> String {
    let mut line = format!(
        "notifications: {} sent, {} to retry later, {} failed, {} need review",
        report.sent, report.retry_later, report.failed, report.needs_review
    );
    if report.cancelled > 0 {
        line.push_str(&format!(
            ", {} cancelled (their reason was gone; see idem ledger list --status cancelled)",
            report.cancelled
        ));
    }
    if report.logged_only > 0 {
        line.push_str(&format!(
            "\n  log transport: NOTHING WAS DELIVERED. {} row(s) were only written to the log and are now marked sent; configure [notify] transport = \"smtp\" or \"http\" and run `idem ledger requeue --transport log` to send them",
            report.logged_only
        ));
    }
    line
}

pub(super) async fn ledger_command(
    pool: &PgPool,
    settings: &Settings,
    command: LedgerCommand,
) -> anyhow::Result<u8> {
    match command {
        LedgerCommand::List {
            status,
            limit,
            json,
        } => {
            let rows = crate::ledger::list(pool, status.as_deref(), limit).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else if rows.is_empty() {
                println!(
                    "no ledger rows{}",
                    status.map_or(String::new(), |s| format!(" with status {s}"))
                );
            } else {
                for row in rows {
                    println!(
                        "{:<13} {:<45} to {} (attempts {}{}){}",
                        row.status,
                        row.key,
                        row.recipient,
                        row.attempts,
                        row.transport
                            .as_deref()
                            .map_or(String::new(), |t| format!(", via {t}")),
                        row.last_error.map_or(String::new(), |e| format!(
                            ": {}",
                            crate::redact::for_terminal(&e)
                        ))
                    );
                }
            }
            Ok(EXIT_OK)
        }
        LedgerCommand::Show { key } => match crate::ledger::get(pool, &key).await? {
            Some(row) => {
                println!("{}", serde_json::to_string_pretty(&row)?);
                Ok(EXIT_OK)
            }
            None => Err(usage(format!("no ledger row with key '{key}'"))),
        },
        LedgerCommand::Requeue { transport } => requeue(pool, settings, &transport).await,
        LedgerCommand::Resolve { key, resolution } => {
            match crate::ledger::resolve(pool, &key, resolution).await {
                Ok(row) => {
                    println!("{}: now {}", row.key, row.status);
                    Ok(EXIT_OK)
                }
                Err(err) => Err(usage(err.to_string())),
            }
        }
    }
}

pub(super) async fn requeue(
    pool: &PgPool,
    settings: &Settings,
    transport: &str,
) -> anyhow::Result<u8> {
    let filter = match transport {
        "log" | "smtp" | "http" => Some(transport),
        "unrecorded" => None,
        other => {
            return Err(usage(format!(
                "--transport must be log, smtp, http or unrecorded, not '{other}'"
            )));
        }
    };
    if settings.notify.transport == crate::config::TransportKind::Log {
        return Err(usage(
            "the configured transport is log, which delivers nothing: configure [notify] transport = \"smtp\" or \"http\" first".into(),
        ));
    }
    let keys = crate::ledger::requeue_sent_by(pool, filter).await?;
    for key in &keys {
        println!("requeued {key}");
    }
    println!(
        "{} row(s) sent by the {transport} transport are pending again; each is re-checked against its record before it is sent",
        keys.len()
    );
    Ok(EXIT_OK)
}
