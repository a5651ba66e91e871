//! Logging set-up: tracing to stderr, text or JSON, filtered by `RUST_LOG` (default `info`);
//! the access log through its own batched writer ([`access`]), to stderr as well.

pub mod access;

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber. Call once, from `main`.
pub fn init(format: LogFormat) {
    let filter = filter(std::env::var("RUST_LOG").ok().as_deref());
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

/// What `rustls` may log unless `RUST_LOG` names it. Its warnings are about what one peer sent
/// (an IP address as SNI, which `wrk` and many clients send when given an address; a warning
/// alert; a message out of order): a line per handshake that any client can trigger, with the
/// cost of a write to stderr each. A failed handshake is already counted and answered.
const RUSTLS_UNLESS_NAMED: &str = "rustls=error";

/// The filter for `RUST_LOG`'s value `env` (`None` or unparsable: `info`), with
/// [`RUSTLS_UNLESS_NAMED`] added when `env` does not name `rustls` itself.
fn filter(env: Option<&str>) -> EnvFilter {
    let env = env.map(str::trim).filter(|s| !s.is_empty());
    let base = env
        .and_then(|s| EnvFilter::try_new(s).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    if env.is_some_and(|s| s.contains("rustls")) {
        base
    } else {
        base.add_directive(RUSTLS_UNLESS_NAMED.parse().expect("a valid directive"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// What a subscriber with the filter for `env` writes for a warning and a debug line of
    /// `rustls` and a warning of the proxy's own.
    fn written(env: Option<&str>) -> String {
        let out = Arc::new(Mutex::new(Vec::new()));
        let writer = {
            let out = Arc::clone(&out);
            move || Sink(Arc::clone(&out))
        };
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(filter(env))
            .with_writer(writer)
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(target: "rustls::msgs::handshake", "Illegal SNI extension");
            tracing::debug!(target: "rustls::server", "a debug line of rustls");
            tracing::warn!(target: "kbs_proxy::control", "a warning of ours");
        });
        let bytes = out.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn rustls_warnings_stay_out_unless_rust_log_names_rustls() {
        for env in [
            None,
            Some(""),
            Some("warn"),
            Some("debug"),
            Some("not a filter ["),
            Some("kbs_proxy=info"),
        ] {
            let text = written(env);
            assert!(!text.contains("rustls"), "{env:?}: {text}");
            assert!(text.contains("a warning of ours"), "{env:?}: {text}");
        }
        let text = written(Some("info,rustls=warn"));
        assert!(
            text.contains("Illegal SNI extension") && text.contains("a warning of ours"),
            "{text}"
        );
        assert!(!text.contains("a debug line"), "{text}");
        assert!(written(Some("rustls=debug")).contains("a debug line of rustls"));
    }
}
