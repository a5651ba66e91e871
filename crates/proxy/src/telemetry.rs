//! Logging set-up: tracing to stderr, text or JSON, filtered by `RUST_LOG` (default `info`);
//! the access log through its own batched writer ([`access`]), to stderr as well.

pub mod access;

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber. Call once, from `main`.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    access::enlarge_pipe(&std::io::stderr());
    access::install(format, std::io::stderr());
}
