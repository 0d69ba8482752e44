//! Destination tables: idempotent DDL from the connector's columns, and the set-based
//! page upsert that writes only new and changed rows.

use std::collections::HashMap;

use sqlx::{PgConnection, PgPool, Row as _};
use uuid::Uuid;

use super::{Context, StoreError};
use crate::connector::ColumnSpec;
use crate::normalize::Row;

/// How a page decides that a stored row is unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compare {
    /// The stored content hash equals the new one: cheap, for regular runs.
    Hash,
    /// The stored `data` and typed columns equal the new ones: catches drift made on our
    /// side (a row edited by hand), for replays.
    Content,
}

/// Counts of one page's write.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WriteCounts {
    pub inserted: u64,
    pub updated: u64,
    pub unchanged: u64,
}

/// A destination table and the statements that write it, built once per run.
pub struct DestinationTable {
    pub name: String,
    columns: Vec<ColumnSpec>,
    classify_hash_sql: String,
    classify_content_sql: String,
    upsert_sql: String,
}

fn quote(identifier: &str) -> String {
    format!("\"{}\"", identifier.replace('"', "\"\""))
}

impl DestinationTable {
    pub fn new(name: &str, columns: &[ColumnSpec]) -> Self {
        let table = quote(name);
        let typed: Vec<String> = columns.iter().map(|c| quote(&c.name)).collect();
        let args_from = |first: usize| -> String {
            (0..columns.len())
                .map(|i| format!(", ${}::text[]", i + first))
                .collect()
        };
        let column_aliases: String = (0..columns.len()).map(|i| format!(", c{i}")).collect();
        let casts: String = columns
            .iter()
            .enumerate()
            .map(|(i, c)| format!(", u.c{i}::{}", c.column_type.sql()))
            .collect();
        let insert_columns: String = typed.iter().map(|c| format!(", {c}")).collect();
        let updates: String = typed
            .iter()
            .map(|c| format!(", {c} = EXCLUDED.{c}"))
            .collect();
        let upsert_sql = format!(
            "INSERT INTO {table} (source_system, source_id, source_updated_at, data, content_hash, last_run_id{insert_columns})
             SELECT $1, u.source_id, u.updated_at, u.data::jsonb, u.hash, $2{casts}
             FROM UNNEST($3::text[], $4::timestamptz[], $5::text[], $6::bytea[]{upsert_args}) AS u(source_id, updated_at, data, hash{column_aliases})
             ON CONFLICT (source_system, source_id) DO UPDATE SET
               source_updated_at = EXCLUDED.source_updated_at, data = EXCLUDED.data,
               content_hash = EXCLUDED.content_hash, last_run_id = EXCLUDED.last_run_id,
               last_changed_at = now(), deleted_at = NULL{updates}
             WHERE {table}.source_updated_at IS NULL OR EXCLUDED.source_updated_at IS NULL
                OR EXCLUDED.source_updated_at >= {table}.source_updated_at",
            upsert_args = args_from(7)
        );
        let classify_hash_sql = format!(
            "SELECT t.source_id, t.content_hash = u.hash AND t.deleted_at IS NULL AS same,
                    t.source_updated_at > u.updated_at AS stored_is_newer
             FROM UNNEST($2::text[], $3::bytea[], $4::timestamptz[]) AS u(source_id, hash, updated_at)
             JOIN {table} t ON t.source_system = $1 AND t.source_id = u.source_id"
        );
        let same_columns: String = columns
            .iter()
            .enumerate()
            .map(|(i, c)| {
                format!(
                    " AND t.{} IS NOT DISTINCT FROM u.c{i}::{}",
                    quote(&c.name),
                    c.column_type.sql()
                )
            })
            .collect();
        let classify_content_sql = format!(
            "SELECT t.source_id, t.content_hash = u.hash AND t.deleted_at IS NULL AND t.data = u.data::jsonb{same_columns} AS same,
                    t.source_updated_at > u.updated_at AS stored_is_newer
             FROM UNNEST($2::text[], $3::bytea[], $4::timestamptz[], $5::text[]{content_args}) AS u(source_id, hash, updated_at, data{column_aliases})
             JOIN {table} t ON t.source_system = $1 AND t.source_id = u.source_id",
            content_args = args_from(6)
        );
        Self {
            name: name.to_string(),
            columns: columns.to_vec(),
            classify_hash_sql,
            classify_content_sql,
            upsert_sql,
        }
    }

    /// Creates the table if missing and adds missing typed columns. Idempotent.
    pub async fn ensure(&self, pool: &PgPool) -> Result<(), StoreError> {
        let table = quote(&self.name);
        let lz4: bool = sqlx::query_scalar(
            "SELECT COALESCE(bool_or('lz4' = ANY(enumvals)), false) FROM pg_settings WHERE name = 'default_toast_compression'",
        )
        .fetch_one(pool)
        .await
        .context(|| "checking for lz4 support".into())?;
        // lz4 makes jsonb compression several times cheaper, which is where Postgres
        // spends its time on wide records.
        let compression = if lz4 { " COMPRESSION lz4" } else { "" };
        let create = format!(
            "CREATE TABLE IF NOT EXISTS {table} (
                source_system     text NOT NULL,
                source_id         text NOT NULL,
                data              jsonb{compression} NOT NULL,
                content_hash      bytea NOT NULL,
                source_updated_at timestamptz,
                first_seen_at     timestamptz NOT NULL DEFAULT now(),
                last_changed_at   timestamptz NOT NULL DEFAULT now(),
                last_run_id       uuid,
                deleted_at        timestamptz,
                CONSTRAINT {} UNIQUE (source_system, source_id)
            )",
            quote(&format!("{}_source_key", self.name))
        );
        let mut statements = vec![create];
        statements.extend(self.columns.iter().map(|c| {
            format!(
                "ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {} {}",
                quote(&c.name),
                c.column_type.sql()
            )
        }));
        for statement in statements {
            sqlx::query(&statement)
                .execute(pool)
                .await
                .context(|| format!("creating or evolving table {}", self.name))?;
        }
        self.check_column_types(pool).await
    }

    /// Compares the typed columns' types in Postgres with the connector's. `ADD COLUMN IF
    /// NOT EXISTS` leaves a column whose declared type changed as it was, and every later
    /// upsert would fail (or cast silently): the run stops first and says how to migrate.
    /// idem does not run the ALTER itself: it rewrites the table under an exclusive lock,
    /// and whether the old values convert is the user's call.
    pub async fn check_column_types(&self, pool: &PgPool) -> Result<(), StoreError> {
        let names: Vec<&str> = self.columns.iter().map(|c| c.name.as_str()).collect();
        let declared: Vec<&str> = self.columns.iter().map(|c| c.column_type.sql()).collect();
        let drift: Vec<(String, String, String)> = sqlx::query_as(
            "SELECT c.name, format_type(a.atttypid, a.atttypmod), c.declared::regtype::text
             FROM unnest($2::text[], $3::text[]) WITH ORDINALITY AS c(name, declared, n)
             JOIN pg_attribute a ON a.attrelid = to_regclass($1) AND a.attname = c.name
                                 AND a.attnum > 0 AND NOT a.attisdropped
             WHERE a.atttypid <> c.declared::regtype
             ORDER BY c.n",
        )
        .bind(quote(&self.name))
        .bind(&names)
        .bind(&declared)
        .fetch_all(pool)
        .await
        .context(|| {
            format!(
                "comparing the columns of table {} with the connector",
                self.name
            )
        })?;
        if drift.is_empty() {
            return Ok(());
        }
        let table = quote(&self.name);
        let changes = drift
            .iter()
            .map(|(column, stored, wanted)| {
                let column_sql = quote(column);
                format!(
                    "column {column} is {stored} in Postgres but the connector declares {wanted}; to migrate: ALTER TABLE {table} ALTER COLUMN {column_sql} TYPE {wanted} USING {column_sql}::{wanted};"
                )
            })
            .collect::<Vec<_>>()
            .join(" ");
        Err(StoreError::SchemaDrift {
            table: self.name.clone(),
            changes,
        })
    }

    /// Upserts one page's rows (already de-duplicated by source id): one statement to
    /// find what is new or changed, one to write only those. Unchanged rows are not
    /// touched at all: no row version, no lock, no WAL.
    pub async fn write_page(
        &self,
        connection: &mut PgConnection,
        source_system: &str,
        run_id: Uuid,
        rows: &[Row],
        compare: Compare,
        dry_run: bool,
    ) -> Result<WriteCounts, StoreError> {
        if rows.is_empty() {
            return Ok(WriteCounts::default());
        }
        let ids: Vec<&str> = rows.iter().map(|r| r.source_id.as_str()).collect();
        let hashes: Vec<&[u8]> = rows.iter().map(|r| r.hash.as_slice()).collect();
        let versions: Vec<Option<chrono::DateTime<chrono::Utc>>> =
            rows.iter().map(|r| r.updated_at).collect();
        let existing: HashMap<String, bool> = match compare {
            Compare::Hash => sqlx::query(&self.classify_hash_sql)
                .bind(source_system)
                .bind(&ids)
                .bind(&hashes)
                .bind(&versions),
            Compare::Content => {
                let data: Vec<&str> = rows.iter().map(|r| r.data.as_str()).collect();
                let mut query = sqlx::query(&self.classify_content_sql)
                    .bind(source_system)
                    .bind(&ids)
                    .bind(&hashes)
                    .bind(&versions)
                    .bind(data);
                for index in 0..self.columns.len() {
                    query = query.bind(
                        rows.iter()
                            .map(|r| r.values[index].clone())
                            .collect::<Vec<_>>(),
                    );
                }
                query
            }
        }
        .fetch_all(&mut *connection)
        .await
        .context(|| format!("comparing a page with table {}", self.name))?
        .into_iter()
        .map(|row| {
            // An older version than the stored one is not written: to the caller it is
            // unchanged (the table already holds something newer). Skipping it here keeps
            // the row unlocked; the upsert's WHERE guards against a concurrent writer.
            let same = row.get::<Option<bool>, _>(1).unwrap_or(false);
            let stored_is_newer = row.get::<Option<bool>, _>(2).unwrap_or(false);
            (row.get::<String, _>(0), same || stored_is_newer)
        })
        .collect();

        let mut counts = WriteCounts::default();
        let to_write: Vec<&Row> = rows
            .iter()
            .filter(|row| match existing.get(&row.source_id) {
                Some(true) => {
                    counts.unchanged += 1;
                    false
                }
                Some(false) => {
                    counts.updated += 1;
                    true
                }
                None => {
                    counts.inserted += 1;
                    true
                }
            })
            .collect();
        if to_write.is_empty() || dry_run {
            return Ok(counts);
        }
        let mut query = sqlx::query(&self.upsert_sql)
            .bind(source_system)
            .bind(run_id)
            .bind(
                to_write
                    .iter()
                    .map(|r| r.source_id.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(to_write.iter().map(|r| r.updated_at).collect::<Vec<_>>())
            .bind(to_write.iter().map(|r| r.data.as_str()).collect::<Vec<_>>())
            .bind(
                to_write
                    .iter()
                    .map(|r| r.hash.as_slice())
                    .collect::<Vec<_>>(),
            );
        for index in 0..self.columns.len() {
            query = query.bind(
                to_write
                    .iter()
                    .map(|r| r.values[index].clone())
                    .collect::<Vec<_>>(),
            );
        }
        query
            .execute(&mut *connection)
            .await
            .context(|| format!("upserting a page into table {}", self.name))?;
        Ok(counts)
    }

    /// Marks rows that a completed full walk did not see as deleted at the vendor.
    pub async fn mark_deleted(
        &self,
        connection: &mut PgConnection,
        source_system: &str,
        seen: &[String],
    ) -> Result<u64, StoreError> {
        let sql = format!(
            "UPDATE {} SET deleted_at = now(), last_changed_at = now()
             WHERE source_system = $1 AND deleted_at IS NULL AND NOT (source_id = ANY($2))",
            quote(&self.name)
        );
        let done = sqlx::query(&sql)
            .bind(source_system)
            .bind(seen)
            .execute(connection)
            .await
            .context(|| format!("marking deleted rows of {}", self.name))?;
        Ok(done.rows_affected())
    }
}
