//! The dispatcher: claims due ledger rows in a short transaction, sends each outside any
//! transaction, and marks the outcome with an update fenced on its lease.

use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::Rng;
use serde::Serialize;
use sqlx::PgPool;
use tracing::{info, info_span, warn};

use super::transport::{Message, Outcome, Transport};
use crate::failpoint::crash_point;
use crate::store::{Context, StoreError};

/// The dispatcher's limits.
#[derive(Debug, Clone)]
pub struct DispatchSettings {
    /// Reservation of a claimed row; longer than `send_timeout`.
    pub lease: Duration,
    /// Time allowed for one send; past it the outcome is ambiguous.
    pub send_timeout: Duration,
    /// Attempts before a row that keeps failing temporarily becomes `failed`.
    pub max_attempts: u32,
    /// Rows claimed per round trip.
    pub batch_size: u32,
    /// First retry delay after a definite non-send; doubles per attempt, with jitter.
    pub retry_backoff: Duration,
}

impl DispatchSettings {
    pub fn from_config(notify: &crate::config::NotifySettings) -> Self {
        Self {
            // A lease shorter than a send would let a second dispatcher claim a row whose
            // send is still in flight.
            lease: notify
                .lease
                .0
                .max(notify.send_timeout.0 + Duration::from_secs(5)),
            send_timeout: notify.send_timeout.0,
            max_attempts: notify.max_attempts.max(1),
            batch_size: notify.batch_size.max(1),
            retry_backoff: notify.retry_backoff.0,
        }
    }
}

/// What one dispatch pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DispatchReport {
    pub sent: u64,
    pub retry_later: u64,
    pub failed: u64,
    pub needs_review: u64,
    /// Rows found `sending` with an expired lease (a dispatcher died mid-send).
    pub recovered_leases: u64,
}

#[derive(sqlx::FromRow)]
struct Claimed {
    key: String,
    recipient: String,
    subject: String,
    body: String,
    message_id: String,
    source_id: String,
    attempts: i32,
}

/// Sends due ledger rows through `transport` until none is due.
pub struct Dispatcher<'a, T: Transport> {
    pool: &'a PgPool,
    transport: &'a T,
    settings: DispatchSettings,
    owner: String,
}

impl<'a, T: Transport> Dispatcher<'a, T> {
    pub fn new(pool: &'a PgPool, transport: &'a T, settings: DispatchSettings) -> Self {
        let owner = format!("{}:{}", std::process::id(), uuid::Uuid::new_v4().simple());
        Self {
            pool,
            transport,
            settings,
            owner,
        }
    }

    /// One pass: recover expired leases, then claim, send and mark batches until no row
    /// is due.
    pub async fn run_once(&self) -> Result<DispatchReport, StoreError> {
        let (recovered, to_review) = self.recover_expired_leases().await?;
        let mut report = DispatchReport {
            recovered_leases: recovered,
            needs_review: to_review,
            ..Default::default()
        };
        // Only rows due when the pass starts: a row rescheduled during the pass waits for
        // the next one instead of being retried again and again within it.
        let pass_started: DateTime<Utc> = sqlx::query_scalar("SELECT now()")
            .fetch_one(self.pool)
            .await
            .context(|| "reading the database clock".into())?;
        let mut sent_in_pass = 0u64;
        loop {
            let batch = self.claim(pass_started).await?;
            if batch.is_empty() {
                break;
            }
            for row in batch {
                let span = info_span!("notify", key = %row.key, source_id = %row.source_id);
                let _entered = span.enter();
                if !self.start_attempt(&row.key).await? {
                    warn!("lost the lease before sending; another dispatcher has this row");
                    continue;
                }
                crash_point("notify_before_send", sent_in_pass + 1);
                let message = Message {
                    key: row.key.clone(),
                    recipient: row.recipient,
                    subject: row.subject,
                    body: row.body,
                    message_id: row.message_id,
                };
                let outcome = match tokio::time::timeout(
                    self.settings.send_timeout,
                    self.transport.send(&message),
                )
                .await
                {
                    Ok(outcome) => outcome,
                    Err(_) => Outcome::Ambiguous {
                        error: format!("no answer within {:?}", self.settings.send_timeout),
                    },
                };
                sent_in_pass += 1;
                crash_point("notify_after_send", sent_in_pass);
                self.mark(&row.key, row.attempts, outcome, &mut report)
                    .await?;
            }
        }
        if report != DispatchReport::default() {
            info!(
                sent = report.sent,
                retry_later = report.retry_later,
                failed = report.failed,
                needs_review = report.needs_review,
                recovered_leases = report.recovered_leases,
                "notifications dispatched"
            );
        }
        Ok(report)
    }

    /// A row still `sending` after its lease expired belongs to a dispatcher that died.
    /// If it never started the send, it is simply due again. If it did, the provider may
    /// have the message: with a de-duplicating provider it is retried under the same key;
    /// otherwise a person decides (`needs_review`). Returns (recovered, sent to review).
    async fn recover_expired_leases(&self) -> Result<(u64, u64), StoreError> {
        let rows: Vec<(String,)> = sqlx::query_as(
            "UPDATE idem_ledger SET
               status = CASE WHEN in_flight_since IS NULL OR $1 THEN 'pending' ELSE 'needs_review' END,
               last_outcome = CASE WHEN in_flight_since IS NULL THEN last_outcome ELSE 'ambiguous' END,
               last_error = CASE WHEN in_flight_since IS NULL THEN last_error
                                 WHEN $1 THEN 'dispatcher died mid-send; retried under the same idempotency key'
                                 ELSE 'dispatcher died mid-send; the provider may have sent it (resolve with idem ledger resolve)' END,
               lease_owner = NULL, lease_expires_at = NULL, in_flight_since = NULL, next_attempt_at = now()
             WHERE status = 'sending' AND lease_expires_at < now()
             RETURNING status",
        )
        .bind(self.transport.deduplicates())
        .fetch_all(self.pool)
        .await
        .context(|| "recovering expired ledger leases".into())?;
        let to_review = rows
            .iter()
            .filter(|(status,)| status == "needs_review")
            .count() as u64;
        if !rows.is_empty() {
            warn!(
                rows = rows.len(),
                needs_review = to_review,
                "found rows claimed by a dispatcher that died"
            );
        }
        Ok((rows.len() as u64, to_review))
    }

    /// Marks the row in flight just before the network call, committed, so a crash from
    /// here on is known to be ambiguous. False when the lease was lost.
    async fn start_attempt(&self, key: &str) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE idem_ledger SET in_flight_since = now(), attempts = attempts + 1,
               first_attempt_at = COALESCE(first_attempt_at, now())
             WHERE key = $1 AND status = 'sending' AND lease_owner = $2",
        )
        .bind(key)
        .bind(&self.owner)
        .execute(self.pool)
        .await
        .context(|| format!("starting the send of ledger row {key}"))?;
        Ok(done.rows_affected() == 1)
    }

    /// Claims a batch in one short statement (its own transaction), committed before any
    /// network call.
    async fn claim(&self, due_by: DateTime<Utc>) -> Result<Vec<Claimed>, StoreError> {
        sqlx::query_as(
            "UPDATE idem_ledger l SET status = 'sending', lease_owner = $1,
               lease_expires_at = now() + $2 * interval '1 millisecond', in_flight_since = NULL
             FROM (SELECT key FROM idem_ledger WHERE status = 'pending' AND next_attempt_at <= $4
                   ORDER BY next_attempt_at, key LIMIT $3 FOR UPDATE SKIP LOCKED) due
             WHERE l.key = due.key
             RETURNING l.key, l.recipient, l.subject, l.body, l.message_id, l.source_id, l.attempts + 1 AS attempts",
        )
        .bind(&self.owner)
        .bind(self.settings.lease.as_millis() as f64)
        .bind(self.settings.batch_size as i64)
        .bind(due_by)
        .fetch_all(self.pool)
        .await
        .context(|| "claiming due ledger rows".into())
    }

    /// Records the outcome, only if we still hold the row's lease.
    async fn mark(
        &self,
        key: &str,
        attempts: i32,
        outcome: Outcome,
        report: &mut DispatchReport,
    ) -> Result<(), StoreError> {
        let (status, last_outcome, error, provider_id, retry_at): (
            &str,
            &str,
            Option<String>,
            Option<String>,
            Option<Duration>,
        ) = match outcome {
            Outcome::Sent { provider_id } => {
                report.sent += 1;
                ("sent", "sent", None, provider_id, None)
            }
            Outcome::NotSent { error, retry_after }
                if (attempts as u32) < self.settings.max_attempts =>
            {
                report.retry_later += 1;
                let wait = retry_after.unwrap_or_default().max(self.backoff(attempts));
                warn!(error = %error, attempt = attempts, retry_in_ms = wait.as_millis() as u64, "not sent; will retry");
                ("pending", "not_sent", Some(error), None, Some(wait))
            }
            Outcome::NotSent { error, .. } => {
                report.failed += 1;
                warn!(error = %error, attempts, "not sent after the last attempt; marked failed");
                ("failed", "not_sent", Some(error), None, None)
            }
            Outcome::Permanent { error } => {
                report.failed += 1;
                warn!(error = %error, "the provider refused the message for good");
                ("failed", "permanent", Some(error), None, None)
            }
            Outcome::Ambiguous { error } if self.transport.deduplicates() => {
                report.retry_later += 1;
                warn!(error = %error, "outcome unknown; retrying under the same idempotency key");
                (
                    "pending",
                    "ambiguous",
                    Some(error),
                    None,
                    Some(self.backoff(attempts)),
                )
            }
            Outcome::Ambiguous { error } => {
                report.needs_review += 1;
                warn!(error = %error, "outcome unknown and the provider cannot de-duplicate; needs review");
                ("needs_review", "ambiguous", Some(error), None, None)
            }
        };
        let done = sqlx::query(
            "UPDATE idem_ledger SET status = $3, last_outcome = $4, last_error = $5,
               provider_message_id = COALESCE($6, provider_message_id),
               sent_at = CASE WHEN $3 = 'sent' THEN now() ELSE sent_at END,
               next_attempt_at = COALESCE(now() + $7 * interval '1 millisecond', next_attempt_at), lease_owner = NULL, lease_expires_at = NULL,
               in_flight_since = NULL
             WHERE key = $1 AND status = 'sending' AND lease_owner = $2",
        )
        .bind(key)
        .bind(&self.owner)
        .bind(status)
        .bind(last_outcome)
        .bind(error)
        .bind(provider_id)
        .bind(retry_at.map(|wait| wait.as_millis() as f64))
        .execute(self.pool)
        .await
        .context(|| format!("recording the outcome of ledger row {key}"))?;
        if done.rows_affected() != 1 {
            warn!(
                outcome = status,
                "lost the lease before recording the outcome; another dispatcher or a person has taken over this row"
            );
        }
        Ok(())
    }

    fn backoff(&self, attempts: i32) -> Duration {
        let base = self
            .settings
            .retry_backoff
            .saturating_mul(1 << attempts.clamp(0, 10) as u32);
        let jitter = rand::rng().random_range(0.0..0.25);
        base.mul_f64(1.0 + jitter).min(Duration::from_secs(3600))
    }
}
