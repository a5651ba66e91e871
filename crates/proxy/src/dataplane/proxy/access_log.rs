//! The observe step both transports share: one access-log line per request, proxied or answered
//! by the proxy itself, in one format.

use std::cell::RefCell;

use super::*;

/// One access-log line per request: method, path (no query: it may carry tokens), status,
/// backend, duration, routing decision and who asked. Cookies, tokens and bodies are never
/// logged.
pub(super) struct AccessLog {
    /// The request's own fields; `None` when the log is off (nothing is recorded).
    pub(super) fields: Option<LineFields>,
    /// The backend the request went (or was pinned) to.
    pub(super) backend: Option<Arc<Backend>>,
    /// How the backend was chosen.
    pub(super) decision: &'static str,
}

/// What a line takes from its request, copied when the request is read: method, path, its
/// `X-Request-Id`, the client's address and the `X-Forwarded-For` chain it sent when it is a
/// trusted proxy (from others it could be forged).
///
/// All in one string, which comes from the strings of this thread's finished lines
/// ([`SPARE`]): a logged request costs no allocation of its own. Owning each field cost three
/// or four allocations, which paced clients (every line made cache-cold) paid for measurably,
/// and one showed in profiles still (docs/history/tuning-journal.md).
pub(super) struct LineFields {
    /// The five fields, one after another.
    text: String,
    /// Where each of the first four ends in `text` (the last runs to its end).
    ends: [u32; 4],
}

thread_local! {
    /// The strings of this thread's finished lines, for its next ones: at most [`SPARE_KEPT`],
    /// each of at most [`SPARE_LARGEST`] bytes. A string goes to the list of the thread that
    /// drops it, so a request that ends on another thread (the hyper path on tokio's threads)
    /// moves one; each thread's list stays bounded all the same.
    static SPARE: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
}

/// How many strings a thread keeps: enough for the requests that end together in one turn of a
/// busy thread's loop (64 connections in the benchmarks); a string beyond them is freed.
const SPARE_KEPT: usize = 64;
/// The largest string a thread keeps (a long path or `X-Forwarded-For` chain is not kept).
const SPARE_LARGEST: usize = 1024;

/// The fields of [`LineFields`], in order.
const METHOD: usize = 0;
const PATH: usize = 1;
const REQUEST_ID: usize = 2;
const CLIENT: usize = 3;
const FORWARDED_FOR: usize = 4;

impl LineFields {
    /// The fields of a request `method path` with `request_id` on `conn`; `chain` gives the
    /// client's `X-Forwarded-For` values, read only when the client is one of `trusted`.
    pub(super) fn new<'a, I>(
        method: &Method,
        path: &str,
        request_id: &[u8],
        conn: &ConnInfo,
        trusted: &[Cidr],
        chain: impl Fn() -> I,
    ) -> Self
    where
        I: Iterator<Item = &'a [u8]>,
    {
        let forwarded = trusted.iter().any(|net| net.contains(conn.peer));
        let chain_len = if forwarded {
            chain().map(|v| v.len() + 2).sum::<usize>()
        } else {
            0
        };
        let client = conn.peer_ip.as_bytes();
        let mut text = SPARE
            .try_with(|spare| spare.borrow_mut().pop())
            .ok()
            .flatten()
            .unwrap_or_default();
        text.reserve(method.as_str().len() + path.len() + request_id.len() + client.len() + chain_len);
        // Method and path are text already; the others are header bytes.
        let mut ends = [0; 4];
        text.push_str(method.as_str());
        ends[METHOD] = end(&text);
        text.push_str(path);
        ends[PATH] = end(&text);
        push_lossy(&mut text, request_id);
        ends[REQUEST_ID] = end(&text);
        push_lossy(&mut text, client);
        ends[CLIENT] = end(&text);
        if forwarded {
            for (i, part) in chain().enumerate() {
                if i > 0 {
                    text.push_str(", ");
                }
                push_lossy(&mut text, part);
            }
        }
        Self { text, ends }
    }

    /// Field `i` (`-` if it were ever out of range).
    fn get(&self, i: usize) -> &str {
        let start = i.checked_sub(1).map_or(0, |prev| self.ends[prev] as usize);
        let end = self.ends.get(i).map_or(self.text.len(), |&end| end as usize);
        self.text.get(start..end).unwrap_or("-")
    }

    /// Writes the line of this request: the one format both transports use.
    pub(super) fn log(
        &self,
        status: u16,
        backend: &str,
        kind: RouteKind,
        decision: &str,
        elapsed: std::time::Duration,
        at: Instant,
    ) {
        let forwarded_for = self.get(FORWARDED_FOR);
        crate::telemetry::access::record(&crate::telemetry::access::Line {
            method: self.get(METHOD),
            path: self.get(PATH),
            status,
            backend,
            route: kind.as_str(),
            decision,
            elapsed,
            at,
            request_id: self.get(REQUEST_ID),
            client: self.get(CLIENT),
            forwarded_for: (!forwarded_for.is_empty()).then_some(forwarded_for),
        });
    }
}

impl Drop for LineFields {
    fn drop(&mut self) {
        let mut text = std::mem::take(&mut self.text);
        if text.capacity() <= SPARE_LARGEST {
            text.clear();
            // At thread exit the list may be gone: the string is freed.
            let _ = SPARE.try_with(|spare| {
                let mut spare = spare.borrow_mut();
                if spare.len() < SPARE_KEPT {
                    spare.push(text);
                }
            });
        }
    }
}

/// Where `text` ends, as [`LineFields`] keeps it.
fn end(text: &str) -> u32 {
    u32::try_from(text.len()).unwrap_or(u32::MAX)
}

/// Appends `bytes`, those that are not UTF-8 (a trusted proxy's `X-Forwarded-For` may carry
/// some) as U+FFFD. The check comes first: it is the fast one, and header values almost always
/// pass it.
fn push_lossy(text: &mut String, bytes: &[u8]) {
    match std::str::from_utf8(bytes) {
        Ok(valid) => text.push_str(valid),
        Err(_) => text.push_str(&String::from_utf8_lossy(bytes)),
    }
}

impl AccessLog {
    /// The line of `req` on `conn`, whose `X-Request-Id` is already the one it goes on with.
    pub(super) fn begin(enabled: bool, req: &Request<Incoming>, conn: &ConnInfo, trusted: &[Cidr]) -> Self {
        let fields = enabled.then(|| {
            let id = req
                .headers()
                .get(request_id::NAME)
                .map_or(&b""[..], HeaderValue::as_bytes);
            let chain = || {
                req.headers()
                    .get_all(&headers::X_FORWARDED_FOR)
                    .iter()
                    .map(HeaderValue::as_bytes)
            };
            LineFields::new(req.method(), req.uri().path(), id, conn, trusted, chain)
        });
        Self::with(fields)
    }

    /// The line of a request whose `fields` were read (`None`: the log is off).
    pub(super) fn with(fields: Option<LineFields>) -> Self {
        Self {
            fields,
            backend: None,
            decision: "none",
        }
    }

    /// The proxy answers `err` itself: the decision says so when the pinned session is lost.
    pub(super) fn answered_locally(&mut self, err: &ProxyError) {
        if let ProxyError::SessionLost = err {
            self.decision = "session-lost";
        }
    }

    /// Writes the line of a request answered with `status` at `at`, `elapsed` after it began.
    pub(super) fn finish(self, kind: RouteKind, status: u16, elapsed: std::time::Duration, at: Instant) {
        if let Some(fields) = &self.fields {
            let backend = self.backend.as_ref().map_or("-", |b| b.name.as_str());
            fields.log(status, backend, kind, self.decision, elapsed, at);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(path: &str, id: &[u8]) -> LineFields {
        let conn = ConnInfo::new("10.1.2.3:4000".parse().unwrap(), false);
        LineFields::new(&Method::GET, path, id, &conn, &[], std::iter::empty)
    }

    fn spare() -> usize {
        SPARE.with(|s| s.borrow().len())
    }

    #[test]
    fn a_thread_reuses_its_finished_lines_strings_and_keeps_few() {
        // Each test runs on a thread of its own: the list starts empty.
        drop(fields("/a/long/first/path/of/some/length", b"id-1"));
        assert_eq!(spare(), 1);
        let second = fields("/b", b"id-2");
        assert_eq!(spare(), 0, "taken back");
        let got = [METHOD, PATH, REQUEST_ID, CLIENT, FORWARDED_FOR].map(|i| second.get(i));
        assert_eq!(got, ["GET", "/b", "id-2", "10.1.2.3", ""], "nothing of the line before");
        let lossy = fields("/c", b"bad\xffbyte");
        assert_eq!(lossy.get(REQUEST_ID), "bad\u{fffd}byte");
        drop((second, lossy));

        let many: Vec<LineFields> = (0..SPARE_KEPT + 10).map(|_| fields("/x", b"id")).collect();
        drop(many);
        assert_eq!(spare(), SPARE_KEPT, "at most this many kept");
        let long = "/p".repeat(SPARE_LARGEST);
        let kept: Vec<LineFields> = (0..SPARE_KEPT).map(|_| fields("/x", b"id")).collect();
        drop(fields(&long, b"id"));
        assert_eq!(spare(), 0, "a long line's string is not kept");
        drop(kept);
    }
}
