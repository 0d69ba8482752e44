//! The dispatcher: claims due ledger rows in a short transaction, re-checks each row's
//! reason and marks it in flight (renewing its lease) in another, sends it outside any
//! transaction, and marks the outcome with an update fenced on its lease.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use rand::Rng;
use serde::Serialize;
use sqlx::PgPool;
use tracing::{Instrument, info, info_span, warn};

use super::rules::Check;
use super::transport::{Message, Outcome, Transport};
use crate::failpoint::crash_point;
use crate::schema::settings::LEASE_MARGIN;
use crate::store::{Context, StoreError};

/// The most sends a dispatcher has in flight, whatever `[notify] concurrency` says: each
/// holds a database connection while its row is checked and recorded.
pub const MAX_CONCURRENCY: u32 = 64;

/// The dispatcher's limits.
#[derive(Debug, Clone)]
pub struct DispatchSettings {
    /// Reservation of a claimed row, renewed when its send starts; at least
    /// `send_timeout` plus [`LEASE_MARGIN`].
    pub lease: Duration,
    /// Time allowed for one send; past it the outcome is ambiguous.
    pub send_timeout: Duration,
    /// Attempts before a row that keeps failing temporarily becomes `failed`.
    pub max_attempts: u32,
    /// Rows claimed per round trip.
    pub batch_size: u32,
    /// Sends in flight at once.
    pub concurrency: usize,
    /// First retry delay after a definite non-send; doubles per attempt, with jitter.
    pub retry_backoff: Duration,
}

impl DispatchSettings {
    pub fn from_config(notify: &crate::schema::settings::NotifySettings) -> Self {
        Self {
            // A lease shorter than a send would let a second dispatcher claim a row whose
            // send is still in flight.
            lease: notify.lease.0.max(notify.send_timeout.0 + LEASE_MARGIN),
            send_timeout: notify.send_timeout.0,
            max_attempts: notify.max_attempts.max(1),
            batch_size: notify.batch_size.max(1),
            concurrency: notify.concurrency.clamp(1, MAX_CONCURRENCY) as usize,
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
    /// Rows not sent because their reason was gone right before the send (the record no
    /// longer matches the rule, or was deleted).
    pub cancelled: u64,
    /// Rows "sent" by the log transport: nothing was delivered to anyone.
    pub logged_only: u64,
}

impl DispatchReport {
    fn add(&mut self, other: &DispatchReport) {
        self.sent += other.sent;
        self.retry_later += other.retry_later;
        self.failed += other.failed;
        self.needs_review += other.needs_review;
        self.recovered_leases += other.recovered_leases;
        self.cancelled += other.cancelled;
        self.logged_only += other.logged_only;
    }
}

/// What finished in a pass: a claim or a row.
enum Event {
    Claimed(Result<Vec<Claimed>, StoreError>),
    Row(Result<RowDone, StoreError>),
}

/// How one claimed row ended in this pass.
enum RowDone {
    Report(DispatchReport),
    /// Its claim expired before its turn.
    LostLease,
}

/// What the check before a send decided.
enum Start {
    /// Marked in flight, lease renewed: send it.
    Send,
    /// Another dispatcher or a person has the row now.
    LostLease,
    /// Cancelled: the reason is gone.
    Cancelled,
    /// The reason cannot be checked (a row this version cannot read): a person decides.
    Unverifiable,
}

/// A claimed row's identity and frozen reason: source system, source id, record table,
/// condition, rule, and whether the record table exists.
type ToCheck = (
    String,
    String,
    Option<String>,
    Option<serde_json::Value>,
    String,
    bool,
    Option<bool>,
);

/// The re-check's answer.
enum Verdict {
    Holds,
    Gone(&'static str, String),
    Unverifiable(String),
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
    /// When this turns true the pass sends nothing more: the send in flight finishes
    /// (within `send_timeout`) and the rest of the claimed rows are released at once.
    stop: Option<tokio::sync::watch::Receiver<bool>>,
}

impl<'a, T: Transport> Dispatcher<'a, T> {
    pub fn new(pool: &'a PgPool, transport: &'a T, settings: DispatchSettings) -> Self {
        // The instance id tells replicas apart (the pid is 1 in every container); the
        // uuid tells this pass from the instance's other passes.
        let owner = format!(
            "{}:{}",
            crate::identity::id(),
            uuid::Uuid::new_v4().simple()
        );
        Self {
            pool,
            transport,
            settings,
            owner,
            stop: None,
        }
    }

    /// Stops the pass between sends when `stop` turns true (shutdown of `idem serve`).
    pub fn with_stop(mut self, stop: tokio::sync::watch::Receiver<bool>) -> Self {
        self.stop = Some(stop);
        self
    }

    fn stopping(&self) -> bool {
        self.stop.as_ref().is_some_and(|stop| *stop.borrow())
    }

    /// Hands this pass's claimed rows whose send never started back to `pending`, due
    /// now, so another replica sends them without waiting for their lease to expire.
    pub async fn release_unsent(&self) -> Result<u64, StoreError> {
        let released = sqlx::query(
            "UPDATE idem_ledger SET status = 'pending', lease_owner = NULL, lease_expires_at = NULL
             WHERE status = 'sending' AND lease_owner = $1 AND in_flight_since IS NULL",
        )
        .bind(&self.owner)
        .execute(self.pool)
        .await
        .context(|| "releasing claimed ledger rows on shutdown".into())?
        .rows_affected();
        Ok(released)
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
        // Sends started in this pass, numbering the crash points.
        let started = AtomicU64::new(0);
        let mut lost_in_pass = 0u64;
        let mut queue: VecDeque<Claimed> = VecDeque::new();
        let mut drained = false;
        let mut claiming = false;
        let mut rows_in_flight = 0usize;
        // Claims and rows are polled together: a row's transaction holds a pool
        // connection, so a claim awaited on its own could wait for a connection that only
        // an unpolled row would give back.
        let mut work: FuturesUnordered<BoxFuture<'_, Event>> = FuturesUnordered::new();
        let mut first_error: Option<StoreError> = None;
        loop {
            // On shutdown no claim and no send starts; sends already started finish.
            if first_error.is_none() && !self.stopping() {
                if !drained && !claiming && queue.len() < self.settings.concurrency {
                    claiming = true;
                    work.push(Box::pin(async move {
                        Event::Claimed(self.claim(pass_started).await)
                    }));
                }
                // Up to `concurrency` rows go at once; each is checked, marked in flight
                // and recorded on its own, so a crash leaves in flight only rows whose
                // send started.
                while rows_in_flight < self.settings.concurrency {
                    let Some(row) = queue.pop_front() else { break };
                    rows_in_flight += 1;
                    let started = &started;
                    work.push(Box::pin(async move {
                        Event::Row(self.dispatch_row(row, started).await)
                    }));
                }
            }
            let Some(event) = work.next().await else {
                break;
            };
            match event {
                Event::Claimed(Ok(batch)) => {
                    claiming = false;
                    drained = batch.is_empty();
                    queue.extend(batch);
                }
                Event::Row(Ok(RowDone::Report(row))) => {
                    rows_in_flight -= 1;
                    report.add(&row);
                }
                Event::Row(Ok(RowDone::LostLease)) => {
                    rows_in_flight -= 1;
                    lost_in_pass += 1;
                }
                // Sends already started are finished and recorded; no new one starts.
                Event::Claimed(Err(err)) => {
                    claiming = false;
                    first_error.get_or_insert(err);
                }
                Event::Row(Err(err)) => {
                    rows_in_flight -= 1;
                    first_error.get_or_insert(err);
                }
            }
        }
        if let Some(err) = first_error {
            return Err(err);
        }
        if self.stopping() {
            let released = self.release_unsent().await?;
            if released > 0 {
                warn!(
                    released,
                    "shutdown: claimed reminders not yet sent were released for another replica"
                );
            }
        }
        if lost_in_pass > 0 {
            // Rows of our batches whose claim expired before their turn and that nobody
            // took over are due again now rather than `sending` until the next pass.
            let (recovered, to_review) = self.recover_expired_leases().await?;
            report.recovered_leases += recovered;
            report.needs_review += to_review;
        }
        if report != DispatchReport::default() {
            info!(
                sent = report.sent,
                retry_later = report.retry_later,
                failed = report.failed,
                needs_review = report.needs_review,
                recovered_leases = report.recovered_leases,
                cancelled = report.cancelled,
                logged_only_nothing_delivered = report.logged_only,
                "notifications dispatched"
            );
        }
        Ok(report)
    }

    /// One claimed row: the check before the send (marking it in flight), the send, and
    /// its outcome record.
    async fn dispatch_row(&self, row: Claimed, started: &AtomicU64) -> Result<RowDone, StoreError> {
        let span = info_span!("notify", key = %row.key, source_id = %row.source_id);
        async move {
            let mut report = DispatchReport::default();
            match self.start_attempt(&row.key).await? {
                Start::Send => {}
                Start::LostLease => {
                    warn!(
                        "the claim expired before this row's turn; another dispatcher or the next pass sends it"
                    );
                    return Ok(RowDone::LostLease);
                }
                Start::Cancelled => {
                    report.cancelled += 1;
                    return Ok(RowDone::Report(report));
                }
                Start::Unverifiable => {
                    report.needs_review += 1;
                    return Ok(RowDone::Report(report));
                }
            }
            let nth = started.fetch_add(1, Ordering::SeqCst) + 1;
            crash_point("notify_before_send", nth);
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
            crash_point("notify_after_send", nth);
            if self.transport.name() == "log" && matches!(outcome, Outcome::Sent { .. }) {
                report.logged_only += 1;
            }
            self.mark(&row.key, row.attempts, outcome, &mut report)
                .await?;
            Ok(RowDone::Report(report))
        }
        .instrument(span)
        .await
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

    /// The check before the act, in one short transaction committed before the network
    /// call: the row must still be ours (status, owner, and an unexpired lease); its
    /// rule's frozen condition must still hold on the record's current row, which is
    /// locked `FOR SHARE` so a page transaction changing it right now is waited for and
    /// its result re-checked; then the row is marked in flight and its lease renewed for
    /// a whole send. A crash from the commit on is known to be ambiguous.
    async fn start_attempt(&self, key: &str) -> Result<Start, StoreError> {
        // The re-check first runs without a savepoint (one round trip fewer per send); a
        // condition that cannot be evaluated aborts that transaction, and the check runs
        // again under a savepoint so the row can be held for a person.
        match self.try_start_attempt(key, false).await? {
            Some(start) => Ok(start),
            None => Ok(self
                .try_start_attempt(key, true)
                .await?
                .unwrap_or(Start::LostLease)),
        }
    }

    /// `start_attempt` once; None when the re-check failed without a savepoint.
    async fn try_start_attempt(
        &self,
        key: &str,
        guarded: bool,
    ) -> Result<Option<Start>, StoreError> {
        let context = || format!("starting the send of ledger row {key}");
        let mut tx = self.pool.begin().await.context(context)?;
        let row: Option<ToCheck> = sqlx::query_as(
                "SELECT source_system, source_id, record_table, condition, rule,
                        to_regclass('\"' || replace(record_table, '\"', '\"\"') || '\"') IS NOT NULL,
                        last_outcome IN ('ambiguous', 'in_progress')
                 FROM idem_ledger
                 WHERE key = $1 AND status = 'sending' AND lease_owner = $2 AND lease_expires_at > now()
                 FOR UPDATE",
            )
            .bind(key)
            .bind(&self.owner)
            .fetch_optional(&mut *tx)
            .await
            .context(context)?;
        let Some((source_system, source_id, table, condition, rule, table_exists, maybe_delivered)) =
            row
        else {
            return Ok(Some(Start::LostLease));
        };
        let verdict = match (table, condition) {
            (Some(table), _) if !table_exists => {
                Verdict::Gone("record_deleted", format!("table {table} no longer exists"))
            }
            (Some(table), condition) => {
                match condition.map_or(Ok(Vec::new()), serde_json::from_value::<Vec<Check>>) {
                    Ok(checks) => {
                        let target = Record {
                            table: &table,
                            source_system: &source_system,
                            source_id: &source_id,
                        };
                        match recheck(&mut tx, &target, &checks, guarded).await? {
                            Some(verdict) => verdict,
                            // The transaction is aborted; it rolls back when dropped.
                            None => return Ok(None),
                        }
                    }
                    Err(err) => {
                        Verdict::Unverifiable(format!("its frozen condition does not parse: {err}"))
                    }
                }
            }
            // Rows made before conditions were frozen (or inserted by hand) have nothing
            // to re-check.
            (None, _) => Verdict::Holds,
        };
        let (status, reason, detail) = match verdict {
            Verdict::Holds => ("sending", "", String::new()),
            // An earlier attempt may have been delivered: cancelling would claim that no
            // email went out, and sending again could deliver one whose reason is gone.
            Verdict::Gone(reason, detail) if maybe_delivered.unwrap_or(false) => (
                "needs_review",
                "gone_after_unknown_outcome",
                format!(
                    "{reason}: {detail}, but an earlier attempt's outcome is unknown (the provider may have delivered it)"
                ),
            ),
            Verdict::Gone(reason, detail) => ("cancelled", reason, detail),
            Verdict::Unverifiable(detail) => ("needs_review", "unverifiable", detail),
        };
        if status != "sending" {
            sqlx::query(
                "UPDATE idem_ledger SET status = $2, last_outcome = $3, last_error = $4,
                   lease_owner = NULL, lease_expires_at = NULL, in_flight_since = NULL
                 WHERE key = $1",
            )
            .bind(key)
            .bind(status)
            .bind(reason)
            .bind(format!("{reason}: {detail} (rule '{rule}'); not sent"))
            .execute(&mut *tx)
            .await
            .context(context)?;
            tx.commit().await.context(context)?;
            warn!(
                reason,
                "the reminder's reason is gone or cannot be checked; not sent"
            );
            return Ok(Some(if status == "cancelled" {
                Start::Cancelled
            } else {
                Start::Unverifiable
            }));
        }
        sqlx::query(
            "UPDATE idem_ledger SET in_flight_since = now(), attempts = attempts + 1,
               first_attempt_at = COALESCE(first_attempt_at, now()), transport = $3,
               lease_expires_at = now() + $2 * interval '1 millisecond'
             WHERE key = $1",
        )
        .bind(key)
        .bind(self.settings.lease.as_millis() as f64)
        .bind(self.transport.name())
        .execute(&mut *tx)
        .await
        .context(context)?;
        tx.commit().await.context(context)?;
        Ok(Some(Start::Send))
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
            Outcome::Ambiguous { error }
                if self.transport.deduplicates()
                    && (attempts as u32) < self.settings.max_attempts =>
            {
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
            Outcome::InProgress { error, retry_after } => {
                report.retry_later += 1;
                let wait = retry_after.unwrap_or_default().max(self.backoff(attempts));
                warn!(error = %error, retry_in_ms = wait.as_millis() as u64, "the provider is still working on this key; retrying later under the same key");
                ("pending", "in_progress", Some(error), None, Some(wait))
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

/// The record a ledger row was made for.
struct Record<'a> {
    table: &'a str,
    source_system: &'a str,
    source_id: &'a str,
}

/// Whether the row's condition still holds on its record's current row. Under `guarded`
/// the query runs under a savepoint, so a condition that cannot be evaluated (a column
/// dropped by hand) makes the row unverifiable; unguarded, such a failure returns None and
/// leaves the transaction aborted.
async fn recheck(
    tx: &mut sqlx::PgConnection,
    record: &Record<'_>,
    checks: &[Check],
    guarded: bool,
) -> Result<Option<Verdict>, StoreError> {
    let Record {
        table,
        source_system,
        source_id,
    } = *record;
    let quoted = format!("\"{}\"", table.replace('"', "\"\""));
    let mut binds = Vec::new();
    let mut holds = String::from("true");
    for check in checks {
        if let Err(err) = check.verify() {
            return Ok(Some(Verdict::Unverifiable(err.to_string())));
        }
        holds.push_str(" AND ");
        holds.push_str(&check.clause("t", 2, &mut binds));
    }
    // FOR SHARE waits for a transaction updating this record and re-evaluates the row
    // it committed, so a payment being written right now is not missed.
    let sql = format!(
        "SELECT t.deleted_at IS NULL, COALESCE({holds}, false) FROM {quoted} t
         WHERE t.source_system = $1 AND t.source_id = $2 FOR SHARE OF t"
    );
    let mut query = sqlx::query_as::<_, (bool, bool)>(&sql)
        .bind(source_system)
        .bind(source_id);
    for value in &binds {
        query = query.bind(value);
    }
    // A table changed by hand (a column of the condition dropped) must hold this one row
    // for a person, not stop every later send.
    let what = || format!("re-checking record {source_system}/{source_id} in {table}");
    if guarded {
        sqlx::query("SAVEPOINT recheck")
            .execute(&mut *tx)
            .await
            .context(what)?;
    }
    let found = match query.fetch_optional(&mut *tx).await {
        Ok(found) => found,
        Err(sqlx::Error::Database(_)) if !guarded => return Ok(None),
        Err(err) if guarded => {
            sqlx::query("ROLLBACK TO SAVEPOINT recheck")
                .execute(&mut *tx)
                .await
                .context(what)?;
            return Ok(Some(Verdict::Unverifiable(format!(
                "the condition cannot be evaluated on {table}: {err}"
            ))));
        }
        Err(err) => return Err(err).context(what),
    };
    Ok(Some(match found {
        None => Verdict::Gone(
            "record_deleted",
            format!("record {source_id} is no longer in {table}"),
        ),
        Some((false, _)) => Verdict::Gone(
            "record_deleted",
            format!("record {source_id} was deleted at the vendor"),
        ),
        Some((true, false)) => Verdict::Gone(
            "condition_no_longer_holds",
            format!("record {source_id}'s current row no longer matches the rule's condition"),
        ),
        Some((true, true)) => Verdict::Holds,
    }))
}
