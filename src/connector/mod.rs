//! Connector files: loading, validation before any request, and the [`Source`] trait.
//!
//! Loading resolves `${ENV}` references and checks everything a run would trip on later
//! (pointers, names, combinations of kinds), collecting every problem with the file,
//! stream and field it is about, so `idem check` can list them all at once.

mod http_error;
pub mod partition;
pub mod template;

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};

pub use crate::schema::connector as spec;
pub use crate::schema::connector::*;
use crate::secret::{self, Secret};
pub use http_error::HttpError;

/// One problem in a configuration or connector file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    /// The file it is in.
    pub file: PathBuf,
    /// The stream it is about, if any.
    pub stream: Option<String>,
    /// The field (dotted path), if known.
    pub field: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(stream) = &self.stream {
            write!(f, ": stream '{stream}'")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": field '{field}'")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Every problem found in a set of files.
#[derive(Debug, thiserror::Error)]
pub struct ConfigIssues(pub Vec<ConfigIssue>);

impl fmt::Display for ConfigIssues {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = self.0.len();
        writeln!(
            f,
            "{count} configuration error{}:",
            if count == 1 { "" } else { "s" }
        )?;
        for issue in &self.0 {
            writeln!(f, "  {issue}")?;
        }
        Ok(())
    }
}

/// Authentication with its secrets resolved.
#[derive(Debug, Clone)]
pub enum Auth {
    Bearer(Secret),
    Basic {
        username: String,
        password: Secret,
    },
    HeaderKey {
        header: String,
        value: Secret,
    },
    QueryKey {
        param: String,
        value: Secret,
    },
    Oauth2 {
        token_url: String,
        client_id: String,
        client_secret: Secret,
        scope: Option<String>,
    },
}

/// A validated connector, secrets resolved, ready to run.
#[derive(Debug, Clone)]
pub struct Connector {
    /// The file it came from.
    pub file: PathBuf,
    /// The spec as written (secrets still as references).
    pub spec: ConnectorSpec,
    /// `base_url` with `${ENV}` resolved and no trailing slash.
    pub base_url: String,
    /// Resolved authentication.
    pub auth: Option<Auth>,
    /// Extra CA certificates from `http.ca_file`, checked when the file is loaded.
    pub ca_certificates: Vec<reqwest::Certificate>,
    /// Resolved default headers; values are secrets since they often carry keys.
    pub headers: Vec<(String, Secret)>,
}

impl Connector {
    /// The stream named `name`.
    pub fn stream(&self, name: &str) -> Option<&StreamSpec> {
        self.spec.streams.get(name)
    }

    /// The partitions a walk of `stream` goes through, in order: `[""]` for an
    /// unpartitioned stream.
    pub fn partitions(&self, stream: &str) -> Vec<String> {
        match self.stream(stream).and_then(|s| s.partitions.as_ref()) {
            Some(partitions) => partitions.values.clone(),
            None => vec![String::new()],
        }
    }

    /// The partitions to walk when the user asked for `only` (`None`: all of them). An
    /// unknown partition, or one asked of an unpartitioned stream, names what exists.
    pub fn select_partitions(
        &self,
        stream: &str,
        only: Option<&str>,
    ) -> Result<Vec<String>, String> {
        let all = self.partitions(stream);
        let Some(only) = only else {
            return Ok(all);
        };
        let name = format!("{}.{stream}", self.spec.source_system);
        if all == [String::new()] {
            return Err(format!(
                "{name} has no partitions; --partition '{only}' cannot apply"
            ));
        }
        if all.iter().any(|p| p == only) {
            Ok(vec![only.to_string()])
        } else {
            Err(format!(
                "unknown partition '{only}' of {name} (partitions: {})",
                all.join(", ")
            ))
        }
    }
}

/// Reads and validates one connector file, resolving secrets from the environment.
pub fn load_file(path: &Path) -> Result<Connector, ConfigIssues> {
    load_file_with(path, &|name| std::env::var(name).ok())
}

/// [`load_file`] with an explicit environment, for tests.
pub fn load_file_with(
    path: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Connector, ConfigIssues> {
    let issue = |message: String| {
        ConfigIssues(vec![ConfigIssue {
            file: path.to_path_buf(),
            stream: None,
            field: None,
            message,
        }])
    };
    let text = std::fs::read_to_string(path).map_err(|err| issue(format!("cannot read: {err}")))?;
    parse(path, &text, env)
}

/// Parses and validates a connector file's text.
pub fn parse(
    path: &Path,
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Connector, ConfigIssues> {
    let spec: ConnectorSpec = toml::from_str(text).map_err(|err| {
        let (stream, field) = locate_toml_error(text, &err);
        ConfigIssues(vec![ConfigIssue {
            file: path.to_path_buf(),
            stream,
            field,
            message: err.message().trim().to_string(),
        }])
    })?;
    let mut issues = Vec::new();
    let mut push = |stream: Option<&str>, field: &str, message: String| {
        issues.push(ConfigIssue {
            file: path.to_path_buf(),
            stream: stream.map(str::to_string),
            field: Some(field.to_string()),
            message,
        })
    };
    let resolve = |field: &str, value: &str, push: &mut dyn FnMut(Option<&str>, &str, String)| {
        secret::resolve_with(value, env).unwrap_or_else(|err| {
            push(None, field, err.to_string());
            String::new()
        })
    };

    if !is_identifier(&spec.source_system) {
        push(
            None,
            "source_system",
            format!(
                "'{}' must be lowercase letters, digits and '_'",
                spec.source_system
            ),
        );
    }
    if spec
        .headers
        .values()
        .any(|v| v.contains(partition::PLACEHOLDER))
    {
        push(
            None,
            "headers",
            format!(
                "{} is only filled in a stream's own `headers` (with [streams.NAME.partitions])",
                partition::PLACEHOLDER
            ),
        );
    }
    let base_url = resolve("base_url", &spec.base_url, &mut push);
    // A `user:password@` in the URL is a credential like any other.
    crate::redact::register_url(&base_url);
    if !base_url.is_empty() && url::Url::parse(&base_url).is_err() {
        push(
            None,
            "base_url",
            format!("'{}' is not an absolute URL", crate::redact::url(&base_url)),
        );
    }
    let auth = spec.auth.as_ref().map(|auth| match auth {
        AuthSpec::Bearer { token } => {
            Auth::Bearer(Secret::new(resolve("auth.token", token, &mut push)))
        }
        AuthSpec::Basic { username, password } => {
            let username = resolve("auth.username", username, &mut push);
            let password = Secret::new(resolve("auth.password", password, &mut push));
            crate::redact::register_basic(&username, password.expose());
            Auth::Basic { username, password }
        }
        AuthSpec::ApiKey {
            header,
            query_param,
            value,
        } => {
            let value = Secret::new(resolve("auth.value", value, &mut push));
            match (header, query_param) {
                (Some(header), None) => Auth::HeaderKey {
                    header: header.clone(),
                    value,
                },
                (None, Some(param)) => {
                    crate::redact::register_param(param);
                    Auth::QueryKey {
                        param: param.clone(),
                        value,
                    }
                }
                _ => {
                    push(
                        None,
                        "auth",
                        "api_key needs exactly one of 'header' or 'query_param'".into(),
                    );
                    Auth::HeaderKey {
                        header: String::new(),
                        value,
                    }
                }
            }
        }
        AuthSpec::Oauth2ClientCredentials {
            token_url,
            client_id,
            client_secret,
            scope,
        } => {
            let token_url = resolve("auth.token_url", token_url, &mut push);
            if !token_url.is_empty() && url::Url::parse(&token_url).is_err() {
                push(
                    None,
                    "auth.token_url",
                    format!("'{token_url}' is not an absolute URL"),
                );
            }
            Auth::Oauth2 {
                token_url,
                client_id: resolve("auth.client_id", client_id, &mut push),
                client_secret: Secret::new(resolve("auth.client_secret", client_secret, &mut push)),
                scope: scope.clone(),
            }
        }
    });
    let headers = spec
        .headers
        .iter()
        .map(|(name, value)| {
            (
                name.clone(),
                Secret::new(resolve(&format!("headers.{name}"), value, &mut push)),
            )
        })
        .collect();
    if let Some(limit) = &spec.rate_limit {
        if limit.requests_per_second == 0 {
            push(
                None,
                "rate_limit.requests_per_second",
                "must be at least 1".into(),
            );
        }
    }
    if spec.http.max_attempts == 0 {
        push(None, "http.max_attempts", "must be at least 1".into());
    }
    let ca_certificates = match &spec.http.ca_file {
        None => Vec::new(),
        Some(file) => {
            let full = path.parent().unwrap_or(Path::new(".")).join(file);
            match std::fs::read(&full) {
                Err(err) => {
                    push(
                        None,
                        "http.ca_file",
                        format!("cannot read {}: {err}", full.display()),
                    );
                    Vec::new()
                }
                Ok(pem) => match reqwest::Certificate::from_pem_bundle(&pem) {
                    Ok(certificates) if !certificates.is_empty() => certificates,
                    Ok(_) => {
                        push(
                            None,
                            "http.ca_file",
                            format!("{} holds no PEM certificate", full.display()),
                        );
                        Vec::new()
                    }
                    Err(err) => {
                        push(
                            None,
                            "http.ca_file",
                            format!("{} is not a PEM certificate bundle: {err}", full.display()),
                        );
                        Vec::new()
                    }
                },
            }
        }
    };
    if spec.streams.is_empty() {
        push(
            None,
            "streams",
            "a connector needs at least one stream".into(),
        );
    }
    // Two streams may fill one table (an events feed and a backfill of the same objects)
    // when they store the same columns; anything else would fight over the table's shape.
    let mut tables: BTreeMap<&str, (&str, &StreamSpec)> = BTreeMap::new();
    for (name, stream) in &spec.streams {
        if let Some((other, other_spec)) = tables.insert(&stream.table, (name, stream)) {
            let shape = |s: &StreamSpec| -> Vec<(String, ColumnType)> {
                s.columns
                    .iter()
                    .map(|c| (c.name.clone(), c.column_type))
                    .collect()
            };
            // Ledger keys are namespaced by stream, so rules on both streams would
            // remind about the same record twice.
            if !stream.notifications.is_empty() && !other_spec.notifications.is_empty() {
                push(
                    Some(name),
                    "notifications",
                    format!(
                        "table '{}' is also filled by stream '{other}', which declares notifications too; declare them on one of the two streams (each would send its own reminder for the same record)",
                        stream.table
                    ),
                );
            }
            if shape(stream) != shape(other_spec) {
                push(
                    Some(name),
                    "table",
                    format!(
                        "table '{}' is also filled by stream '{other}' with other columns; streams sharing a table must declare the same columns",
                        stream.table
                    ),
                );
            }
        }
        validate_stream(name, stream, &mut push);
        validate_parent(name, stream, &spec.streams, &mut push);
    }
    if !issues.is_empty() {
        return Err(ConfigIssues(issues));
    }
    Ok(Connector {
        file: path.to_path_buf(),
        base_url: base_url.trim_end_matches('/').to_string(),
        spec,
        auth,
        headers,
        ca_certificates,
    })
}

fn validate_stream(
    name: &str,
    stream: &StreamSpec,
    push: &mut dyn FnMut(Option<&str>, &str, String),
) {
    let s = Some(name);
    if !is_identifier(name) {
        push(
            s,
            "name",
            "stream names must be lowercase letters, digits and '_'".into(),
        );
    }
    for (field, message) in partition::check(
        stream,
        stream.partitions.as_ref().map(|p| p.values.as_slice()),
    ) {
        push(s, field, message);
    }
    let mut pointer = |field: &str, value: &str| {
        if !value.is_empty() && !value.starts_with('/') {
            push(
                s,
                field,
                format!(
                    "'{value}' is not a JSON pointer: it must be empty or start with '/', e.g. \"/data\""
                ),
            );
        }
    };
    pointer("records", &stream.records);
    if let Some(record) = &stream.record {
        pointer("record", record);
    }
    pointer("id", &stream.id);
    if let Some(updated) = &stream.updated_at {
        pointer("updated_at.pointer", &updated.pointer);
    }
    match &stream.pagination {
        PaginationSpec::BodyCursor { cursor, .. } => pointer("pagination.cursor", cursor),
        PaginationSpec::FirstRecord {
            field: Some(field), ..
        } => pointer("pagination.field", field),
        PaginationSpec::LastRecord {
            field, has_more, ..
        } => {
            if let Some(field) = field {
                pointer("pagination.field", field);
            }
            if let Some(has_more) = has_more {
                pointer("pagination.has_more", has_more);
            }
        }
        PaginationSpec::NextUrl { pointer: p } => pointer("pagination.pointer", p),
        _ => {}
    }
    for (index, column) in stream.columns.iter().enumerate() {
        pointer(&format!("columns[{index}].pointer"), &column.pointer);
    }
    if stream.id.is_empty() {
        push(
            s,
            "id",
            "the id pointer must not be empty, e.g. \"/id\"".into(),
        );
    }
    if !is_identifier(&stream.table) {
        push(
            s,
            "table",
            format!(
                "'{}' must be lowercase letters, digits and '_'",
                stream.table
            ),
        );
    }
    let mut seen = std::collections::BTreeSet::new();
    for (index, column) in stream.columns.iter().enumerate() {
        if !is_identifier(&column.name) {
            push(
                s,
                &format!("columns[{index}].name"),
                format!(
                    "'{}' must be lowercase letters, digits and '_'",
                    column.name
                ),
            );
        } else if RESERVED_COLUMNS.contains(&column.name.as_str()) {
            push(
                s,
                &format!("columns[{index}].name"),
                format!("'{}' is one of idem's own columns", column.name),
            );
        } else if !seen.insert(column.name.as_str()) {
            push(
                s,
                &format!("columns[{index}].name"),
                format!("column '{}' is declared twice", column.name),
            );
        }
        if column.format.is_some()
            && !matches!(
                column.column_type,
                ColumnType::Timestamptz | ColumnType::Date
            )
        {
            push(
                s,
                &format!("columns[{index}].format"),
                "a format only applies to timestamptz and date columns".into(),
            );
        }
    }
    if stream.method == Method::Get && stream.body.is_some() {
        push(s, "body", "a body needs method = \"POST\"".into());
    }
    match &stream.incremental {
        IncrementalSpec::Full { .. } => {}
        IncrementalSpec::Cursor => {
            if !matches!(
                stream.pagination,
                PaginationSpec::BodyCursor { .. }
                    | PaginationSpec::LastRecord { .. }
                    | PaginationSpec::FirstRecord { .. }
            ) {
                push(
                    s,
                    "incremental.kind",
                    "cursor needs pagination kind body_cursor, last_record or first_record".into(),
                );
            }
        }
        IncrementalSpec::HighWaterMark {
            param,
            sorted,
            max_results_per_query,
            ..
        } => {
            if stream.updated_at.is_none() {
                push(
                    s,
                    "updated_at",
                    "high_water_mark needs an updated_at field".into(),
                );
            }
            let body_has_from = stream
                .body
                .as_ref()
                .is_some_and(|body| toml_contains(body, "{{from}}"));
            if param.is_none() && !body_has_from {
                push(
                    s,
                    "incremental.param",
                    "high_water_mark needs a 'param' (or a POST body using \"{{from}}\")".into(),
                );
            }
            if max_results_per_query.is_some() && !sorted {
                push(
                    s,
                    "incremental.max_results_per_query",
                    "restarting a capped query needs sorted = true".into(),
                );
            }
        }
    }
    for (index, rule) in stream.notifications.iter().enumerate() {
        for message in rule.validate(&stream.columns) {
            push(s, &format!("notifications[{index}]"), message);
        }
    }
    for message in crate::schema::notify::stream_rule_problems(&stream.notifications) {
        push(s, "notifications", message);
    }
}

/// A child stream's parent settings and templates: parents exist, are not children
/// themselves (one level, so no cycles), and templates appear only in child streams.
fn validate_parent(
    name: &str,
    stream: &StreamSpec,
    streams: &BTreeMap<String, StreamSpec>,
    push: &mut dyn FnMut(Option<&str>, &str, String),
) {
    let s = Some(name);
    let mut texts: Vec<(String, &str)> = vec![("path".into(), stream.path.as_str())];
    for (key, value) in &stream.params {
        for text in template::toml_strings(value) {
            texts.push((format!("params.{key}"), text));
        }
    }
    if let Some(body) = &stream.body {
        for text in template::toml_strings(body) {
            texts.push(("body".into(), text));
        }
    }
    for (field, text) in &texts {
        for placeholder in template::placeholders(text) {
            match placeholder {
                template::Placeholder::Unknown(inner) => push(
                    s,
                    field,
                    format!("unknown template '{{{inner}}}': use {{parent.id}} or {{parent/<json pointer>}}"),
                ),
                _ if stream.parent.is_none() => push(
                    s,
                    field,
                    "templates {parent…} need a [streams.<name>.parent] section naming the parent streams".into(),
                ),
                _ => {}
            }
        }
    }
    let Some(parent) = &stream.parent else {
        return;
    };
    if parent.streams.is_empty() {
        push(
            s,
            "parent.streams",
            "name at least one parent stream, e.g. streams = [\"invoices\"]".into(),
        );
    }
    for other in &parent.streams {
        match streams.get(other) {
            None => {
                let known: Vec<&str> = streams
                    .iter()
                    .filter(|(_, spec)| spec.parent.is_none())
                    .map(|(n, _)| n.as_str())
                    .collect();
                push(
                    s,
                    "parent.streams",
                    format!(
                        "unknown parent stream '{other}' (streams: {})",
                        known.join(", ")
                    ),
                );
            }
            Some(_) if other == name => push(
                s,
                "parent.streams",
                "a stream cannot be its own parent".into(),
            ),
            Some(spec) if spec.parent.is_some() => push(
                s,
                "parent.streams",
                format!(
                    "'{other}' is itself a child stream; children of children are not supported (name its parent instead)"
                ),
            ),
            Some(spec) if spec.table == stream.table => push(
                s,
                "table",
                format!("a child stream needs its own table, not its parent '{other}''s"),
            ),
            Some(_) => {}
        }
    }
    for (index, condition) in parent.when.iter().enumerate() {
        if !condition.pointer.starts_with('/') {
            push(
                s,
                &format!("parent.when[{index}].pointer"),
                format!(
                    "'{}' is not a JSON pointer: it must start with '/', e.g. \"/lines/has_more\"",
                    condition.pointer
                ),
            );
        }
        if !matches!(
            condition.eq,
            toml::Value::String(_)
                | toml::Value::Boolean(_)
                | toml::Value::Integer(_)
                | toml::Value::Float(_)
        ) {
            push(
                s,
                &format!("parent.when[{index}].eq"),
                "must be a string, number or boolean".into(),
            );
        }
    }
    if stream.columns.iter().any(|c| c.name == PARENT_COLUMN) {
        push(
            s,
            "columns",
            format!("'{PARENT_COLUMN}' is idem's own column in a child stream's table"),
        );
    }
    if !matches!(
        stream.incremental,
        IncrementalSpec::Full {
            mark_deleted: false
        }
    ) {
        push(
            s,
            "incremental",
            "a child stream is walked whole for each parent: leave `incremental` out and use parent.mark_deleted for deletions".into(),
        );
    }
}

/// The column of a child stream's table holding its parent's `source_id`.
pub const PARENT_COLUMN: &str = "parent_source_id";

/// Columns every destination table has; typed columns may not reuse their names.
pub const RESERVED_COLUMNS: &[&str] = &[
    "source_system",
    "source_id",
    "data",
    "content_hash",
    "source_updated_at",
    "first_seen_at",
    "last_changed_at",
    "last_run_id",
    "deleted_at",
];

/// Lowercase ASCII identifier: safe to use, quoted, as a Postgres name.
pub fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some('a'..='z' | '_'))
        && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_'))
        && name.len() <= 63
}

fn toml_contains(value: &toml::Value, needle: &str) -> bool {
    match value {
        toml::Value::String(text) => text.replace(' ', "").contains(needle),
        toml::Value::Array(items) => items.iter().any(|v| toml_contains(v, needle)),
        toml::Value::Table(table) => table.values().any(|v| toml_contains(v, needle)),
        _ => false,
    }
}

/// Turns a toml error's byte span into the stream and dotted field it falls in, best effort:
/// the table header above the span, then the key the span's line assigns (for inline
/// tables, the outer and the innermost key, e.g. `pagination.kind`), or the field a
/// "missing field" message names.
fn locate_toml_error(text: &str, err: &toml::de::Error) -> (Option<String>, Option<String>) {
    let Some(span) = err.span() else {
        return (None, None);
    };
    let mut start = span.start.min(text.len());
    let message = err.message();
    // Errors raised inside a tagged table (a bad duration, time format, ...) span the
    // whole table: point at the offending value when the message quotes it.
    if let Some(value) = message.split('\'').nth(1).filter(|v| !v.is_empty()) {
        let spanned = &text[start..span.end.min(text.len())];
        if let Some(offset) = spanned.find(&format!("\"{value}\"")) {
            start += offset;
        }
    }
    let before = &text[..start];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let prefix = &text[line_start..start];
    let mut section: Option<String> = None;
    let header_lines = if prefix.trim().is_empty() {
        // The span starts a line: that line may be the header itself.
        text[..text[start..].find('\n').map_or(text.len(), |i| start + i)].to_string()
    } else {
        before.to_string()
    };
    for header in header_lines.lines().rev() {
        let header = header.trim();
        if header.starts_with('[') {
            section = Some(
                header
                    .trim_matches(|c| c == '[' || c == ']')
                    .trim()
                    .to_string(),
            );
            break;
        }
    }
    let missing = message
        .strip_prefix("missing field `")
        .and_then(|rest| rest.split('`').next())
        .map(str::to_string);
    let key = if missing.is_some() {
        missing
    } else if prefix.trim().is_empty() {
        // The span is the key itself (an unknown field).
        text[start..span.end.min(text.len())]
            .split('=')
            .next()
            .map(|k| k.trim().trim_matches('"').to_string())
            .filter(|k| !k.is_empty() && !k.contains('\n') && !k.starts_with('['))
    } else {
        // The span is a value: the key(s) assigned on this line before it.
        let keys: Vec<&str> = prefix
            .split('=')
            .rev()
            .skip(1)
            .filter_map(|piece| {
                piece
                    .rsplit(|c: char| c == '{' || c == ',' || c.is_whitespace())
                    .find(|k| !k.is_empty())
            })
            .map(|k| k.trim_matches('"'))
            .collect();
        match keys.as_slice() {
            [] => None,
            [only] => Some(only.to_string()),
            [innermost, .., outer] => Some(format!("{outer}.{innermost}")),
        }
    };
    let (stream, prefix) = match section.as_deref().and_then(|s| s.strip_prefix("streams.")) {
        Some(rest) => {
            let mut parts = rest.splitn(2, '.');
            (
                parts.next().map(str::to_string),
                parts.next().map(str::to_string),
            )
        }
        None => (None, section.clone()),
    };
    let field = match (prefix, key) {
        (Some(prefix), Some(key)) => Some(format!("{prefix}.{key}")),
        (None, Some(key)) => Some(key),
        (Some(prefix), None) => Some(prefix),
        (None, None) => None,
    }
    .map(|f| format!("{f} (line {line})"));
    (stream, field)
}

/// The (connector, stream) pairs that `targets` (`SOURCE` or `SOURCE.STREAM`) name; every
/// stream when `targets` is empty. The error names the unknown target and what exists.
pub fn select_streams<'a>(
    connectors: &'a [Connector],
    targets: &[String],
) -> Result<Vec<(&'a Connector, String)>, String> {
    // Child streams are walked through their parents, so "every stream" leaves them out;
    // naming one (`SOURCE.CHILD`) walks the children still owed.
    let all_of = |connector: &'a Connector| {
        connector
            .spec
            .streams
            .iter()
            .filter(|(_, spec)| spec.parent.is_none())
            .map(move |(s, _)| (connector, s.clone()))
    };
    if targets.is_empty() {
        return Ok(connectors.iter().flat_map(all_of).collect());
    }
    let mut selected = Vec::new();
    for target in targets {
        let (source, stream) = match target.split_once('.') {
            Some((source, stream)) => (source, Some(stream)),
            None => (target.as_str(), None),
        };
        let Some(connector) = connectors.iter().find(|c| c.spec.source_system == source) else {
            let known: Vec<&str> = connectors
                .iter()
                .map(|c| c.spec.source_system.as_str())
                .collect();
            return Err(format!(
                "unknown source '{source}' (configured: {})",
                known.join(", ")
            ));
        };
        match stream {
            Some(stream) if connector.spec.streams.contains_key(stream) => {
                selected.push((connector, stream.to_string()))
            }
            Some(stream) => {
                let known: Vec<&str> = connector.spec.streams.keys().map(String::as_str).collect();
                return Err(format!(
                    "unknown stream '{stream}' of {source} (streams: {})",
                    known.join(", ")
                ));
            }
            None => selected.extend(all_of(connector)),
        }
    }
    Ok(selected)
}

/// One page as the vendor returned it.
#[derive(Debug, Clone, Default)]
pub struct Page {
    /// The records, each as the vendor's JSON text.
    pub records: Vec<crate::record::Record>,
    /// The token that fetches the next page; `None` when this was the last one.
    pub next: Option<String>,
    /// The vendor's clock when it answered (its `Date` header), if it said.
    pub vendor_time: Option<DateTime<Utc>>,
}

/// What to fetch: the page token and the window of `updated_at`.
#[derive(Debug, Clone, Default)]
pub struct PageRequest {
    /// The pagination token from the previous page (`None` for the first page).
    pub token: Option<String>,
    /// Inclusive lower bound of `updated_at`, when the stream is incremental.
    pub from: Option<DateTime<Utc>>,
    /// Exclusive upper bound of `updated_at` (replays of a window).
    pub to: Option<DateTime<Utc>>,
}

/// Why a page could not be fetched. The stream stops; committed pages stay.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error("malformed response from {url}: {reason}")]
    Malformed { url: String, reason: String },
    #[error(
        "the vendor returned the same cursor '{cursor}' twice from {url}; stopping instead of looping forever"
    )]
    RepeatedCursor { url: String, cursor: String },
    #[error(
        "more than {cap} records share the updated_at {at}: the vendor answers at most {cap} results per query and a query cannot restart inside one instant, so the walk stops here instead of skipping records (ask the vendor for a finer timestamp or a higher cap)"
    )]
    TieBeyondCap { at: String, cap: u64 },
}

/// Something that yields pages of raw records. The declarative HTTP connector (`HttpSource`
/// in the `http` module) is the main implementation; a vendor that needs code
/// implements this trait instead of writing a connector file.
pub trait Source: Send {
    /// Fetches one page.
    fn fetch_page(
        &mut self,
        request: &PageRequest,
    ) -> impl Future<Output = Result<Page, SourceError>> + Send;
}
