//! idem: import and sync records from vendor APIs into Postgres so that every job is safe
//! to run twice.
//!
//! The flow of one stream run, and the module that owns each step:
//!
//! ```text
//! config ─► connector (spec) ─► http + paginate (Page) ─► normalize (Row) ─► store (one tx per page) ─► ledger
//!                      └──────────────── run: orchestrates one stream run / replay ─────────────────┘
//! ```
//!
//! - [`config`]: idem.toml + environment, typed and validated.
//! - [`connector`]: the declarative connector files and their validation; the [`connector::Source`] trait.
//! - [`secret`]: `${ENV}` references resolved into values that never print.
//! - [`redact`]: the one redaction point for vendor text, URLs and log lines.
//! - [`http`]: the vendor HTTP client: auth, rate limit, retry/backoff honoring `Retry-After`.
//! - [`paginate`]: the pagination kinds, each a small strategy over one response.
//! - [`normalize`]: raw record → row: id, updated_at, typed columns, content hash.
//! - [`store`]: Postgres: migrations, destination DDL, page upsert, checkpoints, runs, failures, locks.
//! - [`ledger`]: the notification ledger (transactional outbox) and its dispatcher.
//! - [`run`]: one stream run, regular or replay: fetch pages, write each page atomically.
//! - [`telemetry`]: the tracing subscriber.
//! - [`values`]: what Postgres refuses in valid JSON (NUL, lone surrogates, ranges), per record.
//! - [`progress`]: progress bars on the terminal that log lines do not tear.
//! - [`cli`]: the command line; maps outcomes to exit codes.
//! - [`serve`]: the long-running service: schedules, dispatcher, health and metrics.
//! - [`console`]: the operator console `idem serve` serves: pages and guarded actions.
//! - [`fake_vendor`]: an in-project fake vendor (HTTP API + SMTP sink) for tests and the demo.

pub mod child;
pub mod cli;
pub mod config;
pub mod connector;
pub mod console;
pub mod duration;
pub mod failpoint;
pub mod fake_vendor;
pub mod http;
pub mod instance;
pub mod ledger;
pub mod normalize;
pub mod paginate;
pub mod progress;
pub mod redact;
pub mod run;
pub mod schedule;
pub mod secret;
pub mod serve;
pub mod store;
pub mod telemetry;
pub mod values;
pub mod writer;
