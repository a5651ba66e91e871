//! Differential: the HTTP/1.1 fast path against the hyper path, on the same bytes.
//!
//! One process-wide harness (harness.rs) runs a mirror backend (mirror.rs) and two proxies in
//! front of it, fast path on and off, with the same cookie secret; and a second such pair in
//! front of a backend that refuses connections, for the answers the proxies make themselves.
//! Each input becomes request bytes (input.rs: raw, or a structured request or two pipelined
//! ones), sent to both proxies of a pair over new loopback connections. Checks, per answer
//! (http.rs takes the answers apart):
//! - the same answers in the same order: status, fields as HTTP means them, body;
//! - for answers from the mirror, the same request at the backend: request line, fields as HTTP
//!   means them, decoded body;
//! - the same bytes after the last answer (garbage, or a body where there must be none).
//!
//! Allowed differences: those of tests/fastpath.rs (`date`, `connection`, the route cookie's
//! value but not its attributes), the framing (chunk sizes, extensions and trailers, chunked vs
//! length vs close-delimited, so `chunked` in `transfer-encoding` and, for a mirrored answer, its
//! `content-length`; other transfer codings are compared), the reason phrase, and two things
//! about connections: a path may close after an answer that says `Connection: close` where the
//! other goes on with the next pipelined request (the client retries it, RFC 9112 §9.3.2), and
//! hyper refuses an invalid head only once its empty line is in (the fast path at once).
//!
//! A difference is confirmed twice with generous timeouts before it is reported, so a slow
//! scheduler is never a finding. Known, reported divergences: known.rs.
#![no_main]

#[path = "fast_vs_hyper/harness.rs"]
mod harness;
#[path = "fast_vs_hyper/http.rs"]
mod http;
#[path = "fast_vs_hyper/input.rs"]
mod input;
#[path = "fast_vs_hyper/known.rs"]
mod known;
#[path = "fast_vs_hyper/mirror.rs"]
mod mirror;

use std::time::Duration;

use harness::Patience;
use http::{Escaped, Expected, Transcript};
use libfuzzer_sys::fuzz_target;

/// First try: an answer takes a millisecond or two here, so a quiet 60 ms means the proxy waits
/// for more request bytes (and so does the other, or that shows on confirmation). About one
/// input in ten makes both proxies wait, so this bounds the fuzzer's speed.
const QUICK: Patience = Patience {
    quiet: Duration::from_millis(60),
    total: Duration::from_secs(2),
};

/// Confirming a difference: within libFuzzer's `-timeout=10` for the two runs.
const SLOW: Patience = Patience {
    quiet: Duration::from_millis(1500),
    total: Duration::from_secs(3),
};

fuzz_target!(|data: &[u8]| {
    let h = harness::get();
    let (request, backend) = input::request(data, &h.cookies);
    if request.is_empty() {
        return;
    }
    let sent = http::expected_answers(&request);
    // Skipped before sending rather than after comparing: one of them trips a debug assertion
    // inside hyper, on the runtime's thread, before there is anything to compare.
    if known::skipped(&request, &sent, backend).is_some() {
        return;
    }
    h.reset_passive_health();
    let (fast, hyper) = h.exchange_both(backend, &request, &sent, QUICK);
    if show() {
        eprintln!(
            "request: {:?}\nfast path: {}\nhyper path: {}",
            Escaped(&request),
            render(&fast),
            render(&hyper)
        );
    }
    let Err(first) = compare(&request, &sent, &fast, &hyper) else {
        return;
    };
    let mut last = (fast, hyper);
    for _ in 0..2 {
        h.reset_passive_health();
        last = h.exchange_both(backend, &request, &sent, SLOW);
        if compare(&request, &sent, &last.0, &last.1).is_ok() {
            // Said, so a run's log shows how often timing alone made a difference.
            eprintln!(
                "fast_vs_hyper: not confirmed with more time: {first}; request {:?}",
                Escaped(&request)
            );
            return;
        }
    }
    let (fast, hyper) = last;
    let why = compare(&request, &sent, &fast, &hyper).unwrap_err();
    panic!(
        "fast path and hyper path differ: {why}\n\nrequest ({backend:?} backend): {:?}\n\n\
         fast path: {}\n\nhyper path: {}",
        Escaped(&request),
        render(&fast),
        render(&hyper)
    );
});

/// `FAST_VS_HYPER_SHOW=1`: print every request and both transcripts (to replay a seed by hand).
fn show() -> bool {
    static SHOW: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SHOW.get_or_init(|| std::env::var_os("FAST_VS_HYPER_SHOW").is_some())
}

/// A transcript, one answer per line.
fn render(t: &Transcript) -> String {
    let mut out = String::new();
    for (i, a) in t.answers.iter().enumerate() {
        let close = if t.closing[i] { " (connection: close)" } else { "" };
        out.push_str(&format!(
            "\n  [{i}] {}{close} fields={:?}\n      body={:?}",
            a.status, a.fields, a.body
        ));
    }
    let end = if t.closed { "closed by the proxy" } else { "left open" };
    out.push_str(&format!("\n  tail={:?}, {end}", t.tail));
    out
}

/// `Ok` when the two transcripts mean the same; else what differs first.
fn compare(request: &[u8], sent: &[Expected], fast: &Transcript, hyper: &Transcript) -> Result<(), String> {
    let common = fast.answers.len().min(hyper.answers.len());
    for (i, (f, h)) in fast.answers.iter().zip(&hyper.answers).enumerate() {
        if f.status != h.status {
            return Err(format!(
                "answer {i}: status {} (fast) vs {} (hyper)",
                f.status, h.status
            ));
        }
        if f.body != h.body {
            return Err(format!("answer {i}: the body (or what the backend got) differs"));
        }
        if f.fields != h.fields {
            return Err(format!("answer {i}: the response fields differ"));
        }
    }
    if fast.answers.len() != hyper.answers.len() {
        let (short, long, name) = if fast.answers.len() < hyper.answers.len() {
            (fast, hyper, "fast")
        } else {
            (hyper, fast, "hyper")
        };
        // The shorter side closed after an answer that announced it.
        let announced = short.closed && common > 0 && short.closing[common - 1];
        // Still reading an unfinished head the other already refused (see `head_unfinished`).
        let unfinished = sent
            .get(common)
            .is_some_and(|e| http::head_unfinished(&request[e.start..]));
        let refused = long.answers.len() == common + 1
            && long.answers[common].status == 400
            && long.closing[common]
            && !short.closed;
        if !short.tail.0.is_empty() {
            return Err(format!("the {name} path sent bytes after its last answer"));
        }
        if !(announced || (unfinished && refused)) {
            return Err(format!(
                "{} answers (fast) vs {} (hyper): the {name} path stopped early",
                fast.answers.len(),
                hyper.answers.len()
            ));
        }
        return Ok(());
    }
    if fast.tail != hyper.tail {
        return Err("the bytes after the last answer differ".into());
    }
    Ok(())
}
