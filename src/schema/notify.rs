//! The notification rule schema: what `[[streams.NAME.notifications]]` deserializes into,
//! and the checks a rule can make against its stream's declared columns before any run.
//!
//! Every struct refuses unknown keys, and every field's doc comment is the user's
//! documentation of that key.

use serde::Deserialize;

use crate::duration::HumanDuration;
use crate::schema::connector::{ColumnSpec, ColumnType};

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

/// The template environment rules render with: an undefined variable is an error, so a
/// typo in a template fails validation instead of sending a blank.
pub fn template_env() -> minijinja::Environment<'static> {
    let mut env = minijinja::Environment::new();
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    env
}

/// Problems between the rules of one stream: two rules rendering the same key template
/// would take each other's keys; two rules with one name would share their rows.
pub fn stream_rule_problems(rules: &[RuleSpec]) -> Vec<String> {
    let mut problems = Vec::new();
    for (index, rule) in rules.iter().enumerate() {
        for (other_index, other) in rules[..index].iter().enumerate() {
            if other.name == rule.name {
                problems.push(format!(
                    "rule name '{}' is also used by notifications[{other_index}]; each rule needs its own name",
                    rule.name
                ));
            }
            if other.key.split_whitespace().collect::<String>()
                == rule.key.split_whitespace().collect::<String>()
            {
                problems.push(format!(
                    "key template '{}' is also used by notifications[{other_index}]; the two rules' ledger keys would collide (add the stage or rule to the key)",
                    rule.key
                ));
            }
        }
    }
    problems
}
