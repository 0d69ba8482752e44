//! The command line: what it accepts, and which file runs each subcommand (`run` and
//! `replay` in `run`, `notify` and `ledger` in `ledger`, `check`, `migrate`, `serve`,
//! `status`, `checkpoint` in files of their names); this file parses, connects, dispatches
//! and maps outcomes to exit codes.
//!
//! Exit codes: 0 success, 1 failed, 2 usage or configuration error, 3 finished but some
//! records failed, 75 another run holds the stream's lock (try again later).

mod check;
mod checkpoint;
mod ledger;
mod migrate;
mod run;
mod serve;
mod status;

pub use check::POOLING_NOTE;

use std::path::PathBuf;
use std::process::ExitCode;

use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand};
use sqlx::PgPool;

use crate::config::{ConfigError, Settings};
use crate::connector::Connector;
use crate::duration::HumanDuration;
use crate::ledger::dispatch::MAX_CONCURRENCY;
use crate::store;
use crate::telemetry::{self, LogFormat};

pub const EXIT_OK: u8 = 0;
pub const EXIT_FAILED: u8 = 1;
pub const EXIT_CONFIG: u8 = 2;
pub const EXIT_PARTIAL: u8 = 3;
pub const EXIT_LOCKED: u8 = 75;

/// idem imports records from vendor APIs into Postgres; every job is safe to run twice.
#[derive(Debug, Parser)]
#[command(name = "idem", version, about)]
pub struct Cli {
    /// The config file (default: ./idem.toml if present).
    #[arg(long, global = true, env = "IDEM_CONFIG")]
    pub config: Option<PathBuf>,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Auto)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Import streams incrementally (all streams when none is named).
    Run {
        /// `SOURCE` or `SOURCE.STREAM`.
        targets: Vec<String>,
        /// Fetch and compare, report what would change, write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Only this partition of a partitioned stream (default: every partition, one
        /// after another).
        #[arg(long)]
        partition: Option<String>,
        /// Do not send notifications after the run.
        #[arg(long)]
        no_notify: bool,
        /// Print the reports as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Re-read a window of one stream to repair drift; the regular checkpoint is untouched.
    Replay {
        /// `SOURCE.STREAM`.
        target: String,
        /// The window is [now - SINCE, now), e.g. `7d`.
        #[arg(long, conflicts_with_all = ["from", "to"])]
        since: Option<HumanDuration>,
        /// Window start, inclusive (RFC 3339).
        #[arg(long, requires = "to")]
        from: Option<DateTime<Utc>>,
        /// Window end, exclusive (RFC 3339).
        #[arg(long, requires = "from")]
        to: Option<DateTime<Utc>>,
        /// Start the window again instead of resuming an interrupted replay of it.
        #[arg(long)]
        restart: bool,
        /// Only this partition of a partitioned stream (default: every partition, one
        /// after another).
        #[arg(long)]
        partition: Option<String>,
        /// Do not send notifications after the replay.
        #[arg(long)]
        no_notify: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Checkpoints, recent runs, failures and ledger counts.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Apply idem's database migrations.
    Migrate {
        /// Also create or extend every connector's destination tables (even with
        /// `ddl = "never"`): the step for a role that may alter them.
        #[arg(long)]
        tables: bool,
    },
    /// Validate the config and every connector file, without any request.
    Check,
    /// Show or change checkpoints.
    Checkpoint {
        #[command(subcommand)]
        command: CheckpointCommand,
    },
    /// Run as a service: scheduled runs, the dispatcher, /healthz and /metrics.
    Serve {
        /// Address for /healthz and /metrics (default: `[serve] listen` in idem.toml).
        #[arg(long)]
        listen: Option<String>,
    },
    /// Send due notifications from the ledger (also done after every run).
    Notify {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Inspect and resolve notification ledger rows.
    Ledger {
        #[command(subcommand)]
        command: LedgerCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum LedgerCommand {
    /// List rows, oldest first.
    List {
        /// Only rows with this status (pending, sending, sent, failed, needs_review, cancelled).
        #[arg(long)]
        status: Option<String>,
        /// At most this many rows.
        #[arg(long, default_value_t = 100)]
        limit: i64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one row with its frozen payload.
    Show { key: String },
    /// Put rows "sent" through a transport back in the queue, e.g. `--transport log` once
    /// a real transport is configured (the log transport delivered nothing).
    Requeue {
        /// The transport the rows were "sent" by: log, smtp, http, or `unrecorded` for
        /// rows sent before idem recorded it.
        #[arg(long)]
        transport: String,
    },
    /// Decide the fate of a row whose outcome is unknown or that failed.
    Resolve {
        key: String,
        /// sent: it did go out; retry: send it again; cancel: never send it.
        #[arg(long = "as", value_enum)]
        resolution: crate::ledger::Resolution,
    },
}

#[derive(Debug, Subcommand)]
pub enum CheckpointCommand {
    /// Show checkpoints (all, or one stream's).
    Show {
        target: Option<String>,
        /// Only this partition's checkpoints.
        #[arg(long)]
        partition: Option<String>,
    },
    /// Forget a stream's checkpoint: the next run walks everything.
    Reset {
        target: String,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
        /// Only this partition (default: every partition of the stream).
        #[arg(long)]
        partition: Option<String>,
    },
    /// Set a stream's high-water mark (it may move backwards).
    Set {
        target: String,
        #[arg(long)]
        high_water_mark: DateTime<Utc>,
        /// Only this partition (default: every partition of the stream).
        #[arg(long)]
        partition: Option<String>,
    },
}

/// Parses the arguments and runs; the binary's whole `main`.
pub async fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(cli.log_format);
    match execute(cli).await {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            let code = if err.downcast_ref::<ConfigError>().is_some() {
                EXIT_CONFIG
            } else {
                EXIT_FAILED
            };
            eprintln!(
                "error: {}",
                crate::redact::for_terminal(&crate::redact::vendor_text(&format!("{err:#}")))
            );
            ExitCode::from(code)
        }
    }
}

async fn execute(cli: Cli) -> anyhow::Result<u8> {
    let settings = Settings::load(cli.config.as_deref())?;
    let mut name = session_name(&cli.command);
    if matches!(cli.command, Command::Serve { .. }) {
        // Replicas are told apart in pg_stat_activity too.
        let instance = crate::instance::set_id(settings.serve.instance.as_deref());
        name = format!("{name} {instance}");
    }
    let _ = SESSION_NAME.set(name);
    let insecure = insecure_files(&settings);
    for warning in &insecure {
        tracing::warn!("{warning}");
    }
    if let Command::Run { json, .. } | Command::Replay { json, .. } | Command::Notify { json } =
        &cli.command
    {
        crate::progress::enable(*json, cli.log_format == LogFormat::Json);
    }
    match cli.command {
        Command::Check => check::check_command(&settings, &insecure).await,
        Command::Migrate { tables } => migrate::migrate(&settings, tables).await,
        Command::Run {
            targets,
            dry_run,
            partition,
            no_notify,
            json,
        } => run::run(&settings, targets, dry_run, partition, no_notify, json).await,
        Command::Replay {
            target,
            since,
            from,
            to,
            restart,
            partition,
            no_notify,
            json,
        } => {
            let args = run::ReplayArgs {
                target,
                since,
                from,
                to,
                restart,
                partition,
                no_notify,
                json,
            };
            run::replay(&settings, args).await
        }
        Command::Serve { listen } => serve::serve(settings, listen).await,
        Command::Notify { json } => ledger::notify_command(&settings, json).await,
        Command::Ledger { command } => {
            let pool = connect(&settings).await?;
            ledger::ledger_command(&pool, &settings, command).await
        }
        Command::Status { json } => {
            let connectors = settings.load_connectors()?;
            let pool = connect(&settings).await?;
            status::status(&pool, &connectors, settings.serve.lag_alert, json).await
        }
        Command::Checkpoint { command } => {
            let connectors = settings.load_connectors()?;
            let pool = connect(&settings).await?;
            let url = settings.database_url()?;
            checkpoint::checkpoint(&pool, &url, &connectors, command).await
        }
    }
}

fn usage(message: String) -> anyhow::Error {
    anyhow::Error::new(ConfigError::File {
        file: "command line".into(),
        message,
    })
}

/// The `application_name` of this process's pooled sessions, e.g. `idem run stripe`.
static SESSION_NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();

fn session_name(command: &Command) -> String {
    let (name, targets): (&str, Vec<&str>) = match command {
        Command::Run { targets, .. } => ("run", targets.iter().map(String::as_str).collect()),
        Command::Replay { target, .. } => ("replay", vec![target.as_str()]),
        Command::Status { .. } => ("status", vec![]),
        Command::Migrate { .. } => ("migrate", vec![]),
        Command::Check => ("check", vec![]),
        Command::Checkpoint { .. } => ("checkpoint", vec![]),
        Command::Serve { .. } => ("serve", vec![]),
        Command::Notify { .. } => ("notify", vec![]),
        Command::Ledger { .. } => ("ledger", vec![]),
    };
    let mut session = format!("idem {name}");
    for target in targets {
        session.push(' ');
        session.push_str(target);
    }
    session
}

async fn connect(settings: &Settings) -> anyhow::Result<PgPool> {
    connect_creating(settings, false).await
}

/// Connects and migrates; with `create`, first creates the database when it does not
/// exist yet (`idem migrate`, and the first `run`, `replay` or `serve`).
async fn connect_creating(settings: &Settings, create: bool) -> anyhow::Result<PgPool> {
    connect_creating_sized(settings, create, 4).await
}

/// [`connect_creating`] with a pool of `max_connections` (`idem serve`: `[serve] pool_size`).
async fn connect_creating_sized(
    settings: &Settings,
    create: bool,
    max_connections: u32,
) -> anyhow::Result<PgPool> {
    let url = settings.database_url()?;
    let name = SESSION_NAME.get().map_or("idem", String::as_str);
    let session = settings.database.session(name);
    // Each send in flight checks and records its row on a connection of its own.
    let connections =
        max_connections.max(settings.notify.concurrency.clamp(1, MAX_CONCURRENCY) + 1);
    // The database is looked for only when connecting fails: a connection of its own
    // first would cost every run a serial round of connecting (~12 ms).
    let pool = match store::connect_with(&url, connections, &session).await {
        Ok(pool) => pool,
        Err(first) => match store::bootstrap::ensure_database(&url, create).await? {
            store::bootstrap::Prepared::Existing => return Err(first.into()),
            store::bootstrap::Prepared::Created(created) => {
                eprintln!("created database \"{created}\" (first run)");
                store::connect_with(&url, connections, &session).await?
            }
            store::bootstrap::Prepared::CreatedByAnother => {
                store::connect_with(&url, connections, &session).await?
            }
        },
    };
    store::migrate(&pool).await?;
    Ok(pool)
}

/// The config file and connector files that hold a plaintext secret others may read.
fn insecure_files(settings: &Settings) -> Vec<String> {
    let mut files: Vec<std::path::PathBuf> = settings.file.iter().cloned().collect();
    files.extend(settings.connector_files().unwrap_or_default());
    crate::secret::insecure_secret_files(&files)
}

fn select<'a>(
    connectors: &'a [Connector],
    targets: &[String],
) -> anyhow::Result<Vec<(&'a Connector, String)>> {
    crate::connector::select_streams(connectors, targets).map_err(usage)
}
