//! `idem check`: the config and connector files validated as a run would read them, the
//! delivery guarantee of the transport, and, with a database, its TLS and missing grants.

use anyhow::Context as _;

use super::{EXIT_FAILED, EXIT_OK, select, usage};
use crate::config::Settings;
use crate::connector::Connector;
use crate::ledger::transport::AnyTransport;
use crate::store;

/// `idem check`: the file permission warnings, every file validated, then the database.
pub(super) async fn check_command(settings: &Settings, insecure: &[String]) -> anyhow::Result<u8> {
    for warning in insecure {
        println!("warning: {warning}");
    }
    let code = check(settings).await?;
    if let Ok(url) = settings.database_url() {
        if let Some(warning) = crate::schedule::connection_warning(&settings.serve, &url).await {
            println!("{warning}");
        }
    }
    Ok(code)
}

/// What `idem check` says about connection poolers (it cannot tell from here).
pub const POOLING_NOTE: &str = "note: one run per stream relies on a Postgres session advisory lock: DATABASE_URL must reach Postgres directly or through a session-mode pool, not a transaction-pooling proxy (PgBouncer pool_mode=transaction), where the lock can stay held by a pooled server connection or be taken twice. Writes stay fenced either way: a run commits only while it owns the stream.";

pub(super) async fn check(settings: &Settings) -> anyhow::Result<u8> {
    let connectors = settings.load_connectors()?;
    for connector in &connectors {
        let streams: Vec<String> = connector
            .spec
            .streams
            .iter()
            .map(|(name, spec)| match &spec.parent {
                Some(parent) => format!("{name} (child of {})", parent.streams.join(", ")),
                None => name.clone(),
            })
            .collect();
        println!(
            "ok  {} ({}): streams {}",
            connector.file.display(),
            connector.spec.source_system,
            streams.join(", ")
        );
    }
    // The rest of idem.toml, as a run or `serve` would read it.
    AnyTransport::from_settings(&settings.notify).map_err(|e| usage(e.to_string()))?;
    for (index, schedule) in settings.serve.schedules.iter().enumerate() {
        select(&connectors, &schedule.streams)
            .with_context(|| format!("serve.schedules[{index}].streams"))?;
    }
    if settings.database_url.is_some() {
        settings.database_url()?;
    }
    println!("{}", transport_guarantee(settings.notify.transport));
    println!(
        "{} connector file(s) valid; notify and serve settings valid",
        connectors.len()
    );
    println!("{POOLING_NOTE}");
    if settings.database_url.is_some() {
        return check_database(settings, &connectors).await;
    }
    Ok(EXIT_OK)
}

/// With a database: how the connection is secured, and which grants (or, with
/// `ddl = "never"`, which schema changes) are missing. Changes nothing.
pub(super) async fn check_database(
    settings: &Settings,
    connectors: &[Connector],
) -> anyhow::Result<u8> {
    let url = settings.database_url()?;
    let target = store::Target::parse(&url)?;
    let pool = store::connect_with(&url, 1, &settings.database.session("idem check")).await?;
    let tls = store::session::tls_status(&pool, &target).await?;
    match (&tls.version, tls.encrypted) {
        (Some(version), true) => println!(
            "database {}: TLS {version} ({}), {}",
            target.describe(),
            tls.cipher.as_deref().unwrap_or("cipher unknown"),
            tls.verified
        ),
        _ => println!(
            "database {}: NOT encrypted{}",
            target.describe(),
            if target.loopback {
                " (loopback)"
            } else {
                "; records and passwords cross the network readable"
            }
        ),
    }
    let ddl_allowed = settings.database.ddl == crate::config::DdlMode::Auto;
    let mut tables = Vec::new();
    for connector in connectors {
        for stream in connector.spec.streams.values() {
            if !tables
                .iter()
                .any(|t: &store::table::DestinationTable| t.name == stream.table)
            {
                tables.push(store::table::DestinationTable::new(
                    &stream.table,
                    &crate::run::children::table_columns(stream),
                ));
            }
        }
    }
    let destinations: Vec<store::grants::Destination> = tables
        .iter()
        .map(|table| store::grants::Destination { table, ddl_allowed })
        .collect();
    let missing = store::grants::missing(&pool, &destinations).await?;
    pool.close().await;
    let mode = if ddl_allowed { "auto" } else { "never" };
    if missing.is_empty() {
        println!(
            "grants: all in place for {} destination table(s) with ddl = \"{mode}\"",
            tables.len()
        );
        return Ok(EXIT_OK);
    }
    println!("grants: {} missing (ddl = \"{mode}\"):", missing.len());
    for line in &missing {
        println!("  {line}");
    }
    Ok(EXIT_FAILED)
}

/// The delivery guarantee of the configured transport, as `idem check` states it.
pub(super) fn transport_guarantee(kind: crate::config::TransportKind) -> &'static str {
    use crate::config::TransportKind;
    match kind {
        TransportKind::Log => {
            "notify: transport = log: NOTHING IS DELIVERED. Rows are written to the log and marked sent for good; after configuring smtp or http, `idem ledger requeue --transport log` sends them"
        }
        TransportKind::Smtp => {
            "notify: transport = smtp: at most once; a send whose outcome is unknown goes to needs_review (resolve it with idem ledger resolve), never out again by itself"
        }
        TransportKind::Http => {
            "notify: transport = http: exactly once; the ledger key is the Idempotency-Key, so an unknown outcome is retried under the same key"
        }
    }
}
