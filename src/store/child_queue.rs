//! The child queue's write side: in a parent page's own transaction, the parents whose
//! child streams are owed (`idem_child_queue`), and how many are owed. The walk that
//! drains the queue is `run::children`.

use serde_json::Value;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::{Context, StoreError};
use crate::schema::connector::ParentCondition;

/// Records, in the parent page's transaction, the parents whose children are owed: each
/// `(source_id, record)` of `owed` that meets a child's conditions. A parent already owed
/// gets the newer record (its children are walked once, with the newest values).
pub async fn enqueue(
    tx: &mut PgConnection,
    source_system: &str,
    run_id: Uuid,
    children: &[(String, Vec<ParentCondition>)],
    owed: &[(String, String)],
) -> Result<(), StoreError> {
    for (child, when) in children {
        let mut ids = Vec::new();
        let mut records = Vec::new();
        for (id, data) in owed {
            if !when.is_empty() {
                let record: Value = serde_json::from_str(data).unwrap_or(Value::Null);
                if !when.iter().all(|c| c.holds(&record)) {
                    continue;
                }
            }
            ids.push(id.as_str());
            records.push(data.as_str());
        }
        if ids.is_empty() {
            continue;
        }
        sqlx::query(
            "INSERT INTO idem_child_queue (source_system, stream, parent_source_id, parent, run_id)
             SELECT $1, $2, u.id, u.data::jsonb, $3 FROM UNNEST($4::text[], $5::text[]) AS u(id, data)
             ON CONFLICT (source_system, stream, parent_source_id) DO UPDATE SET
               parent = EXCLUDED.parent, run_id = EXCLUDED.run_id, enqueued_at = clock_timestamp()",
        )
        .bind(source_system)
        .bind(child)
        .bind(run_id)
        .bind(&ids)
        .bind(&records)
        .execute(&mut *tx)
        .await
        .context(|| format!("recording the owed children of stream {child}"))?;
    }
    Ok(())
}

/// How many parents of `child` are owed their children.
pub async fn owed_count(
    pool: &PgPool,
    source_system: &str,
    child: &str,
) -> Result<i64, StoreError> {
    sqlx::query_scalar(
        "SELECT count(*) FROM idem_child_queue WHERE source_system = $1 AND stream = $2",
    )
    .bind(source_system)
    .bind(child)
    .fetch_one(pool)
    .await
    .context(|| format!("counting the owed children of {source_system}.{child}"))
}
