//! The command line: parses arguments, runs the command, maps outcomes to exit codes.
//!
//! Exit codes: 0 success, 1 failed, 2 usage or configuration error, 3 finished but some
//! records failed, 75 another run holds the stream's lock (try again later).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand};
use serde_json::json;
use sqlx::PgPool;

use crate::config::{ConfigError, Settings};
use crate::connector::Connector;
use crate::duration::HumanDuration;
use crate::ledger::dispatch::{DispatchReport, DispatchSettings, Dispatcher, MAX_CONCURRENCY};
use crate::ledger::transport::AnyTransport;
use crate::run::{Mode, RunError, RunOptions, RunStatus, StreamRunner, summary};
use crate::store;
use crate::telemetry::{self, LogFormat};

pub const EXIT_OK: u8 = 0;
pub const EXIT_FAILED: u8 = 1;
pub const EXIT_CONFIG: u8 = 2;
pub const EXIT_PARTIAL: u8 = 3;
pub const EXIT_LOCKED: u8 = 75;

/// What `idem check` says about connection poolers (it cannot tell from here).
pub const POOLING_NOTE: &str = "note: one run per stream relies on a Postgres session advisory lock: DATABASE_URL must reach Postgres directly or through a session-mode pool, not a transaction-pooling proxy (PgBouncer pool_mode=transaction), where the lock can stay held by a pooled server connection or be taken twice. Writes stay fenced either way: a run commits only while it owns the stream.";

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
        /// Address for /healthz and /metrics (default: [serve] listen in idem.toml).
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
        Command::Check => {
            for warning in &insecure {
                println!("warning: {warning}");
            }
            let code = check(&settings).await?;
            if let Ok(url) = settings.database_url() {
                if let Some(warning) =
                    crate::schedule::connection_warning(&settings.serve, &url).await
                {
                    println!("{warning}");
                }
            }
            Ok(code)
        }
        Command::Migrate { tables } => {
            let connectors = if tables {
                settings.load_connectors()?
            } else {
                Vec::new()
            };
            let pool = connect_creating(&settings, true).await?;
            store::migrate(&pool).await?;
            println!("migrations applied");
            migrate_tables(&pool, &settings, &connectors).await?;
            Ok(EXIT_OK)
        }
        Command::Run {
            targets,
            dry_run,
            partition,
            no_notify,
            json,
        } => {
            let connectors = settings.load_connectors()?;
            let selected = select(&connectors, &targets)?;
            let walks = plan_walks(&selected, partition.as_deref())?;
            let pool = connect_creating(&settings, true).await?;
            let url = settings.database_url()?;
            let transport =
                AnyTransport::from_settings(&settings.notify).map_err(|e| usage(e.to_string()))?;
            let options = RunOptions {
                batching: settings.import.batching(),
                ddl: settings.database.ddl_policy(),
                ..RunOptions::new(Mode::Regular, dry_run)
            };
            let code = run_all(&pool, &url, walks, &options, json).await?;
            if !no_notify && !dry_run {
                let report = notify(&pool, &settings, &transport).await?;
                if !json {
                    println!("{}", notify_summary(&report));
                }
            }
            Ok(code)
        }
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
            let connectors = settings.load_connectors()?;
            let selected = select(&connectors, std::slice::from_ref(&target))?;
            if selected.len() != 1 {
                return Err(usage(format!(
                    "replay needs one SOURCE.STREAM, '{target}' names {} streams",
                    selected.len()
                )));
            }
            let walks = plan_walks(&selected, partition.as_deref())?;
            let (from, to, label) = match (since, from, to) {
                (Some(since), None, None) => {
                    let now = Utc::now();
                    (now - since.as_chrono(), now, format!("since:{since}"))
                }
                (None, Some(from), Some(to)) if from < to => (
                    from,
                    to,
                    format!("{}..{}", from.to_rfc3339(), to.to_rfc3339()),
                ),
                (None, Some(_), Some(_)) => return Err(usage("--from must be before --to".into())),
                _ => {
                    return Err(usage(
                        "replay needs --since DURATION, or --from and --to".into(),
                    ));
                }
            };
            let pool = connect_creating(&settings, true).await?;
            let url = settings.database_url()?;
            let transport =
                AnyTransport::from_settings(&settings.notify).map_err(|e| usage(e.to_string()))?;
            let options = RunOptions {
                batching: settings.import.batching(),
                ddl: settings.database.ddl_policy(),
                ..RunOptions::new(
                    Mode::Replay {
                        from,
                        to,
                        label,
                        restart,
                    },
                    false,
                )
            };
            let code = run_all(&pool, &url, walks, &options, json).await?;
            if !no_notify {
                let report = notify(&pool, &settings, &transport).await?;
                if !json {
                    println!("{}", notify_summary(&report));
                }
            }
            Ok(code)
        }
        Command::Serve { listen } => {
            let connectors = settings.load_connectors()?;
            for (index, schedule) in settings.serve.schedules.iter().enumerate() {
                select(&connectors, &schedule.streams)
                    .with_context(|| format!("serve.schedules[{index}].streams"))?;
            }
            let transport =
                AnyTransport::from_settings(&settings.notify).map_err(|e| usage(e.to_string()))?;
            let instance = crate::instance::set_id(settings.serve.instance.as_deref());
            let pool = connect_creating_sized(&settings, true, settings.serve.pool_size()).await?;
            let url = settings.database_url()?;
            let address = listen.unwrap_or_else(|| settings.serve.listen.clone());
            let listener = tokio::net::TcpListener::bind(&address)
                .await
                .map_err(|err| usage(format!("serve.listen: cannot listen on {address}: {err}")))?;
            println!(
                "idem serve: {} schedule(s), instance {instance}; health http://{addr}/healthz, metrics http://{addr}/metrics, console http://{addr}/",
                settings.serve.schedules.len(),
                addr = listener.local_addr()?
            );
            if settings.notify.transport == crate::config::TransportKind::Log {
                println!("{}", transport_guarantee(settings.notify.transport));
            }
            use std::io::Write as _;
            std::io::stdout().flush()?;
            let shutdown = crate::serve::shutdown_signal();
            crate::serve::serve(
                settings, connectors, pool, url, transport, listener, shutdown,
            )
            .await?;
            Ok(EXIT_OK)
        }
        Command::Notify { json } => {
            let transport =
                AnyTransport::from_settings(&settings.notify).map_err(|e| usage(e.to_string()))?;
            let pool = connect(&settings).await?;
            let report = notify(&pool, &settings, &transport).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!("{}", notify_summary(&report));
            }
            Ok(if report.failed + report.needs_review > 0 {
                EXIT_PARTIAL
            } else {
                EXIT_OK
            })
        }
        Command::Ledger { command } => {
            let pool = connect(&settings).await?;
            ledger_command(&pool, &settings, command).await
        }
        Command::Status { json } => {
            let connectors = settings.load_connectors()?;
            let pool = connect(&settings).await?;
            status(&pool, &connectors, settings.serve.lag_alert, json).await
        }
        Command::Checkpoint { command } => {
            let connectors = settings.load_connectors()?;
            let pool = connect(&settings).await?;
            let url = settings.database_url()?;
            checkpoint(&pool, &url, &connectors, command).await
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
    if let Some(created) = store::bootstrap::ensure_database(&url, create).await? {
        eprintln!("created database \"{created}\" (first run)");
    }
    let name = SESSION_NAME.get().map_or("idem", String::as_str);
    // Each send in flight checks and records its row on a connection of its own.
    let connections =
        max_connections.max(settings.notify.concurrency.clamp(1, MAX_CONCURRENCY) + 1);
    let pool = store::connect_with(&url, connections, &settings.database.session(name)).await?;
    store::migrate(&pool).await?;
    Ok(pool)
}

async fn notify(
    pool: &PgPool,
    settings: &Settings,
    transport: &AnyTransport,
) -> anyhow::Result<DispatchReport> {
    let dispatcher = Dispatcher::new(
        pool,
        transport,
        DispatchSettings::from_config(&settings.notify),
    );
    let bar = crate::progress::NotifyBar::start(pool).await;
    let report = dispatcher.run_once().await;
    if let Some(bar) = bar {
        bar.finish();
    }
    Ok(report?)
}

fn notify_summary(report: &DispatchReport) -> String {
    let mut line = format!(
        "notifications: {} sent, {} to retry later, {} failed, {} need review",
        report.sent, report.retry_later, report.failed, report.needs_review
    );
    if report.cancelled > 0 {
        line.push_str(&format!(
            ", {} cancelled (their reason was gone; see idem ledger list --status cancelled)",
            report.cancelled
        ));
    }
    if report.logged_only > 0 {
        line.push_str(&format!(
            "\n  log transport: NOTHING WAS DELIVERED. {} row(s) were only written to the log and are now marked sent; configure [notify] transport = \"smtp\" or \"http\" and run `idem ledger requeue --transport log` to send them",
            report.logged_only
        ));
    }
    line
}

/// The delivery guarantee of the configured transport, as `idem check` states it.
fn transport_guarantee(kind: crate::config::TransportKind) -> &'static str {
    use crate::config::TransportKind;
    match kind {
        TransportKind::Log => {
            "notify: transport = log: NOTHING IS DELIVERED. Rows are written to the log and marked sent for good; after configuring smtp or http, `idem ledger requeue --transport log` sends them"
        }
        TransportKind::Smtp => {
            "notify: transport = smtp: at most once; a send whose outcome is unknown goes to needs_review (resolve it with idem ledger resolve), never out again by itself"
        }
        TransportKind::Http => {
            "notify: transport = http: exactly once; the ledger key is the Idempotency-Key, so an unknown outcome is retried under the same key"
        }
    }
}

async fn requeue(pool: &PgPool, settings: &Settings, transport: &str) -> anyhow::Result<u8> {
    let filter = match transport {
        "log" | "smtp" | "http" => Some(transport),
        "unrecorded" => None,
        other => {
            return Err(usage(format!(
                "--transport must be log, smtp, http or unrecorded, not '{other}'"
            )));
        }
    };
    if settings.notify.transport == crate::config::TransportKind::Log {
        return Err(usage(
            "the configured transport is log, which delivers nothing: configure [notify] transport = \"smtp\" or \"http\" first".into(),
        ));
    }
    let keys = crate::ledger::requeue_sent_by(pool, filter).await?;
    for key in &keys {
        println!("requeued {key}");
    }
    println!(
        "{} row(s) sent by the {transport} transport are pending again; each is re-checked against its record before it is sent",
        keys.len()
    );
    Ok(EXIT_OK)
}

async fn ledger_command(
    pool: &PgPool,
    settings: &Settings,
    command: LedgerCommand,
) -> anyhow::Result<u8> {
    match command {
        LedgerCommand::List {
            status,
            limit,
            json,
        } => {
            let rows = crate::ledger::list(pool, status.as_deref(), limit).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else if rows.is_empty() {
                println!(
                    "no ledger rows{}",
                    status.map_or(String::new(), |s| format!(" with status {s}"))
                );
            } else {
                for row in rows {
                    println!(
                        "{:<13} {:<45} to {} (attempts {}{}){}",
                        row.status,
                        row.key,
                        row.recipient,
                        row.attempts,
                        row.transport
                            .as_deref()
                            .map_or(String::new(), |t| format!(", via {t}")),
                        row.last_error.map_or(String::new(), |e| format!(
                            ": {}",
                            crate::redact::for_terminal(&e)
                        ))
                    );
                }
            }
            Ok(EXIT_OK)
        }
        LedgerCommand::Show { key } => match crate::ledger::get(pool, &key).await? {
            Some(row) => {
                println!("{}", serde_json::to_string_pretty(&row)?);
                Ok(EXIT_OK)
            }
            None => Err(usage(format!("no ledger row with key '{key}'"))),
        },
        LedgerCommand::Requeue { transport } => requeue(pool, settings, &transport).await,
        LedgerCommand::Resolve { key, resolution } => {
            match crate::ledger::resolve(pool, &key, resolution).await {
                Ok(row) => {
                    println!("{}: now {}", row.key, row.status);
                    Ok(EXIT_OK)
                }
                Err(err) => Err(usage(err.to_string())),
            }
        }
    }
}

/// The config file and connector files that hold a plaintext secret others may read.
fn insecure_files(settings: &Settings) -> Vec<String> {
    let mut files: Vec<std::path::PathBuf> = settings.file.iter().cloned().collect();
    files.extend(settings.connector_files().unwrap_or_default());
    crate::secret::insecure_secret_files(&files)
}

async fn check(settings: &Settings) -> anyhow::Result<u8> {
    let connectors = settings.load_connectors()?;
    for connector in &connectors {
        let streams: Vec<String> = connector
            .spec
            .streams
            .iter()
            .map(|(name, spec)| match &spec.parent {
                Some(parent) => format!("{name} (child of {})", parent.streams.join(", ")),
                None => name.clone(),
            })
            .collect();
        println!(
            "ok  {} ({}): streams {}",
            connector.file.display(),
            connector.spec.source_system,
            streams.join(", ")
        );
    }
    // The rest of idem.toml, as a run or `serve` would read it.
    AnyTransport::from_settings(&settings.notify).map_err(|e| usage(e.to_string()))?;
    for (index, schedule) in settings.serve.schedules.iter().enumerate() {
        select(&connectors, &schedule.streams)
            .with_context(|| format!("serve.schedules[{index}].streams"))?;
    }
    if settings.database_url.is_some() {
        settings.database_url()?;
    }
    println!("{}", transport_guarantee(settings.notify.transport));
    println!(
        "{} connector file(s) valid; notify and serve settings valid",
        connectors.len()
    );
    println!("{POOLING_NOTE}");
    if settings.database_url.is_some() {
        return check_database(settings, &connectors).await;
    }
    Ok(EXIT_OK)
}

/// With a database: how the connection is secured, and which grants (or, with
/// `ddl = "never"`, which schema changes) are missing. Changes nothing.
async fn check_database(settings: &Settings, connectors: &[Connector]) -> anyhow::Result<u8> {
    let url = settings.database_url()?;
    let target = store::Target::parse(&url)?;
    let pool = store::connect_with(&url, 1, &settings.database.session("idem check")).await?;
    let tls = store::session::tls_status(&pool, &target).await?;
    match (&tls.version, tls.encrypted) {
        (Some(version), true) => println!(
            "database {}: TLS {version} ({}), {}",
            target.describe(),
            tls.cipher.as_deref().unwrap_or("cipher unknown"),
            tls.verified
        ),
        _ => println!(
            "database {}: NOT encrypted{}",
            target.describe(),
            if target.loopback {
                " (loopback)"
            } else {
                "; records and passwords cross the network readable"
            }
        ),
    }
    let ddl_allowed = settings.database.ddl == crate::config::DdlMode::Auto;
    let mut tables = Vec::new();
    for connector in connectors {
        for stream in connector.spec.streams.values() {
            if !tables
                .iter()
                .any(|t: &store::table::DestinationTable| t.name == stream.table)
            {
                tables.push(store::table::DestinationTable::new(
                    &stream.table,
                    &crate::run::children::table_columns(stream),
                ));
            }
        }
    }
    let destinations: Vec<store::grants::Destination> = tables
        .iter()
        .map(|table| store::grants::Destination { table, ddl_allowed })
        .collect();
    let missing = store::grants::missing(&pool, &destinations).await?;
    pool.close().await;
    let mode = if ddl_allowed { "auto" } else { "never" };
    if missing.is_empty() {
        println!(
            "grants: all in place for {} destination table(s) with ddl = \"{mode}\"",
            tables.len()
        );
        return Ok(EXIT_OK);
    }
    println!("grants: {} missing (ddl = \"{mode}\"):", missing.len());
    for line in &missing {
        println!("  {line}");
    }
    Ok(EXIT_FAILED)
}

/// `idem migrate --tables`: brings every destination table to its connector's shape,
/// with the same lock timeout as a run, whatever `ddl` says.
async fn migrate_tables(
    pool: &PgPool,
    settings: &Settings,
    connectors: &[Connector],
) -> anyhow::Result<()> {
    let policy = store::table::DdlPolicy {
        allow: true,
        ..settings.database.ddl_policy()
    };
    let mut done: Vec<&str> = Vec::new();
    for connector in connectors {
        for stream in connector.spec.streams.values() {
            if done.contains(&stream.table.as_str()) {
                continue;
            }
            done.push(&stream.table);
            let table = store::table::DestinationTable::new(
                &stream.table,
                &crate::run::children::table_columns(stream),
            )
            .with_ddl(policy.clone());
            let statements = table.missing_ddl(pool).await?;
            table.ensure(pool).await?;
            if statements.is_empty() {
                println!("table {}: up to date", stream.table);
            }
            for statement in statements {
                println!("table {}: {statement}", stream.table);
            }
        }
    }
    Ok(())
}

fn select<'a>(
    connectors: &'a [Connector],
    targets: &[String],
) -> anyhow::Result<Vec<(&'a Connector, String)>> {
    crate::connector::select_streams(connectors, targets).map_err(usage)
}

/// One walk `idem run`/`replay` makes: a stream, and its partition (`""` for none).
type Walk<'a> = (&'a Connector, &'a str, String);

/// The walks of `selected`, every partition of each (or only `partition`): checked before
/// anything connects or runs, so a mistyped partition is a usage error at once.
fn plan_walks<'a>(
    selected: &'a [(&'a Connector, String)],
    partition: Option<&str>,
) -> anyhow::Result<Vec<Walk<'a>>> {
    let mut walks = Vec::new();
    for (connector, stream) in selected {
        let partitions = match (partition, selected.len()) {
            // `--partition` with several streams applies to the partitioned ones only.
            (Some(_), n) if n > 1 && connector.partitions(stream) == [String::new()] => {
                continue;
            }
            _ => connector
                .select_partitions(stream, partition)
                .map_err(usage)?,
        };
        for p in partitions {
            walks.push((*connector, stream.as_str(), p));
        }
    }
    if let (Some(partition), true) = (partition, walks.is_empty()) {
        return Err(usage(format!(
            "--partition {partition}: none of the selected streams has partitions"
        )));
    }
    Ok(walks)
}

async fn run_all(
    pool: &PgPool,
    database_url: &str,
    walks: Vec<Walk<'_>>,
    options: &RunOptions,
    json: bool,
) -> anyhow::Result<u8> {
    let mut runner = StreamRunner::default();
    let mut code = EXIT_OK;
    let mut reports = Vec::new();
    for (connector, stream, partition) in walks {
        let spec = connector.stream(stream).expect("selected streams exist");
        let name = format!(
            "{}.{}",
            connector.spec.source_system,
            crate::connector::partition::qualified(stream, &partition)
        );
        let bar = crate::progress::StreamBar::start(&name);
        let mut options = options.clone();
        options.progress = bar.as_ref().map(|(_, sender)| sender.clone());
        let result = runner
            .run_one(
                pool,
                database_url,
                connector,
                stream,
                spec,
                &partition,
                &options,
            )
            .await;
        if let Some((bar, _)) = bar {
            bar.finish();
        }
        match result {
            Ok(report) => {
                let stream_code = match report.status {
                    RunStatus::Succeeded => EXIT_OK,
                    RunStatus::Partial => EXIT_PARTIAL,
                    RunStatus::Failed | RunStatus::Interrupted => EXIT_FAILED,
                };
                code = worst(code, stream_code);
                if !json {
                    println!("{}", summary(&report));
                }
                for child in &report.children {
                    code = worst(
                        code,
                        match child.status {
                            RunStatus::Succeeded => EXIT_OK,
                            RunStatus::Partial => EXIT_PARTIAL,
                            RunStatus::Failed | RunStatus::Interrupted => EXIT_FAILED,
                        },
                    );
                    if !json {
                        println!("{}", summary(child));
                    }
                }
                reports.push(report);
            }
            Err(RunError::Locked {
                source_system,
                stream,
            }) => {
                eprintln!(
                    "{source_system}.{stream}: another run of this stream is in progress (it holds the lock); nothing was written. Try again when it has finished."
                );
                code = worst(code, EXIT_LOCKED);
            }
            Err(err) => {
                return Err(err).context(name);
            }
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    }
    Ok(code)
}

/// The most severe of two exit codes: failed, then locked, then partial.
fn worst(a: u8, b: u8) -> u8 {
    let rank = |code| match code {
        EXIT_FAILED => 3,
        EXIT_LOCKED => 2,
        EXIT_PARTIAL => 1,
        _ => 0,
    };
    if rank(b) > rank(a) { b } else { a }
}

async fn status(
    pool: &PgPool,
    connectors: &[Connector],
    lag_alert: HumanDuration,
    json: bool,
) -> anyhow::Result<u8> {
    let checkpoints = store::state::list_checkpoints(pool, None).await?;
    let runs = store::state::recent_runs(pool, None, 5).await?;
    let failures: Vec<(String, String, String, String, i32)> = sqlx::query_as(
        "SELECT source_system, CASE WHEN partition = '' THEN stream ELSE stream || '#' || partition END,
                record_key, error, attempts FROM idem_failures ORDER BY 1, 2, 3",
    )
    .fetch_all(pool)
    .await?;
    let ledger = crate::ledger::counts_by_status(pool).await?;
    if json {
        let value = json!({
            "streams": connectors.iter().flat_map(|c| c.spec.streams.keys().map(move |s| format!("{}.{s}", c.spec.source_system))).collect::<Vec<_>>(),
            "partitions": connectors.iter().flat_map(|c| c.spec.streams.iter().filter_map(move |(s, spec)| {
                spec.partitions.as_ref().map(|p| (format!("{}.{s}", c.spec.source_system), json!(p.values)))
            })).collect::<serde_json::Map<_, _>>(),
            "checkpoints": checkpoints,
            "runs": runs,
            "failures": failures.iter().map(|(ss, st, key, error, attempts)| json!({
                "source_system": ss, "stream": st, "record_key": key, "error": error, "attempts": attempts })).collect::<Vec<_>>(),
            "ledger": ledger.iter().map(|(s, n)| (s.clone(), json!(n))).collect::<serde_json::Map<_, _>>(),
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(EXIT_OK);
    }
    let rows = crate::console::overview(pool, connectors, lag_alert, &Default::default()).await?;
    // Vendor text (cursors, errors) cannot drive the terminal; the table's own newlines stay.
    for line in crate::console::table::render(&rows).lines() {
        println!("{}", crate::redact::for_terminal(line));
    }
    if runs.iter().any(|r| r.error.is_some()) {
        println!("Last errors");
        for r in runs.iter().filter(|r| r.error.is_some()).take(5) {
            println!(
                "  {}.{} {} {} {}: {}",
                r.source_system,
                r.stream,
                r.mode,
                r.status,
                r.started_at.to_rfc3339(),
                crate::redact::for_terminal(&crate::redact::redact(
                    r.error.as_deref().unwrap_or_default()
                ))
            );
        }
    }
    println!("Record failures: {}", failures.len());
    for (ss, st, key, error, attempts) in failures.iter().take(20) {
        println!(
            "  {ss}.{st} {} (attempts {attempts}): {}",
            crate::redact::for_terminal(key),
            crate::redact::for_terminal(&crate::redact::redact(error))
        );
    }
    let counts: Vec<String> = ledger.iter().map(|(s, n)| format!("{s} {n}")).collect();
    println!(
        "Ledger: {}",
        if counts.is_empty() {
            "empty".to_string()
        } else {
            counts.join(", ")
        }
    );
    Ok(EXIT_OK)
}

async fn checkpoint(
    pool: &PgPool,
    database_url: &str,
    connectors: &[Connector],
    command: CheckpointCommand,
) -> anyhow::Result<u8> {
    let one = |target: &str| -> anyhow::Result<(String, String)> {
        let selected = select(connectors, &[target.to_string()])?;
        match selected.as_slice() {
            [(connector, stream)] => Ok((connector.spec.source_system.clone(), stream.clone())),
            _ => Err(usage(format!("'{target}' must name one SOURCE.STREAM"))),
        }
    };
    match command {
        CheckpointCommand::Show { target, partition } => {
            let filter = target.as_deref().map(one).transpose()?;
            if let (Some((ss, st)), Some(_)) = (&filter, &partition) {
                partitions_of(connectors, ss, st, partition.as_deref())?;
            }
            let rows: Vec<_> = store::state::list_checkpoints(
                pool,
                filter.as_ref().map(|(a, b)| (a.as_str(), b.as_str())),
            )
            .await?
            .into_iter()
            .filter(|cp| partition.as_ref().is_none_or(|p| *p == cp.partition))
            .collect();
            if rows.is_empty() {
                println!("no checkpoint yet");
            }
            for cp in rows {
                println!(
                    "{}.{} [{}] high_water_mark={} cursor={} resume={}",
                    cp.source_system,
                    crate::connector::partition::qualified(&cp.stream, &cp.partition),
                    cp.scope,
                    cp.high_water_mark.map_or("-".into(), |t| t.to_rfc3339()),
                    cp.cursor.unwrap_or_else(|| "-".into()),
                    cp.resume.map_or("-".into(), |r| r.to_string())
                );
            }
            Ok(EXIT_OK)
        }
        CheckpointCommand::Reset {
            target,
            yes,
            partition,
        } => {
            let (ss, st) = one(&target)?;
            let partitions = partitions_of(connectors, &ss, &st, partition.as_deref())?;
            if !yes
                && !confirm(&format!(
                    "Forget the checkpoint of {ss}.{st}{}? The next run walks everything (writes nothing for unchanged records). [y/N] ",
                    partition
                        .as_ref()
                        .map_or(String::new(), |p| format!(" (partition {p})"))
                ))?
            {
                println!("nothing changed");
                return Ok(EXIT_OK);
            }
            for p in partitions {
                let name = crate::connector::partition::qualified(&st, &p);
                let Some(lock) = store::StreamLock::try_acquire(database_url, &ss, &st, &p).await?
                else {
                    return Ok(checkpoint_locked(&ss, &name));
                };
                let done = store::state::overwrite_checkpoint(pool, &ss, &st, &p, None).await;
                lock.release().await;
                done?;
                println!("{ss}.{name}: checkpoint reset");
            }
            Ok(EXIT_OK)
        }
        CheckpointCommand::Set {
            target,
            high_water_mark,
            partition,
        } => {
            let (ss, st) = one(&target)?;
            for p in partitions_of(connectors, &ss, &st, partition.as_deref())? {
                let name = crate::connector::partition::qualified(&st, &p);
                let Some(lock) = store::StreamLock::try_acquire(database_url, &ss, &st, &p).await?
                else {
                    return Ok(checkpoint_locked(&ss, &name));
                };
                let done =
                    store::state::overwrite_checkpoint(pool, &ss, &st, &p, Some(high_water_mark))
                        .await;
                lock.release().await;
                done?;
                println!(
                    "{ss}.{name}: high-water mark set to {}",
                    high_water_mark.to_rfc3339()
                );
            }
            Ok(EXIT_OK)
        }
    }
}

/// The partitions of `source_system.stream` that `only` selects (all when `None`).
fn partitions_of(
    connectors: &[Connector],
    source_system: &str,
    stream: &str,
    only: Option<&str>,
) -> anyhow::Result<Vec<String>> {
    let connector = connectors
        .iter()
        .find(|c| c.spec.source_system == source_system)
        .expect("the target was selected from these connectors");
    connector.select_partitions(stream, only).map_err(usage)
}

/// A run holds the stream: changing its checkpoint now would be overwritten by the run's
/// next page (or would move the ground under it), so nothing is changed.
fn checkpoint_locked(source_system: &str, stream: &str) -> u8 {
    eprintln!(
        "error: a run of {source_system}.{stream} is in progress (it holds the stream's lock); the checkpoint was not changed, try again when it ends"
    );
    EXIT_LOCKED
}

fn confirm(question: &str) -> anyhow::Result<bool> {
    use std::io::{BufRead, IsTerminal, Write};
    if !std::io::stdin().is_terminal() {
        anyhow::bail!(usage(
            "refusing to reset without confirmation: pass --yes".into()
        ));
    }
    print!("{question}");
    std::io::stdout().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes"))
}
