//! Reminder rules: which records need a side effect, and the ledger rows that say so.
//!
//! A rule's conditions are data (column, test, value) compiled to SQL with bound
//! parameters, never SQL text from a config file. Matching is set-based over the
//! destination table; each match is rendered once into a frozen ledger row whose key is
//! the side effect's business identity, inserted with `ON CONFLICT DO NOTHING`.

use serde::Deserialize;
use sqlx::{PgConnection, Row as _};
use tracing::{info, warn};

use crate::connector::{ColumnSpec, ColumnType, StreamSpec};
use crate::duration::HumanDuration;
use crate::store::{Context, StoreError};

/// One reminder rule of a stream (`[[streams.NAME.notifications]]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// The rule's name, e.g. `"overdue_reminder"`; stored on each ledger row.
    pub name: String,
    /// The ledger key template: the side effect's business identity, e.g.
    /// `"email:reminder:{{ source_id }}:stage1"`. Never a run id, a time or a random value:
    /// the key is what makes a second send impossible.
    pub key: String,
    /// The channel (default `"email"`).
    #[serde(default = "default_channel")]
    pub channel: String,
    /// The typed column holding the recipient's address.
    pub to: String,
    /// Subject template (minijinja); sees `source_id`, `source_system`, every typed column,
    /// and the raw record as `data`.
    pub subject: String,
    /// Body template (minijinja), same variables as `subject`.
    pub body: String,
    /// Conditions that must all hold for a record to need this side effect.
    #[serde(default)]
    pub when: Vec<Condition>,
}

fn default_channel() -> String {
    "email".into()
}

/// One condition on a typed column. Set exactly one test.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    /// A typed column of the stream.
    pub column: String,
    /// The column equals this value.
    #[serde(default)]
    pub eq: Option<toml::Value>,
    /// The column differs from this value (NULL counts as different).
    #[serde(default)]
    pub ne: Option<toml::Value>,
    /// The column is one of these values.
    #[serde(default, rename = "in")]
    pub one_of: Option<Vec<toml::Value>>,
    /// A timestamptz/date column lies more than this long before now, e.g. `"3d"`.
    #[serde(default)]
    pub older_than: Option<HumanDuration>,
    /// A timestamptz/date column lies less than this long before now.
    #[serde(default)]
    pub newer_than: Option<HumanDuration>,
    /// The column is NULL (`true`) or not (`false`).
    #[serde(default)]
    pub is_null: Option<bool>,
}

impl RuleSpec {
    /// Problems with this rule given the stream's columns (empty when fine).
    pub fn validate(&self, columns: &[ColumnSpec]) -> Vec<String> {
        let mut problems = Vec::new();
        let column = |name: &str| columns.iter().find(|c| c.name == name);
        if column(&self.to).is_none() {
            problems.push(format!(
                "'to' names column '{}', which the stream does not declare",
                self.to
            ));
        }
        let env = template_env();
        for (field, template) in [
            ("key", &self.key),
            ("subject", &self.subject),
            ("body", &self.body),
        ] {
            if let Err(err) = env.template_from_str(template) {
                problems.push(format!("{field}: template does not parse: {err}"));
            }
        }
        if !self.key.contains("source_id") {
            problems.push(
                "key must contain {{ source_id }}: the key is the side effect's business identity"
                    .into(),
            );
        }
        for (index, condition) in self.when.iter().enumerate() {
            let tests = [
                condition.eq.is_some(),
                condition.ne.is_some(),
                condition.one_of.is_some(),
                condition.older_than.is_some(),
                condition.newer_than.is_some(),
                condition.is_null.is_some(),
            ];
            if tests.iter().filter(|set| **set).count() != 1 {
                problems.push(format!(
                    "when[{index}]: set exactly one of eq, ne, in, older_than, newer_than, is_null"
                ));
            }
            match column(&condition.column) {
                None => problems.push(format!(
                    "when[{index}]: column '{}' is not declared by the stream",
                    condition.column
                )),
                Some(spec) => {
                    let is_time =
                        matches!(spec.column_type, ColumnType::Timestamptz | ColumnType::Date);
                    if (condition.older_than.is_some() || condition.newer_than.is_some())
                        && !is_time
                    {
                        problems.push(format!(
                            "when[{index}]: older_than/newer_than need a timestamptz or date column"
                        ));
                    }
                }
            }
        }
        problems
    }
}

fn template_env() -> minijinja::Environment<'static> {
    let mut env = minijinja::Environment::new();
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    env
}

fn quote(identifier: &str) -> String {
    format!("\"{}\"", identifier.replace('"', "\"\""))
}

fn literal(value: &toml::Value) -> String {
    match value {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A ledger row about to be inserted.
struct Pending {
    key: String,
    recipient: String,
    subject: String,
    body: String,
    source_id: String,
}

/// Inserts ledger rows for every record of the stream that matches a rule and has no
/// row for that rule yet. `only` restricts the evaluation to a page's records (inside
/// the page's transaction); `None` evaluates the whole table (end of a run), so a record
/// that became overdue without changing still gets its reminder.
pub async fn enqueue(
    connection: &mut PgConnection,
    source_system: &str,
    stream_name: &str,
    stream: &StreamSpec,
    only: Option<&[&str]>,
) -> Result<u64, StoreError> {
    let mut inserted = 0;
    for rule in &stream.notifications {
        // The raw record is read (and detoasted) only for templates that use it.
        let uses_data = [&rule.key, &rule.subject, &rule.body]
            .iter()
            .any(|t| t.contains("data"));
        let mut sql = format!(
            "SELECT t.source_id, {}{} FROM {} t WHERE t.source_system = $1 AND t.deleted_at IS NULL
             AND NOT EXISTS (SELECT 1 FROM idem_ledger l WHERE l.source_system = $1 AND l.stream = $2
                             AND l.rule = $3 AND l.source_id = t.source_id)",
            if uses_data { "t.data" } else { "NULL::jsonb" },
            stream.columns.iter().map(|c| format!(", t.{}::text", quote(&c.name))).collect::<String>(),
            quote(&stream.table)
        );
        let mut binds: Vec<String> = Vec::new();
        let mut bind = |value: String| {
            binds.push(value);
            format!("${}", binds.len() + 3)
        };
        for condition in &rule.when {
            let Some(spec) = stream.columns.iter().find(|c| c.name == condition.column) else {
                continue;
            };
            let column = format!("t.{}", quote(&spec.name));
            let cast = spec.column_type.sql();
            let clause = if let Some(value) = &condition.eq {
                format!("{column} = CAST({} AS {cast})", bind(literal(value)))
            } else if let Some(value) = &condition.ne {
                format!(
                    "{column} IS DISTINCT FROM CAST({} AS {cast})",
                    bind(literal(value))
                )
            } else if let Some(values) = &condition.one_of {
                let placeholders: Vec<String> = values
                    .iter()
                    .map(|v| format!("CAST({} AS {cast})", bind(literal(v))))
                    .collect();
                format!("{column} IN ({})", placeholders.join(", "))
            } else if let Some(age) = &condition.older_than {
                format!(
                    "{column} < now() - CAST({} AS interval)",
                    bind(format!("{} milliseconds", age.0.as_millis()))
                )
            } else if let Some(age) = &condition.newer_than {
                format!(
                    "{column} >= now() - CAST({} AS interval)",
                    bind(format!("{} milliseconds", age.0.as_millis()))
                )
            } else if let Some(is_null) = condition.is_null {
                format!("{column} IS {}NULL", if is_null { "" } else { "NOT " })
            } else {
                continue;
            };
            sql.push_str(" AND ");
            sql.push_str(&clause);
        }
        let only_param = only.map(|_| bind(String::new()));
        if let Some(param) = &only_param {
            sql.push_str(&format!(" AND t.source_id = ANY({param}::text[])"));
        }
        let mut query = sqlx::query(&sql)
            .bind(source_system)
            .bind(stream_name)
            .bind(&rule.name);
        let condition_binds = if only_param.is_some() {
            &binds[..binds.len() - 1]
        } else {
            &binds[..]
        };
        for value in condition_binds {
            query = query.bind(value);
        }
        if let Some(ids) = only {
            query = query.bind(ids);
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
            let render = |template: &str| env.render_str(template, &context);
            let recipient = context
                .get(&rule.to)
                .and_then(|v| v.as_str())
                .unwrap_or("")
                .to_string();
            if recipient.is_empty() {
                warn!(source_id = %source_id, rule = %rule.name, "record matches the rule but has no recipient in column '{}'; skipped", rule.to);
                continue;
            }
            match (render(&rule.key), render(&rule.subject), render(&rule.body)) {
                (Ok(key), Ok(subject), Ok(body)) => pending.push(Pending {
                    key,
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
        if pending.is_empty() {
            continue;
        }
        let done = sqlx::query(
            "INSERT INTO idem_ledger (key, channel, recipient, subject, body, message_id, source_system, stream, source_id, rule)
             SELECT p.key, $1, p.recipient, p.subject, p.body, p.message_id, $2, $3, p.source_id, $4
             FROM UNNEST($5::text[], $6::text[], $7::text[], $8::text[], $9::text[], $10::text[])
               AS p(key, recipient, subject, body, message_id, source_id)
             ON CONFLICT (key) DO NOTHING",
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
        .execute(&mut *connection)
        .await
        .context(|| format!("inserting ledger rows of rule '{}'", rule.name))?;
        inserted += done.rows_affected();
        if done.rows_affected() > 0 {
            info!(rule = %rule.name, new_ledger_rows = done.rows_affected(), "side effects recorded in the ledger");
        }
    }
    Ok(inserted)
}
