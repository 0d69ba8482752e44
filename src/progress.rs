//! Progress on the terminal for `idem run`, `idem replay` and `idem notify`: one bar per
//! stream that log lines do not tear (the log writer suspends the bars while it writes),
//! and nothing at all off a terminal or in JSON mode.

use std::io::{IsTerminal, Write};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::sync::watch;

use crate::store::state::Counters;

static BARS: OnceLock<MultiProgress> = OnceLock::new();

/// Turns bars on when stderr is a terminal and neither `--json` nor JSON logs were asked
/// for. Returns whether they are on.
pub fn enable(json_output: bool, json_logs: bool) -> bool {
    if json_output || json_logs || !std::io::stderr().is_terminal() {
        return false;
    }
    BARS.get_or_init(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(8)));
    true
}

fn bars() -> Option<&'static MultiProgress> {
    BARS.get()
}

/// The log writer: stderr, with the bars lifted while a line is written.
#[derive(Clone, Copy, Default)]
pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match bars() {
            Some(bars) => bars.suspend(|| std::io::stderr().write(buf)),
            None => std::io::stderr().write(buf),
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        match bars() {
            Some(bars) => bars.suspend(|| std::io::stderr().write_all(buf)),
            None => std::io::stderr().write_all(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogWriter;
    fn make_writer(&'a self) -> Self::Writer {
        LogWriter
    }
}

/// Prints a result line on stdout without tearing a bar.
pub fn println(line: &str) {
    match bars() {
        Some(bars) => bars.suspend(|| println!("{line}")),
        None => println!("{line}"),
    }
}

/// One stream's bar, fed by the run's counters through a watch channel.
pub struct StreamBar {
    bar: ProgressBar,
    task: tokio::task::JoinHandle<()>,
}

impl StreamBar {
    /// A bar for `name` and the sender the run reports its counters to; `None` when
    /// bars are off.
    pub fn start(name: &str) -> Option<(StreamBar, watch::Sender<Counters>)> {
        let bars = bars()?;
        let bar = bars.add(ProgressBar::new_spinner());
        bar.set_style(
            ProgressStyle::with_template("{spinner} {prefix:.bold} {msg} [{elapsed}]")
                .expect("the template parses"),
        );
        bar.set_prefix(name.to_string());
        bar.set_message("starting…");
        bar.enable_steady_tick(Duration::from_millis(120));
        let (sender, mut receiver) = watch::channel(Counters::default());
        let shown = bar.clone();
        let started = Instant::now();
        let task = tokio::spawn(async move {
            while receiver.changed().await.is_ok() {
                let c = *receiver.borrow_and_update();
                shown.set_message(counters_line(&c, started.elapsed()));
            }
        });
        Some((StreamBar { bar, task }, sender))
    }

    /// Removes the bar (the run's summary line replaces it).
    pub fn finish(self) {
        self.task.abort();
        self.bar.finish_and_clear();
        if let Some(bars) = bars() {
            bars.remove(&self.bar);
        }
    }
}

/// `1,200 records, 12 pages, 3,400 records/s (1,150 new, 50 updated, 0 failed)`.
pub fn counters_line(c: &Counters, elapsed: Duration) -> String {
    let rate = c.fetched as f64 / elapsed.as_secs_f64().max(0.001);
    format!(
        "{} records, {} pages, {:.0} records/s ({} new, {} updated, {} unchanged, {} failed)",
        c.fetched, c.pages, rate, c.inserted, c.updated, c.unchanged, c.failed
    )
}

/// A bar for `idem notify`: counts polled from the ledger while the dispatcher works.
pub struct NotifyBar {
    bar: ProgressBar,
    task: tokio::task::JoinHandle<()>,
}

impl NotifyBar {
    /// Starts polling the ledger every 200 ms; `None` when bars are off.
    pub async fn start(pool: &sqlx::PgPool) -> Option<NotifyBar> {
        let bars = bars()?;
        let started: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT now()")
            .fetch_one(pool)
            .await
            .ok()?;
        let bar = bars.add(ProgressBar::new_spinner());
        bar.set_style(
            ProgressStyle::with_template("{spinner} notifications: {msg} [{elapsed}]")
                .expect("the template parses"),
        );
        bar.enable_steady_tick(Duration::from_millis(120));
        let shown = bar.clone();
        let pool = pool.clone();
        let task = tokio::spawn(async move {
            loop {
                // What this pass changed (rows sent, rescheduled or failed since it
                // began), and every row that waits for review, new or old.
                let counts: Result<(i64, i64, i64, i64), _> = sqlx::query_as(
                    "SELECT count(*) FILTER (WHERE status = 'sent' AND sent_at >= $1),
                            count(*) FILTER (WHERE status = 'pending' AND attempts > 0 AND next_attempt_at > $1),
                            count(*) FILTER (WHERE status = 'failed' AND first_attempt_at IS NOT NULL AND next_attempt_at >= $1),
                            count(*) FILTER (WHERE status = 'needs_review')
                     FROM idem_ledger WHERE status IN ('sent', 'pending', 'failed', 'needs_review')",
                )
                .bind(started)
                .fetch_one(&pool)
                .await;
                if let Ok((sent, retry, failed, review)) = counts {
                    shown.set_message(format!(
                        "{sent} sent, {retry} to retry later, {failed} failed, {review} need review"
                    ));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        Some(NotifyBar { bar, task })
    }

    pub fn finish(self) {
        self.task.abort();
        self.bar.finish_and_clear();
        if let Some(bars) = bars() {
            bars.remove(&self.bar);
        }
    }
}
