//! The console's first page as a compact text table, for `idem status` (without the
//! next scheduled run: only a running `idem serve` knows it).

use super::views::StreamRow;

/// One line per stream (plus an indented line of reasons for a stream in trouble).
pub fn render(rows: &[StreamRow]) -> String {
    let header = [
        "STREAM",
        "LAST RUN",
        "WHEN",
        "TOOK",
        "IN",
        "UPD",
        "UNCH",
        "FAIL",
        "MARK / CURSOR",
        "LAG",
        "FAILURES",
        "LEDGER",
    ];
    let mut lines: Vec<(Vec<String>, Vec<String>)> = Vec::new();
    for r in rows {
        let (status, when, took, counts) = match (&r.in_progress, &r.last_run) {
            (Some(progress), _) => (
                "running".to_string(),
                progress.clone(),
                "-".to_string(),
                ["-"; 4].map(String::from),
            ),
            (None, Some(run)) => (
                format!("{} {}", run.mode, run.status),
                run.when
                    .split_once(" (")
                    .map_or(run.when.clone(), |(_, ago)| {
                        ago.trim_end_matches(')').to_string()
                    }),
                run.duration.clone(),
                [
                    run.fetched.to_string(),
                    (run.inserted + run.updated).to_string(),
                    run.unchanged.to_string(),
                    run.failed.to_string(),
                ],
            ),
            (None, None) => (
                "never run".to_string(),
                "-".to_string(),
                "-".to_string(),
                ["-"; 4].map(String::from),
            ),
        };
        let ledger = if r.ledger.is_empty() {
            "-".to_string()
        } else {
            r.ledger
                .iter()
                .map(|(s, n)| format!("{s} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let [fetched, changed, unchanged, failed] = counts;
        lines.push((
            vec![
                format!(
                    "{}{}.{}",
                    if r.trouble.is_empty() { "  " } else { "! " },
                    r.source_system,
                    r.stream
                ),
                status,
                when,
                took,
                fetched,
                changed,
                unchanged,
                failed,
                r.mark.clone(),
                r.lag.clone(),
                r.failures.to_string(),
                ledger,
            ],
            r.trouble.clone(),
        ));
    }
    let mut widths: Vec<usize> = header.iter().map(|h| h.len() + 2).collect();
    widths[0] = widths[0].max(2 + header[0].len());
    for (cells, _) in &lines {
        for (w, cell) in widths.iter_mut().zip(cells) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let numeric = |i: usize| (4..=7).contains(&i) || i == 10;
    let line = |cells: &[String]| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if numeric(i) {
                out.push_str(&format!("{cell:>w$}  "));
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.trim_end().to_string()
    };
    let mut out = String::new();
    let mut head: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    head[0] = format!("  {}", head[0]);
    out.push_str(&line(&head));
    out.push('\n');
    for (cells, trouble) in &lines {
        out.push_str(&line(cells));
        out.push('\n');
        if !trouble.is_empty() {
            out.push_str(&format!("    ! {}\n", trouble.join("; ")));
        }
    }
    out
}
