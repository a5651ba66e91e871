//! The access log's writer, off the request's critical path.
//!
//! A request's line is formatted on the thread that served it, into a buffer that thread owns
//! (a lock no other worker takes); one writer thread takes the buffers on a timer and writes
//! each with one system call. A request therefore pays for formatting about a hundred bytes,
//! not for a `write` to stderr, and the lines of many requests share one write.
//!
//! The writer's period adapts to the busiest thread: [`FLUSH_EVERY`] when little is logged,
//! shorter (down to [`FLUSH_EVERY_MIN`]) so that a busy thread's buffer holds about
//! [`FLUSH_AT`] when it is written. The workers do not wake the writer themselves unless a
//! burst outruns the period ([`WAKE_AT`]): each such wake-up is a system call on the worker
//! and, worse, the writer preempting the worker on its core, hundreds of times a second when
//! workers woke it at a fixed fill (docs/history/tuning-journal.md).
//!
//! Memory is bounded: a thread whose buffer holds [`MAX_BUFFERED`] bytes (the sink is slower
//! than the requests) drops its next lines and counts them ([`dropped`], exported as
//! `kbs_proxy_access_log_dropped_lines_total`) rather than make a request wait for the sink.
//!
//! Formatting is written out here rather than through `tracing`'s formatter, whose per-field
//! visiting and per-event write cost the fast path a large share of its CPU per request
//! (benchmarked); the lines look as they did: the same fields, text or JSON. Lines of one
//! thread keep their order; lines of different threads may interleave by up to one flush
//! period.

use std::cell::RefCell;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::Thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::config::LogFormat;

/// The writer thread's longest period: how late a line may be written when few are logged.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// The writer thread's shortest period, for threads that log fast.
pub const FLUSH_EVERY_MIN: Duration = Duration::from_millis(5);
/// What the writer's period aims for the busiest thread's buffer to hold when it is written:
/// a quarter of [`MAX_BUFFERED`], so a burst of four times the rate is still kept.
pub const FLUSH_AT: usize = MAX_BUFFERED / 4;
/// A thread's buffer this full wakes the writer at once (a burst the period has not caught up
/// with): once per fill, by the line that crosses it.
pub const WAKE_AT: usize = MAX_BUFFERED / 2;
/// A thread's buffer this full drops the next lines (counted).
pub const MAX_BUFFERED: usize = 1024 * 1024;

/// One request's line.
#[derive(Debug, Clone, Copy)]
pub struct Line<'a> {
    /// The request method.
    pub method: &'a str,
    /// The path, without its query (which may carry tokens).
    pub path: &'a str,
    /// The status the client was sent.
    pub status: u16,
    /// The backend's name, or `-`.
    pub backend: &'a str,
    /// The KBS step (`auth`, `attest`, `resource`, ...).
    pub route: &'a str,
    /// How the backend was chosen.
    pub decision: &'a str,
    /// From the request's head to the end of the answer.
    pub elapsed: Duration,
    /// When the answer ended, as the caller read it for `elapsed`: the line's timestamp,
    /// without a clock read of its own.
    pub at: Instant,
    /// The request's `X-Request-Id`, the client's or generated (also sent to the backend).
    pub request_id: &'a str,
    /// The client's address (of the TCP connection).
    pub client: &'a str,
    /// The `X-Forwarded-For` chain the client sent, when it is a trusted proxy.
    pub forwarded_for: Option<&'a str>,
}

/// A thread's buffer of formatted lines.
type Buffer = Arc<Mutex<Vec<u8>>>;

struct Sink {
    format: LogFormat,
    /// Every thread's buffer, registered when the thread logs its first line.
    buffers: Mutex<Vec<Buffer>>,
    /// The writer thread, to wake when a buffer fills.
    writer: Thread,
    /// Passes the writer has completed over every buffer, for [`flush`] to wait on.
    passes: Mutex<u64>,
    /// Signalled at the end of each pass.
    passed: Condvar,
}

static SINK: OnceLock<Sink> = OnceLock::new();
static DROPPED: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// This thread's buffer and its clock.
    static LOCAL: RefCell<Option<(Buffer, Clock)>> = const { RefCell::new(None) };
}

/// Starts the writer thread: from now on access lines go to `out` in `format`. Once per
/// process; later calls change nothing and return `false`. Without it, lines go through
/// `tracing` (target `access`), as a library user would expect.
pub fn install(format: LogFormat, out: impl Write + Send + 'static) -> bool {
    let mut installed = false;
    SINK.get_or_init(|| {
        installed = true;
        let writer = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_forever(out))
            .expect("a thread for the access log");
        Sink {
            format,
            buffers: Mutex::new(Vec::new()),
            writer: writer.thread().clone(),
            passes: Mutex::new(0),
            passed: Condvar::new(),
        }
    });
    installed
}

/// What [`enlarge_pipe`] asks for: a flush period's lines at about 100,000 requests a second.
pub const PIPE_SIZE: usize = 1024 * 1024;

/// When `out` is a pipe (a container's stderr, as its runtime reads it), asks the kernel for a
/// [`PIPE_SIZE`] buffer, never shrinking it. With the default 64 KiB, a flush of a busy
/// period's lines fills the pipe many times over, and each time the writer thread sleeps
/// until the reader drains it and is woken again: context switches on the proxy's own cores.
/// A refusal (not a pipe; above `/proc/sys/fs/pipe-max-size` or the user's pipe quota) leaves
/// the pipe as it was. Returns the pipe's size afterwards, `None` when `out` is no pipe.
pub fn enlarge_pipe(out: &impl std::os::fd::AsFd) -> Option<usize> {
    let size = rustix::pipe::fcntl_getpipe_size(out).ok()?;
    if size < PIPE_SIZE {
        let _ = rustix::pipe::fcntl_setpipe_size(out, PIPE_SIZE);
    }
    rustix::pipe::fcntl_getpipe_size(out).ok()
}

/// Lines dropped because the sink could not keep up.
pub fn dropped() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// Logs `line`: into this thread's buffer when the writer is installed, else through `tracing`.
pub fn record(line: &Line<'_>) {
    let Some(sink) = SINK.get() else {
        return through_tracing(line);
    };
    LOCAL.with(|local| {
        let mut local = local.borrow_mut();
        let (buffer, clock) = local.get_or_insert_with(|| {
            let buffer = Buffer::default();
            lock(&sink.buffers).push(Arc::clone(&buffer));
            (buffer, Clock::default())
        });
        let mut buf = lock(buffer);
        if buf.len() >= MAX_BUFFERED {
            DROPPED.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let before = buf.len();
        let since_epoch = clock.since_epoch(line.at);
        format_line(&mut buf, sink.format, clock, since_epoch, line);
        if before < WAKE_AT && buf.len() >= WAKE_AT {
            sink.writer.unpark();
        }
    });
}

/// Writes what every thread has buffered, now (before exiting, and in tests).
/// Waits (at most 2 s, for a stuck sink) until a whole pass of the writer has begun after the
/// call and ended, with every line recorded before it written.
pub fn flush() {
    let Some(sink) = SINK.get() else { return };
    let mut passes = lock(&sink.passes);
    // The pass running now may have taken some buffers before the lines of this call were in.
    let done = *passes + 2;
    sink.writer.unpark();
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while *passes < done {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return;
        }
        // Wake the writer again: a pass that ended as this call began used up the unpark.
        sink.writer.unpark();
        passes = sink
            .passed
            .wait_timeout(passes, left.min(FLUSH_EVERY))
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn write_forever(mut out: impl Write) {
    let mut spare = Vec::new();
    let mut period = FLUSH_EVERY;
    let mut last = Instant::now();
    loop {
        std::thread::park_timeout(period);
        let Some(sink) = SINK.get() else { continue };
        let now = Instant::now();
        let buffers: Vec<Buffer> = lock(&sink.buffers).clone();
        let mut most = 0;
        for buffer in buffers {
            std::mem::swap(&mut *lock(&buffer), &mut spare);
            if !spare.is_empty() {
                most = most.max(spare.len());
                // A sink that fails (stderr closed) loses these lines; the proxy goes on.
                let _ = out.write_all(&spare).and_then(|()| out.flush());
                spare.clear();
            }
        }
        period = next_period(now.saturating_duration_since(last), most);
        last = now;
        *lock(&sink.passes) += 1;
        sink.passed.notify_all();
    }
}

/// The writer's next period after a pass that found at most `most` bytes in one thread's
/// buffer, `elapsed` after the pass before: at that thread's rate, the time to buffer
/// [`FLUSH_AT`], within [`FLUSH_EVERY_MIN`]..=[`FLUSH_EVERY`].
fn next_period(elapsed: Duration, most: usize) -> Duration {
    if most == 0 {
        return FLUSH_EVERY;
    }
    let nanos = elapsed.as_nanos() * FLUSH_AT as u128 / most as u128;
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX)).clamp(FLUSH_EVERY_MIN, FLUSH_EVERY)
}

fn through_tracing(line: &Line<'_>) {
    tracing::info!(
        target: "access",
        method = line.method,
        path = line.path,
        status = line.status,
        backend = line.backend,
        route = line.route,
        decision = line.decision,
        duration_ms = millis(line.elapsed),
        request_id = line.request_id,
        client = line.client,
        forwarded_for = line.forwarded_for,
        "request"
    );
}

/// Milliseconds with microsecond precision (three decimals), as the lines print them.
fn millis(d: Duration) -> f64 {
    d.as_micros() as f64 / 1000.0
}

/// A thread's wall clock for its lines: the time of an [`Instant`] from one pair of clock
/// readings (the anchor), and the RFC 3339 text of the last second it stamped, so most lines
/// copy it.
#[derive(Default)]
struct Clock {
    /// An instant and its time since the epoch, read together; renewed every [`ANCHOR_FOR`].
    anchor: Option<(Instant, Duration)>,
    /// The second `text` shows, once one was formatted.
    second: Option<u64>,
    text: [u8; 19],
}

/// How long a thread's clock anchor is used: a stepped or slewed wall clock shows in the
/// lines within this long.
const ANCHOR_FOR: Duration = Duration::from_secs(1);

impl Clock {
    /// The time since the epoch at `at`.
    fn since_epoch(&mut self, at: Instant) -> Duration {
        let from_anchor = self
            .anchor
            .and_then(|(instant, wall)| match at.checked_duration_since(instant) {
                Some(later) => (later < ANCHOR_FOR).then(|| wall + later),
                None => (instant - at < ANCHOR_FOR).then(|| wall.saturating_sub(instant - at)),
            });
        from_anchor.unwrap_or_else(|| {
            let (now, wall) = (Instant::now(), SystemTime::now());
            let wall = wall.duration_since(UNIX_EPOCH).unwrap_or_default();
            // `at` is usually a little earlier (the caller's reading).
            let wall = match at.checked_duration_since(now) {
                Some(later) => wall + later,
                None => wall.saturating_sub(now - at),
            };
            self.anchor = Some((at, wall));
            wall
        })
    }

    /// `YYYY-MM-DDTHH:MM:SS` of `secs` since the epoch.
    fn second(&mut self, secs: u64) -> &[u8; 19] {
        if self.second != Some(secs) {
            let t = time::OffsetDateTime::from_unix_timestamp(secs as i64).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
            let mut w = &mut self.text[..];
            let _ = write!(
                w,
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
                t.year(),
                u8::from(t.month()),
                t.day(),
                t.hour(),
                t.minute(),
                t.second()
            );
            self.second = Some(secs);
        }
        &self.text
    }
}

/// Appends one line of `format`, ending in `\n`.
fn format_line(buf: &mut Vec<u8>, format: LogFormat, clock: &mut Clock, since: Duration, l: &Line<'_>) {
    // Written out field by field, numbers with `itoa`: `write!`'s formatting machinery was a
    // large part of a line's cost where every line is formatted cache-cold (paced clients;
    // docs/history/tuning-journal.md).
    let micros = u64::try_from(l.elapsed.as_micros()).unwrap_or(u64::MAX);
    let json = format == LogFormat::Json;
    if json {
        buf.extend_from_slice(b"{\"timestamp\":\"");
    }
    buf.extend_from_slice(clock.second(since.as_secs()));
    buf.push(b'.');
    digits(buf, since.subsec_micros(), 6);
    let quote: fn(&mut Vec<u8>, &str) = if json { quoted_json } else { quoted_text };
    if json {
        buf.extend_from_slice(b"Z\",\"level\":\"INFO\",\"message\":\"request\",\"method\":");
        quoted_json(buf, l.method);
    } else {
        buf.extend_from_slice(b"Z  INFO access: request method=");
        buf.extend_from_slice(l.method.as_bytes());
    }
    let field = |buf: &mut Vec<u8>, name: &str| {
        if json {
            buf.extend_from_slice(b",\"");
            buf.extend_from_slice(name.as_bytes());
            buf.extend_from_slice(b"\":");
        } else {
            buf.push(b' ');
            buf.extend_from_slice(name.as_bytes());
            buf.push(b'=');
        }
    };
    field(buf, "path");
    quote(buf, l.path);
    field(buf, "status");
    buf.extend_from_slice(itoa::Buffer::new().format(l.status).as_bytes());
    field(buf, "backend");
    quote(buf, l.backend);
    // Route and decision are names of the proxy's own: quoted as they are.
    for (name, value) in [("route", l.route), ("decision", l.decision)] {
        field(buf, name);
        buf.push(b'"');
        buf.extend_from_slice(value.as_bytes());
        buf.push(b'"');
    }
    field(buf, "duration_ms");
    buf.extend_from_slice(itoa::Buffer::new().format(micros / 1000).as_bytes());
    buf.push(b'.');
    digits(buf, (micros % 1000) as u32, 3);
    let who = [
        ("request_id", Some(l.request_id)),
        ("client", Some(l.client)),
        ("forwarded_for", l.forwarded_for),
    ];
    for (name, value) in who {
        if let Some(value) = value {
            field(buf, name);
            quote(buf, value);
        }
    }
    buf.extend_from_slice(if json { b",\"target\":\"access\"}\n" } else { b"\n" });
}

/// The last `width` decimal digits of `n`, with leading zeros.
fn digits(buf: &mut Vec<u8>, mut n: u32, width: usize) {
    let mut out = [b'0'; 10];
    for slot in out[..width].iter_mut().rev() {
        *slot = b'0' + (n % 10) as u8;
        n /= 10;
    }
    buf.extend_from_slice(&out[..width]);
}

/// `"text"`, with `"`, `\` and control bytes escaped (`\xNN`), so a path cannot forge a field
/// or a line.
fn quoted_text(buf: &mut Vec<u8>, text: &str) {
    quoted(buf, text, |buf, b| {
        let _ = write!(buf, "\\x{b:02x}");
    });
}

/// A JSON string (RFC 8259 §7: control bytes as `\u00NN`).
fn quoted_json(buf: &mut Vec<u8>, text: &str) {
    quoted(buf, text, |buf, b| {
        let _ = write!(buf, "\\u{b:04x}");
    });
}

/// `text` in double quotes, `"` and `\` escaped with a backslash, control bytes by `control`.
/// Most fields need no escape: they are checked in one pass that has no early exit (so the
/// compiler checks many bytes per instruction) and copied whole; the others copy the runs
/// between escapes. A byte at a time showed in profiles of logged requests (perf,
/// docs/history/tuning-journal.md).
fn quoted(buf: &mut Vec<u8>, text: &str, control: impl Fn(&mut Vec<u8>, u8)) {
    let escaped = |b: u8| b < 0x20 || b == b'"' || b == b'\\' || b == 0x7f;
    let bytes = text.as_bytes();
    buf.reserve(bytes.len() + 2);
    buf.push(b'"');
    if bytes.iter().fold(false, |any, &b| any | escaped(b)) {
        let mut run = 0;
        for (i, &b) in bytes.iter().enumerate() {
            if escaped(b) {
                buf.extend_from_slice(&bytes[run..i]);
                if b < 0x20 || b == 0x7f {
                    control(buf, b);
                } else {
                    buf.extend_from_slice(&[b'\\', b]);
                }
                run = i + 1;
            }
        }
        buf.extend_from_slice(&bytes[run..]);
    } else {
        buf.extend_from_slice(bytes);
    }
    buf.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(path: &str) -> Line<'_> {
        Line {
            method: "GET",
            path,
            status: 200,
            backend: "kbs-0",
            route: "resource",
            decision: "pinned",
            elapsed: Duration::from_micros(1_234_567),
            at: Instant::now(),
            request_id: "req-1",
            client: "10.0.0.9",
            forwarded_for: None,
        }
    }

    fn formatted(format: LogFormat, l: &Line<'_>) -> String {
        let mut buf = Vec::new();
        let since = Duration::from_micros(1_764_820_128_084_409);
        format_line(&mut buf, format, &mut Clock::default(), since, l);
        String::from_utf8(buf).unwrap()
    }

    #[test]
    fn text_lines_look_as_tracing_wrote_them() {
        assert_eq!(
            formatted(LogFormat::Text, &line("/kbs/v0/resource/a/b/c")),
            "2025-12-04T03:48:48.084409Z  INFO access: request method=GET path=\"/kbs/v0/resource/a/b/c\" \
             status=200 backend=\"kbs-0\" route=\"resource\" decision=\"pinned\" duration_ms=1234.567 \
             request_id=\"req-1\" client=\"10.0.0.9\"\n"
        );
        let forwarded = Line {
            forwarded_for: Some("203.0.113.7, 10.0.0.2"),
            ..line("/")
        };
        assert!(formatted(LogFormat::Text, &forwarded)
            .ends_with(" client=\"10.0.0.9\" forwarded_for=\"203.0.113.7, 10.0.0.2\"\n"));
    }

    #[test]
    fn json_lines_parse_with_every_field() {
        let text = formatted(LogFormat::Json, &line("/a\"b\\c\u{1}"));
        let v: serde_json::Value = serde_json::from_str(text.trim_end()).unwrap();
        assert_eq!(v["path"], "/a\"b\\c\u{1}");
        assert_eq!(v["target"], "access");
        assert_eq!(v["status"], 200);
        assert_eq!(v["duration_ms"], 1234.567);
        assert_eq!(v["timestamp"], "2025-12-04T03:48:48.084409Z");
        assert_eq!(
            (v["request_id"].as_str(), v["client"].as_str()),
            (Some("req-1"), Some("10.0.0.9"))
        );
        assert!(v.get("forwarded_for").is_none(), "only from trusted proxies");
        let forwarded = Line {
            forwarded_for: Some("203.0.113.7"),
            request_id: "a\"b",
            ..line("/")
        };
        let v: serde_json::Value = serde_json::from_str(formatted(LogFormat::Json, &forwarded).trim_end()).unwrap();
        assert_eq!(
            (v["forwarded_for"].as_str(), v["request_id"].as_str()),
            (Some("203.0.113.7"), Some("a\"b"))
        );
    }

    #[test]
    fn a_path_cannot_forge_a_field_or_a_line() {
        let text = formatted(LogFormat::Text, &line("/x\" status=500 \n"));
        assert_eq!(text.matches('\n').count(), 1);
        assert!(text.contains(r#"path="/x\" status=500 \x0a""#), "{text}");
    }

    #[test]
    fn a_pipe_is_enlarged_and_anything_else_left_alone() {
        let (reader, writer) = rustix::pipe::pipe().unwrap();
        let before = rustix::pipe::fcntl_getpipe_size(&writer).unwrap();
        let after = enlarge_pipe(&writer).expect("a pipe");
        // The kernel may cap it (pipe-max-size, the user's quota) but never below what it had.
        assert!(after >= before, "{after} < {before}");
        if std::fs::read_to_string("/proc/sys/fs/pipe-max-size")
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .is_some_and(|max| max >= PIPE_SIZE)
        {
            assert!(after >= PIPE_SIZE, "{after}");
        }
        drop(reader);
        let file = tempfile::tempfile().unwrap();
        assert_eq!(enlarge_pipe(&file), None);
    }

    #[test]
    fn the_writer_period_follows_the_busiest_thread() {
        let ms = Duration::from_millis;
        assert_eq!(
            next_period(ms(37), 0),
            FLUSH_EVERY,
            "nothing logged: the longest period"
        );
        assert_eq!(
            next_period(ms(100), FLUSH_AT),
            ms(100),
            "a quarter full in 100 ms: keep it"
        );
        // 1 MiB in 100 ms (10 MiB/s): 256 KiB takes 25 ms.
        assert_eq!(next_period(ms(100), MAX_BUFFERED), ms(25));
        // A pass woken early measures the rate over the time it really waited.
        assert_eq!(next_period(ms(10), MAX_BUFFERED / 8), ms(20));
        assert_eq!(next_period(ms(100), 100 * MAX_BUFFERED), FLUSH_EVERY_MIN);
        assert_eq!(next_period(ms(100), 100), FLUSH_EVERY);
    }

    #[test]
    fn escapes_between_runs_keep_every_byte() {
        let text = formatted(LogFormat::Text, &line("a\"b\\\u{1}cd\u{7f}"));
        assert!(text.contains(r#"path="a\"b\\\x01cd\x7f" "#), "{text}");
        let json = formatted(LogFormat::Json, &line("\"x\ty\""));
        let v: serde_json::Value = serde_json::from_str(json.trim_end()).unwrap();
        assert_eq!(v["path"], "\"x\ty\"");
    }

    #[test]
    fn lines_are_stamped_from_the_callers_instant_on_the_wall_clock() {
        let ms = Duration::from_millis;
        let wall = || SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        let mut clock = Clock::default();
        let before = wall();
        let at = Instant::now();
        let stamped = clock.since_epoch(at);
        let after = wall();
        assert!(
            before <= stamped + ms(1) && stamped <= after + ms(1),
            "{before:?} {stamped:?} {after:?}"
        );
        assert_eq!(clock.anchor, Some((at, stamped)), "anchored at the first line");
        // Within a second of the anchor: the instant's distance from it, both ways.
        assert_eq!(clock.since_epoch(at + ms(300)), stamped + ms(300));
        assert_eq!(clock.since_epoch(at - ms(300)), stamped - ms(300));
        assert_eq!(clock.anchor, Some((at, stamped)), "no new reading");
        // Past it: the wall clock is read again, and `at` still placed where it falls.
        let later = at + ANCHOR_FOR + ms(500);
        let renewed = clock.since_epoch(later);
        assert_eq!(clock.anchor, Some((later, renewed)));
        assert!(renewed.abs_diff(stamped + ANCHOR_FOR + ms(500)) < ms(50), "{renewed:?}");
    }

    #[test]
    fn durations_have_three_decimals() {
        assert_eq!(millis(Duration::from_nanos(33_142_000)), 33.142);
        let l = Line {
            elapsed: Duration::from_micros(5),
            ..line("/")
        };
        assert!(formatted(LogFormat::Text, &l).contains(" duration_ms=0.005 "));
    }
}
