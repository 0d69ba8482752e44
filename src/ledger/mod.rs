//! The notification ledger (transactional outbox): rules record side effects as rows in
//! the same transactions as the data; the dispatcher sends each row once; operators list,
//! inspect and resolve rows.

pub mod dispatch;
pub mod rules;
pub mod transport;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

use crate::store::{Context, StoreError};

/// The deterministic Message-ID of a ledger key: a resend (after `resolve --as retry`)
/// carries the same id, so a mail system can tell it is the same message.
pub fn message_id(key: &str) -> String {
    format!(
        "<{}@idem.local>",
        uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_URL, key.as_bytes())
    )
}

/// A ledger row as operators see it.
#[derive(Debug, Clone, sqlx::FromRow, Serialize)]
pub struct LedgerRow {
    pub key: String,
    pub channel: String,
    pub recipient: String,
    pub subject: String,
    pub body: String,
    pub message_id: String,
    pub source_system: String,
    pub stream: String,
    pub source_id: String,
    pub rule: String,
    pub status: String,
    pub attempts: i32,
    pub next_attempt_at: DateTime<Utc>,
    pub lease_owner: Option<String>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub in_flight_since: Option<DateTime<Utc>>,
    pub last_outcome: Option<String>,
    pub last_error: Option<String>,
    pub provider_message_id: Option<String>,
    /// The transport that attempted the row last (`log` delivered nothing).
    pub transport: Option<String>,
    pub created_at: DateTime<Utc>,
    pub first_attempt_at: Option<DateTime<Utc>>,
    pub sent_at: Option<DateTime<Utc>>,
}

const COLUMNS: &str = "key, channel, recipient, subject, body, message_id, source_system, stream, source_id, rule, status,
    attempts, next_attempt_at, lease_owner, lease_expires_at, in_flight_since, last_outcome, last_error, provider_message_id, transport, created_at,
    first_attempt_at, sent_at";

/// Rows, optionally of one status, oldest first.
pub async fn list(
    pool: &PgPool,
    status: Option<&str>,
    limit: i64,
) -> Result<Vec<LedgerRow>, StoreError> {
    sqlx::query_as(&format!("SELECT {COLUMNS} FROM idem_ledger WHERE ($1::text IS NULL OR status = $1) ORDER BY created_at, key LIMIT $2"))
        .bind(status)
        .bind(limit)
        .fetch_all(pool)
        .await
        .context(|| "listing the ledger".into())
}

/// How many rows have each status.
pub async fn counts_by_status(pool: &PgPool) -> Result<Vec<(String, i64)>, StoreError> {
    sqlx::query_as("SELECT status, count(*) FROM idem_ledger GROUP BY status ORDER BY status")
        .fetch_all(pool)
        .await
        .context(|| "counting ledger rows".into())
}

/// One row by key.
pub async fn get(pool: &PgPool, key: &str) -> Result<Option<LedgerRow>, StoreError> {
    sqlx::query_as(&format!("SELECT {COLUMNS} FROM idem_ledger WHERE key = $1"))
        .bind(key)
        .fetch_optional(pool)
        .await
        .context(|| format!("reading ledger row {key}"))
}

/// How an operator resolves a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Resolution {
    /// It did go out: mark it sent.
    Sent,
    /// It did not go out: send it again (same payload, same Message-ID).
    Retry,
    /// Never send it.
    Cancel,
}

/// Why a resolution was refused.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("no ledger row with key '{0}'")]
    NotFound(String),
    #[error(
        "ledger row '{key}' is {status}; only needs_review, failed or pending rows, and rows cancelled because their reason was gone, can be resolved (a sending row is in flight)"
    )]
    WrongState { key: String, status: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Resolves a row by hand. A row in flight (`sending`) or already `sent` is refused. A row
/// the dispatcher cancelled because its reason was gone (never attempted) may be retried:
/// its reason is checked again right before the send.
pub async fn resolve(
    pool: &PgPool,
    key: &str,
    resolution: Resolution,
) -> Result<LedgerRow, ResolveError> {
    let status = match resolution {
        Resolution::Sent => "sent",
        Resolution::Retry => "pending",
        Resolution::Cancel => "cancelled",
    };
    let updated: Option<LedgerRow> = sqlx::query_as(&format!(
        "UPDATE idem_ledger SET status = $2, last_outcome = 'resolved by hand',
           sent_at = CASE WHEN $2 = 'sent' THEN now() ELSE sent_at END, next_attempt_at = now()
         WHERE key = $1 AND (status IN ('needs_review', 'failed', 'pending')
                             OR (status = 'cancelled' AND last_outcome IN ('condition_no_longer_holds', 'record_deleted')))
         RETURNING {COLUMNS}"
    ))
    .bind(key)
    .bind(status)
    .fetch_optional(pool)
    .await
    .context(|| format!("resolving ledger row {key}"))?;
    match updated {
        Some(row) => Ok(row),
        None => match get(pool, key).await? {
            None => Err(ResolveError::NotFound(key.to_string())),
            Some(row) => Err(ResolveError::WrongState {
                key: key.to_string(),
                status: row.status,
            }),
        },
    }
}

/// Puts rows back in the queue that were "sent" by `transport` (`log` delivered nothing),
/// or, with `None`, rows sent before the transport was recorded. Their payload, key and
/// Message-ID stay as frozen; each is checked against its record again before it goes
/// out. Returns the keys requeued.
pub async fn requeue_sent_by(
    pool: &PgPool,
    transport: Option<&str>,
) -> Result<Vec<String>, StoreError> {
    sqlx::query_scalar(
        "UPDATE idem_ledger SET status = 'pending', sent_at = NULL, next_attempt_at = now(),
           last_outcome = 'requeued', last_error = NULL
         WHERE status = 'sent' AND transport IS NOT DISTINCT FROM $1 RETURNING key",
    )
    .bind(transport)
    .fetch_all(pool)
    .await
    .context(|| {
        format!(
            "requeueing rows sent by the {} transport",
            transport.unwrap_or("unrecorded")
        )
    })
}
