//! What the console shows, read from idem's tables and shaped for the templates: every
//! value is already a display string, and anything that could carry a credential or a
//! whole foreign record is redacted or cut before it gets here.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::PgPool;

use crate::store::{Context, StoreError};

/// Payload characters shown for one failed record; the full payload stays in
/// `idem_failures` for whoever may read it there.
pub const PAYLOAD_SHOWN: usize = 2_000;

/// A stream's row on the first page.
#[derive(Debug, Serialize)]
pub struct StreamRow {
    pub source_system: String,
    pub stream: String,
    /// The stream's page.
    pub href: String,
    pub last_run: Option<RunView>,
    pub mark: String,
    pub lag: String,
    pub next_run: String,
    pub in_progress: Option<String>,
    pub failures: i64,
    pub ledger: Vec<(String, i64)>,
    /// `(status, count, link to the filtered ledger)`.
    pub ledger_links: Vec<(String, i64, String)>,
    pub trouble: Vec<String>,
}

/// `text` as one URL path segment or query value.
pub fn urlencoded(text: &str) -> String {
    url::form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

/// One recorded run (the same query as `idem status`).
pub use crate::store::state::RunSummary as RunRecord;

/// A run as the templates show it.
#[derive(Debug, Serialize)]
pub struct RunView {
    pub mode: String,
    pub status: String,
    pub when: String,
    pub duration: String,
    pub window: String,
    pub pages: i64,
    pub fetched: i64,
    pub inserted: i64,
    pub updated: i64,
    pub unchanged: i64,
    pub failed: i64,
    pub deleted: i64,
    pub error: Option<String>,
}

impl RunView {
    pub fn from_record(r: &RunRecord, now: DateTime<Utc>) -> RunView {
        let duration = match r.finished_at {
            Some(end) => human_span(end - r.started_at),
            None => format!("{} so far", human_span(now - r.started_at)),
        };
        let window = match (r.window_from, r.window_to) {
            (None, None) => String::new(),
            (from, to) => format!(
                "[{}, {})",
                from.map_or("-".into(), short_time),
                to.map_or("-".into(), short_time)
            ),
        };
        RunView {
            // A partitioned stream's runs are listed together; each says whose it was.
            mode: if r.partition.is_empty() {
                r.mode.clone()
            } else {
                format!("{} ({})", r.mode, r.partition)
            },
            status: r.status.clone(),
            when: when(r.started_at, now),
            duration,
            window,
            pages: r.pages,
            fetched: r.fetched,
            inserted: r.inserted,
            updated: r.updated,
            unchanged: r.unchanged,
            failed: r.failed,
            deleted: r.deleted,
            error: r.error.clone(),
        }
    }
}

/// `2026-12-02 14:20 UTC (3m ago)`.
pub fn when(at: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let delta = now - at;
    if delta >= chrono::Duration::zero() {
        format!("{} ({} ago)", short_time(at), human_span(delta))
    } else {
        format!("{} (in {})", short_time(at), human_span(-delta))
    }
}

pub fn short_time(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

/// `3d 4h`, `12m 5s`, `0.4s`: two units at most.
pub fn human_span(span: chrono::Duration) -> String {
    let ms = span.num_milliseconds().max(0);
    if ms < 10_000 {
        return format!("{:.1}s", ms as f64 / 1000.0);
    }
    let s = ms / 1000;
    let (d, h, m, sec) = (s / 86_400, s % 86_400 / 3600, s % 3600 / 60, s % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{sec}s"),
        (0, 0, _) => format!("{m}m {sec}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

/// The latest `per_stream` runs of every stream (or of one), newest first.
pub async fn runs(
    pool: &PgPool,
    only: Option<(&str, &str)>,
    per_stream: i64,
) -> Result<Vec<RunRecord>, StoreError> {
    crate::store::state::recent_runs(pool, only, per_stream).await
}

/// Counts keyed by `(source_system, stream, partition)`.
pub async fn failure_counts(
    pool: &PgPool,
) -> Result<BTreeMap<(String, String, String), i64>, StoreError> {
    let rows: Vec<(String, String, String, i64)> = sqlx::query_as(
        "SELECT source_system, stream, partition, count(*) FROM idem_failures GROUP BY 1, 2, 3",
    )
    .fetch_all(pool)
    .await
    .context(|| "counting failures for the console".into())?;
    Ok(rows
        .into_iter()
        .map(|(a, b, p, n)| ((a, b, p), n))
        .collect())
}

/// Ledger rows per stream and status.
pub async fn ledger_counts(
    pool: &PgPool,
) -> Result<BTreeMap<(String, String), Vec<(String, i64)>>, StoreError> {
    let rows: Vec<(String, String, String, i64)> = sqlx::query_as(
        "SELECT source_system, stream, status, count(*) FROM idem_ledger GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
    )
    .fetch_all(pool)
    .await
    .context(|| "counting ledger rows for the console".into())?;
    let mut out: BTreeMap<(String, String), Vec<(String, i64)>> = BTreeMap::new();
    for (a, b, status, n) in rows {
        out.entry((a, b)).or_default().push((status, n));
    }
    Ok(out)
}

/// A failed record as shown: its payload redacted and cut to [`PAYLOAD_SHOWN`].
#[derive(Debug, Serialize)]
pub struct FailureView {
    pub record_key: String,
    pub error: String,
    pub attempts: i32,
    pub last_failed: String,
    pub payload: String,
}

pub async fn failures(
    pool: &PgPool,
    source_system: &str,
    stream: &str,
    limit: i64,
) -> Result<Vec<FailureView>, StoreError> {
    let now = Utc::now();
    let rows: Vec<(String, String, i32, DateTime<Utc>, Value)> = sqlx::query_as(
        "SELECT record_key, error, attempts, last_failed_at, payload FROM idem_failures
         WHERE source_system = $1 AND stream = $2 ORDER BY last_failed_at DESC, record_key LIMIT $3",
    )
    .bind(source_system)
    .bind(stream)
    .bind(limit)
    .fetch_all(pool)
    .await
    .context(|| format!("reading failures of {source_system}.{stream}"))?;
    Ok(rows
        .into_iter()
        .map(|(record_key, error, attempts, at, payload)| FailureView {
            record_key,
            error,
            attempts,
            last_failed: when(at, now),
            payload: pretty_cut(&redact(payload), PAYLOAD_SHOWN),
        })
        .collect())
}

/// Pretty JSON, cut at `limit` characters with a note saying how much was left out.
pub fn pretty_cut(value: &Value, limit: usize) -> String {
    let text = serde_json::to_string_pretty(value).unwrap_or_default();
    let total = text.chars().count();
    if total <= limit {
        return text;
    }
    let shown: String = text.chars().take(limit).collect();
    format!(
        "{shown}\n… {} more characters not shown (the full payload is in idem_failures)",
        total - limit
    )
}

/// Field names whose values are credentials wherever they appear.
fn secret_name(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    [
        "password",
        "passwd",
        "secret",
        "token",
        "apikey",
        "api_key",
        "api-key",
        "authorization",
        "credential",
        "signature",
        "private_key",
        "session",
        "cookie",
    ]
    .iter()
    .any(|word| name.contains(word))
}

/// `value` with credentials replaced by `***`: values of secret-looking keys, and in
/// strings, URL user info and secret-looking query parameters (vendors echo keys in
/// their next links) and `Bearer` tokens.
pub fn redact(value: Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| {
                    if secret_name(&k) && !v.is_null() {
                        (k, Value::String("***".into()))
                    } else {
                        (k, redact(v))
                    }
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.into_iter().map(redact).collect()),
        Value::String(s) => Value::String(redact_text(&s)),
        other => other,
    }
}

/// A string with credentials in URLs and `Bearer` values replaced by `***`.
pub fn redact_text(text: &str) -> String {
    if let Some(rest) = text.strip_prefix("Bearer ") {
        if !rest.is_empty() {
            return "Bearer ***".into();
        }
    }
    if text.starts_with("http://") || text.starts_with("https://") {
        if let Ok(mut url) = url::Url::parse(text) {
            if !url.username().is_empty() {
                let _ = url.set_username("***");
            }
            if url.password().is_some() {
                let _ = url.set_password(Some("***"));
            }
            if url.query().is_some() {
                let pairs: Vec<(String, String)> = url
                    .query_pairs()
                    .map(|(k, v)| {
                        let v = if secret_name(&k) || k.eq_ignore_ascii_case("key") {
                            "***".to_string()
                        } else {
                            v.into_owned()
                        };
                        (k.into_owned(), v)
                    })
                    .collect();
                url.query_pairs_mut().clear().extend_pairs(pairs);
            }
            return url.to_string();
        }
    }
    text.to_string()
}

/// A checkpoint (one scope) as shown.
#[derive(Debug, Serialize)]
pub struct CheckpointView {
    pub scope: String,
    pub high_water_mark: String,
    pub cursor: String,
    pub resume: Option<String>,
    pub updated: String,
}

pub async fn checkpoints(
    pool: &PgPool,
    source_system: &str,
    stream: &str,
) -> Result<Vec<CheckpointView>, StoreError> {
    let now = Utc::now();
    let rows = crate::store::state::list_checkpoints(pool, Some((source_system, stream))).await?;
    Ok(rows
        .into_iter()
        .map(|cp| CheckpointView {
            // One checkpoint per partition: the scope names whose it is.
            scope: if cp.partition.is_empty() {
                cp.scope
            } else {
                format!("{} ({})", cp.scope, cp.partition)
            },
            high_water_mark: cp.high_water_mark.map_or("-".into(), |t| when(t, now)),
            cursor: cp.cursor.map_or("-".into(), |c| cut(&redact_text(&c), 120)),
            resume: cp.resume.map(|r| pretty_cut(&redact(r), PAYLOAD_SHOWN)),
            updated: when(cp.updated_at, now),
        })
        .collect())
}

/// At most `limit` characters of `text`, with `…` when cut.
pub fn cut(text: &str, limit: usize) -> String {
    if text.chars().count() <= limit {
        text.to_string()
    } else {
        let mut out: String = text.chars().take(limit).collect();
        out.push('…');
        out
    }
}

/// A ledger row as the ledger page shows it (no body: the frozen email is the
/// customer's, readable with `idem ledger show` by whoever may).
#[derive(Debug, Serialize)]
pub struct LedgerView {
    pub key: String,
    pub stream: String,
    pub status: String,
    pub recipient: String,
    pub subject: String,
    pub attempts: i32,
    pub last_error: String,
    pub provider_message_id: String,
    pub created: String,
    pub resolvable: bool,
    pub resolution: Option<String>,
}

/// Ledger rows matching the filters, oldest first; with the last console resolution of each.
pub async fn ledger_rows(
    pool: &PgPool,
    status: Option<&str>,
    stream: Option<&str>,
    key_contains: Option<&str>,
    limit: i64,
) -> Result<Vec<LedgerView>, StoreError> {
    type Row = (
        String,
        String,
        String,
        String,
        String,
        String,
        i32,
        Option<String>,
        Option<String>,
        DateTime<Utc>,
        Option<String>,
    );
    let now = Utc::now();
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT l.key, l.source_system || '.' || l.stream, l.status, l.recipient, l.subject, l.rule,
                l.attempts, l.last_error, l.provider_message_id, l.created_at,
                (SELECT a.operator || ' at ' || to_char(a.at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') || ' UTC: ' || a.outcome || ' — ' || coalesce(a.note, '')
                 FROM idem_console_actions a WHERE a.target = 'ledger:' || l.key AND a.action = 'resolve'
                 ORDER BY a.at DESC LIMIT 1)
         FROM idem_ledger l
         WHERE ($1::text IS NULL OR l.status = $1)
           AND ($2::text IS NULL OR l.source_system || '.' || l.stream = $2)
           AND ($3::text IS NULL OR strpos(l.key, $3) > 0)
         ORDER BY l.created_at, l.key LIMIT $4",
    )
    .bind(status)
    .bind(stream)
    .bind(key_contains)
    .bind(limit)
    .fetch_all(pool)
    .await
    .context(|| "listing the ledger for the console".into())?;
    Ok(rows
        .into_iter()
        .map(
            |(
                key,
                stream,
                status,
                recipient,
                subject,
                _rule,
                attempts,
                last_error,
                provider,
                created,
                resolution,
            )| {
                LedgerView {
                    resolvable: matches!(status.as_str(), "needs_review" | "failed"),
                    key,
                    stream,
                    status,
                    recipient,
                    subject,
                    attempts,
                    last_error: last_error.map_or(String::new(), |e| cut(&e, 300)),
                    provider_message_id: provider.unwrap_or_default(),
                    created: when(created, now),
                    resolution,
                }
            },
        )
        .collect())
}

/// One entry of the action log.
#[derive(Debug, Serialize)]
pub struct ActionView {
    pub at: String,
    pub operator: String,
    pub action: String,
    pub target: String,
    pub note: String,
    pub outcome: String,
}

pub async fn recent_actions(
    pool: &PgPool,
    target_prefix: &str,
    limit: i64,
) -> Result<Vec<ActionView>, StoreError> {
    type Row = (
        DateTime<Utc>,
        String,
        String,
        String,
        Option<String>,
        String,
    );
    let now = Utc::now();
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT at, operator, action, target, note, outcome FROM idem_console_actions
             WHERE starts_with(target, $1) ORDER BY at DESC, id DESC LIMIT $2",
    )
    .bind(target_prefix)
    .bind(limit)
    .fetch_all(pool)
    .await
    .context(|| "reading the console's action log".into())?;
    Ok(rows
        .into_iter()
        .map(|(at, operator, action, target, note, outcome)| ActionView {
            at: when(at, now),
            operator,
            action,
            target,
            note: note.unwrap_or_default(),
            outcome,
        })
        .collect())
}

/// Records an action in the log table.
pub async fn log_action(
    pool: &PgPool,
    operator: &str,
    action: &str,
    target: &str,
    note: Option<&str>,
    outcome: &str,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO idem_console_actions (operator, action, target, note, outcome) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(operator)
    .bind(action)
    .bind(target)
    .bind(note)
    .bind(outcome)
    .execute(pool)
    .await
    .context(|| format!("logging the console action {action} on {target}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn redaction_hides_credentials_in_keys_urls_and_bearer_values() {
        let value = redact(json!({
            "next_page": "https://u:pw@api.example/v1?starting_after=in_9&api_key=sk_live_1&key=k2",
            "auth": {"access_token": "tok_v4lue", "Password": "pw_v4lue"},
            "header": "Bearer abc_v4lue",
            "amount": 5
        }));
        let text = value.to_string();
        for secret in [
            "sk_live_1",
            "k2",
            "tok_v4lue",
            "pw_v4lue",
            "abc_v4lue",
            "u:pw",
        ] {
            assert!(!text.contains(secret), "{secret} leaked: {text}");
        }
        assert!(text.contains("starting_after=in_9"), "{text}");
        assert_eq!(value["amount"], 5);
    }

    #[test]
    fn long_payloads_are_cut_and_say_so() {
        let big = json!({"blob": "x".repeat(5000)});
        let shown = pretty_cut(&big, 100);
        assert!(shown.chars().count() < 200);
        assert!(shown.contains("more characters not shown"));
    }
}
