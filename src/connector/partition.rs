//! Partitions of a stream: the `{partition}` placeholder, its checks, and the stream spec
//! one partition is walked with.

use super::StreamSpec;

/// The placeholder a partitioned stream's path, parameter values and headers use.
pub const PLACEHOLDER: &str = "{partition}";

pub use crate::schema::connector::qualified;

/// Why a partition value is refused, or `None`. Values go into advisory lock keys, URL
/// paths and headers unescaped, so only characters that mean nothing in any of them pass.
pub fn unsafe_value(value: &str) -> Option<String> {
    if value.is_empty() {
        return Some("a partition value cannot be empty".into());
    }
    if value.len() > 128 {
        return Some(format!("partition '{value}' is longer than 128 characters"));
    }
    if let Some(c) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
    {
        return Some(format!(
            "partition '{}' contains {c:?}: only ASCII letters, digits, '_', '-' and '.' are allowed (the value goes into URLs and lock keys)",
            value.escape_debug()
        ));
    }
    None
}

/// Whether any of the places a partition may go mentions `{partition}`.
pub fn uses_placeholder(stream: &StreamSpec) -> bool {
    stream.path.contains(PLACEHOLDER)
        || stream
            .params
            .values()
            .any(|v| v.as_str().is_some_and(|v| v.contains(PLACEHOLDER)))
        || stream.headers.values().any(|v| v.contains(PLACEHOLDER))
}

/// The problems of a stream's partition settings, as `(field, message)`; `values` is the
/// effective list (the connector's, or idem.toml's override).
pub fn check(stream: &StreamSpec, values: Option<&[String]>) -> Vec<(&'static str, String)> {
    let mut issues = Vec::new();
    let uses = uses_placeholder(stream);
    let Some(values) = values else {
        if uses {
            issues.push((
                "partitions",
                format!("uses {PLACEHOLDER} but has no [partitions] values to fill it with"),
            ));
        }
        return issues;
    };
    if values.is_empty() {
        issues.push((
            "partitions.values",
            "is empty: list at least one partition, or remove [partitions]".into(),
        ));
    }
    if !uses {
        issues.push((
            "partitions",
            format!(
                "has partitions but never uses {PLACEHOLDER} in path, params or headers: every partition would fetch the same records"
            ),
        ));
    }
    if matches!(
        stream.incremental,
        super::IncrementalSpec::Full { mark_deleted: true }
    ) {
        issues.push((
            "incremental.mark_deleted",
            "cannot be combined with partitions: one partition's walk does not see the other partitions' rows in the shared table".into(),
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for value in values {
        if let Some(problem) = unsafe_value(value) {
            issues.push(("partitions.values", problem));
        } else if !seen.insert(value.as_str()) {
            issues.push((
                "partitions.values",
                format!("partition '{value}' is listed twice"),
            ));
        }
    }
    issues
}

/// The spec one partition is walked with: every `{partition}` filled in. An unpartitioned
/// walk (`""`) gets the spec as it is.
pub fn for_partition(stream: &StreamSpec, partition: &str) -> StreamSpec {
    let mut spec = stream.clone();
    if partition.is_empty() {
        return spec;
    }
    spec.path = spec.path.replace(PLACEHOLDER, partition);
    for value in spec.params.values_mut() {
        if let toml::Value::String(text) = value {
            *text = text.replace(PLACEHOLDER, partition);
        }
    }
    for value in spec.headers.values_mut() {
        *value = value.replace(PLACEHOLDER, partition);
    }
    spec
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(extra: &str) -> StreamSpec {
        toml::from_str(&format!(
            "path = \"/v1/charges\"\nid = \"/id\"\ntable = \"charges\"\n{extra}"
        ))
        .unwrap()
    }

    #[test]
    fn the_placeholder_is_filled_in_path_params_and_headers() {
        let spec = stream(
            "params = { account = \"{partition}\", limit = 10 }\nheaders = { \"Stripe-Account\" = \"{partition}\" }\n[partitions]\nvalues = [\"acct_1\"]",
        );
        assert!(check(&spec, Some(&["acct_1".into()])).is_empty());
        let one = for_partition(&spec, "acct_1");
        assert_eq!(one.params["account"].as_str(), Some("acct_1"));
        assert_eq!(one.headers["Stripe-Account"], "acct_1");
        assert_eq!(qualified("charges", "acct_1"), "charges#acct_1");
        assert_eq!(qualified("charges", ""), "charges");
    }

    #[test]
    fn bad_partition_settings_are_named() {
        let spec = stream("headers = { \"Stripe-Account\" = \"{partition}\" }");
        let unused = stream("");
        let text = |issues: Vec<(&str, String)>| {
            issues
                .into_iter()
                .map(|(_, m)| m)
                .collect::<Vec<_>>()
                .join("; ")
        };
        assert!(text(check(&spec, None)).contains("no [partitions] values"));
        assert!(text(check(&spec, Some(&[]))).contains("is empty"));
        assert!(text(check(&spec, Some(&["a".into(), "a".into()]))).contains("listed twice"));
        assert!(text(check(&spec, Some(&["a/b".into()]))).contains("'/'"));
        assert!(text(check(&unused, Some(&["a".into()]))).contains("never uses {partition}"));
    }
}
