//! `idem run` and `idem replay`: the walks the targets name, run one after another with a
//! progress bar each, then the reminders they made due; the worst outcome is the exit code.

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::ledger::{notify, notify_summary};
use super::{EXIT_FAILED, EXIT_LOCKED, EXIT_OK, EXIT_PARTIAL, connect_creating, select, usage};
use crate::config::Settings;
use crate::connector::Connector;
use crate::duration::HumanDuration;
use crate::ledger::transport::AnyTransport;
use crate::run::{Mode, RunError, RunOptions, RunStatus, StreamRunner, summary};

pub(super) async fn run(
    settings: &Settings,
    targets: Vec<String>,
    dry_run: bool,
    partition: Option<String>,
    no_notify: bool,
    json: bool,
) -> anyhow::Result<u8> {
    let connectors = settings.load_connectors()?;
    let selected = select(&connectors, &targets)?;
    let walks = plan_walks(&selected, partition.as_deref())?;
    let notify_after = !no_notify && !dry_run;
    run_walks_then_notify(settings, walks, Mode::Regular, dry_run, notify_after, json).await
}

/// `idem replay`'s arguments.
pub(super) struct ReplayArgs {
    pub target: String,
    pub since: Option<HumanDuration>,
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    pub restart: bool,
    pub partition: Option<String>,
    pub no_notify: bool,
    pub json: bool,
}

pub(super) async fn replay(settings: &Settings, args: ReplayArgs) -> anyhow::Result<u8> {
    let connectors = settings.load_connectors()?;
    let selected = select(&connectors, std::slice::from_ref(&args.target))?;
    if selected.len() != 1 {
        return Err(usage(format!(
            "replay needs one SOURCE.STREAM, '{}' names {} streams",
            args.target,
            selected.len()
        )));
    }
    let walks = plan_walks(&selected, args.partition.as_deref())?;
    let (from, to, label) = match (args.since, args.from, args.to) {
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
    let mode = Mode::Replay {
        from,
        to,
        label,
        restart: args.restart,
    };
    run_walks_then_notify(settings, walks, mode, false, !args.no_notify, args.json).await
}

/// Connects (creating the database on a first run), runs `walks` one after another, then,
/// with `notify_after`, sends the reminders they made due.
async fn run_walks_then_notify(
    settings: &Settings,
    walks: Vec<Walk<'_>>,
    mode: Mode,
    dry_run: bool,
    notify_after: bool,
    json: bool,
) -> anyhow::Result<u8> {
    let pool = connect_creating(settings, true).await?;
    let url = settings.database_url()?;
    let transport =
        AnyTransport::from_settings(&settings.notify).map_err(|e| usage(e.to_string()))?;
    let options = RunOptions {
        batching: settings.import.batching(),
        ddl: settings.database.ddl_policy(),
        ..RunOptions::new(mode, dry_run)
    };
    let code = run_all(&pool, &url, walks, &options, json).await?;
    if notify_after {
        let report = notify(&pool, settings, &transport).await?;
        if !json {
            println!("{}", notify_summary(&report));
        }
    }
    Ok(code)
}

/// One walk `idem run`/`replay` makes: a stream, and its partition (`""` for none).
type Walk<'a> = (&'a Connector, &'a str, String);

/// The walks of `selected`, every partition of each (or only `partition`): checked before
/// anything connects or runs, so a mistyped partition is a usage error at once.
pub(super) fn plan_walks<'a>(
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

pub(super) async fn run_all(
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
                for report in std::iter::once(&report).chain(&report.children) {
                    code = worst(code, exit_code(report.status));
                    if !json {
                        println!("{}", summary(report));
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

/// The exit code of one stream's outcome.
fn exit_code(status: RunStatus) -> u8 {
    match status {
        RunStatus::Succeeded => EXIT_OK,
        RunStatus::Partial => EXIT_PARTIAL,
        RunStatus::Failed | RunStatus::Interrupted => EXIT_FAILED,
    }
}

/// The most severe of two exit codes: failed, then locked, then partial.
pub(super) fn worst(a: u8, b: u8) -> u8 {
    let rank = |code| match code {
        EXIT_FAILED => 3,
        EXIT_LOCKED => 2,
        EXIT_PARTIAL => 1,
        _ => 0,
    };
    if rank(b) > rank(a) { b } else { a }
}
