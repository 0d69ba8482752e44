//! Reminder rules: which records need a side effect, and the ledger rows that say so.
//!
//! A rule's conditions are data (column, test, value) compiled to SQL with bound
//! parameters, never SQL text from a config file. Matching is set-based over the
//! destination table; each match is rendered once into a frozen ledger row whose key is
//! the side effect's business identity, inserted with `ON CONFLICT DO NOTHING`.

use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, Row as _};
use tracing::{info, warn};

use crate::schema::connector::{ColumnSpec, ColumnType, StreamSpec};
use crate::schema::notify::template_env;
pub use crate::schema::notify::{Condition, RuleSpec, stream_rule_problems};
use crate::store::{Context, StoreError};

fn quote(identifier: &str) -> String {
    format!("\"{}\"", identifier.replace('"', "\"\""))
}

fn literal(value: &toml::Value) -> String {
    match value {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// One condition of a rule compiled to data: frozen into each ledger row (`condition`) so
/// the dispatcher can re-check it on the record's current row right before sending,
/// without the connector files and without SQL text in the database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    /// The typed column tested.
    pub column: String,
    /// The column's SQL type (one of [`ColumnType::sql`]); values are cast to it.
    pub sql_type: String,
    /// The test.
    pub test: Test,
}

/// What a [`Check`] tests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Test {
    Eq { value: String },
    Ne { value: String },
    In { values: Vec<String> },
    OlderThan { ms: u64 },
    NewerThan { ms: u64 },
    IsNull { is_null: bool },
}

/// Why a frozen condition cannot be turned into SQL (a row written by something else).
#[derive(Debug, thiserror::Error)]
#[error("ledger condition on column '{column}' has unknown type '{sql_type}'")]
pub struct UnknownType {
    pub column: String,
    pub sql_type: String,
}

const SQL_TYPES: &[ColumnType] = &[
    ColumnType::Text,
    ColumnType::Bigint,
    ColumnType::Integer,
    ColumnType::Numeric,
    ColumnType::Double,
    ColumnType::Boolean,
    ColumnType::Timestamptz,
    ColumnType::Date,
    ColumnType::Jsonb,
];

impl Check {
    /// The SQL clause on table alias `alias`, pushing its values onto `binds` (placeholders
    /// are numbered after `offset` fixed parameters). The type is checked against the
    /// known column types, so a tampered row cannot inject SQL.
    pub fn clause(&self, alias: &str, offset: usize, binds: &mut Vec<String>) -> String {
        let cast = SQL_TYPES
            .iter()
            .map(|t| t.sql())
            .find(|t| *t == self.sql_type)
            .unwrap_or("text");
        let mut bind = |value: String| {
            binds.push(value);
            format!("${}", binds.len() + offset)
        };
        let column = format!("{alias}.{}", quote(&self.column));
        match &self.test {
            Test::Eq { value } => format!("{column} = CAST({} AS {cast})", bind(value.clone())),
            Test::Ne { value } => format!(
                "{column} IS DISTINCT FROM CAST({} AS {cast})",
                bind(value.clone())
            ),
            Test::In { values } => {
                let placeholders: Vec<String> = values
                    .iter()
                    .map(|v| format!("CAST({} AS {cast})", bind(v.clone())))
                    .collect();
                if placeholders.is_empty() {
                    "false".into()
                } else {
                    format!("{column} IN ({})", placeholders.join(", "))
                }
            }
            Test::OlderThan { ms } => format!(
                "{column} < now() - CAST({} AS interval)",
                bind(format!("{ms} milliseconds"))
            ),
            Test::NewerThan { ms } => format!(
                "{column} >= now() - CAST({} AS interval)",
                bind(format!("{ms} milliseconds"))
            ),
            Test::IsNull { is_null } => {
                format!("{column} IS {}NULL", if *is_null { "" } else { "NOT " })
            }
        }
    }

    /// Fails on a type this version does not know (the clause would fall back to text).
    pub fn verify(&self) -> Result<(), UnknownType> {
        if SQL_TYPES.iter().any(|t| t.sql() == self.sql_type) {
            Ok(())
        } else {
            Err(UnknownType {
                column: self.column.clone(),
                sql_type: self.sql_type.clone(),
            })
        }
    }
}

/// A rule's conditions as data; conditions on undeclared columns were refused by
/// validation and are skipped here.
pub fn compile(rule: &RuleSpec, columns: &[ColumnSpec]) -> Vec<Check> {
    rule.when
        .iter()
        .filter_map(|condition| {
            let spec = columns.iter().find(|c| c.name == condition.column)?;
            let test = if let Some(value) = &condition.eq {
                Test::Eq {
                    value: literal(value),
                }
            } else if let Some(value) = &condition.ne {
                Test::Ne {
                    value: literal(value),
                }
            } else if let Some(values) = &condition.one_of {
                Test::In {
                    values: values.iter().map(literal).collect(),
                }
            } else if let Some(age) = &condition.older_than {
                Test::OlderThan {
                    ms: age.0.as_millis() as u64,
                }
            } else if let Some(age) = &condition.newer_than {
                Test::NewerThan {
                    ms: age.0.as_millis() as u64,
                }
            } else if let Some(is_null) = condition.is_null {
                Test::IsNull { is_null }
            } else {
                return None;
            };
            Some(Check {
                column: spec.name.clone(),
                sql_type: spec.column_type.sql().to_string(),
                test,
            })
        })
        .collect()
}

/// The stored ledger key: the rendered template inside the namespace of its source system
/// and stream, so two sources whose ids look alike can never share a key.
pub fn namespaced_key(source_system: &str, stream: &str, rendered: &str) -> String {
    format!("{source_system}/{stream}/{rendered}")
}

/// A ledger row about to be inserted.
struct Pending {
    key: String,
    recipient: String,
    subject: String,
    body: String,
    source_id: String,
}

/// Which records a rule pass looks at.
#[derive(Clone, Copy)]
pub enum Scope<'a> {
    /// The records of the table a walk's end must look at, so that a record that became
    /// overdue without changing still gets its reminder: every record after a change of
    /// the rule (and once a day), else those changed since the last such pass; in both
    /// cases except the records run `run_id` wrote (its page transactions matched them as
    /// they wrote them) unless an `older_than` threshold has crossed them since it began.
    WalkEnd { run_id: uuid::Uuid },
    /// These records, as the table holds them (inside the transaction that wrote them).
    Records(&'a [&'a str]),
    /// Records this transaction has just written, with their typed column values as
    /// written (in the stream's column order): matched without reading the rows back,
    /// unless a template uses the raw record.
    Written {
        ids: &'a [&'a str],
        values: &'a [&'a [Option<String>]],
    },
}

/// Inserts ledger rows for every record in `scope` that matches a rule of the stream and
/// has no row for that rule yet.
pub async fn enqueue(
    connection: &mut PgConnection,
    source_system: &str,
    stream_name: &str,
    stream: &StreamSpec,
    scope: Scope<'_>,
) -> Result<u64, StoreError> {
    let found = find_matches(&mut *connection, source_system, stream_name, stream, scope).await?;
    record_matches(connection, source_system, stream_name, stream, found).await
}

/// One rule's matching records, rendered into the ledger rows they are owed.
pub struct Matches {
    /// The rule's index in the stream's `notifications`.
    rule: usize,
    checks: Vec<Check>,
    pending: Vec<Pending>,
}

/// The first half of [`enqueue`]: finds and renders the ledger rows owed, writing nothing
/// (except, for a walk-end pass, the rule's pass record). A page transaction runs it while
/// earlier transactions are still open, since it reads only its own rows and committed
/// ledger rows; the insert ([`record_matches`]) waits for its turn, because two
/// transactions inserting one key would wait on each other.
pub async fn find_matches(
    connection: &mut PgConnection,
    source_system: &str,
    stream_name: &str,
    stream: &StreamSpec,
    scope: Scope<'_>,
) -> Result<Vec<Matches>, StoreError> {
    let mut found = Vec::new();
    if matches!(scope, Scope::WalkEnd { .. }) && !stream.notifications.is_empty() {
        // A pass over a large table is estimated costly enough for JIT compilation, which
        // took half of such a pass's 0.4 s (200,000 invoices) and saves nothing on a plan
        // this simple. For the rest of the walk's final transaction only.
        sqlx::query("SELECT set_config('jit', 'off', true)")
            .execute(&mut *connection)
            .await
            .context(|| "turning JIT off for the rule pass".into())?;
    }
    for (rule_index, rule) in stream.notifications.iter().enumerate() {
        // The raw record is read (and detoasted) only for templates that use it.
        let uses_data = [&rule.key, &rule.subject, &rule.body]
            .iter()
            .any(|t| t.contains("data"));
        let checks = compile(rule, &stream.columns);
        let mut binds: Vec<String> = Vec::new();
        let mut conditions = String::new();
        for check in &checks {
            conditions.push_str(" AND ");
            conditions.push_str(&check.clause("t", 3, &mut binds));
        }
        // At a walk's end: only the records that can have started to match since the last
        // pass, unless this rule's conditions changed or its last full pass is old.
        let since = match scope {
            Scope::WalkEnd { .. } => {
                last_pass_and_record_this_one(
                    &mut *connection,
                    source_system,
                    stream_name,
                    &rule.name,
                    &stream.table,
                    &checks,
                )
                .await?
            }
            _ => None,
        };
        if let Scope::WalkEnd { run_id } = scope {
            let since = since.map(|since| {
                binds.push(since);
                format!("${}", binds.len() + 3)
            });
            binds.push(run_id.to_string());
            let run = format!("${}", binds.len() + 3);
            conditions.push_str(&walk_end_clause(&checks, since.as_deref(), &run));
        }
        // Array parameters follow the conditions' values.
        let first_array = binds.len() + 4;
        let written = match scope {
            Scope::Written { ids, values } if !uses_data => Some((ids, values)),
            _ => None,
        };
        let source = match (&scope, &written) {
            (_, Some(_)) => {
                // The rows as this transaction wrote them, typed as the table types them,
                // without reading them back.
                let columns: String = stream
                    .columns
                    .iter()
                    .enumerate()
                    .map(|(i, c)| {
                        format!(", u.c{i}::{} AS {}", c.column_type.sql(), quote(&c.name))
                    })
                    .collect();
                let arrays: String = (0..=stream.columns.len())
                    .map(|i| format!("${}::text[]", first_array + i))
                    .collect::<Vec<_>>()
                    .join(", ");
                let aliases: String = (0..stream.columns.len())
                    .map(|i| format!(", c{i}"))
                    .collect();
                format!(
                    "(SELECT $1::text AS source_system, u.source_id, NULL::timestamptz AS deleted_at{columns}
                      FROM UNNEST({arrays}) AS u(source_id{aliases}))"
                )
            }
            (Scope::WalkEnd { .. }, None) => quote(&stream.table),
            (_, None) => {
                conditions.push_str(&format!(" AND t.source_id = ANY(${first_array}::text[])"));
                quote(&stream.table)
            }
        };
        // `OFFSET 0` keeps the probe a lookup by record in the ledger's index, whatever the
        // statistics say: when the destination table had statistics and the ledger none
        // (autovacuum off, or not round yet), the planner joined against a materialized
        // read of the rule's whole ledger per record, quadratic (over 60 s, the statement
        // timeout, on a 200,000-invoice import's full pass), where the lookup is linear.
        let sql = format!(
            "SELECT t.source_id, {}{} FROM {source} t WHERE t.source_system = $1 AND t.deleted_at IS NULL
             AND NOT EXISTS (SELECT 1 FROM idem_ledger l WHERE l.source_system = $1 AND l.stream = $2
                             AND l.rule = $3 AND l.source_id = t.source_id OFFSET 0){conditions}",
            if uses_data { "t.data" } else { "NULL::jsonb" },
            stream.columns.iter().map(|c| format!(", t.{}::text", quote(&c.name))).collect::<String>(),
        );
        let mut query = sqlx::query(&sql)
            .bind(source_system)
            .bind(stream_name)
            .bind(&rule.name);
        for value in &binds {
            query = query.bind(value);
        }
        match (&scope, written) {
            (_, Some((ids, values))) => {
                query = query.bind(ids);
                for index in 0..stream.columns.len() {
                    query = query.bind(
                        values
                            .iter()
                            .map(|row| row.get(index).and_then(|v| v.as_deref()))
                            .collect::<Vec<_>>(),
                    );
                }
            }
            (Scope::Records(ids), None) | (Scope::Written { ids, .. }, None) => {
                query = query.bind(*ids);
            }
            (Scope::WalkEnd { .. }, None) => {}
        }
        let matches = query.fetch_all(&mut *connection).await.context(|| {
            format!(
                "evaluating rule '{}' of {source_system}.{stream_name}",
                rule.name
            )
        })?;
        if matches.is_empty() {
            continue;
        }
        let env = template_env();
        // Compiled once per pass, not once per record: compiling was most of the
        // rendering's cost on an import that owes thousands of reminders.
        let compile = |template| env.template_from_str(template);
        let templates = [
            compile(&rule.key),
            compile(&rule.subject),
            compile(&rule.body),
        ];
        let mut pending = Vec::with_capacity(matches.len());
        for row in matches {
            let source_id: String = row.get(0);
            let data: Option<serde_json::Value> = row.get(1);
            let mut context = serde_json::Map::new();
            context.insert("source_id".into(), source_id.clone().into());
            context.insert("source_system".into(), source_system.into());
            if let Some(data) = data {
                context.insert("data".into(), data);
            }
            for (index, column) in stream.columns.iter().enumerate() {
                let value: Option<String> = row.get(index + 2);
                context.insert(
                    column.name.clone(),
                    value.map_or(serde_json::Value::Null, Into::into),
                );
            }
            let context = serde_json::Value::Object(context);
            // Converted once for the three templates.
            let values = minijinja::Value::from_serialize(&context);
            let render =
                |template: &Result<minijinja::Template<'_, '_>, minijinja::Error>| match template {
                    Ok(template) => template.render(&values),
                    Err(err) => Err(minijinja::Error::new(err.kind(), err.to_string())),
                };
            let recipient = context
                .get(&rule.to)
                .and_then(|v| v.as_str())
                .unwrap_or("")
                .to_string();
            if recipient.is_empty() {
                warn!(source_id = %source_id, rule = %rule.name, "record matches the rule but has no recipient in column '{}'; skipped", rule.to);
                continue;
            }
            match (
                render(&templates[0]),
                render(&templates[1]),
                render(&templates[2]),
            ) {
                (Ok(key), Ok(subject), Ok(body)) => pending.push(Pending {
                    key: namespaced_key(source_system, stream_name, &key),
                    recipient,
                    subject,
                    body,
                    source_id,
                }),
                (key, subject, body) => {
                    let error = [key.err(), subject.err(), body.err()]
                        .into_iter()
                        .flatten()
                        .next()
                        .map(|e| e.to_string())
                        .unwrap_or_default();
                    warn!(source_id = %source_id, rule = %rule.name, error = %error, "cannot render the rule's templates for this record; skipped");
                }
            }
        }
        if !pending.is_empty() {
            found.push(Matches {
                rule: rule_index,
                checks,
                pending,
            });
        }
    }
    Ok(found)
}

/// The second half of [`enqueue`]: inserts the ledger rows [`find_matches`] rendered.
pub async fn record_matches(
    connection: &mut PgConnection,
    source_system: &str,
    stream_name: &str,
    stream: &StreamSpec,
    found: Vec<Matches>,
) -> Result<u64, StoreError> {
    let mut inserted = 0;
    for Matches {
        rule,
        checks,
        pending,
    } in found
    {
        let rule = &stream.notifications[rule];
        let condition = serde_json::to_value(&checks).unwrap_or_default();
        // Returns the record with each key inserted: two records of one statement may render
        // one key, and then only one of them got it.
        let new_rows: Vec<(String, String)> = sqlx::query_as(
            "INSERT INTO idem_ledger (key, channel, recipient, subject, body, message_id, source_system, stream, source_id, rule,
                                      record_table, condition)
             SELECT p.key, $1, p.recipient, p.subject, p.body, p.message_id, $2, $3, p.source_id, $4, $11, $12
             FROM UNNEST($5::text[], $6::text[], $7::text[], $8::text[], $9::text[], $10::text[])
               AS p(key, recipient, subject, body, message_id, source_id)
             ON CONFLICT (key) DO NOTHING
             RETURNING key, source_id",
        )
        .bind(&rule.channel)
        .bind(source_system)
        .bind(stream_name)
        .bind(&rule.name)
        .bind(pending.iter().map(|p| p.key.as_str()).collect::<Vec<_>>())
        .bind(pending.iter().map(|p| p.recipient.as_str()).collect::<Vec<_>>())
        .bind(pending.iter().map(|p| p.subject.as_str()).collect::<Vec<_>>())
        .bind(pending.iter().map(|p| p.body.as_str()).collect::<Vec<_>>())
        .bind(pending.iter().map(|p| super::message_id(&p.key)).collect::<Vec<_>>())
        .bind(pending.iter().map(|p| p.source_id.as_str()).collect::<Vec<_>>())
        .bind(&stream.table)
        .bind(&condition)
        .fetch_all(&mut *connection)
        .await
        .context(|| format!("inserting ledger rows of rule '{}'", rule.name))?;
        inserted += new_rows.len() as u64;
        if !new_rows.is_empty() {
            info!(rule = %rule.name, new_ledger_rows = new_rows.len(), "side effects recorded in the ledger");
        }
        if new_rows.len() < pending.len() {
            let new_rows: std::collections::HashSet<(&str, &str)> = new_rows
                .iter()
                .map(|(key, id)| (key.as_str(), id.as_str()))
                .collect();
            let refused: Vec<&Pending> = pending
                .iter()
                .filter(|p| !new_rows.contains(&(p.key.as_str(), p.source_id.as_str())))
                .collect();
            inserted += record_collisions(
                &mut *connection,
                source_system,
                stream_name,
                &stream.table,
                rule,
                &condition,
                &refused,
            )
            .await?;
        }
    }
    Ok(inserted)
}

/// How far back a walk's end looks when it cannot see when the other sessions' open
/// transactions started (a role without `pg_read_all_stats` sees NULL there).
const BLIND_OVERLAP: &str = "1 day";
/// A walk's end evaluates a rule over its whole table at least this often, so what the
/// narrower passes cannot see (a ledger row deleted by hand, a record skipped for a
/// missing recipient) is picked up within a day, as every pass did before.
const FULL_PASS_EVERY: &str = "1 day";

/// The rule's form as far as matching goes: a change of its conditions (or of its table)
/// needs a full pass, since records that did not match before may match now.
fn conditions_fingerprint(table: &str, checks: &[Check]) -> String {
    let text = format!(
        "{table}\n{}",
        serde_json::to_string(checks).unwrap_or_default()
    );
    format!("{:032x}", xxhash_rust::xxh3::xxh3_128(text.as_bytes()))
}

/// Reads (and locks) rule `rule`'s last walk-end pass and records this one, in the walk's
/// final transaction, so a rolled back pass records nothing. Returns the instant from which
/// records must be looked at (`None`: all of them, a full pass).
///
/// What a pass records is not its own time but the start of the oldest transaction then
/// open in this database (or its own, if older), read before the pass's query takes its
/// snapshot: a page transaction the pass could not see was open then, or started later,
/// and stamps its rows with its start (`last_changed_at = now()`), so the next pass, looking
/// from the recorded instant on, sees them. Another role's session shows NULL for its
/// type, state and start to a role without `pg_read_all_stats`: then the pass records a
/// day before its own start instead.
async fn last_pass_and_record_this_one(
    connection: &mut PgConnection,
    source_system: &str,
    stream_name: &str,
    rule: &str,
    table: &str,
    checks: &[Check],
) -> Result<Option<String>, StoreError> {
    let fingerprint = conditions_fingerprint(table, checks);
    let last: Option<(String, String, bool)> = sqlx::query_as(&format!(
        "SELECT fingerprint, covers_from::text, full_at > now() - interval '{FULL_PASS_EVERY}'
         FROM idem_rule_passes WHERE source_system = $1 AND stream = $2 AND rule = $3
         FOR UPDATE"
    ))
    .bind(source_system)
    .bind(stream_name)
    .bind(rule)
    .fetch_optional(&mut *connection)
    .await
    .context(|| format!("reading the last pass of rule '{rule}'"))?;
    let since = match last {
        Some((stored, since, full_is_recent)) if stored == fingerprint && full_is_recent => {
            Some(since)
        }
        _ => None,
    };
    sqlx::query(&format!(
        "INSERT INTO idem_rule_passes (source_system, stream, rule, fingerprint, covers_from, full_at)
         SELECT $1, $2, $3, $4,
                CASE WHEN bool_or(a.state IS NULL) THEN now() - interval '{BLIND_OVERLAP}'
                     ELSE LEAST(now(), min(a.xact_start)) END,
                now()
         FROM pg_stat_activity a
         WHERE a.datname = current_database()
           AND (a.backend_type = 'client backend' OR a.backend_type IS NULL)
           AND a.pid <> pg_backend_pid()
         ON CONFLICT (source_system, stream, rule) DO UPDATE SET
           fingerprint = EXCLUDED.fingerprint, covers_from = EXCLUDED.covers_from,
           full_at = CASE WHEN $5 THEN idem_rule_passes.full_at ELSE now() END"
    ))
    .bind(source_system)
    .bind(stream_name)
    .bind(rule)
    .bind(&fingerprint)
    .bind(since.is_some())
    .execute(&mut *connection)
    .await
    .context(|| format!("recording the pass of rule '{rule}'"))?;
    Ok(since)
}

/// The records a walk's end looks at (see [`Scope::WalkEnd`]); `since` is the instant of
/// the last pass (a timestamptz parameter) or `None` for a full pass, `run` the run's id.
///
/// A record can have started to match since an instant only if it was written since (by
/// any stream: a stream sharing the table writes without this rule), or if its
/// `older_than` column crossed its threshold since. Nothing else changes whether a record
/// matches: the other tests read only the record's columns.
fn walk_end_clause(checks: &[Check], since: Option<&str>, run: &str) -> String {
    let run_start =
        format!("(SELECT r.started_at FROM idem_runs r WHERE r.id = CAST({run} AS uuid))");
    let not_this_run = format!("t.last_run_id IS DISTINCT FROM CAST({run} AS uuid)");
    let crossed_since = |from: &str| -> Vec<String> {
        checks
            .iter()
            .filter_map(|check| {
                let Test::OlderThan { ms } = check.test else {
                    return None;
                };
                // Both bounds, so an index on the column answers it: the rows that crossed
                // the threshold between `from` and now.
                let column = quote(&check.column);
                Some(format!(
                    "(t.{column} >= {from} - interval '{ms} milliseconds' \
                 AND t.{column} < now() - interval '{ms} milliseconds')"
                ))
            })
            .collect()
    };
    let mut looked_at = Vec::new();
    match since {
        Some(since) => {
            looked_at.push(format!(
                "(t.last_changed_at >= CAST({since} AS timestamptz) AND {not_this_run})"
            ));
            looked_at.extend(crossed_since(&format!(
                "LEAST(CAST({since} AS timestamptz), {run_start})"
            )));
        }
        None => {
            looked_at.push(not_this_run);
            looked_at.extend(crossed_since(&run_start));
        }
    }
    format!(" AND ({})", looked_at.join(" OR "))
}

/// Rows whose key was already taken. If the key's row is about this very record and rule
/// (a concurrent insert), nothing is wrong. Otherwise the key template does not identify
/// one record of one rule: the record gets a `failed` row of its own (outcome
/// `key_collision`, naming the other owner) so the collision is reported once in `idem
/// ledger list` instead of being retried silently on every run. Returns rows inserted.
async fn record_collisions(
    connection: &mut PgConnection,
    source_system: &str,
    stream_name: &str,
    table: &str,
    rule: &RuleSpec,
    condition: &serde_json::Value,
    refused: &[&Pending],
) -> Result<u64, StoreError> {
    let keys: Vec<&str> = refused.iter().map(|p| p.key.as_str()).collect();
    let owners: Vec<(String, String, String, String, String)> = sqlx::query_as(
        "SELECT key, source_system, stream, rule, source_id FROM idem_ledger WHERE key = ANY($1)",
    )
    .bind(&keys)
    .fetch_all(&mut *connection)
    .await
    .context(|| format!("reading the owners of ledger keys of rule '{}'", rule.name))?;
    let mut inserted = 0;
    for pending in refused {
        let Some((_, owner_system, owner_stream, owner_rule, owner_id)) =
            owners.iter().find(|(key, ..)| *key == pending.key)
        else {
            continue;
        };
        if (
            owner_system.as_str(),
            owner_stream.as_str(),
            owner_rule.as_str(),
            owner_id.as_str(),
        ) == (
            source_system,
            stream_name,
            rule.name.as_str(),
            pending.source_id.as_str(),
        ) {
            continue;
        }
        let error = format!(
            "key_collision: ledger key '{}' is already used by rule '{owner_rule}' of {owner_system}.{owner_stream} for record {owner_id}; the key template '{}' must identify one record of one rule (nothing was sent for record {})",
            pending.key, rule.key, pending.source_id
        );
        warn!(source_id = %pending.source_id, rule = %rule.name, "{error}");
        let key = format!(
            "{}#collision:{}:{}",
            pending.key, rule.name, pending.source_id
        );
        let done = sqlx::query(
            "INSERT INTO idem_ledger (key, channel, recipient, subject, body, message_id, source_system, stream, source_id, rule,
                                      record_table, condition, status, last_outcome, last_error)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, 'failed', 'key_collision', $13)
             ON CONFLICT (key) DO NOTHING",
        )
        .bind(&key)
        .bind(&rule.channel)
        .bind(&pending.recipient)
        .bind(&pending.subject)
        .bind(&pending.body)
        .bind(super::message_id(&key))
        .bind(source_system)
        .bind(stream_name)
        .bind(&pending.source_id)
        .bind(&rule.name)
        .bind(table)
        .bind(condition)
        .bind(&error)
        .execute(&mut *connection)
        .await
        .context(|| format!("recording a ledger key collision of rule '{}'", rule.name))?;
        inserted += done.rows_affected();
    }
    Ok(inserted)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(text: &str) -> Vec<RuleSpec> {
        #[derive(Deserialize)]
        struct File {
            rules: Vec<RuleSpec>,
        }
        toml::from_str::<File>(text).unwrap().rules
    }

    #[test]
    fn two_rules_of_a_stream_may_not_share_a_key_template_or_a_name() {
        let same_key = rules(
            r#"
            [[rules]]
            name = "a"
            key = "email:{{ source_id }}"
            to = "email"
            subject = "s"
            body = "b"
            [[rules]]
            name = "b"
            key = "email:{{source_id}}"
            to = "email"
            subject = "s"
            body = "b"
            [[rules]]
            name = "a"
            key = "email:{{ source_id }}:2"
            to = "email"
            subject = "s"
            body = "b"
            "#,
        );
        let problems = stream_rule_problems(&same_key);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains("would collide"), "{problems:?}");
        assert!(problems[1].contains("rule name 'a'"), "{problems:?}");
    }

    #[test]
    fn a_frozen_condition_binds_its_values_and_refuses_unknown_types() {
        let check = Check {
            column: "status\"; DROP TABLE x; --".into(),
            sql_type: "text".into(),
            test: Test::In {
                values: vec!["open".into(), "draft".into()],
            },
        };
        let mut binds = Vec::new();
        let clause = check.clause("t", 2, &mut binds);
        assert_eq!(
            clause,
            "t.\"status\"\"; DROP TABLE x; --\" IN (CAST($3 AS text), CAST($4 AS text))"
        );
        assert_eq!(binds, vec!["open".to_string(), "draft".to_string()]);
        let tampered = Check {
            sql_type: "text); DROP TABLE x; --".into(),
            ..check
        };
        assert!(tampered.verify().is_err());
    }
}
