//! The notification ledger (transactional outbox): rules record side effects as rows in
//! the same transactions as the data; the dispatcher sends each row once.

pub mod rules;

/// The deterministic Message-ID of a ledger key: a resend (after `resolve --as retry`)
/// carries the same id, so a mail system can tell it is the same message.
pub fn message_id(key: &str) -> String {
    format!(
        "<{}@idem.local>",
        uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_URL, key.as_bytes())
    )
}
