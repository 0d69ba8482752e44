//! Crash points for crash-safety tests: `IDEM_CRASH_AT=<point>:<n>` makes the process
//! SIGKILL itself the n-th time it passes `<point>`, exactly as a power cut would.
//!
//! Points: `page_written` (page n written, its transaction still open),
//! `page_before_commit`, `page_after_commit` (n = the last page of the committing
//! transaction; with `[import] transaction_records = 1` every page);
//! `walk_end_before_commit`, `walk_end_after_commit` (the end-of-walk transaction: mark or
//! cursor, deletions, reminder rules) and `run_after_finish` (the run's row is closed),
//! n = 1; child streams (`src/run/children.rs`): `child_page_before_commit` and
//! `child_page_after_commit` (n = the child page committed by this process, 1, 2, ...)
//! and `child_run_after_finish` (n = 1); `notify_before_send` (the row is marked in flight, nothing sent yet) and
//! `notify_after_send` (n = message number of the dispatcher's pass).
//!
//! `IDEM_PANIC_AT=<point>:<n>` panics there instead (a bug in a task, not a power cut).
//! Points: `fetch_page` (n = page number the fetcher task is about to fetch).

use std::sync::OnceLock;

static TARGET: OnceLock<Option<(String, u64)>> = OnceLock::new();

/// Kills the process here if the environment asks for it.
pub fn crash_point(point: &str, n: u64) {
    let target = TARGET.get_or_init(|| {
        let value = std::env::var("IDEM_CRASH_AT").ok()?;
        let (name, count) = value.rsplit_once(':')?;
        Some((name.to_string(), count.parse().ok()?))
    });
    if let Some((name, count)) = target {
        if name == point && *count == n {
            eprintln!("IDEM_CRASH_AT: killing the process at {point}:{n}");
            // SAFETY: kill(2) on our own pid has no memory-safety preconditions.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
        }
    }
}

static PANIC_TARGET: OnceLock<Option<(String, u64)>> = OnceLock::new();

/// Panics here if `IDEM_PANIC_AT` asks for it.
pub fn panic_point(point: &str, n: u64) {
    let target = PANIC_TARGET.get_or_init(|| {
        let value = std::env::var("IDEM_PANIC_AT").ok()?;
        let (name, count) = value.rsplit_once(':')?;
        Some((name.to_string(), count.parse().ok()?))
    });
    if let Some((name, count)) = target {
        if name == point && *count == n {
            panic!("IDEM_PANIC_AT: panicking at {point}:{n}");
        }
    }
}
