//! The `idem.toml` schema: what the config file and `IDEM__SECTION__KEY` variables
//! deserialize into, with defaults, plus the plain settings the mechanisms take from it
//! (transaction batching, the schema-change policy, session limits). Loading and
//! validating a file is `config`'s job; this module depends on nothing above it.
//!
//! Every struct refuses unknown keys, and every field's doc comment is the user's
//! documentation of that key.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::duration::HumanDuration;

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Postgres URL. `DATABASE_URL` in the environment wins over this.
    #[serde(default)]
    pub database_url: Option<String>,
    /// Connector files to load, relative to this file's folder. Default: every `*.toml`
    /// in `connectors/` beside this file.
    #[serde(default)]
    pub connectors: Vec<PathBuf>,
    /// How reminders and other side effects are sent.
    #[serde(default)]
    pub notify: NotifySettings,
    /// The long-running service (`idem serve`): schedules, health and metrics.
    #[serde(default)]
    pub serve: ServeSettings,
    /// How idem behaves in a database it shares: schema changes, lock and statement
    /// timeouts.
    #[serde(default)]
    pub database: DatabaseSettings,
    /// How imports group pages into transactions.
    #[serde(default)]
    pub import: ImportSettings,
    /// Per-source overrides of partitioned streams' values:
    /// `[partitions.<source_system>]` then `<stream> = ["acct_1", "acct_2"]` replaces that
    /// stream's `[streams.<stream>.partitions] values` (the accounts of this deployment).
    #[serde(default)]
    pub partitions:
        std::collections::BTreeMap<String, std::collections::BTreeMap<String, Vec<String>>>,
    /// The folder the config file is in (connector paths are relative to it).
    #[serde(skip)]
    pub base_dir: PathBuf,
    /// The config file read, if any.
    #[serde(skip)]
    pub file: Option<PathBuf>,
}

/// How a walk's pages are grouped into transactions (see BENCHMARKS.md for the choice).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportSettings {
    /// A transaction commits once it holds this many records (default 2000; 1 means one
    /// page per transaction). A crash loses at most the open transactions' pages, which
    /// the next run re-reads.
    #[serde(default = "default_transaction_records")]
    pub transaction_records: usize,
    /// ...or once its first page is this old (default `"1s"`).
    #[serde(default = "default_transaction_time")]
    pub transaction_time: HumanDuration,
    /// Transactions written at once, each on its own connection (default 2); they still
    /// commit in page order.
    #[serde(default = "default_writer_connections")]
    pub writer_connections: usize,
}

impl Default for ImportSettings {
    fn default() -> Self {
        Self {
            transaction_records: default_transaction_records(),
            transaction_time: default_transaction_time(),
            writer_connections: default_writer_connections(),
        }
    }
}

impl ImportSettings {
    /// The writer's settings.
    pub fn batching(&self) -> Batching {
        Batching {
            max_records: self.transaction_records,
            max_wait: self.transaction_time.0,
            connections: self.writer_connections,
        }
    }
}

fn default_transaction_records() -> usize {
    Batching::default().max_records
}
fn default_transaction_time() -> HumanDuration {
    HumanDuration(Batching::default().max_wait)
}
fn default_writer_connections() -> usize {
    Batching::default().connections
}

/// `idem serve`: what runs when, and where health and metrics are served.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeSettings {
    /// Address of `/healthz` and `/metrics` (default `"127.0.0.1:9464"`; port 0 picks one).
    #[serde(default = "default_listen")]
    pub listen: String,
    /// How often the dispatcher sends due notifications between runs (default `"1m"`).
    #[serde(default = "default_notify_every")]
    pub notify_every: HumanDuration,
    /// Scheduled runs, e.g. `{ streams = ["stripe.invoices"], every = "1h" }`.
    #[serde(default)]
    pub schedules: Vec<Schedule>,
    /// This process's instance id on runs, ledger leases and log lines (default: the
    /// host name, which is the pod name in Kubernetes, `@` the start time).
    #[serde(default)]
    pub instance: Option<String>,
    /// Streams this process runs at once (default 2). Replicas share the schedule, so the
    /// deployment runs up to replicas × workers streams at once.
    #[serde(default = "default_workers")]
    pub workers: u32,
    /// Postgres pool size of this process (default `workers + 3`: a page writer per
    /// worker, the dispatcher, the heartbeat and the metrics scrape). Each running worker
    /// also holds one session of its own for the stream's advisory lock, so one replica
    /// uses at most `pool_size + workers` connections; keep replicas × that under the
    /// server's `max_connections`.
    #[serde(default)]
    pub pool_size: Option<u32>,
    /// Time from SIGTERM to exit at the latest (default `"10s"`): claiming stops at once,
    /// runs stop after their page, the send in flight finishes or is abandoned within
    /// `send_timeout`, and unsent claimed reminders are released. Keep it under the
    /// orchestrator's grace (Kubernetes `terminationGracePeriodSeconds`, 30 s by default).
    #[serde(default = "default_shutdown_grace")]
    pub shutdown_grace: HumanDuration,
    /// Heartbeat period of this process's row in `idem_instances` (default `"5s"`).
    /// After three missed heartbeats its running runs are marked `abandoned` and the
    /// other replicas take its share of each connector's rate limit.
    #[serde(default = "default_heartbeat_every")]
    pub heartbeat_every: HumanDuration,
    /// How many `idem serve` replicas the deployment runs (default 1). Only `idem check`
    /// reads it, to warn when replicas × connections per replica approach the server's
    /// `max_connections`.
    #[serde(default = "default_replicas")]
    pub replicas: u32,
    /// The console's admin token, a `${ENV}` or `${file:...}` reference. Without it the
    /// console is read-only: nobody can run, replay or resolve from the browser.
    #[serde(default)]
    pub admin_token: Option<String>,
    /// A stream whose mark (or cursor) has not moved for longer than this stands out on
    /// the console (default `"2d"`).
    #[serde(default = "default_lag_alert")]
    pub lag_alert: HumanDuration,
}

impl Default for ServeSettings {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            notify_every: default_notify_every(),
            schedules: Vec::new(),
            instance: None,
            workers: default_workers(),
            pool_size: None,
            shutdown_grace: default_shutdown_grace(),
            heartbeat_every: default_heartbeat_every(),
            replicas: default_replicas(),
            admin_token: None,
            lag_alert: default_lag_alert(),
        }
    }
}

impl ServeSettings {
    /// The pool size in force (see `pool_size`).
    pub fn pool_size(&self) -> u32 {
        self.pool_size.unwrap_or(self.workers.max(1) + 3).max(2)
    }

    /// Postgres connections one replica may hold: its pool plus one lock session per
    /// worker.
    pub fn connections_per_replica(&self) -> u32 {
        self.pool_size() + self.workers.max(1)
    }
}

fn default_replicas() -> u32 {
    1
}

fn default_workers() -> u32 {
    2
}
fn default_shutdown_grace() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(10))
}
fn default_heartbeat_every() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(5))
}
fn default_lag_alert() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(2 * 86_400))
}

fn default_listen() -> String {
    "127.0.0.1:9464".into()
}
fn default_notify_every() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(60))
}

/// One schedule of `idem serve`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    /// `SOURCE` or `SOURCE.STREAM` targets, run one after another (empty: every stream).
    #[serde(default)]
    pub streams: Vec<String>,
    /// Time between the starts of one stream's runs, e.g. `"15m"`, shared by all replicas
    /// (each start is claimed by one of them; see `idem_schedule`). A new stream is due at
    /// once; a run that outlasts `every` skips the periods it overlaps.
    pub every: HumanDuration,
}

/// `[database]`: how idem behaves as a neighbour in a shared database.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    /// `auto` (default): create destination tables and add new typed columns when a
    /// connector needs them. `never`: the role may not alter tables; a missing table or
    /// column stops the run at start with the exact statement to run.
    #[serde(default)]
    pub ddl: DdlMode,
    /// The longest one schema-change attempt waits for its table lock; readers of the
    /// table queue behind it meanwhile (default `"3s"`).
    #[serde(default = "default_lock_timeout")]
    pub lock_timeout: HumanDuration,
    /// Attempts of a schema change that cannot get its lock, with backoff (default 3).
    #[serde(default = "default_ddl_attempts")]
    pub ddl_attempts: u32,
    /// `statement_timeout` of idem's sessions (default `"60s"`; a page's statements take
    /// milliseconds).
    #[serde(default = "default_statement_timeout")]
    pub statement_timeout: HumanDuration,
    /// `idle_in_transaction_session_timeout` of idem's sessions (default `"60s"`; idem
    /// never waits on the network inside a transaction).
    #[serde(default = "default_idle_in_transaction_timeout")]
    pub idle_in_transaction_timeout: HumanDuration,
    /// The longest a new connection may take, TLS included (default `"10s"`).
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: HumanDuration,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self {
            ddl: DdlMode::Auto,
            lock_timeout: default_lock_timeout(),
            ddl_attempts: default_ddl_attempts(),
            statement_timeout: default_statement_timeout(),
            idle_in_transaction_timeout: default_idle_in_transaction_timeout(),
            connect_timeout: default_connect_timeout(),
        }
    }
}

impl DatabaseSettings {
    /// The schema-change policy of destination tables.
    pub fn ddl_policy(&self) -> DdlPolicy {
        DdlPolicy {
            allow: self.ddl == DdlMode::Auto,
            lock_timeout: self.lock_timeout.0,
            attempts: self.ddl_attempts.max(1),
        }
    }

    /// Session name and limits for sessions named `application_name`.
    pub fn session(&self, application_name: impl Into<String>) -> SessionSettings {
        SessionSettings {
            application_name: application_name.into(),
            statement_timeout: self.statement_timeout.0,
            idle_in_transaction_timeout: self.idle_in_transaction_timeout.0,
            connect_timeout: self.connect_timeout.0,
        }
    }
}

fn default_lock_timeout() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(3))
}
fn default_ddl_attempts() -> u32 {
    3
}
fn default_statement_timeout() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(60))
}
fn default_idle_in_transaction_timeout() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(60))
}
fn default_connect_timeout() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(10))
}

/// Whether idem may change destination tables' schema.
#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DdlMode {
    /// Create tables and add columns as connectors need them.
    #[default]
    Auto,
    /// Never: report the statement to run instead.
    Never,
}

/// The dispatcher's transport and limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifySettings {
    /// `log` (writes what would be sent; the default), `smtp` or `http`.
    #[serde(default)]
    pub transport: TransportKind,
    /// The From address of emails.
    #[serde(default = "default_from")]
    pub from: String,
    /// SMTP server, for `transport = "smtp"`.
    #[serde(default)]
    pub smtp: Option<SmtpSettings>,
    /// HTTP email API, for `transport = "http"`.
    #[serde(default)]
    pub http: Option<HttpEmailSettings>,
    /// Time allowed for one send (default `"30s"`).
    #[serde(default = "default_send_timeout")]
    pub send_timeout: HumanDuration,
    /// How long a claimed row is reserved for its dispatcher; renewed when its send
    /// starts. Must be at least `send_timeout` plus 1s, or another dispatcher could take
    /// a row whose send is still in flight (default `"2m"`).
    #[serde(default = "default_lease")]
    pub lease: HumanDuration,
    /// Attempts before a row that keeps failing temporarily becomes `failed` (default 8).
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Rows claimed per batch (default 50).
    #[serde(default = "default_batch")]
    pub batch_size: u32,
    /// Sends in flight at once (default 8, 1-64; each holds a database connection while
    /// its row is checked and recorded). Each row is still checked, marked in flight and
    /// recorded on its own; only rows whose send has started can be in flight when a
    /// dispatcher dies, so at most this many SMTP rows land in `needs_review` per crash.
    /// 1 sends one row after another.
    #[serde(default = "default_concurrency")]
    pub concurrency: u32,
    /// First delay before retrying a message that was definitely not sent; doubles per
    /// attempt, with jitter (default `"30s"`). A provider's `Retry-After` wins when longer.
    #[serde(default = "default_retry_backoff")]
    pub retry_backoff: HumanDuration,
}

impl Default for NotifySettings {
    fn default() -> Self {
        Self {
            transport: TransportKind::Log,
            from: default_from(),
            smtp: None,
            http: None,
            send_timeout: default_send_timeout(),
            lease: default_lease(),
            max_attempts: default_max_attempts(),
            batch_size: default_batch(),
            concurrency: default_concurrency(),
            retry_backoff: default_retry_backoff(),
        }
    }
}

/// Time a dispatcher needs around a send (marking it in flight, recording the outcome)
/// on top of `send_timeout`, within one lease.
pub const LEASE_MARGIN: std::time::Duration = std::time::Duration::from_secs(1);

impl NotifySettings {
    /// Refuses a lease that a send could outlast.
    pub fn check_lease(&self) -> Result<(), String> {
        let needed = self.send_timeout.0 + LEASE_MARGIN;
        if self.lease.0 < needed {
            return Err(format!(
                "lease = \"{}\" is shorter than send_timeout (\"{}\") plus {}s: a send still in flight could be taken and sent again by another dispatcher; set lease to at least {}ms",
                self.lease,
                self.send_timeout,
                LEASE_MARGIN.as_secs(),
                needed.as_millis()
            ));
        }
        Ok(())
    }
}

fn default_from() -> String {
    "idem@localhost".into()
}
fn default_send_timeout() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(30))
}
fn default_lease() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(120))
}
fn default_max_attempts() -> u32 {
    8
}
fn default_batch() -> u32 {
    50
}
fn default_concurrency() -> u32 {
    8
}
fn default_retry_backoff() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(30))
}

/// Which transport sends ledger rows.
#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TransportKind {
    /// Log what would be sent and mark it sent.
    #[default]
    Log,
    /// Send through an SMTP server.
    Smtp,
    /// POST to an HTTP email API that honors `Idempotency-Key`.
    Http,
}

/// An SMTP server.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmtpSettings {
    /// Host name (may be `${ENV}`).
    pub host: String,
    /// Port (default 587 with STARTTLS, 465 with TLS, 25 without).
    #[serde(default)]
    pub port: Option<u16>,
    /// `starttls` (default), `tls` or `none`.
    #[serde(default)]
    pub tls: SmtpTls,
    /// User name, if the server wants a login.
    #[serde(default)]
    pub username: Option<String>,
    /// Password: a `${ENV}` or `${file:...}` reference.
    #[serde(default)]
    pub password: Option<String>,
}

/// SMTP transport security.
#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SmtpTls {
    #[default]
    Starttls,
    Tls,
    None,
}

/// An HTTP email API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpEmailSettings {
    /// The send endpoint (may use `${ENV}`).
    pub url: String,
    /// Bearer token: a `${ENV}` reference.
    #[serde(default)]
    pub token: Option<String>,
}

/// How pages are grouped into transactions and how many connections write them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batching {
    /// A transaction is committed once it holds at least this many records (1: one page
    /// per transaction).
    pub max_records: usize,
    /// ...or once its first page is this old, so a slow vendor does not hold work
    /// uncommitted for long.
    pub max_wait: Duration,
    /// Transactions written at the same time (each on its own connection); commits stay
    /// in page order whatever this is.
    pub connections: usize,
}

impl Default for Batching {
    /// Chosen by measurement (BENCHMARKS.md): 2,000 records make the per-transaction
    /// bookkeeping and WAL flush small, and are short enough that one transaction's last
    /// chunk and commit overlap the next one's writes, so two connections keep both of
    /// Postgres' cores busy (5,000 left a core idle about a quarter of the time).
    fn default() -> Self {
        Self {
            max_records: 2_000,
            max_wait: Duration::from_secs(1),
            connections: 2,
        }
    }
}

/// Whether and how idem changes a destination table's schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DdlPolicy {
    /// `false` (`ddl = "never"`): a missing table or column is an error naming the DDL.
    pub allow: bool,
    /// The longest one attempt waits for the table's lock.
    pub lock_timeout: Duration,
    /// Attempts before giving up, with backoff between them.
    pub attempts: u32,
}

impl Default for DdlPolicy {
    fn default() -> Self {
        Self {
            allow: true,
            lock_timeout: Duration::from_secs(3),
            attempts: 3,
        }
    }
}

/// Names and limits every idem session carries.
#[derive(Debug, Clone)]
pub struct SessionSettings {
    /// `application_name`, shown in `pg_stat_activity` (Postgres keeps 63 bytes).
    pub application_name: String,
    /// `statement_timeout`: the longest one statement may run (a page's upsert takes
    /// milliseconds; this only stops a statement stuck behind someone else's lock).
    pub statement_timeout: Duration,
    /// `idle_in_transaction_session_timeout`: idem never waits on the network inside a
    /// transaction, so an idle open transaction means something is wrong.
    pub idle_in_transaction_timeout: Duration,
    /// The longest a new connection may take, TLS handshake included.
    pub connect_timeout: Duration,
}

impl Default for SessionSettings {
    fn default() -> Self {
        Self {
            application_name: "idem".into(),
            statement_timeout: Duration::from_secs(60),
            idle_in_transaction_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(10),
        }
    }
}

impl SessionSettings {
    /// The same limits under another session name.
    pub fn named(&self, application_name: impl Into<String>) -> Self {
        Self {
            application_name: application_name.into(),
            ..self.clone()
        }
    }
}
