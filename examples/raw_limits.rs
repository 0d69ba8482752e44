//! Benchmark helper (not part of idem): how fast Postgres itself absorbs the fake vendor's
//! invoices, without idem. Reads every invoice from the vendor first (untimed), then times
//! a set-based UNNEST upsert in batches of 1,000 rows and a COPY into an empty table, each
//! on one and on two connections, into tables shaped like idem's destination table.
//!
//! Usage: raw_limits DATABASE_URL VENDOR_URL BEARER [MAX_ROWS]
//! Prints one `limit <name> <rows/s>` line per measurement, and one `busy <name>
//! <core-seconds>`: the CPU the whole machine spent during it, less this process's own
//! (so, on a machine doing nothing else, what Postgres and the kernel needed for the rows).

use std::time::Instant;

use serde_json::Value;
use sqlx::{Connection, PgConnection};

/// One invoice as idem would store it.
struct Rec {
    id: String,
    updated: i64,
    data: String,
    hash: Vec<u8>,
    number: Option<String>,
    email: Option<String>,
    status: Option<String>,
    amount: Option<i64>,
    currency: Option<String>,
}

const BATCH: usize = 1_000;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (db, vendor, bearer) = (&args[1], &args[2], &args[3]);
    let max: usize = args.get(4).map_or(Ok(usize::MAX), |n| n.parse())?;
    let started = Instant::now();
    let records = fetch_all(vendor, bearer, max).await?;
    let seconds = started.elapsed().as_secs_f64();
    // The vendor's serving rate (with a plain JSON client): it must not be idem's limit.
    println!("vendor read_1conn {:.0}", records.len() as f64 / seconds);

    for connections in [1usize, 2] {
        for (name, table, method) in [
            ("upsert", "raw_upsert", Method::Upsert),
            ("copy", "raw_copy", Method::Copy),
        ] {
            let before = cpu_seconds();
            let seconds = timed(db, table, connections, &records, method).await?;
            let after = cpu_seconds();
            println!(
                "limit {name}_{connections}conn {:.0}",
                records.len() as f64 / seconds
            );
            println!(
                "busy {name}_{connections}conn {:.2}",
                (after.0 - before.0) - (after.1 - before.1)
            );
        }
    }
    let mut conn = PgConnection::connect(db).await?;
    sqlx::query("DROP TABLE IF EXISTS raw_upsert, raw_copy")
        .execute(&mut conn)
        .await?;
    Ok(())
}

/// (CPU seconds the whole machine has spent busy, this process's CPU seconds), from
/// `/proc` (zeros where there is none).
fn cpu_seconds() -> (f64, f64) {
    // Linux reports both in clock ticks of 1/100 s.
    let ticks = |fields: &[&str]| -> f64 {
        fields
            .iter()
            .filter_map(|f| f.parse::<f64>().ok())
            .sum::<f64>()
            / 100.0
    };
    let machine = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|stat| {
            let line = stat.lines().next()?.to_string();
            // user nice system idle iowait irq softirq: busy is all but idle and iowait.
            let fields: Vec<&str> = line.split_whitespace().skip(1).take(7).collect();
            (fields.len() == 7)
                .then(|| ticks(&[fields[0], fields[1], fields[2], fields[5], fields[6]]))
        })
        .unwrap_or(0.0);
    let own = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|stat| {
            // Fields after the command name (which may hold spaces) start at `state`.
            let rest = stat.rsplit_once(')')?.1.to_string();
            let fields: Vec<&str> = rest.split_whitespace().collect();
            Some(ticks(&[fields.get(11)?, fields.get(12)?]))
        })
        .unwrap_or(0.0);
    (machine, own)
}

async fn fetch_all(
    vendor: &str,
    bearer: &str,
    max: usize,
) -> Result<Vec<Rec>, Box<dyn std::error::Error>> {
    let client = reqwest::Client::new();
    let mut out = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut request = client
            .get(format!("{vendor}/v1/invoices"))
            .bearer_auth(bearer)
            .query(&[("limit", "100")]);
        if let Some(after) = &after {
            request = request.query(&[("starting_after", after)]);
        }
        let page: Value = request.send().await?.error_for_status()?.json().await?;
        let data = page["data"].as_array().cloned().unwrap_or_default();
        for record in data {
            let text = |k: &str| record.get(k).and_then(Value::as_str).map(str::to_string);
            let data = serde_json::to_string(&record)?;
            out.push(Rec {
                id: text("id").unwrap_or_default(),
                updated: record["updated"].as_i64().unwrap_or(0),
                hash: xxhash_rust::xxh3::xxh3_128(data.as_bytes())
                    .to_le_bytes()
                    .to_vec(),
                data,
                number: text("number"),
                email: text("customer_email"),
                status: text("status"),
                amount: record["amount_due"].as_i64(),
                currency: text("currency"),
            });
        }
        after = out.last().map(|r| r.id.clone());
        if page["has_more"] != Value::Bool(true) || out.len() >= max {
            break;
        }
    }
    out.truncate(max);
    Ok(out)
}

/// Creates `table` fresh (idem's shape), then times `write` over the rows split into
/// `connections` interleaved shares, each on its own connection.
#[derive(Clone, Copy)]
enum Method {
    Upsert,
    Copy,
}

async fn write_share(
    method: Method,
    conn: PgConnection,
    table: &'static str,
    rows: Vec<&Rec>,
) -> Result<(), sqlx::Error> {
    match method {
        Method::Upsert => upsert_slice(conn, table, rows).await,
        Method::Copy => copy_slice(conn, table, rows).await,
    }
}

async fn timed(
    db: &str,
    table: &'static str,
    connections: usize,
    records: &[Rec],
    method: Method,
) -> Result<f64, Box<dyn std::error::Error>> {
    let mut conn = PgConnection::connect(db).await?;
    sqlx::query(&format!("DROP TABLE IF EXISTS {table}"))
        .execute(&mut conn)
        .await?;
    sqlx::query(&format!(
        "CREATE TABLE {table} (
            source_system text NOT NULL, source_id text NOT NULL, data jsonb COMPRESSION lz4 NOT NULL,
            content_hash bytea NOT NULL, source_updated_at timestamptz,
            first_seen_at timestamptz NOT NULL DEFAULT now(), last_changed_at timestamptz NOT NULL DEFAULT now(),
            last_run_id uuid, deleted_at timestamptz,
            number text, customer_email text, status text, amount_due bigint, currency text,
            UNIQUE (source_system, source_id))"
    ))
    .execute(&mut conn)
    .await?;
    sqlx::query("CHECKPOINT").execute(&mut conn).await?;
    let mut conns = Vec::new();
    for _ in 0..connections {
        conns.push(PgConnection::connect(db).await?);
    }
    // Shares of whole batches, alternating, as pages would arrive.
    let mut shares: Vec<Vec<&Rec>> = (0..connections).map(|_| Vec::new()).collect();
    for (index, chunk) in records.chunks(BATCH).enumerate() {
        shares[index % connections].extend(chunk.iter());
    }
    let started = Instant::now();
    let results = futures_join(
        conns
            .into_iter()
            .zip(shares)
            .map(|(c, share)| write_share(method, c, table, share))
            .collect(),
    )
    .await;
    let seconds = started.elapsed().as_secs_f64();
    for result in results {
        result?;
    }
    Ok(seconds)
}

async fn futures_join<Fut: std::future::Future>(futures: Vec<Fut>) -> Vec<Fut::Output> {
    // Polled together on this task: the work is in Postgres, not here.
    let mut pinned: Vec<_> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<Fut::Output>> = pinned.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (future, output) in pinned.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    std::task::Poll::Ready(value) => *output = Some(value),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    outputs.into_iter().map(Option::unwrap).collect()
}

/// idem's upsert statement, without the comparison that keeps unchanged rows out.
async fn upsert_slice(
    mut conn: PgConnection,
    table: &'static str,
    rows: Vec<&Rec>,
) -> Result<(), sqlx::Error> {
    let sql = format!(
        "INSERT INTO {table} (source_system, source_id, source_updated_at, data, content_hash, last_run_id,
                              number, customer_email, status, amount_due, currency)
         SELECT 'bench', u.id, to_timestamp(u.updated), u.data::jsonb, u.hash, NULL, u.number, u.email, u.status, u.amount, u.currency
         FROM UNNEST($1::text[], $2::bigint[], $3::text[], $4::bytea[], $5::text[], $6::text[], $7::text[], $8::bigint[], $9::text[])
              AS u(id, updated, data, hash, number, email, status, amount, currency)
         ON CONFLICT (source_system, source_id) DO UPDATE SET
           source_updated_at = EXCLUDED.source_updated_at, data = EXCLUDED.data, content_hash = EXCLUDED.content_hash,
           last_changed_at = now(), number = EXCLUDED.number, customer_email = EXCLUDED.customer_email,
           status = EXCLUDED.status, amount_due = EXCLUDED.amount_due, currency = EXCLUDED.currency"
    );
    for batch in rows.chunks(BATCH) {
        sqlx::query(&sql)
            .bind(batch.iter().map(|r| r.id.as_str()).collect::<Vec<_>>())
            .bind(batch.iter().map(|r| r.updated).collect::<Vec<_>>())
            .bind(batch.iter().map(|r| r.data.as_str()).collect::<Vec<_>>())
            .bind(batch.iter().map(|r| r.hash.as_slice()).collect::<Vec<_>>())
            .bind(
                batch
                    .iter()
                    .map(|r| r.number.as_deref())
                    .collect::<Vec<_>>(),
            )
            .bind(batch.iter().map(|r| r.email.as_deref()).collect::<Vec<_>>())
            .bind(
                batch
                    .iter()
                    .map(|r| r.status.as_deref())
                    .collect::<Vec<_>>(),
            )
            .bind(batch.iter().map(|r| r.amount).collect::<Vec<_>>())
            .bind(
                batch
                    .iter()
                    .map(|r| r.currency.as_deref())
                    .collect::<Vec<_>>(),
            )
            .execute(&mut conn)
            .await?;
    }
    Ok(())
}

/// One COPY per connection into the empty table: not idempotent, the hard ceiling.
async fn copy_slice(
    mut conn: PgConnection,
    table: &'static str,
    rows: Vec<&Rec>,
) -> Result<(), sqlx::Error> {
    let mut copy = conn
        .copy_in_raw(&format!(
            "COPY {table} (source_system, source_id, source_updated_at, data, content_hash,
                           number, customer_email, status, amount_due, currency) FROM STDIN WITH (FORMAT csv)"
        ))
        .await?;
    let csv = |v: Option<&str>| match v {
        Some(v) => format!("\"{}\"", v.replace('"', "\"\"")),
        None => String::new(),
    };
    let mut buffer = String::new();
    for batch in rows.chunks(BATCH) {
        buffer.clear();
        for r in batch {
            let updated = chrono::DateTime::from_timestamp(r.updated, 0)
                .map(|t| t.to_rfc3339())
                .unwrap_or_default();
            let hash: String = r.hash.iter().map(|b| format!("{b:02x}")).collect();
            buffer.push_str(&format!(
                "bench,{},{},{},\\x{},{},{},{},{},{}\n",
                csv(Some(&r.id)),
                updated,
                csv(Some(&r.data)),
                hash,
                csv(r.number.as_deref()),
                csv(r.email.as_deref()),
                csv(r.status.as_deref()),
                r.amount.map(|a| a.to_string()).unwrap_or_default(),
                csv(r.currency.as_deref()),
            ));
        }
        copy.send(buffer.as_bytes()).await?;
    }
    copy.finish().await?;
    Ok(())
}
