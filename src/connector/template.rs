//! Child-stream templates: `{parent.id}` and `{parent/<json pointer>}` in a child's path,
//! params and body, filled from one parent record.

use serde_json::Value;

/// One placeholder found in a text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placeholder {
    /// `{parent.id}`: the parent's stored id.
    ParentId,
    /// `{parent/<pointer>}`: a value inside the parent record.
    Pointer(String),
    /// `{parent…}` in another form: a mistake to report.
    Unknown(String),
}

/// Why a template could not be filled.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TemplateError {
    #[error("the parent record has no value at '{0}'")]
    Missing(String),
    #[error("the parent record's value at '{0}' is not a string, number or boolean")]
    NotScalar(String),
    #[error("unknown template '{{{0}}}': use {{parent.id}} or {{parent/<json pointer>}}")]
    Unknown(String),
}

/// The `{parent…}` placeholders in `text`, in order; other braces (e.g. `{{from}}`) are
/// left alone.
pub fn placeholders(text: &str) -> Vec<Placeholder> {
    let mut found = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("{parent") {
        let after = &rest[start + 1..];
        let Some(end) = after.find('}') else { break };
        let inner = &after[..end];
        found.push(match inner.strip_prefix("parent") {
            Some(".id") => Placeholder::ParentId,
            Some(pointer) if pointer.starts_with('/') => Placeholder::Pointer(pointer.into()),
            _ => Placeholder::Unknown(inner.into()),
        });
        rest = &after[end + 1..];
    }
    found
}

/// `text` with its placeholders filled from the parent; `encode` percent-encodes each
/// value (for a URL path segment).
pub fn render(
    text: &str,
    parent_id: &str,
    parent: &Value,
    encode: bool,
) -> Result<String, TemplateError> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("{parent") {
        let after = &rest[start + 1..];
        let Some(end) = after.find('}') else { break };
        let inner = &after[..end];
        let value = match inner.strip_prefix("parent") {
            Some(".id") => parent_id.to_string(),
            Some(pointer) if pointer.starts_with('/') => match parent.pointer(pointer) {
                None | Some(Value::Null) => return Err(TemplateError::Missing(pointer.into())),
                Some(Value::String(s)) => s.clone(),
                Some(Value::Number(n)) => n.to_string(),
                Some(Value::Bool(b)) => b.to_string(),
                Some(_) => return Err(TemplateError::NotScalar(pointer.into())),
            },
            _ => return Err(TemplateError::Unknown(inner.into())),
        };
        out.push_str(&rest[..start]);
        if encode {
            for byte in value.bytes() {
                if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
                    out.push(byte as char);
                } else {
                    out.push_str(&format!("%{byte:02X}"));
                }
            }
        } else {
            out.push_str(&value);
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// A TOML value with every string's placeholders filled.
pub fn render_toml(
    value: &toml::Value,
    parent_id: &str,
    parent: &Value,
) -> Result<toml::Value, TemplateError> {
    Ok(match value {
        toml::Value::String(text) => toml::Value::String(render(text, parent_id, parent, false)?),
        toml::Value::Array(items) => toml::Value::Array(
            items
                .iter()
                .map(|v| render_toml(v, parent_id, parent))
                .collect::<Result<_, _>>()?,
        ),
        toml::Value::Table(table) => toml::Value::Table(
            table
                .iter()
                .map(|(k, v)| Ok((k.clone(), render_toml(v, parent_id, parent)?)))
                .collect::<Result<_, TemplateError>>()?,
        ),
        other => other.clone(),
    })
}

/// Every string in a TOML value.
pub fn toml_strings(value: &toml::Value) -> Vec<&str> {
    match value {
        toml::Value::String(text) => vec![text.as_str()],
        toml::Value::Array(items) => items.iter().flat_map(toml_strings).collect(),
        toml::Value::Table(table) => table.values().flat_map(toml_strings).collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn fills_the_parent_id_and_pointers() {
        let parent = json!({"id": "in_1", "customer": {"id": "cus 7"}, "n": 3});
        assert_eq!(
            render("/v1/invoices/{parent.id}/lines", "in_1", &parent, true).unwrap(),
            "/v1/invoices/in_1/lines"
        );
        assert_eq!(
            render("/c/{parent/customer/id}/{parent/n}", "in_1", &parent, true).unwrap(),
            "/c/cus%207/3"
        );
        assert_eq!(
            render("{{from}}", "in_1", &parent, false).unwrap(),
            "{{from}}"
        );
        assert_eq!(
            render("{parent/nope}", "in_1", &parent, false),
            Err(TemplateError::Missing("/nope".into()))
        );
        assert_eq!(
            placeholders("{parent.id} {parent.name} {parent/a}"),
            vec![
                Placeholder::ParentId,
                Placeholder::Unknown("parent.name".into()),
                Placeholder::Pointer("/a".into())
            ]
        );
    }
}
