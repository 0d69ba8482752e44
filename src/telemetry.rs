//! The tracing subscriber: readable lines on a terminal, JSON lines otherwise (containers,
//! CI), so every line of a run carries its span's fields either way.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum LogFormat {
    /// Pretty on a terminal, JSON otherwise.
    #[default]
    Auto,
    Pretty,
    Json,
}

/// Installs the global subscriber, writing to stderr (stdout is for results), every line
/// through the redactor.
/// `RUST_LOG` filters (default `info`, with sqlx's notices and slow-query lines at `warn`).
pub fn init(format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn"));
    let json = match format {
        LogFormat::Auto => !std::io::stderr().is_terminal(),
        LogFormat::Pretty => false,
        LogFormat::Json => true,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(RedactedLog);
    let _ = if json {
        builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .try_init()
    } else {
        builder.compact().try_init()
    };
}

/// The log writer: each formatted log line is redacted, then written to stderr without
/// tearing a progress bar.
struct RedactedLog;

/// One log line being formatted; redacted and written out when dropped.
struct RedactedLine(Vec<u8>);

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for RedactedLog {
    type Writer = RedactedLine;

    fn make_writer(&'a self) -> Self::Writer {
        RedactedLine(Vec::with_capacity(256))
    }
}

impl std::io::Write for RedactedLine {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for RedactedLine {
    fn drop(&mut self) {
        let text = crate::redact::redact(&String::from_utf8_lossy(&self.0));
        let _ = std::io::Write::write_all(&mut crate::progress::LogWriter, text.as_bytes());
    }
}
