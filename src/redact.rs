//! The one redaction point: every string idem stores, logs or prints that a vendor or a
//! provider could have written passes through [`redact`] (or [`vendor_text`]).
//!
//! The redactor knows every secret value of the configuration: each `Secret` (see `secret`)
//! registers itself when created, with the forms a vendor may echo it in (URL-encoded,
//! JSON-escaped, and the base64 `user:password` of basic auth, registered by the connector
//! loader). Besides those values it hides the password of any `scheme://user:password@`
//! URL and the value of password-like query parameters (`password=`, `api_key=`, ...).
//!
//! The registry is process-wide on purpose: a log line, a run's error or a status table
//! may mix text from several vendors, and a secret must be hidden wherever it turns up.

use std::sync::RwLock;

/// What a hidden value is replaced with.
pub const MASK: &str = "***";

/// Values shorter than this are not searched for: a two-letter "secret" would mask half
/// of every message, and is no secret anyway.
const MIN_SECRET_LEN: usize = 4;

/// Query parameters whose value is always hidden in URLs idem shows (lowercase).
const SECRET_PARAMS: &[&str] = &[
    "password",
    "passwd",
    "pwd",
    "pass",
    "secret",
    "client_secret",
    "api_key",
    "apikey",
    "api-key",
    "key",
    "access_token",
    "token",
    "auth",
    "sig",
    "signature",
];

static SECRETS: RwLock<Vec<String>> = RwLock::new(Vec::new());
static PARAMS: RwLock<Vec<String>> = RwLock::new(Vec::new());

/// Registers a secret value (and the encoded forms a vendor may echo it in).
pub fn register(secret: &str) {
    if secret.len() < MIN_SECRET_LEN {
        return;
    }
    let mut forms = vec![secret.to_string()];
    forms.push(url::form_urlencoded::byte_serialize(secret.as_bytes()).collect());
    forms.push(percent_encode_all(secret));
    if let Ok(json) = serde_json::to_string(secret) {
        forms.push(json[1..json.len() - 1].to_string());
    }
    let mut secrets = SECRETS.write().unwrap_or_else(|e| e.into_inner());
    for form in forms {
        if form.len() >= MIN_SECRET_LEN && !secrets.contains(&form) {
            secrets.push(form);
        }
    }
    // Longest first, so a secret containing another is masked whole.
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
}

/// Registers HTTP basic credentials: the password and the header's base64 form.
pub fn register_basic(username: &str, password: &str) {
    register(password);
    register(&base64(format!("{username}:{password}").as_bytes()));
}

/// Registers a query parameter name whose value is a secret (a connector's API key
/// parameter), so URLs showing it are masked even when the value is not yet known.
pub fn register_param(name: &str) {
    let name = name.to_ascii_lowercase();
    let mut params = PARAMS.write().unwrap_or_else(|e| e.into_inner());
    if !params.contains(&name) {
        params.push(name);
    }
}

/// Registers the secrets inside a URL: its `user:password@` password and the values of
/// password-like query parameters (a database URL's `?password=`).
pub fn register_url(url: &str) {
    let Ok(parsed) = url::Url::parse(url) else {
        return;
    };
    if let Some(password) = parsed.password() {
        register(password);
        let user = percent_decode(parsed.username()).unwrap_or_default();
        if let Ok(decoded) = percent_decode(password) {
            // An HTTP client sends URL credentials as basic auth.
            register_basic(&user, &decoded);
        }
    }
    for (name, value) in parsed.query_pairs() {
        if is_secret_param(&name) {
            register(&value);
        }
    }
}

/// `text` with every known secret, URL password and secret query parameter masked.
pub fn redact(text: &str) -> String {
    let out = mask_known(text);
    let out = mask_userinfo(&out);
    mask_query_params(&out)
}

/// `text` with the registered secret values masked, and nothing else changed: for a
/// vendor's link that idem must keep usable (a `token=` or `key=` cursor in it is the
/// vendor's, not idem's).
pub fn mask_known(text: &str) -> String {
    let mut out = text.to_string();
    let secrets = SECRETS.read().unwrap_or_else(|e| e.into_inner());
    for secret in secrets.iter() {
        if out.contains(secret.as_str()) {
            out = out.replace(secret.as_str(), MASK);
        }
    }
    out
}

/// True when `text` holds a registered secret value (in any registered form).
pub fn contains_secret(text: &str) -> bool {
    SECRETS
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .any(|secret| text.contains(secret.as_str()))
}

/// Text a vendor or provider wrote, made safe to store and show: redacted, without NUL
/// (Postgres text refuses it).
pub fn vendor_text(text: &str) -> String {
    let redacted = redact(text);
    if redacted.contains('\0') {
        redacted.replace('\0', "")
    } else {
        redacted
    }
}

/// `text` for a terminal: control characters (ESC, CR, BEL, C1, ...) written as `\u{..}`
/// escapes, so vendor text cannot move the cursor, recolor or rewrite what is shown.
pub fn for_terminal(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.push_str(&c.escape_unicode().to_string());
        } else {
            out.push(c);
        }
    }
    out
}

/// A URL for logs and errors: its password, known secrets and secret query values masked.
pub fn url(url: &str) -> String {
    redact(url)
}

fn is_secret_param(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    SECRET_PARAMS.contains(&name.as_str())
        || PARAMS
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&name)
}

/// `scheme://user:password@host` → `scheme://user:***@host`, anywhere in `text`.
fn mask_userinfo(text: &str) -> String {
    if !text.contains("://") {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("://") {
        let authority_start = start + 3;
        out.push_str(&rest[..authority_start]);
        let after = &rest[authority_start..];
        let end = after
            .find(|c: char| {
                matches!(c, '/' | '?' | '#' | '"' | '\'' | '<' | '>') || c.is_whitespace()
            })
            .unwrap_or(after.len());
        let authority = &after[..end];
        match authority.rfind('@') {
            Some(at) => {
                let userinfo = &authority[..at];
                match userinfo.split_once(':') {
                    Some((user, _password)) => {
                        out.push_str(user);
                        out.push(':');
                        out.push_str(MASK);
                    }
                    None => out.push_str(userinfo),
                }
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

/// `?password=x&page=2` → `?password=***&page=2`, for every secret-looking parameter.
fn mask_query_params(text: &str) -> String {
    if !text.contains('=') {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len());
    let mut chars = text.char_indices().peekable();
    let bytes = text.as_bytes();
    let mut copied = 0;
    while let Some((i, c)) = chars.next() {
        if c != '?' && c != '&' && c != ';' {
            continue;
        }
        let name_start = i + 1;
        let Some(eq) = text[name_start..].find('=').map(|e| name_start + e) else {
            break;
        };
        let name = &text[name_start..eq];
        if name.is_empty()
            || name
                .chars()
                .any(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '[' | ']')))
            || !is_secret_param(name)
        {
            continue;
        }
        let value_start = eq + 1;
        let mut value_end = value_start;
        while value_end < bytes.len()
            && !matches!(
                bytes[value_end],
                b'&' | b'#'
                    | b'"'
                    | b'\''
                    | b'<'
                    | b'>'
                    | b' '
                    | b'\t'
                    | b'\n'
                    | b'\r'
                    | b','
                    | b';'
                    | b')'
            )
        {
            value_end += 1;
        }
        if value_end == value_start || &text[value_start..value_end] == MASK {
            continue;
        }
        out.push_str(&text[copied..value_start]);
        out.push_str(MASK);
        copied = value_end;
        while chars.peek().is_some_and(|(j, _)| *j < value_end) {
            chars.next();
        }
    }
    out.push_str(&text[copied..]);
    out
}

fn percent_encode_all(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn percent_decode(text: &str) -> Result<String, std::string::FromUtf8Error> {
    let bytes: Vec<u8> = url::form_urlencoded::parse(format!("x={text}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned().into_bytes())
        .unwrap_or_default();
    String::from_utf8(bytes)
}

/// Standard base64 with padding, as HTTP basic auth writes it.
pub fn base64(input: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let byte = |i: usize| u32::from(chunk.get(i).copied().unwrap_or(0));
        let n = (byte(0) << 16) | (byte(1) << 8) | byte(2);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(TABLE[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_registered_secrets_in_every_form_and_url_passwords() {
        register("s3cr3t/+value");
        register_basic("user", "pa55word!");
        let text = format!(
            "Bearer s3cr3t/+value, q=s3cr3t%2F%2Bvalue, Basic {}",
            base64(b"user:pa55word!")
        );
        let out = redact(&text);
        assert!(!out.contains("s3cr3t"), "{out}");
        assert!(!out.contains(&base64(b"user:pa55word!")), "{out}");
        assert_eq!(
            redact("postgres://idem:hunter2@db:5432/idem?sslmode=require&password=zzz9"),
            "postgres://idem:***@db:5432/idem?sslmode=require&password=***"
        );
        assert_eq!(
            redact("GET https://x.test/a?page=2&api_key=abcd1234&b=1 failed"),
            "GET https://x.test/a?page=2&api_key=***&b=1 failed"
        );
        assert_eq!(vendor_text("a\0b"), "ab");
        assert_eq!(
            for_terminal("red\x1b[31m\r\n"),
            "red\\u{1b}[31m\\u{d}\\u{a}"
        );
        assert_eq!(base64(b"ab"), "YWI=");
    }
}
