//! Log set-up shared by the binaries: to standard error, filtered by an environment variable.
//!
//! JSON lines carry the fields of the span the event happened in (`span`) and of every span around
//! it (`spans`), so a per-request span's request id, route and method reach every line logged
//! while the request is handled.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines (colours only on a terminal).
    Text,
    /// One JSON object per line.
    Json {
        /// Puts the event's fields at the top level instead of under `fields`.
        flatten_event: bool,
    },
}

/// Installs the global subscriber: `filter_env` (e.g. `RUST_LOG`) selects what is logged, else
/// `default_filter` (an `EnvFilter` directive such as `info,ort=warn`).
pub fn init_logging(format: LogFormat, filter_env: &str, default_filter: &str) {
    let filter = EnvFilter::try_from_env(filter_env).unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json { flatten_event } => {
            builder.json().flatten_event(flatten_event).with_current_span(true).with_span_list(true).init()
        }
    }
}
