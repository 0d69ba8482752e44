//! Transports that send a ledger row, and how each classifies what happened.
//!
//! The classification is what keeps a send exactly-once: `Sent` is final, `NotSent` is
//! safe to retry, `Permanent` stops, and `Ambiguous` (the message may have gone out) is
//! retried only by a provider that de-duplicates on the ledger key.

use std::future::Future;
use std::time::Duration;

use lettre::message::header::ContentType;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{AsyncSmtpConnection, TlsParameters};
use lettre::transport::smtp::commands::{Data, Mail, Rcpt};
use lettre::transport::smtp::extension::{ClientId, MailBodyParameter, MailParameter};
use lettre::transport::smtp::response::Response;
use serde_json::json;

use crate::schema::settings::{
    HttpEmailSettings, NotifySettings, SmtpSettings, SmtpTls, TransportKind,
};
use crate::secret::{self, Secret};

/// One message, rendered once when its ledger row was inserted.
#[derive(Debug, Clone)]
pub struct Message {
    pub key: String,
    pub recipient: String,
    pub subject: String,
    pub body: String,
    pub message_id: String,
}

/// What happened to one send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The provider accepted the message.
    Sent { provider_id: Option<String> },
    /// Definitely not sent (connection refused, 429, 503): retry later.
    NotSent {
        error: String,
        retry_after: Option<Duration>,
    },
    /// The provider refused it for good (invalid address, 4xx).
    Permanent { error: String },
    /// It may or may not have gone out (timeout after the request, reset, 502/504).
    Ambiguous { error: String },
    /// The provider is still working on an earlier request under this idempotency key
    /// (HTTP 409/425): retried later under the same key, never a failure, since the
    /// earlier request may be delivering it right now.
    InProgress {
        error: String,
        retry_after: Option<Duration>,
    },
}

/// A way to send ledger rows.
pub trait Transport: Send + Sync {
    /// Sends one message.
    fn send(&self, message: &Message) -> impl Future<Output = Outcome> + Send;
    /// True when the provider de-duplicates on the ledger key, so an ambiguous send may
    /// simply be retried.
    fn deduplicates(&self) -> bool;
    /// The name recorded on each row this transport attempts (`log`, `smtp`, `http`), so
    /// rows "sent" to the log can be found and requeued.
    fn name(&self) -> &'static str {
        "custom"
    }
}

/// The configured transport.
pub enum AnyTransport {
    Log,
    Smtp(SmtpTransport),
    Http(HttpTransport),
}

/// Why a transport could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("notify.transport = \"{0}\" needs a [notify.{0}] section")]
    Missing(&'static str),
    #[error("notify.{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

impl AnyTransport {
    pub fn from_settings(settings: &NotifySettings) -> Result<AnyTransport, TransportError> {
        settings
            .check_lease()
            .map_err(|message| TransportError::Invalid {
                field: "lease",
                message,
            })?;
        Ok(match settings.transport {
            TransportKind::Log => AnyTransport::Log,
            TransportKind::Smtp => AnyTransport::Smtp(SmtpTransport::new(
                settings
                    .smtp
                    .as_ref()
                    .ok_or(TransportError::Missing("smtp"))?,
                &settings.from,
                settings.send_timeout.0,
                settings.concurrency as usize,
            )?),
            TransportKind::Http => AnyTransport::Http(HttpTransport::new(
                settings
                    .http
                    .as_ref()
                    .ok_or(TransportError::Missing("http"))?,
                &settings.from,
                settings.send_timeout.0,
            )?),
        })
    }
}

impl Transport for AnyTransport {
    async fn send(&self, message: &Message) -> Outcome {
        // A provider's answer may echo the credentials it was sent: what is stored in the
        // ledger row and logged is redacted.
        redact_outcome(self.send_unredacted(message).await)
    }

    fn deduplicates(&self) -> bool {
        match self {
            AnyTransport::Log => true,
            AnyTransport::Smtp(smtp) => smtp.deduplicates(),
            AnyTransport::Http(http) => http.deduplicates(),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            AnyTransport::Log => "log",
            AnyTransport::Smtp(_) => "smtp",
            AnyTransport::Http(_) => "http",
        }
    }
}

fn redact_outcome(outcome: Outcome) -> Outcome {
    let clean = |error: String| crate::redact::vendor_text(&error);
    match outcome {
        Outcome::Sent { provider_id } => Outcome::Sent {
            provider_id: provider_id.map(clean),
        },
        Outcome::NotSent { error, retry_after } => Outcome::NotSent {
            error: clean(error),
            retry_after,
        },
        Outcome::Permanent { error } => Outcome::Permanent {
            error: clean(error),
        },
        Outcome::Ambiguous { error } => Outcome::Ambiguous {
            error: clean(error),
        },
        Outcome::InProgress { error, retry_after } => Outcome::InProgress {
            error: clean(error),
            retry_after,
        },
    }
}

/// The one rule for a recipient, whatever the transport: exactly one syntactically valid
/// address (lettre's parser, as SMTP uses), so a `to` carrying CR/LF, a second header or a
/// comma list cannot reach more people than the rule meant.
pub fn validate_recipient(recipient: &str) -> Result<lettre::Address, String> {
    recipient
        .parse::<lettre::Address>()
        .map_err(|err| format!("invalid recipient '{}': {err}", recipient.escape_debug()))
}

/// A ledger key must travel as a header (`Idempotency-Key`): visible ASCII only.
pub fn validate_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key.len() > 255 || !key.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return Err(format!(
            "ledger key '{}' cannot be sent as a header: it must be 1-255 visible ASCII characters",
            key.escape_debug()
        ));
    }
    Ok(())
}

impl AnyTransport {
    async fn send_unredacted(&self, message: &Message) -> Outcome {
        match self {
            AnyTransport::Log => {
                tracing::info!(key = %message.key, to = %message.recipient, subject = %message.subject, "log transport: would send");
                Outcome::Sent { provider_id: None }
            }
            AnyTransport::Smtp(smtp) => smtp.send(message).await,
            AnyTransport::Http(http) => http.send(message).await,
        }
    }
}

fn resolve(field: &'static str, value: &str) -> Result<String, TransportError> {
    secret::resolve(value).map_err(|err| TransportError::Invalid {
        field,
        message: err.to_string(),
    })
}

/// SMTP through lettre's connection type, with connections kept open and reused (one per
/// send in flight) on sockets with `TCP_NODELAY`. lettre writes a message body and its
/// terminating `.` in two writes; without `TCP_NODELAY` the second waits for the server's
/// delayed ACK (~40 ms a message), and lettre's own pooled transport offers no way to set
/// it. SMTP has no idempotency key: an ambiguous send goes to `needs_review`, never
/// silently out again.
pub struct SmtpTransport {
    host: String,
    port: u16,
    tls: SmtpTls,
    credentials: Option<Credentials>,
    hello: ClientId,
    connect_timeout: Duration,
    from: lettre::message::Mailbox,
    /// Open connections between sends; at most `max_idle` are kept.
    idle: std::sync::Mutex<Vec<AsyncSmtpConnection>>,
    max_idle: usize,
}

/// How far a send got before it failed: what decides whether the message may have gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SmtpStage {
    /// Connecting, greeting, STARTTLS, AUTH: no message was started.
    Setup,
    /// MAIL, RCPT, DATA: no content was written, so nothing can have been accepted.
    Envelope,
    /// The content and its terminating `.` were being written or answered.
    Content,
}

#[derive(Debug, thiserror::Error)]
enum SmtpFailure {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Smtp(#[from] lettre::transport::smtp::Error),
}

impl SmtpTransport {
    pub fn new(
        settings: &SmtpSettings,
        from: &str,
        timeout: Duration,
        max_idle: usize,
    ) -> Result<Self, TransportError> {
        let host = resolve("smtp.host", &settings.host)?;
        let port = settings.port.unwrap_or(match settings.tls {
            SmtpTls::None => 25,
            SmtpTls::Starttls => 587,
            SmtpTls::Tls => 465,
        });
        if settings.tls != SmtpTls::None {
            // Fails early on a host name TLS cannot verify against.
            TlsParameters::new(host.clone()).map_err(|e| TransportError::Invalid {
                field: "smtp",
                message: e.to_string(),
            })?;
        }
        let credentials = match &settings.username {
            Some(user) => {
                let password = Secret::new(resolve(
                    "smtp.password",
                    settings.password.as_deref().unwrap_or(""),
                )?);
                Some(Credentials::new(
                    resolve("smtp.username", user)?,
                    password.expose().to_string(),
                ))
            }
            None => None,
        };
        let from = from.parse().map_err(|e| TransportError::Invalid {
            field: "from",
            message: format!("'{from}' is not an address: {e}"),
        })?;
        Ok(Self {
            host,
            port,
            tls: settings.tls,
            credentials,
            hello: ClientId::default(),
            connect_timeout: timeout,
            from,
            idle: std::sync::Mutex::new(Vec::new()),
            max_idle: max_idle.max(1),
        })
    }

    async fn connect(&self) -> Result<AsyncSmtpConnection, SmtpFailure> {
        let tls = || TlsParameters::new(self.host.clone());
        let mut conn = if self.tls == SmtpTls::Tls {
            // Implicit TLS needs the handshake before the greeting, which lettre only does
            // on a socket it opens itself (without TCP_NODELAY).
            AsyncSmtpConnection::connect_tokio1(
                (self.host.as_str(), self.port),
                Some(self.connect_timeout),
                &self.hello,
                Some(tls()?),
                None,
            )
            .await?
        } else {
            let addr = format!("{}:{}", self.host, self.port);
            let failed = |source| SmtpFailure::Connect {
                addr: addr.clone(),
                source,
            };
            let tcp = tokio::time::timeout(
                self.connect_timeout,
                tokio::net::TcpStream::connect((self.host.as_str(), self.port)),
            )
            .await
            .map_err(|_| failed(std::io::ErrorKind::TimedOut.into()))?
            .map_err(failed)?;
            tcp.set_nodelay(true).map_err(failed)?;
            let mut conn =
                AsyncSmtpConnection::connect_with_transport(Box::new(tcp), &self.hello).await?;
            if self.tls == SmtpTls::Starttls {
                conn.starttls(tls()?, &self.hello).await?;
            }
            conn
        };
        if let Some(credentials) = &self.credentials {
            conn.auth(&[Mechanism::Plain, Mechanism::Login], credentials)
                .await?;
        }
        Ok(conn)
    }

    fn take_idle(&self) -> Option<AsyncSmtpConnection> {
        self.idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop()
    }

    fn put_idle(&self, conn: AsyncSmtpConnection) {
        let mut idle = self
            .idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if idle.len() < self.max_idle {
            idle.push(conn);
        }
    }

    async fn send(&self, message: &Message) -> Outcome {
        let to = match validate_recipient(&message.recipient) {
            Ok(address) => lettre::message::Mailbox::new(None, address),
            Err(error) => return Outcome::Permanent { error },
        };
        let email = lettre::Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(message.subject.clone())
            .message_id(Some(message.message_id.clone()))
            .header(ContentType::TEXT_PLAIN)
            .body(message.body.clone());
        let email = match email {
            Ok(email) => email,
            Err(err) => {
                return Outcome::Permanent {
                    error: format!("cannot build the message: {err}"),
                };
            }
        };
        let envelope = email.envelope().clone();
        let bytes = email.formatted();
        loop {
            let (mut conn, reused) = match self.take_idle() {
                Some(conn) => (conn, true),
                None => match self.connect().await {
                    Ok(conn) => (conn, false),
                    Err(err) => return classify_failure(&err, SmtpStage::Setup),
                },
            };
            match transmit(&mut conn, &envelope, &bytes).await {
                Ok(response) => {
                    self.put_idle(conn);
                    return Outcome::Sent {
                        provider_id: response.message().next().map(str::to_string),
                    };
                }
                // A kept connection the server closed meanwhile fails before any content
                // was written: nothing went out, so the next connection is tried at once.
                Err((SmtpStage::Envelope, err)) if reused && !err.is_permanent() => {
                    tracing::debug!(error = %err, "a kept SMTP connection was closed; using another");
                }
                // The connection is dropped: after a failure its state is unknown.
                Err((stage, err)) => return classify_failure(&SmtpFailure::Smtp(err), stage),
            }
        }
    }

    fn deduplicates(&self) -> bool {
        false
    }
}

/// One message over an open connection, as lettre's transport sends it, but telling
/// apart a failure before the content was written (nothing can have been accepted) from
/// one after.
async fn transmit(
    conn: &mut AsyncSmtpConnection,
    envelope: &lettre::address::Envelope,
    bytes: &[u8],
) -> Result<Response, (SmtpStage, lettre::transport::smtp::Error)> {
    let envelope_stage = |err| (SmtpStage::Envelope, err);
    let mut options = Vec::new();
    let non_ascii = |a: &lettre::Address| !AsRef::<str>::as_ref(a).is_ascii();
    if envelope.from().is_some_and(non_ascii) || envelope.to().iter().any(non_ascii) {
        options.push(MailParameter::SmtpUtfEight);
    }
    if !bytes.is_ascii() {
        options.push(MailParameter::Body(MailBodyParameter::EightBitMime));
    }
    conn.command(Mail::new(envelope.from().cloned(), options))
        .await
        .map_err(envelope_stage)?;
    for to in envelope.to() {
        conn.command(Rcpt::new(to.clone(), Vec::new()))
            .await
            .map_err(envelope_stage)?;
    }
    conn.command(Data).await.map_err(envelope_stage)?;
    conn.message(bytes)
        .await
        .map_err(|err| (SmtpStage::Content, err))
}

/// Before any content was written nothing can have been sent: what would be ambiguous
/// later is a definite non-send there.
fn classify_failure(err: &SmtpFailure, stage: SmtpStage) -> Outcome {
    let outcome = match err {
        SmtpFailure::Connect { .. } => Outcome::NotSent {
            error: crate::errors::error_chain(err),
            retry_after: None,
        },
        SmtpFailure::Smtp(err) => classify_smtp(err),
    };
    match outcome {
        Outcome::Ambiguous { error } if stage != SmtpStage::Content => Outcome::NotSent {
            error,
            retry_after: None,
        },
        outcome => outcome,
    }
}

fn classify_smtp(err: &lettre::transport::smtp::Error) -> Outcome {
    let error = crate::errors::error_chain(err);
    if err.is_permanent() {
        return Outcome::Permanent { error };
    }
    if err.is_transient() {
        return Outcome::NotSent {
            error,
            retry_after: None,
        };
    }
    // A connection that never opened sent nothing; anything later may have.
    let mut source: Option<&dyn std::error::Error> = Some(err);
    while let Some(inner) = source {
        if let Some(io) = inner.downcast_ref::<std::io::Error>() {
            if matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::AddrNotAvailable
            ) {
                return Outcome::NotSent {
                    error,
                    retry_after: None,
                };
            }
        }
        source = inner.source();
    }
    if err.to_string().starts_with("Connection error") {
        return Outcome::NotSent {
            error,
            retry_after: None,
        };
    }
    Outcome::Ambiguous { error }
}

/// An HTTP email API that honors `Idempotency-Key`: the ledger key is sent as that key,
/// so a retry after an ambiguous outcome cannot deliver twice.
pub struct HttpTransport {
    client: reqwest::Client,
    url: String,
    token: Option<Secret>,
    from: String,
}

impl HttpTransport {
    pub fn new(
        settings: &HttpEmailSettings,
        from: &str,
        timeout: Duration,
    ) -> Result<Self, TransportError> {
        let url = resolve("http.url", &settings.url)?;
        let token = settings
            .token
            .as_deref()
            .map(|t| resolve("http.token", t).map(Secret::new))
            .transpose()?;
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .map_err(|e| TransportError::Invalid {
                field: "http",
                message: e.to_string(),
            })?;
        Ok(Self {
            client,
            url,
            token,
            from: from.to_string(),
        })
    }

    async fn send(&self, message: &Message) -> Outcome {
        let recipient = match validate_recipient(&message.recipient) {
            Ok(address) => address.to_string(),
            Err(error) => return Outcome::Permanent { error },
        };
        if let Err(error) = validate_key(&message.key) {
            return Outcome::Permanent { error };
        }
        let mut request = self
            .client
            .post(&self.url)
            .header("Idempotency-Key", &message.key)
            .json(&json!({
                "from": self.from,
                "to": recipient,
                "subject": message.subject,
                "body": message.body,
                "message_id": message.message_id,
            }));
        if let Some(token) = &self.token {
            request = request.bearer_auth(token.expose());
        }
        let response = match request.send().await {
            Ok(response) => response,
            Err(err) if err.is_connect() => {
                return Outcome::NotSent {
                    error: format!("cannot connect to {}: {}", self.url, err.without_url()),
                    retry_after: None,
                };
            }
            Err(err) => {
                return Outcome::Ambiguous {
                    error: format!("{}: {}", self.url, err.without_url()),
                };
            }
        };
        let status = response.status();
        let retry_after = crate::http::retry_after(response.headers());
        let mut body = Vec::new();
        let mut response = response;
        // Only the start of a provider's answer is kept; a huge one is never downloaded.
        while body.len() < 64 * 1024 {
            match response.chunk().await {
                Ok(Some(chunk)) => body.extend_from_slice(&chunk),
                _ => break,
            }
        }
        let body = String::from_utf8_lossy(&body).into_owned();
        let error = || {
            format!(
                "{}: HTTP {status}: {}",
                self.url,
                // Redacted before it is cut: no half of a secret is left at the cut.
                crate::redact::vendor_text(&body)
                    .chars()
                    .take(300)
                    .collect::<String>()
            )
        };
        match status.as_u16() {
            200..=299 => Outcome::Sent {
                provider_id: serde_json::from_str::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v.get("id").and_then(|id| id.as_str()).map(str::to_string)),
            },
            429 | 503 => Outcome::NotSent {
                error: error(),
                retry_after,
            },
            // "A request with this key is in progress" (Stripe-style 409, 425 Too Early).
            409 | 425 => Outcome::InProgress {
                error: error(),
                retry_after,
            },
            400..=499 => Outcome::Permanent { error: error() },
            _ => Outcome::Ambiguous { error: error() },
        }
    }

    fn deduplicates(&self) -> bool {
        true
    }
}
