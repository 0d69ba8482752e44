//! `idem checkpoint show|reset|set`: an operator's view of and changes to a stream's
//! checkpoints, refused while a run holds the stream.

use sqlx::PgPool;

use super::{CheckpointCommand, EXIT_LOCKED, EXIT_OK, select, usage};
use crate::connector::Connector;
use crate::store;

pub(super) async fn checkpoint(
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
pub(super) fn partitions_of(
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
pub(super) fn checkpoint_locked(source_system: &str, stream: &str) -> u8 {
    eprintln!(
        "error: a run of {source_system}.{stream} is in progress (it holds the stream's lock); the checkpoint was not changed, try again when it ends"
    );
    EXIT_LOCKED
}

pub(super) fn confirm(question: &str) -> anyhow::Result<bool> {
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
