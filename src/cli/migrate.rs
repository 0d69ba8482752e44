//! `idem migrate`: idem's own tables, and with `--tables` every destination table brought
//! to its connector's shape.

use sqlx::PgPool;

use super::{EXIT_OK, connect_creating};
use crate::config::Settings;
use crate::connector::Connector;
use crate::store;

pub(super) async fn migrate(settings: &Settings, tables: bool) -> anyhow::Result<u8> {
    let connectors = if tables {
        settings.load_connectors()?
    } else {
        Vec::new()
    };
    let pool = connect_creating(settings, true).await?;
    store::migrate(&pool).await?;
    println!("migrations applied");
    migrate_tables(&pool, settings, &connectors).await?;
    Ok(EXIT_OK)
}

/// `idem migrate --tables`: brings every destination table to its connector's shape,
/// with the same lock timeout as a run, whatever `ddl` says.
pub(super) async fn migrate_tables(
    pool: &PgPool,
    settings: &Settings,
    connectors: &[Connector],
) -> anyhow::Result<()> {
    let policy = store::table::DdlPolicy {
        allow: true,
        ..settings.database.ddl_policy()
    };
    let mut done: Vec<&str> = Vec::new();
    for connector in connectors {
        for stream in connector.spec.streams.values() {
            if done.contains(&stream.table.as_str()) {
                continue;
            }
            done.push(&stream.table);
            let table = store::table::DestinationTable::new(
                &stream.table,
                &crate::run::children::table_columns(stream),
            )
            .with_indexes(stream.rule_threshold_columns())
            .with_ddl(policy.clone());
            let mut statements = table.missing_ddl(pool).await?;
            statements.extend(table.missing_indexes(pool).await?);
            table.ensure(pool).await?;
            if statements.is_empty() {
                println!("table {}: up to date", stream.table);
            }
            for statement in statements {
                println!("table {}: {statement}", stream.table);
            }
        }
    }
    Ok(())
}
