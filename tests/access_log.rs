//! The access log's batched writer: lines arrive whole and in order, and a sink that cannot keep
//! up costs dropped (counted) lines, never a blocked request or unbounded memory.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use kbs_proxy::config::LogFormat;
use kbs_proxy::telemetry::access::{self, Line, MAX_BUFFERED};

/// A sink that holds every write until its gate opens.
struct Gated {
    gate: Arc<(Mutex<bool>, Condvar)>,
    out: Arc<Mutex<Vec<u8>>>,
}

impl Write for Gated {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let (open, cv) = &*self.gate;
        let mut open = open.lock().unwrap();
        while !*open {
            open = cv.wait(open).unwrap();
        }
        self.out.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_stuck_sink_drops_and_counts_lines_and_the_rest_arrive_in_order() {
    let gate = Arc::new((Mutex::new(false), Condvar::new()));
    let out = Arc::new(Mutex::new(Vec::new()));
    let sink = Gated {
        gate: Arc::clone(&gate),
        out: Arc::clone(&out),
    };
    assert!(access::install(LogFormat::Text, sink));

    // The sink is stuck: record until lines are dropped (bounded: far more than the buffer).
    let paths: Vec<String> = (0..200_000).map(|i| format!("/kbs/v0/resource/seq/{i:06}")).collect();
    let mut recorded = 0;
    for path in &paths {
        access::record(&Line {
            method: "GET",
            path,
            status: 200,
            backend: "kbs-0",
            route: "resource",
            decision: "pinned",
            elapsed: Duration::from_micros(250),
            at: Instant::now(),
            request_id: "r-1",
            client: "127.0.0.1",
            forwarded_for: None,
        });
        recorded += 1;
        if access::dropped() > 100 {
            break;
        }
    }
    let dropped = access::dropped();
    assert!(
        dropped > 0,
        "a stuck sink makes the log drop lines, not grow without bound"
    );
    assert!(recorded < paths.len(), "dropping started before the bound of the loop");

    // Unstuck: everything that was not dropped arrives, whole and in order.
    *gate.0.lock().unwrap() = true;
    gate.1.notify_all();
    access::flush();
    let text = String::from_utf8(out.lock().unwrap().clone()).unwrap();
    let seqs: Vec<usize> = text
        .lines()
        .map(|l| {
            assert!(
                l.ends_with(" duration_ms=0.250 request_id=\"r-1\" client=\"127.0.0.1\""),
                "a whole line: {l}"
            );
            let at = l.find("/seq/").unwrap() + 5;
            l[at..at + 6].parse().unwrap()
        })
        .collect();
    assert_eq!(seqs.len() as u64, recorded as u64 - dropped);
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in order");
    // What was held while the sink was stuck stayed within the bound (one batch in the writer,
    // one full buffer).
    assert!(text.len() <= 2 * MAX_BUFFERED + 64 * 1024, "{} bytes held", text.len());
}
