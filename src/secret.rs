//! `${ENV}` references in config values, and the [`Secret`] type that never prints.
//!
//! A value may contain `${NAME}` (the environment variable, which must be set),
//! `${NAME:-default}` (the default when unset) or `${file:/path}` (the file's content,
//! trailing newline trimmed — for container secrets).

use std::fmt;

/// A resolved secret. `Debug` and `Display` print `***`; only [`Secret::expose`] gives the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps `value` and registers it with the redactor, so it is masked wherever a
    /// vendor or a provider echoes it.
    pub fn new(value: impl Into<String>) -> Self {
        let value = value.into();
        crate::redact::register(&value);
        Self(value)
    }

    /// The value, for the one place that must send it (an HTTP header, an SMTP login).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Why a reference could not be resolved. Names the reference, never a value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResolveError {
    #[error("environment variable {0} is not set (referenced as ${{{0}}})")]
    MissingEnv(String),
    #[error("cannot read secret file {path}: {reason}")]
    File { path: String, reason: String },
    #[error("unterminated ${{...}} reference")]
    Unterminated,
}

/// Replaces every `${...}` reference in `input`, reading the environment through `lookup`.
pub fn resolve_with(
    input: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<String, ResolveError> {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or(ResolveError::Unterminated)?;
        let reference = &after[..end];
        out.push_str(&resolve_one(reference, lookup)?);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Replaces every `${...}` reference in `input` from the process environment.
pub fn resolve(input: &str) -> Result<String, ResolveError> {
    resolve_with(input, &|name| std::env::var(name).ok())
}

fn resolve_one(
    reference: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<String, ResolveError> {
    if let Some(path) = reference.strip_prefix("file:") {
        return std::fs::read_to_string(path)
            .map(|content| content.trim_end_matches(['\n', '\r']).to_string())
            .map_err(|err| ResolveError::File {
                path: path.to_string(),
                reason: err.to_string(),
            });
    }
    let (name, default) = match reference.split_once(":-") {
        Some((name, default)) => (name, Some(default)),
        None => (reference, None),
    };
    match (lookup(name), default) {
        (Some(value), _) if !value.is_empty() => Ok(value),
        (_, Some(default)) => Ok(default.to_string()),
        (Some(value), None) => Ok(value),
        (None, None) => Err(ResolveError::MissingEnv(name.to_string())),
    }
}

/// A warning for each file that holds a plaintext secret (a credential written as is,
/// not as a `${...}` reference) while others than its owner may read or write it — the
/// check ssh does on its keys and libpq on `.pgpass`.
pub fn insecure_secret_files(files: &[std::path::PathBuf]) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt;
    let mut warnings = Vec::new();
    for file in files {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        let Ok(value) = text.parse::<toml::Table>() else {
            continue;
        };
        let mut found = Vec::new();
        plaintext_secrets(&value, "", &mut found);
        if found.is_empty() {
            continue;
        }
        let Ok(metadata) = std::fs::metadata(file) else {
            continue;
        };
        let mode = metadata.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            warnings.push(format!(
                "{} holds a plaintext secret ({}) and others than its owner may read or write it (mode {mode:04o}): run `chmod 600` on it, or use a ${{ENV}} or ${{file:/path}} reference",
                file.display(),
                found.join(", ")
            ));
        }
    }
    warnings
}

/// Dotted names of the keys under `table` that hold a literal credential.
fn plaintext_secrets(table: &toml::Table, prefix: &str, found: &mut Vec<String>) {
    for (key, value) in table {
        let name = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        match value {
            toml::Value::Table(inner) => plaintext_secrets(inner, &name, found),
            toml::Value::String(text) if !text.is_empty() && !text.contains("${") => {
                let credential = matches!(key.as_str(), "token" | "password" | "client_secret")
                    || (key == "value" && prefix.ends_with("auth"))
                    || (matches!(key.as_str(), "database_url" | "base_url" | "url")
                        && url::Url::parse(text).is_ok_and(|url| {
                            url.password().is_some()
                                || url.query_pairs().any(|(k, _)| k == "password")
                        }));
                if credential {
                    found.push(name);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_env_defaults_and_reports_missing_names() {
        let env = |name: &str| (name == "TOKEN").then(|| "s3cr3t".to_string());
        assert_eq!(
            resolve_with("Bearer ${TOKEN}", &env).unwrap(),
            "Bearer s3cr3t"
        );
        assert_eq!(
            resolve_with("${URL:-http://localhost}/v1", &env).unwrap(),
            "http://localhost/v1"
        );
        assert_eq!(
            resolve_with("${NOPE}", &env),
            Err(ResolveError::MissingEnv("NOPE".into()))
        );
        assert_eq!(format!("{:?}", Secret::new("s3cr3t")), "Secret(***)");
    }
}
