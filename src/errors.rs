//! How errors read in log lines: an error and its sources on one line. Every layer logs
//! errors where it handles them, so this sits at the bottom, above nothing.

/// An error and its sources, on one line.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(inner) = source {
        let inner_text = inner.to_string();
        if !text.contains(&inner_text) {
            text = format!("{text}: {inner_text}");
        }
        source = inner.source();
    }
    text
}
