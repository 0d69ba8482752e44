//! Who this process is: the instance id written on runs, ledger leases and every log line
//! of `idem serve`. The store and the ledger stamp it on rows, so it sits at the bottom;
//! the heartbeat and membership that use it live in `instance`.

use std::sync::OnceLock;

static INSTANCE: OnceLock<String> = OnceLock::new();

/// This process's instance id. `idem serve` sets it at start ([`set_id`]); any other
/// command is `host:pid`, which is enough to tell a CLI run apart in `idem_runs`.
pub fn id() -> &'static str {
    INSTANCE.get_or_init(|| format!("{}:{}", hostname(), std::process::id()))
}

/// Fixes the instance id: `configured` (`[serve] instance` or `IDEM__SERVE__INSTANCE`)
/// when given, else the host name (the pod name in Kubernetes) and the start time, so a
/// restarted pod with the same name is still a new instance. Returns the id in force.
pub fn set_id(configured: Option<&str>) -> &'static str {
    let wanted = match configured.map(str::trim).filter(|s| !s.is_empty()) {
        Some(id) => id.to_string(),
        None => format!(
            "{}@{}",
            hostname(),
            chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ")
        ),
    };
    let _ = INSTANCE.set(wanted);
    id()
}

fn hostname() -> String {
    if let Ok(name) = std::env::var("HOSTNAME") {
        if !name.is_empty() {
            return name;
        }
    }
    let mut buffer = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at most that much.
    let ok = unsafe { libc::gethostname(buffer.as_mut_ptr().cast(), buffer.len()) } == 0;
    let end = buffer.iter().position(|b| *b == 0).unwrap_or(buffer.len());
    match std::str::from_utf8(&buffer[..end]) {
        Ok(name) if ok && !name.is_empty() => name.to_string(),
        _ => "unknown-host".into(),
    }
}
