//! How idem opens Postgres sessions: TLS with libpq's `sslmode` semantics, a name and
//! timeouts on every session so each wait is bounded and visible, and connection errors
//! said once, with what to try.

use std::net::IpAddr;

use sqlx::postgres::{PgConnectOptions, PgSslMode};
use sqlx::{Connection as _, PgConnection, PgPool};

use super::StoreError;
pub use crate::schema::settings::SessionSettings;

/// A parsed database URL (plus the `PG*` environment), with idem's TLS default applied.
#[derive(Debug, Clone)]
pub struct Target {
    options: PgConnectOptions,
    /// The host, or the socket folder.
    pub host: String,
    pub port: u16,
    pub database: String,
    pub user: String,
    /// The effective sslmode.
    pub ssl_mode: PgSslMode,
    /// Whether the URL or `PGSSLMODE` chose the sslmode (rather than idem's default).
    pub ssl_mode_explicit: bool,
    /// A Unix socket or a loopback address: traffic never leaves the machine.
    pub loopback: bool,
    /// Whether a CA file (`sslrootcert`/`PGSSLROOTCERT`) is given.
    pub has_root_cert: bool,
}

/// libpq's name of an sslmode.
pub fn ssl_mode_name(mode: PgSslMode) -> &'static str {
    match mode {
        PgSslMode::Disable => "disable",
        PgSslMode::Allow => "allow",
        PgSslMode::Prefer => "prefer",
        PgSslMode::Require => "require",
        PgSslMode::VerifyCa => "verify-ca",
        PgSslMode::VerifyFull => "verify-full",
    }
}

impl Target {
    /// Parses `url` as libpq would: URL parameters win over `PG*` variables. A host that
    /// is not loopback gets `sslmode=require` unless an sslmode is given, so clear text
    /// over a network is always a choice someone wrote down.
    pub fn parse(url: &str) -> Result<Target, StoreError> {
        let invalid = |cause: String| {
            StoreError::Connect {
            target: super::describe_url(url),
            cause,
            hint: " Check DATABASE_URL: postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE[?sslmode=verify-full&sslrootcert=FILE]".into(),
        }
        };
        let mut parsed =
            url::Url::parse(url).map_err(|err| invalid(format!("not a valid URL ({err})")))?;
        let pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        let url_mode = pairs.iter().any(|(k, _)| k == "sslmode" || k == "ssl-mode");
        // libpq's `sslrootcert=system` means the platform's roots; idem always trusts its
        // bundled web PKI roots, so it only has to drop the word (sqlx would read a file).
        let system_roots = |k: &str, v: &str| {
            matches!(k, "sslrootcert" | "ssl-root-cert" | "ssl-ca") && v == "system"
        };
        if pairs.iter().any(|(k, v)| system_roots(k, v)) {
            let kept: Vec<&(String, String)> =
                pairs.iter().filter(|(k, v)| !system_roots(k, v)).collect();
            if kept.is_empty() {
                parsed.set_query(None);
            } else {
                parsed.query_pairs_mut().clear().extend_pairs(kept);
            }
        }
        let mut options: PgConnectOptions = parsed
            .as_str()
            .parse()
            .map_err(|err: sqlx::Error| invalid(root_cause(&err)))?;
        let root_cert_env = std::env::var("PGSSLROOTCERT").ok();
        if root_cert_env.as_deref() == Some("system") {
            return Err(invalid(
                "PGSSLROOTCERT=system is not a file; unset it (idem trusts the bundled web PKI roots already)".into(),
            ));
        }
        let ssl_mode_explicit = url_mode || std::env::var_os("PGSSLMODE").is_some();
        let socket = options.get_socket().map(|s| s.display().to_string());
        let host = socket
            .clone()
            .unwrap_or_else(|| options.get_host().to_string());
        let loopback = socket.is_some() || host.starts_with('/') || is_loopback(&host);
        if !ssl_mode_explicit && !loopback {
            options = options.ssl_mode(PgSslMode::Require);
        }
        let has_root_cert = pairs.iter().any(|(k, v)| {
            matches!(k.as_str(), "sslrootcert" | "ssl-root-cert" | "ssl-ca") && v != "system"
        }) || root_cert_env.is_some();
        Ok(Target {
            host,
            port: options.get_port(),
            database: options
                .get_database()
                .unwrap_or(options.get_username())
                .to_string(),
            user: options.get_username().to_string(),
            ssl_mode: options.get_ssl_mode(),
            ssl_mode_explicit,
            loopback,
            has_root_cert,
            options,
        })
    }

    /// Host, port, database, user and sslmode, in one phrase, never the password.
    pub fn describe(&self) -> String {
        format!(
            "{}:{}, database {} as {} (sslmode={})",
            self.host,
            self.port,
            self.database,
            self.user,
            ssl_mode_name(self.ssl_mode)
        )
    }

    /// Options for a session named `application_name`.
    pub fn options(&self, application_name: &str) -> PgConnectOptions {
        self.options
            .clone()
            .application_name(&truncate_name(application_name))
    }

    /// One session, named and bounded, or an error that says once what went wrong.
    pub async fn open(&self, settings: &SessionSettings) -> Result<PgConnection, StoreError> {
        let options = self.options(&settings.application_name);
        let mut connection = match tokio::time::timeout(
            settings.connect_timeout,
            PgConnection::connect_with(&options),
        )
        .await
        {
            Ok(Ok(connection)) => connection,
            Ok(Err(err)) => return Err(self.connect_error(&err)),
            Err(_) => {
                return Err(StoreError::Connect {
                    target: self.describe(),
                    cause: format!(
                        "no answer within {}s",
                        settings.connect_timeout.as_secs_f64()
                    ),
                    hint: " Is the host reachable from here (firewall, security group, VPN)?"
                        .into(),
                });
            }
        };
        apply_limits(&mut connection, settings)
            .await
            .map_err(|err| self.connect_error(&err))?;
        Ok(connection)
    }

    /// A connection error in one sentence: where, the root cause, and what to try.
    pub fn connect_error(&self, err: &sqlx::Error) -> StoreError {
        let cause = root_cause(err);
        let lower = cause.to_lowercase();
        let mode = ssl_mode_name(self.ssl_mode);
        let hint = if lower.contains("unknownissuer") || lower.contains("unknown issuer") {
            if self.has_root_cert {
                " The certificate is not signed by the CA in sslrootcert (nor a public one): check that sslrootcert names the CA that signed the server's certificate.".to_string()
            } else {
                format!(
                    " The server's certificate is not signed by a public CA: with sslmode={mode} and a private CA (self-hosted, some managed services), set sslrootcert=/path/to/ca.pem in the URL (or PGSSLROOTCERT)."
                )
            }
        } else if lower.contains("not valid for name") || lower.contains("notvalidforname") {
            // sqlx 0.8 with rustls >= 0.23.24 checks the name under verify-ca too
            // (launchbadge/sqlx#3793), so verify-ca is no way out here.
            format!(
                " The certificate is for another host name than {}: connect using a host name the certificate lists (via DNS or /etc/hosts if need be).",
                self.host
            )
        } else if lower.contains("does not support tls") || lower.contains("does not support ssl") {
            if self.ssl_mode_explicit {
                " The server does not offer TLS: turn ssl on in the server, or (only on a network you trust) use sslmode=disable.".to_string()
            } else {
                format!(
                    " idem requires TLS for a host that is not loopback unless the URL says sslmode=disable: turn ssl on in the server, or add sslmode=disable if the network to {} is trusted.",
                    self.host
                )
            }
        } else if lower.contains("no pg_hba.conf entry") && lower.contains("no encryption") {
            " The server accepts this host only over TLS: use sslmode=verify-full (or require)."
                .to_string()
        } else if lower.contains("certificate") || lower.contains("pem") {
            " Check the files named by sslrootcert, sslcert and sslkey (PEM, readable by idem)."
                .to_string()
        } else if lower.contains("password authentication failed") || lower.contains("no password")
        {
            " Check the user and password in DATABASE_URL (or PGPASSWORD, ~/.pgpass).".to_string()
        } else if lower.contains("does not exist") {
            " Create it, or fix the name in DATABASE_URL.".to_string()
        } else if lower.contains("refused") {
            format!(
                " Is Postgres running and listening on {}:{}?",
                self.host, self.port
            )
        } else if lower.contains("failed to lookup")
            || lower.contains("name or service not known")
            || lower.contains("no such host")
        {
            " Check the host name in DATABASE_URL.".to_string()
        } else {
            String::new()
        };
        StoreError::Connect {
            target: self.describe(),
            cause,
            hint,
        }
    }
}

/// Sets the session's timeouts (one round trip per new connection).
pub async fn apply_limits(
    connection: &mut PgConnection,
    settings: &SessionSettings,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "SELECT set_config('statement_timeout', $1, false), set_config('idle_in_transaction_session_timeout', $2, false)",
    )
    .bind(format!("{}ms", settings.statement_timeout.as_millis()))
    .bind(format!("{}ms", settings.idle_in_transaction_timeout.as_millis()))
    .execute(connection)
    .await
    .map(|_| ())
}

impl super::StreamLock {
    /// Names the lock's session after its run: it stays open for the whole run, so it
    /// is the session a DBA finds in `pg_stat_activity`.
    pub async fn name_run(&mut self, name: &str) {
        let _ = sqlx::query("SELECT set_config('application_name', $1, false)")
            .bind(truncate_name(name))
            .execute(&mut self.connection)
            .await;
    }
}

/// What the server says about this session's encryption.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TlsStatus {
    /// Whether the session is encrypted.
    pub encrypted: bool,
    /// e.g. `TLSv1.3`.
    pub version: Option<String>,
    pub cipher: Option<String>,
    /// What idem checked of the server's certificate.
    pub verified: &'static str,
}

/// The TLS state of one of the pool's sessions, from `pg_stat_ssl`.
pub async fn tls_status(pool: &PgPool, target: &Target) -> Result<TlsStatus, StoreError> {
    let (encrypted, version, cipher): (bool, Option<String>, Option<String>) =
        sqlx::query_as("SELECT ssl, version, cipher FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .fetch_one(pool)
            .await
            .map_err(|source| StoreError::Query {
                context: "reading pg_stat_ssl".into(),
                source,
            })?;
    let verified = match (encrypted, target.ssl_mode) {
        (false, _) => "not encrypted",
        (true, PgSslMode::VerifyFull) => "certificate verified (CA and host name)",
        (true, PgSslMode::VerifyCa) => {
            "certificate verified (CA; this build checks the host name too)"
        }
        (true, _) => "certificate NOT verified (use sslmode=verify-full)",
    };
    Ok(TlsStatus {
        encrypted,
        version,
        cipher,
        verified,
    })
}

/// The innermost message of an error chain: sqlx wraps TLS and I/O causes in sentences
/// that repeat them, so only the root is worth showing.
pub fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut current = err;
    while let Some(next) = current.source() {
        current = next;
    }
    let message = current.to_string();
    match err.downcast_ref::<sqlx::Error>() {
        Some(sqlx::Error::Database(db)) => db.message().to_string(),
        Some(sqlx::Error::Configuration(inner)) => format!("invalid connection settings: {inner}"),
        // rustls' failures reach sqlx as TLS or I/O errors; either way, say it was TLS.
        Some(sqlx::Error::Tls(_)) => format!("TLS handshake failed: {message}"),
        _ if message.contains("certificate") || message.contains("TLS") => {
            format!("TLS handshake failed: {message}")
        }
        _ => message,
    }
}

fn is_loopback(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare.eq_ignore_ascii_case("localhost")
        || bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Postgres keeps the first 63 bytes of `application_name`; cut on a char boundary so
/// the name stays valid UTF-8.
fn truncate_name(name: &str) -> String {
    let mut end = name.len().min(63);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name[..end].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_remote_host_without_sslmode_requires_tls() {
        let target = Target::parse("postgres://u@db.example.com/app").unwrap();
        assert_eq!(ssl_mode_name(target.ssl_mode), "require");
        assert!(!target.ssl_mode_explicit);
        let target = Target::parse("postgres://u@db.example.com/app?sslmode=disable").unwrap();
        assert_eq!(ssl_mode_name(target.ssl_mode), "disable");
        let local = Target::parse("postgres://u@127.0.0.1/app").unwrap();
        assert!(local.loopback);
        let local = Target::parse("postgres://u@[::1]/app").unwrap();
        assert!(local.loopback);
    }

    #[test]
    fn sslrootcert_system_means_the_bundled_roots() {
        let target =
            Target::parse("postgres://u@db.example.com/app?sslmode=verify-full&sslrootcert=system")
                .unwrap();
        assert_eq!(ssl_mode_name(target.ssl_mode), "verify-full");
        assert!(!target.has_root_cert);
    }

    #[test]
    fn names_are_cut_to_what_postgres_keeps() {
        let long = "é".repeat(40);
        assert!(truncate_name(&long).len() <= 63);
        assert_eq!(truncate_name("idem run"), "idem run");
    }
}
