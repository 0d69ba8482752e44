//! Least privilege: which grants idem's role lacks for its bookkeeping tables and for
//! each destination table, in the configured DDL mode (`idem check` prints them).

use sqlx::PgPool;

use super::table::DestinationTable;
use super::{Context, StoreError};

/// One destination table to check, and whether idem may change its schema.
pub struct Destination<'a> {
    pub table: &'a DestinationTable,
    pub ddl_allowed: bool,
}

/// Every missing grant or schema change, one sentence each (empty: all is in place).
pub async fn missing(
    pool: &PgPool,
    destinations: &[Destination<'_>],
) -> Result<Vec<String>, StoreError> {
    let mut missing = Vec::new();
    // Bookkeeping: idem's own tables and sequences, created by `idem migrate`.
    let rows: Vec<(String, bool, bool, bool, bool)> = sqlx::query_as(
        "SELECT c.relname::text,
                has_table_privilege(c.oid, 'SELECT'), has_table_privilege(c.oid, 'INSERT'),
                has_table_privilege(c.oid, 'UPDATE'), has_table_privilege(c.oid, 'DELETE')
         FROM pg_class c
         WHERE c.relkind IN ('r', 'p') AND pg_table_is_visible(c.oid)
           AND (c.relname LIKE 'idem\\_%' OR c.relname = '_sqlx_migrations')
         ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .context(|| "checking privileges on idem's tables".into())?;
    for (name, select, insert, update, delete) in rows {
        // `_sqlx_migrations` is only read once `idem migrate` has run as its owner.
        let writes = name != "_sqlx_migrations";
        let lacking: Vec<&str> = [
            ("SELECT", select),
            ("INSERT", insert || !writes),
            ("UPDATE", update || !writes),
            ("DELETE", delete || !writes),
        ]
        .into_iter()
        .filter(|(_, held)| !held)
        .map(|(p, _)| p)
        .collect();
        if !lacking.is_empty() {
            missing.push(format!(
                "GRANT {} ON {name} TO CURRENT_USER  -- idem's bookkeeping",
                lacking.join(", ")
            ));
        }
    }
    let sequences: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_class c
         WHERE c.relkind = 'S' AND pg_table_is_visible(c.oid) AND c.relname LIKE 'idem\\_%'
           AND CASE WHEN c.relkind = 'S' THEN NOT has_sequence_privilege(c.oid, 'USAGE') ELSE false END",
    )
    .fetch_all(pool)
    .await
    .context(|| "checking privileges on idem's sequences".into())?;
    for name in sequences {
        missing.push(format!(
            "GRANT USAGE ON SEQUENCE {name} TO CURRENT_USER  -- idem's bookkeeping"
        ));
    }

    for destination in destinations {
        let table = destination.table;
        let row: Option<(bool, bool, bool, bool)> = sqlx::query_as(
            "SELECT has_table_privilege(c.oid, 'SELECT'), has_table_privilege(c.oid, 'INSERT'),
                    has_table_privilege(c.oid, 'UPDATE'), pg_has_role(c.relowner, 'USAGE')
             FROM pg_class c WHERE c.oid = to_regclass($1)",
        )
        .bind(format!("\"{}\"", table.name.replace('"', "\"\"")))
        .fetch_optional(pool)
        .await
        .context(|| format!("checking privileges on table {}", table.name))?;
        let changes = table.missing_ddl(pool).await?;
        match row {
            Some((select, insert, update, owner)) => {
                let lacking: Vec<&str> =
                    [("SELECT", select), ("INSERT", insert), ("UPDATE", update)]
                        .into_iter()
                        .filter(|(_, held)| !held)
                        .map(|(p, _)| p)
                        .collect();
                if !lacking.is_empty() {
                    missing.push(format!(
                        "GRANT {} ON {} TO CURRENT_USER  -- writing the destination table",
                        lacking.join(", "),
                        table.name
                    ));
                }
                if !changes.is_empty() {
                    if !destination.ddl_allowed {
                        missing.push(format!(
                            "{}  -- needed by the connector; ddl = \"never\", so run it as the table's owner",
                            changes.join("; ")
                        ));
                    } else if !owner {
                        missing.push(format!(
                            "{}  -- needed by the connector; only the table's owner may run it (ddl = \"auto\")",
                            changes.join("; ")
                        ));
                    }
                }
            }
            None => {
                let (schema, can_create): (String, bool) = sqlx::query_as(
                    "SELECT current_schema()::text, has_schema_privilege(current_schema(), 'CREATE')",
                )
                        .fetch_one(pool)
                        .await
                        .context(|| "checking the CREATE privilege on the schema".into())?;
                if !destination.ddl_allowed {
                    missing.push(format!(
                        "table {} does not exist and ddl = \"never\": create it as its owner, then GRANT SELECT, INSERT, UPDATE ON {} TO idem's role:\n  {}",
                        table.name,
                        table.name,
                        changes.join(";\n  ")
                    ));
                } else if !can_create {
                    missing.push(format!(
                        "GRANT CREATE ON SCHEMA {schema} TO CURRENT_USER  -- to create table {} (ddl = \"auto\")",
                        table.name
                    ));
                }
            }
        }
    }
    Ok(missing)
}
