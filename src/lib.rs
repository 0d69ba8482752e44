//! idem: import and sync records from vendor APIs into Postgres so that every job is safe
//! to run twice.
//!
//! The flow of one stream run, and the module that owns each step:
//!
//! ```text
//! config ─► connector (spec) ─► http + paginate (Page) ─► normalize (Row) ─► writer + store (one tx per batch of pages) ─► ledger
//!                      └──────────────────── run: orchestrates one stream run / replay ─────────────────────┘
//! ```
//!
//! The modules sit in four layers; a module uses modules of its own layer or below, never
//! above, and no two modules use each other (tests/it/architecture.rs checks both):
//!
//! ```text
//!  top         cli · serve · schedule · console · progress · telemetry
//!               │
//!  run         run (walk, fetch, commit, complete, retry, children) · instance
//!               │
//!  mechanisms  config · connector · http · paginate · normalize · store · writer · ledger
//!               │
//!  bottom      schema · errors · identity · duration · secret · redact · values · record · failpoint
//! ```
//!
//! Bottom: what everything may use.
//! - [`schema`]: what connector files and idem.toml deserialize into, reminder rules included.
//! - [`errors`]: an error and its sources on one log line.
//! - [`identity`]: this process's instance id.
//! - [`duration`]: human durations (`"90s"`, `"7d"`) in config files.
//! - [`secret`]: `${ENV}` references resolved into values that never print.
//! - [`redact`]: the one redaction point for vendor text, URLs and log lines.
//! - [`record`]: a record as the vendor's JSON text, read at pointers and hashed in one pass.
//! - [`values`]: what Postgres refuses in valid JSON (NUL, lone surrogates, ranges), per record.
//! - [`failpoint`]: named crash points for the crash tests (inert unless `IDEM_CRASH_AT` is set).
//!
//! Mechanisms: each does one kind of work and knows nothing of runs.
//! - [`config`]: loads idem.toml + environment and the connector files, validated together.
//! - [`connector`]: connector files loaded and validated; the [`connector::Source`] trait.
//! - [`http`]: the vendor HTTP client: auth, rate limit, retry/backoff honoring `Retry-After`.
//! - [`paginate`]: the pagination kinds, each a small strategy over one response.
//! - [`normalize`]: raw record → row: id, updated_at, typed columns, content hash.
//! - [`store`]: Postgres: migrations, destination DDL, upserts, checkpoints, runs, failures, locks.
//! - [`writer`]: groups pages into transactions and commits them in page order.
//! - [`ledger`]: the notification ledger (transactional outbox) and its dispatcher.
//!
//! The run: one stream walk, start to end.
//! - [`run`]: one stream run or replay, and its child streams.
//! - [`instance`]: heartbeats, live membership and dead replicas' runs.
//!
//! Top: how users reach it.
//! - [`cli`]: the command line; maps outcomes to exit codes.
//! - [`serve`]: the long-running service: schedules, dispatcher, health and metrics.
//! - [`schedule`]: the shared schedule that replicas claim due streams from.
//! - [`console`]: the operator console `idem serve` serves: pages and guarded actions.
//! - [`progress`]: progress bars on the terminal that log lines do not tear.
//! - [`telemetry`]: the tracing subscriber.
//!
//! The fake vendor and mail sinks the tests and the demo use are the `idem-fakes` crate
//! (`fakes/`), never part of this one.

pub mod cli;
pub mod config;
pub mod connector;
pub mod console;
pub mod duration;
pub mod errors;
pub mod failpoint;
pub mod http;
pub mod identity;
pub mod instance;
pub mod ledger;
pub mod normalize;
pub mod paginate;
pub mod progress;
pub mod record;
pub mod redact;
pub mod run;
pub mod schedule;
pub mod schema;
pub mod secret;
pub mod serve;
pub mod store;
pub mod telemetry;
pub mod values;
pub mod writer;
