//! Who may act in the console: the admin token from config opens a session (a random id
//! in an `HttpOnly`, `SameSite=Strict` cookie, never the token itself), and every action
//! must carry that session's CSRF token in its form and come from this very origin.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use rand::RngCore;

use crate::secret::Secret;

pub const COOKIE: &str = "idem_console";

/// Sessions expire after this long without being used.
const IDLE: Duration = Duration::from_secs(8 * 3600);

/// An operator's session.
#[derive(Debug, Clone)]
pub struct Session {
    /// The name the operator gave at sign-in, recorded with every action.
    pub operator: String,
    /// Must come back in every action's form.
    pub csrf: String,
    last_seen: Instant,
    /// A message for the next page shown (the outcome of the last action).
    pub flash: Option<String>,
}

/// The admin token and the open sessions.
pub struct Gate {
    token: Option<Secret>,
    sessions: Mutex<HashMap<String, Session>>,
}

/// Why an action was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The console has no admin token configured: it is read-only.
    ReadOnly,
    /// No valid session: sign in with the admin token first.
    NotSignedIn,
    /// The form's CSRF token or the request's origin is wrong.
    Csrf,
}

impl Refusal {
    pub fn message(&self) -> &'static str {
        match self {
            Refusal::ReadOnly => {
                "This console is read-only: no admin token is configured ([serve] admin_token = \"${IDEM_ADMIN_TOKEN}\")."
            }
            Refusal::NotSignedIn => "Sign in with the admin token to act.",
            Refusal::Csrf => {
                "Refused: the form's CSRF token does not match your session, or the request came from another site. Reload the page and try again."
            }
        }
    }
}

fn random_hex() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Compares without stopping at the first difference, so timing does not reveal a prefix.
pub fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Gate {
    pub fn new(token: Option<Secret>) -> Gate {
        Gate {
            token,
            sessions: Mutex::new(HashMap::new()),
        }
    }

    pub fn read_only(&self) -> bool {
        self.token.is_none()
    }

    /// Opens a session when `token` is the admin token; returns the session id.
    pub fn sign_in(&self, token: &str, operator: &str) -> Result<String, Refusal> {
        let Some(admin) = &self.token else {
            return Err(Refusal::ReadOnly);
        };
        if !same(admin.expose(), token) {
            return Err(Refusal::NotSignedIn);
        }
        let id = random_hex();
        let mut sessions = self.sessions.lock().expect("sessions lock");
        sessions.retain(|_, s| s.last_seen.elapsed() < IDLE);
        sessions.insert(
            id.clone(),
            Session {
                operator: operator.to_string(),
                csrf: random_hex(),
                last_seen: Instant::now(),
                flash: None,
            },
        );
        Ok(id)
    }

    pub fn sign_out(&self, headers: &HeaderMap) {
        if let Some(id) = session_id(headers) {
            self.sessions.lock().expect("sessions lock").remove(&id);
        }
    }

    /// The session of this request, if any (its flash message is taken).
    pub fn session(&self, headers: &HeaderMap) -> Option<Session> {
        let id = session_id(headers)?;
        let mut sessions = self.sessions.lock().expect("sessions lock");
        let session = sessions.get_mut(&id)?;
        if session.last_seen.elapsed() >= IDLE {
            sessions.remove(&id);
            return None;
        }
        session.last_seen = Instant::now();
        let shown = session.clone();
        session.flash = None;
        Some(shown)
    }

    /// The session allowed to perform a POSTed action with form field `csrf`.
    pub fn authorize(&self, headers: &HeaderMap, csrf: &str) -> Result<Session, Refusal> {
        if self.read_only() {
            return Err(Refusal::ReadOnly);
        }
        let id = session_id(headers).ok_or(Refusal::NotSignedIn)?;
        let sessions = self.sessions.lock().expect("sessions lock");
        let session = sessions
            .get(&id)
            .filter(|s| s.last_seen.elapsed() < IDLE)
            .ok_or(Refusal::NotSignedIn)?;
        if !same(&session.csrf, csrf) || !same_origin(headers) {
            return Err(Refusal::Csrf);
        }
        Ok(session.clone())
    }

    /// Leaves a message for the session's next page.
    pub fn flash(&self, headers: &HeaderMap, message: String) {
        if let Some(id) = session_id(headers) {
            if let Some(session) = self.sessions.lock().expect("sessions lock").get_mut(&id) {
                session.flash = Some(message);
            }
        }
    }
}

fn session_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.to_string())
}

/// A browser names the page a form was posted from; it must be this host. Requests
/// without `Origin` or `Referer` (curl, old browsers) rely on the CSRF token alone.
pub fn same_origin(headers: &HeaderMap) -> bool {
    let Some(host) = headers
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok())
    else {
        return false;
    };
    let from = headers
        .get(axum::http::header::ORIGIN)
        .or_else(|| headers.get(axum::http::header::REFERER))
        .and_then(|v| v.to_str().ok());
    match from {
        None => true,
        Some(from) => url::Url::parse(from).is_ok_and(|url| {
            let authority = match (url.host_str(), url.port()) {
                (Some(h), Some(p)) => format!("{h}:{p}"),
                (Some(h), None) => h.to_string(),
                _ => return false,
            };
            authority.eq_ignore_ascii_case(host)
        }),
    }
}

/// The `Set-Cookie` value for a new session.
pub fn cookie(id: &str) -> String {
    format!("{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age=28800")
}

/// The `Set-Cookie` value that ends a session in the browser.
pub fn expired_cookie() -> String {
    format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0")
}
