//! One torture world: a fresh database, the fake vendor, the SMTP sink, connector and config
//! files, the release binary as child processes, and the checks against the vendor's truth.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use idem_fakes::{FakeVendor, SmtpSink};
use rand::Rng;
use rand::rngs::StdRng;
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection, PgPool};
use tokio::process::{Child, Command};

/// What `scripts/torture.sh` asked for.
pub struct Cfg {
    pub seed: u64,
    pub kills: usize,
    pub soak: bool,
    pub bin: PathBuf,
    pub reproduce: String,
}

/// The run's settings, or `None` when the torture is not asked for (plain `cargo test`).
pub fn cfg(test: &str) -> Option<Cfg> {
    let Ok(mode) = std::env::var("IDEM_TORTURE") else {
        eprintln!("{test}: skipped (scripts/torture.sh runs it, with IDEM_TORTURE set)");
        return None;
    };
    let seed = std::env::var("IDEM_TORTURE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| Utc::now().timestamp() as u64);
    let soak = mode == "soak";
    let kills = std::env::var("IDEM_TORTURE_KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if soak { 1000 } else { 50 });
    let bin = std::env::var("IDEM_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_BIN_EXE_idem")));
    // Known-bug switches that are on belong to the command that reproduces a failure.
    let switches: String = std::env::vars()
        .filter(|(k, v)| {
            k.starts_with("IDEM_TORTURE_")
                && ![
                    "IDEM_TORTURE_SEED",
                    "IDEM_TORTURE_KILLS",
                    "IDEM_TORTURE_REPRODUCE",
                ]
                .contains(&k.as_str())
                && v == "1"
        })
        .map(|(k, v)| format!("{k}={v} "))
        .collect();
    let reproduce = switches
        + &std::env::var("IDEM_TORTURE_REPRODUCE")
            .unwrap_or_else(|_| format!("scripts/torture.sh --seed {seed} --kills {kills}"))
        + &format!(" --only {test}");
    eprintln!(
        "== {test}: seed {seed}, {kills} kills per shape, binary {}",
        bin.display()
    );
    Some(Cfg {
        seed,
        kills,
        soak,
        bin,
        reproduce,
    })
}

impl Cfg {
    /// Stops the test with the seed and the command that reproduces it.
    pub fn violation(&self, what: impl std::fmt::Display) -> ! {
        panic!(
            "TORTURE VIOLATION: {what}\n  seed: {}\n  reproduce: {}",
            self.seed, self.reproduce
        )
    }

    pub fn check(&self, result: Result<(), String>) {
        if let Err(e) = result {
            self.violation(e)
        }
    }
}

/// A stream shape under torture.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// Stripe-shaped list `/v1/invoices` by `starting_after`, unsorted high-water mark;
    /// reminders over the keyed HTTP mail API.
    List,
    /// Stripe events feed `/v1/events` walked with `ending_before`, cursor checkpoint;
    /// reminders over SMTP.
    Events,
    /// HubSpot-shaped search with offsets, sorted high-water mark; no reminders.
    Search,
}

impl Shape {
    pub const ALL: [Shape; 3] = [Shape::List, Shape::Events, Shape::Search];

    pub fn stream(self) -> &'static str {
        match self {
            Shape::List => "list",
            Shape::Events => "events",
            Shape::Search => "search",
        }
    }

    pub fn target(self) -> String {
        format!("torture.{}", self.stream())
    }

    pub fn table(self) -> String {
        format!("t_{}", self.stream())
    }

    pub fn has_ledger(self) -> bool {
        self != Shape::Search
    }

    pub fn smtp(self) -> bool {
        self == Shape::Events
    }

    pub fn replayable(self) -> bool {
        self != Shape::Events
    }
}

/// The `overlap` of the streams with a high-water mark, in minutes.
const OVERLAP_MINUTES: i64 = 15;

/// Records per shape: 30 pages of 10.
pub const RECORDS: usize = 300;
pub const PAGE: usize = 10;

/// The latest event of each invoice, kept by the harness as it changes the vendor (the
/// seeded invoice `in_00000k` is event k).
#[derive(Default)]
pub struct Events {
    pub count: usize,
    pub latest: HashMap<String, usize>,
}

pub struct World {
    pub vendor: FakeVendor,
    pub smtp: SmtpSink,
    pub pool: PgPool,
    pub db_url: String,
    db_name: String,
    pub dir: tempfile::TempDir,
    pub bin: PathBuf,
    pub events: Arc<Mutex<Events>>,
    /// The vendor clock (unix seconds); advanced before each change.
    pub clock: Arc<Mutex<i64>>,
}

pub fn admin_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

fn url_for(database: &str) -> String {
    let mut url = url::Url::parse(&admin_url()).expect("DATABASE_URL is a URL");
    url.set_path(&format!("/{database}"));
    url.to_string()
}

const CONNECTOR_HEAD: &str = r#"source_system = "torture"
base_url = "${TORTURE_URL}"

[auth]
kind = "bearer"
token = "sk_torture"

[rate_limit]
requests_per_second = 10000
burst = 1000

[http]
timeout = "5s"
max_attempts = 4
initial_backoff = "50ms"
max_backoff = "500ms"
"#;

const INVOICE_COLUMNS: &str = r#"
[[streams.STREAM.columns]]
name = "number"
pointer = "/number"
type = "text"

[[streams.STREAM.columns]]
name = "customer_email"
pointer = "/customer_email"
type = "text"

[[streams.STREAM.columns]]
name = "status"
pointer = "/status"
type = "text"

[[streams.STREAM.columns]]
name = "amount_due"
pointer = "/amount_due"
type = "bigint"

[[streams.STREAM.columns]]
name = "currency"
pointer = "/currency"
type = "text"

[[streams.STREAM.columns]]
name = "due_date"
pointer = "/due_date"
type = "timestamptz"
format = "unix_seconds"

[[streams.STREAM.notifications]]
name = "overdue_reminder"
key = "STREAM:reminder:{{ source_id }}:stage1"
to = "customer_email"
subject = "Invoice {{ number }} is overdue"
body = "Invoice {{ number }} for {{ amount_due }} {{ currency | upper }} is still open."
when = [
  { column = "status", eq = "open" },
  { column = "due_date", older_than = "3d" },
]
"#;

fn list_stream(name: &str, table: &str, reminders: bool) -> String {
    let mut s = format!(
        r#"
[streams.{name}]
path = "/v1/invoices"
params = {{ limit = "{PAGE}" }}
records = "/data"
id = "/id"
updated_at = {{ pointer = "/updated", format = "unix_seconds" }}
table = "{table}"

[streams.{name}.pagination]
kind = "last_record"
param = "starting_after"
has_more = "/has_more"

[streams.{name}.incremental]
kind = "high_water_mark"
param = "updated[gte]"
param_to = "updated[lt]"
format = "unix_seconds"
overlap = "{OVERLAP_MINUTES}m"
sorted = false
"#
    );
    if reminders {
        s += &INVOICE_COLUMNS.replace("STREAM", name);
    }
    s
}

fn connector() -> String {
    let mut s = CONNECTOR_HEAD.to_owned();
    s += &list_stream("list", "t_list", true);
    s += &format!(
        r#"
[streams.events]
path = "/v1/events"
params = {{ limit = "{PAGE}", type = "invoice.*" }}
records = "/data"
record = "/data/object"
id = "/id"
table = "t_events"

[streams.events.pagination]
kind = "first_record"
param = "ending_before"
field = "/id"

[streams.events.incremental]
kind = "cursor"
"#
    );
    s += &INVOICE_COLUMNS.replace("STREAM", "events");
    s += &format!(
        r#"
[streams.search]
path = "/crm/v3/objects/contacts/search"
method = "POST"
params = {{ limit = {PAGE} }}
records = "/results"
id = "/id"
updated_at = {{ pointer = "/properties/lastmodifieddate", format = "rfc3339" }}
table = "t_search"

[streams.search.body]
filterGroups = [
  {{ filters = [{{ propertyName = "lastmodifieddate", operator = "GTE", value = "{{{{from}}}}" }}] }},
]
sorts = [{{ propertyName = "lastmodifieddate", direction = "ASCENDING" }}]

[streams.search.pagination]
kind = "body_cursor"
cursor = "/paging/next/after"
param = "after"

[streams.search.incremental]
kind = "high_water_mark"
format = "unix_millis"
overlap = "{OVERLAP_MINUTES}m"
sorted = true
max_results_per_query = 10000

[[streams.search.columns]]
name = "email"
pointer = "/properties/email"
type = "text"
"#
    );
    s
}

/// Ten list streams for the replicas mode.
fn replicas_connector() -> String {
    let mut s = CONNECTOR_HEAD.replace("\"torture\"", "\"replicas\"");
    for i in 0..10 {
        s += &list_stream(&format!("s{i}"), &format!("r{i}"), false);
    }
    s
}

/// Settings of the dispatcher under torture: a send may take at most 1s, a claimed row is
/// reserved for 2s, retries come quickly.
const NOTIFY_LIMITS: &str = r#"send_timeout = "1s"
lease = "2s"
retry_backoff = "50ms"
max_attempts = 1000
batch_size = 5
"#;

impl World {
    pub async fn new(cfg: &Cfg, rng: &mut StdRng) -> World {
        let vendor = FakeVendor::start().await;
        vendor.require_bearer("sk_torture");
        // The vendor's clock is the real one (as a real vendor's is, give or take): idem's
        // guard for changes behind an unsorted walk compares the vendor's stamps with the
        // walk's start on its own clock. A random offset of up to 2s stands for the skew.
        let clock0 = Utc::now().timestamp() - rng.random_range(0..2);
        vendor.set_clock(clock0);
        vendor.seed_invoices(RECORDS);
        vendor.seed_contacts(RECORDS);
        let smtp = SmtpSink::start().await;
        let db_name = format!("torture_{}", uuid::Uuid::new_v4().simple());
        let mut admin = PgConnection::connect(&admin_url())
            .await
            .expect("connect to the torture Postgres");
        sqlx::query(&format!("CREATE DATABASE \"{db_name}\""))
            .execute(&mut admin)
            .await
            .expect("create database");
        admin.close().await.ok();
        let db_url = url_for(&db_name);
        let pool = idem::store::connect(&db_url, 4).await.expect("connect");
        idem::store::migrate(&pool).await.expect("migrate");
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("torture.toml"), connector()).unwrap();
        std::fs::write(dir.path().join("replicas.toml"), replicas_connector()).unwrap();
        let serve = "[serve]\nlisten = \"127.0.0.1:0\"\nnotify_every = \"500ms\"\n";
        std::fs::write(
            dir.path().join("http.toml"),
            format!(
                "connectors = [\"torture.toml\"]\n{serve}\n[notify]\ntransport = \"http\"\nfrom = \"billing@torture.example\"\n{NOTIFY_LIMITS}\n[notify.http]\nurl = \"${{TORTURE_URL}}/email/send\"\n"
            ),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("smtp.toml"),
            format!(
                "connectors = [\"torture.toml\"]\n{serve}\n[notify]\ntransport = \"smtp\"\nfrom = \"billing@torture.example\"\n{NOTIFY_LIMITS}\n[notify.smtp]\nhost = \"127.0.0.1\"\nport = {}\ntls = \"none\"\n",
                smtp.addr().port()
            ),
        )
        .unwrap();
        let events = Events {
            count: RECORDS,
            latest: (1..=RECORDS).map(|k| (format!("in_{k:06}"), k)).collect(),
        };
        let world = World {
            vendor,
            smtp,
            pool,
            db_url,
            db_name,
            dir,
            bin: cfg.bin.clone(),
            events: Arc::new(Mutex::new(events)),
            clock: Arc::new(Mutex::new(clock0)),
        };
        world.start_events_cursor().await;
        world
    }

    /// The events stream starts from the beginning of the feed (a first run alone would read
    /// only its newest page), so that its walk is 30 pages long.
    pub async fn start_events_cursor(&self) {
        sqlx::query(
            "INSERT INTO idem_checkpoints (source_system, stream, scope, cursor) VALUES ('torture', 'events', 'main', 'evt_000000')
             ON CONFLICT (source_system, stream, partition, scope) DO UPDATE SET cursor = 'evt_000000', resume = NULL, high_water_mark = NULL",
        )
        .execute(&self.pool)
        .await
        .expect("set the events cursor");
    }

    /// Drops the stream's table and checkpoints, as before its first run.
    pub async fn reset(&self, shape: Shape) {
        for sql in [
            format!("DROP TABLE IF EXISTS {}", shape.table()),
            format!(
                "DELETE FROM idem_checkpoints WHERE source_system = 'torture' AND stream = '{}'",
                shape.stream()
            ),
            format!(
                "DELETE FROM idem_failures WHERE source_system = 'torture' AND stream = '{}'",
                shape.stream()
            ),
        ] {
            sqlx::query(&sql).execute(&self.pool).await.expect("reset");
        }
        if shape == Shape::Events {
            self.start_events_cursor().await;
        }
    }

    /// Whether an interrupted walk of the shape waits to be resumed.
    pub async fn walk_in_progress(&self, shape: Shape) -> bool {
        sqlx::query_scalar::<_, bool>(
            "SELECT resume IS NOT NULL FROM idem_checkpoints WHERE source_system = 'torture' AND stream = $1 AND scope = 'main'",
        )
        .bind(shape.stream())
        .fetch_optional(&self.pool)
        .await
        .expect("read the checkpoint")
        .unwrap_or(false)
    }

    pub fn config(&self, shape: Shape) -> PathBuf {
        self.dir.path().join(if shape.smtp() {
            "smtp.toml"
        } else {
            "http.toml"
        })
    }

    pub fn replicas_config(&self, schedules: &str) -> PathBuf {
        let path = self.dir.path().join("replicas_serve.toml");
        std::fs::write(
            &path,
            format!(
                "connectors = [\"replicas.toml\"]\n[serve]\nlisten = \"127.0.0.1:0\"\nnotify_every = \"1h\"\n{schedules}\n[notify]\ntransport = \"log\"\n"
            ),
        )
        .unwrap();
        path
    }

    /// The release binary with this world's database and vendor.
    pub fn idem(&self, config: &Path, args: &[&str], crash_at: Option<&str>) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("--config")
            .arg(config)
            .arg("--log-format")
            .arg("json")
            .args(args)
            .env("DATABASE_URL", &self.db_url)
            .env("TORTURE_URL", self.vendor.base_url())
            .env("RUST_LOG", "warn")
            .env_remove("IDEM_CRASH_AT")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(at) = crash_at {
            c.env("IDEM_CRASH_AT", at);
        }
        c
    }

    /// Runs a command to its end (2 minutes at most); returns its status and stderr.
    pub async fn finish(&self, mut c: Command) -> (ExitStatus, String) {
        let out = tokio::time::timeout(Duration::from_secs(120), c.output())
            .await
            .expect("idem finishes within 2 minutes")
            .expect("idem starts");
        (
            out.status,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    pub fn spawn(&self, mut c: Command) -> Child {
        c.stderr(Stdio::null()).spawn().expect("idem starts")
    }

    /// `idem run` of one shape to a clean end (a few tries: the vendor may be faulty); the
    /// reminders it records wait for [`World::drain_ledger`].
    pub async fn converge(&self, cfg: &Cfg, shape: Shape) {
        // A run reads changes stamped before the second it starts in (`updated[lt]`):
        // start after the last change's second.
        let last_change = *self.clock.lock().unwrap();
        while Utc::now().timestamp() <= last_change {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let config = self.config(shape);
        let target = shape.target();
        let mut last = String::new();
        for _ in 0..3 {
            let (status, stderr) = self
                .finish(self.idem(&config, &["run", &target, "--no-notify"], None))
                .await;
            if status.success() {
                return;
            }
            last = stderr;
        }
        cfg.violation(format!(
            "{target}: `idem run` does not succeed after the torture: {}",
            tail(&last)
        ))
    }

    /// Sends every due reminder (a few passes: retries are due 50ms later).
    pub async fn drain_ledger(&self, cfg: &Cfg, shape: Shape) {
        if !shape.has_ledger() {
            return;
        }
        for _ in 0..40 {
            let (status, stderr) = self
                .finish(self.idem(&self.config(shape), &["notify"], None))
                .await;
            // Exit 3 says some rows need review: expected for an ambiguous SMTP send, and
            // for any send killed in flight whose reason was gone when it was retried
            // (`gone_after_unknown_outcome`: it may have been delivered, so it is neither
            // sent again nor cancelled). Any other row in review is a violation.
            let partial = status.code() == Some(3)
                && (shape.smtp()
                    || {
                        let other: i64 = sqlx::query_scalar(&format!(
                        "SELECT count(*) FROM idem_ledger WHERE stream = '{}' AND status = 'needs_review'
                           AND last_outcome IS DISTINCT FROM 'gone_after_unknown_outcome'",
                        shape.stream()
                    ))
                    .fetch_one(&self.pool)
                    .await
                    .unwrap();
                        other == 0
                    });
            if !status.success() && !partial {
                cfg.violation(format!("idem notify failed ({status}): {}", tail(&stderr)));
            }
            let open: i64 = sqlx::query_scalar(&format!(
                "SELECT count(*) FROM idem_ledger WHERE stream = '{}' AND status IN ('pending', 'sending')",
                shape.stream()
            ))
            .fetch_one(&self.pool)
            .await
            .unwrap();
            if open == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        cfg.violation(format!(
            "{}: ledger rows still pending or sending after 40 notify passes",
            shape.stream()
        ))
    }

    /// Moves the vendor clock to now, so that the next changes carry newer times.
    pub fn tick(&self) {
        let mut c = self.clock.lock().unwrap();
        *c = next_stamp(*c);
        self.vendor.set_clock(*c);
    }

    /// Changes a few records of the shape at the vendor, as its users would.
    pub fn mutate(&self, shape: Shape, rng: &mut StdRng) -> usize {
        self.tick();
        let n = rng.random_range(1..=3);
        for _ in 0..n {
            let k = rng.random_range(1..=RECORDS);
            let amount: i64 = rng.random_range(100..100_000);
            let status = ["open", "paid", "void"][rng.random_range(0..3)];
            match shape {
                Shape::List | Shape::Events => {
                    let id = format!("in_{k:06}");
                    self.vendor.update_invoice(&id, |inv| {
                        inv["amount_due"] = json!(amount);
                        inv["status"] = json!(status);
                    });
                    let mut ev = self.events.lock().unwrap();
                    ev.count += 1;
                    let seq = ev.count;
                    ev.latest.insert(id, seq);
                }
                Shape::Search => {
                    let id = format!("{}", 1000 + k);
                    self.vendor.update_contact(&id, |c| {
                        c["properties"]["company"] = json!(format!("Co {amount}"));
                    });
                }
            }
        }
        n
    }

    /// Changes one record while the `nth` next request is being served (mid-walk).
    pub fn mutate_during_walk(&self, shape: Shape, rng: &mut StdRng) {
        let nth = self.vendor.requests().len() + rng.random_range(1..=25);
        let k = rng.random_range(1..=RECORDS);
        let amount: i64 = rng.random_range(100..100_000);
        let events = self.events.clone();
        let clock = self.clock.clone();
        self.vendor.on_request(nth, move |data| {
            // The change is stamped later than any before it (the hook cannot move the
            // vendor clock; the next `tick` starts after this stamp).
            let now = {
                let mut c = clock.lock().unwrap();
                *c = next_stamp(*c);
                *c
            };
            match shape {
                Shape::List | Shape::Events => {
                    let id = format!("in_{k:06}");
                    if data.update_invoice(&id, |inv| {
                        inv["amount_due"] = json!(amount);
                        inv["updated"] = json!(now);
                    }) {
                        let mut ev = events.lock().unwrap();
                        ev.count += 1;
                        let seq = ev.count;
                        ev.latest.insert(id, seq);
                    }
                }
                Shape::Search => {
                    data.update_contact(&format!("{}", 1000 + k), |c| {
                        c["properties"]["company"] = json!(format!("Mid {amount}"));
                        c["properties"]["lastmodifieddate"] = json!(
                            DateTime::from_timestamp(now, 0)
                                .unwrap_or_default()
                                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
                        );
                    });
                }
            }
        });
    }

    /// The vendor's records of the shape, by id.
    pub fn truth(&self, shape: Shape) -> BTreeMap<String, Value> {
        let records = match shape {
            Shape::List | Shape::Events => self.vendor.invoices(),
            Shape::Search => self.vendor.contacts(),
        };
        records
            .into_iter()
            .map(|r| (r["id"].as_str().unwrap_or_default().to_owned(), r))
            .collect()
    }

    /// [`World::stored`], waiting out a Postgres restart (up to 30s).
    pub async fn stored_after_restart(&self, table: &str) -> BTreeMap<String, Value> {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            match self.stored(table).await {
                Ok(rows) => return rows,
                Err(e) if std::time::Instant::now() > deadline => {
                    panic!("cannot read {table} after a Postgres restart: {e}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// The stored rows of a table, by id; an error names duplicates.
    pub async fn stored(&self, table: &str) -> Result<BTreeMap<String, Value>, String> {
        let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(table)
            .fetch_one(&self.pool)
            .await
            .map_err(|e| e.to_string())?;
        if !exists {
            return Ok(BTreeMap::new());
        }
        let rows: Vec<(String, Value)> =
            sqlx::query_as(&format!("SELECT source_id, data FROM {table}"))
                .fetch_all(&self.pool)
                .await
                .map_err(|e| format!("read {table}: {e}"))?;
        let mut out = BTreeMap::new();
        for (id, data) in rows {
            if out.insert(id.clone(), data).is_some() {
                return Err(format!("{table}: duplicate rows for {id}"));
            }
        }
        Ok(out)
    }

    /// The run completed: the table holds exactly the vendor's records, each once.
    pub async fn check_converged(&self, shape: Shape) -> Result<(), String> {
        let table = shape.table();
        let stored = self.stored(&table).await?;
        compare(&table, &stored, &self.truth(shape))
    }

    /// Every committed checkpoint claims only data that is committed too.
    pub async fn check_not_ahead(&self, shape: Shape) -> Result<(), String> {
        let row: Option<(Option<String>, Option<DateTime<Utc>>)> = sqlx::query_as(
            "SELECT cursor, high_water_mark FROM idem_checkpoints WHERE source_system = 'torture' AND stream = $1 AND scope = 'main'",
        )
        .bind(shape.stream())
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| e.to_string())?;
        let Some((cursor, mark)) = row else {
            return Ok(());
        };
        let table = shape.table();
        let stored = self.stored(&table).await?;
        let truth = self.truth(shape);
        let claimed: Vec<&String> = match shape {
            Shape::Events => {
                let Some(n) = cursor
                    .as_deref()
                    .and_then(|c| c.strip_prefix("evt_"))
                    .and_then(|n| n.parse::<usize>().ok())
                else {
                    return Ok(());
                };
                let ev = self.events.lock().unwrap();
                truth
                    .keys()
                    .filter(|id| ev.latest.get(*id).is_some_and(|&s| s <= n))
                    .collect()
            }
            // A mark promises that the next run reads from `mark - overlap` (15m in both
            // streams): everything updated before that must be stored.
            Shape::List => {
                let Some(mark) = mark else { return Ok(()) };
                let mark = mark - chrono::Duration::minutes(OVERLAP_MINUTES);
                truth
                    .iter()
                    .filter(|(_, v)| v["updated"].as_i64().unwrap_or(0) < mark.timestamp())
                    .map(|(k, _)| k)
                    .collect()
            }
            Shape::Search => {
                let Some(mark) = mark else { return Ok(()) };
                let mark = mark - chrono::Duration::minutes(OVERLAP_MINUTES);
                truth
                    .iter()
                    .filter(|(_, v)| {
                        v["properties"]["lastmodifieddate"]
                            .as_str()
                            .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
                            .is_some_and(|t| t.timestamp_millis() < mark.timestamp_millis())
                    })
                    .map(|(k, _)| k)
                    .collect()
            }
        };
        for id in claimed {
            match stored.get(id) {
                Some(v) if *v == truth[id] => {}
                Some(_) => {
                    return Err(format!(
                        "{table}: the checkpoint (cursor {cursor:?}, mark {mark:?}) claims {id}, but the stored row is an older version"
                    ));
                }
                None => {
                    return Err(format!(
                        "{table}: the checkpoint (cursor {cursor:?}, mark {mark:?}) claims {id}, but it is not stored"
                    ));
                }
            }
        }
        Ok(())
    }

    /// Ledger rows of a stream: key → (status, message id).
    pub async fn ledger(&self, shape: Shape) -> BTreeMap<String, (String, String)> {
        let rows: Vec<(String, String, String)> = sqlx::query_as(
            "SELECT key, status, message_id FROM idem_ledger WHERE source_system = 'torture' AND stream = $1",
        )
        .bind(shape.stream())
        .fetch_all(&self.pool)
        .await
        .expect("read the ledger");
        rows.into_iter().map(|(k, s, m)| (k, (s, m))).collect()
    }

    /// Emails per ledger key: over the keyed HTTP API (list) or SMTP (events, by Message-ID).
    pub async fn emails_per_key(&self, shape: Shape) -> BTreeMap<String, usize> {
        let ledger = self.ledger(shape).await;
        let mut per_key: BTreeMap<String, usize> = BTreeMap::new();
        if shape.smtp() {
            let by_mid: HashMap<String, &String> = ledger
                .iter()
                .map(|(k, (_, m))| (m.trim_matches(['<', '>']).to_owned(), k))
                .collect();
            for mail in self.smtp.messages() {
                let mid = mail.message_id.unwrap_or_default();
                let key = by_mid
                    .get(mid.trim_matches(['<', '>']))
                    .map_or_else(|| format!("(unknown Message-ID {mid})"), |k| (*k).clone());
                *per_key.entry(key).or_default() += 1;
            }
        } else {
            // Ledger keys are namespaced `source_system/stream/…`.
            let prefix = format!("torture/{0}/{0}:", shape.stream());
            for email in self.vendor.emails() {
                let key = email.idempotency_key.unwrap_or_default();
                if key.starts_with(&prefix) {
                    *per_key.entry(key).or_default() += 1;
                }
            }
        }
        per_key
    }

    /// At any moment: no key emailed twice, no email without a ledger row.
    pub async fn check_ledger_so_far(&self, shape: Shape) -> Result<(), String> {
        if !shape.has_ledger() {
            return Ok(());
        }
        let ledger = self.ledger(shape).await;
        for (key, n) in self.emails_per_key(shape).await {
            if n > 1 {
                return Err(format!("{key}: {n} emails (at most one allowed)"));
            }
            if !ledger.contains_key(&key) {
                return Err(format!("{key}: an email without a ledger row"));
            }
        }
        Ok(())
    }

    /// After the ledger is drained: every row has its one email (HTTP: exactly one; SMTP:
    /// exactly one when `sent`, at most one when `needs_review`), every reminder the
    /// vendor's truth calls for has its row. Returns (expected, sent, needs_review).
    pub async fn check_ledger_final(&self, shape: Shape) -> Result<(usize, usize, usize), String> {
        if !shape.has_ledger() {
            return Ok((0, 0, 0));
        }
        self.check_ledger_so_far(shape).await?;
        let ledger = self.ledger(shape).await;
        let emails = self.emails_per_key(shape).await;
        let (mut sent, mut review) = (0, 0);
        for (key, (status, _)) in &ledger {
            let n = emails.get(key).copied().unwrap_or(0);
            match status.as_str() {
                "sent" if n == 1 => sent += 1,
                // SMTP: any ambiguous send. HTTP: a reminder whose reason went away after
                // an attempt with an unknown outcome (check before send).
                "needs_review" if n <= 1 => review += 1,
                // Check before send: the reason went away before any attempt.
                "cancelled" if n == 0 => {}
                other => {
                    return Err(format!(
                        "{key}: ledger status {other} with {n} emails over {}",
                        if shape.smtp() {
                            "SMTP"
                        } else {
                            "the keyed HTTP API"
                        }
                    ));
                }
            }
        }
        let cutoff = Utc::now().timestamp() - 3 * 86_400;
        let expected: BTreeSet<String> = self
            .vendor
            .invoices()
            .iter()
            .filter(|inv| {
                inv["status"] == "open"
                    && inv["due_date"].as_i64().is_some_and(|d| d < cutoff)
                    && inv["customer_email"]
                        .as_str()
                        .is_some_and(|e| !e.is_empty())
            })
            .map(|inv| {
                format!(
                    "torture/{0}/{0}:reminder:{1}:stage1",
                    shape.stream(),
                    inv["id"].as_str().unwrap_or_default()
                )
            })
            .collect();
        if let Some(missing) = expected.iter().find(|k| !ledger.contains_key(*k)) {
            return Err(format!(
                "{missing}: the vendor's truth calls for this reminder but the ledger has no row"
            ));
        }
        Ok((expected.len(), sent, review))
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let database = self.db_name.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                if let Ok(mut admin) = PgConnection::connect(&admin_url()).await {
                    let _ = sqlx::query(&format!(
                        "DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)"
                    ))
                    .execute(&mut admin)
                    .await;
                }
            })
        })
        .join();
    }
}

/// The vendor's next change time: now (never before the last one).
fn next_stamp(last: i64) -> i64 {
    Utc::now().timestamp().max(last)
}

pub fn compare(
    table: &str,
    stored: &BTreeMap<String, Value>,
    truth: &BTreeMap<String, Value>,
) -> Result<(), String> {
    if let Some(id) = truth.keys().find(|id| !stored.contains_key(*id)) {
        return Err(format!(
            "{table}: {id} is at the vendor but not stored ({} stored, {} at the vendor)",
            stored.len(),
            truth.len()
        ));
    }
    if let Some(id) = stored.keys().find(|id| !truth.contains_key(*id)) {
        return Err(format!("{table}: {id} is stored but not at the vendor"));
    }
    for (id, v) in truth {
        if stored[id] != *v {
            return Err(format!(
                "{table}: {id} differs from the vendor's: stored {}, vendor {}",
                stored[id], v
            ));
        }
    }
    Ok(())
}

/// The last lines of a process's stderr, for messages.
pub fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(5)..].join("\n")
}

/// Kills a child with SIGKILL; true when it was still running (the kill landed).
pub async fn sigkill(child: &mut Child) -> bool {
    let landed = matches!(child.try_wait(), Ok(None));
    let _ = child.start_kill();
    let _ = child.wait().await;
    landed
}

/// Stops a child with SIGTERM (a graceful shutdown), SIGKILL after 20s.
pub async fn sigterm(child: &mut Child) {
    if let Some(pid) = child.id() {
        // SAFETY: kill(2) on a child we started.
        unsafe {
            libc::kill(pid as i32, libc::SIGTERM);
        }
    }
    if tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .is_err()
    {
        let _ = child.start_kill();
        let _ = child.wait().await;
    }
}

/// Restarts the torture cluster as a crash would (`pg_ctl restart -m immediate`).
pub fn restart_postgres() {
    let data = std::env::var("IDEM_PGDATA")
        .expect("IDEM_PGDATA: run the postgres_restart mode through scripts/torture.sh");
    let bin = std::env::var("IDEM_PGBIN").expect("IDEM_PGBIN");
    let user = std::env::var("IDEM_PG_OS_USER").unwrap_or_default();
    let log = Path::new(&data).with_file_name("postgres.log");
    let pg_ctl = format!("{bin}/pg_ctl");
    let args = [
        "-D",
        &data,
        "-l",
        log.to_str().unwrap(),
        "-m",
        "immediate",
        "-w",
        "-t",
        "60",
        "restart",
    ];
    let mut c = if user.is_empty() {
        std::process::Command::new(&pg_ctl)
    } else {
        let mut c = std::process::Command::new("runuser");
        c.args(["-u", &user, "--", &pg_ctl]);
        c
    };
    let out = c
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run pg_ctl");
    assert!(
        out.status.success(),
        "pg_ctl restart failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
