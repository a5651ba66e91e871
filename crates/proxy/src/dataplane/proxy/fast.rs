//! The HTTP/1.1 fast path, for clients over plain TCP or TLS ([`client`]: rustls in the
//! connection's own task; HTTP/2 chosen by ALPN goes to hyper).
//!
//! A request head is parsed with `httparse` into borrowed slices in the connection's read
//! buffer; routing is decided from those bytes (the same [`decide`] as the hyper path); the head
//! is rewritten for the backend while copying (hop-by-hop fields dropped, `X-Forwarded-*` set)
//! and written with the body to a pooled backend connection **in the same task**, on the
//! runtime the worker runs the fast path on ([`FastRuntime`]: its own event loop or tokio); the response
//! head is rewritten the same way and the body streamed back by its framing. No `HeaderMap`, no
//! channel between tasks, no timer per connection (deadlines are numbers a sweeper per worker
//! checks: [`alarm`]), buffers reused from a per-worker free list, and an idle client connection
//! holds no buffer at all.
//!
//! Everything unusual goes to hyper instead, with the bytes already read replayed: HTTP/1.0,
//! `Transfer-Encoding` or `Upgrade`/`Expect` on the request, absolute-form targets, a missing
//! `Host`, `auth` and `attest` (buffered bodies, learning), admin writes (fan-out), `https`
//! backends. Once handed over, the connection stays with hyper. Framing is exactly as strict as
//! hyper's: conflicting `Content-Length`s, bad chunk sizes, obs-fold, invalid bytes are errors.

mod alarm;
mod buf;
mod chunked;
mod client;
mod clock;
mod lines;
mod rewind;

use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Method, Response, StatusCode};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use buf::in_use as fast_buffers_in_use;
pub use client::{ClientIo, Handoff, Plain, TlsClient};
pub use rewind::Rewind;

use self::alarm::{AlarmHandle, Alarms};
use self::buf::{Buf, STREAM_CHUNK};
use self::chunked::ChunkedScanner;
use self::clock::WallClock;
use self::lines::Lines;
use super::request_id;
use super::retry::{AfterRefusal, Attempts};
use super::{body::ProxyBody, ConnInfo, ProxyError, Worker};
use crate::kbs::RouteKind;
use crate::routing::route_cookie::{BackendId, Pin as RoutePin, Rejection, RouteCookieCodec, ENCODED_LEN};
use crate::routing::{CookieIssuer, Routing};
use crate::upstream::backend::{Backend, InFlight, UpstreamCause};
use rt::Stream;

use crate::control::metrics::AbortReason;
use crate::dataplane::server::MAX_HEADERS;
/// Largest backend response head.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Idle connections kept per backend per worker.
const IDLE_PER_BACKEND: usize = 512;
/// How long an idle backend connection is kept.
const BACKEND_IDLE: Duration = Duration::from_secs(60);

/// A runtime the fast path runs on: what [`rt::Runtime`] gives, and which of the worker's
/// pools keeps its idle backend connections.
pub trait FastRuntime: rt::Runtime {
    /// This runtime's pool in `state`.
    fn pool(state: &FastState) -> &Pool<Self::Stream>;
}

impl FastRuntime for rt::own::Own {
    fn pool(state: &FastState) -> &Pool<Self::Stream> {
        &state.own
    }
}

impl FastRuntime for rt::tokio::Tokio {
    fn pool(state: &FastState) -> &Pool<Self::Stream> {
        &state.tokio
    }
}

/// The fast path's per-worker state: idle backend connections and the client connections'
/// deadlines.
#[derive(Debug, Default)]
pub struct FastState {
    /// Idle backend connections, when the worker runs the fast path on its own loop.
    own: Pool<rt::own::TcpStream>,
    /// Idle backend connections, when the worker runs the fast path on tokio.
    tokio: Pool<rt::tokio::TcpStream>,
    alarms: Alarms,
    /// Unix time for route cookies, from each request's monotonic reading.
    clock: WallClock,
}

/// One worker's idle backend connections, most recently used last, per backend (a few;
/// searched in order, no hashing), each with until when it may be reused.
#[derive(Debug)]
pub struct Pool<S> {
    idle: Mutex<Vec<(BackendId, IdleList<S>)>>,
}

/// Idle connections to one backend, each with until when it may be reused.
type IdleList<S> = Vec<(S, Instant)>;

impl<S> Default for Pool<S> {
    fn default() -> Self {
        Self { idle: Mutex::default() }
    }
}

/// A backend connection whose response head is in `head`, counted in flight until dropped.
struct Upstream<'b, S> {
    conn: S,
    head: Buf,
    /// From the request sent to its response head's arrival.
    response_time: Duration,
    _in_flight: InFlight<&'b Backend>,
}

impl<S> Pool<S> {
    /// The most recently used idle connection to `id` that has not been idle too long at `now`.
    fn take(&self, id: BackendId, now: Instant) -> Option<S> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let at = idle.iter().position(|(b, _)| *b == id)?;
        let list = &mut idle[at].1;
        loop {
            match list.pop() {
                Some((conn, until)) if now < until => break Some(conn),
                Some(_stale) => {}
                None => break None,
            }
        }
    }

    fn put(&self, id: BackendId, conn: S, now: Instant) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = match idle.iter().position(|(b, _)| *b == id) {
            Some(at) => &mut idle[at].1,
            None => {
                // A list emptied by takes stays (with its memory: no allocation per request
                // when a backend's connections are all in use); gone backends' lists leave
                // when a new backend comes.
                idle.retain(|(_, list)| !list.is_empty());
                idle.push((id, Vec::new()));
                &mut idle.last_mut().expect("just pushed").1
            }
        };
        if list.len() < IDLE_PER_BACKEND {
            list.push((conn, now + BACKEND_IDLE));
        }
    }
}

/// What to do with a parsed request.
enum Prepared {
    /// The head is not complete yet.
    Partial,
    /// Forward it.
    Forward(Plan),
    /// Answer it here (an error of our own), then carry on or close.
    Local {
        resp: Response<ProxyBody>,
        head_len: usize,
        body_len: u64,
        close: bool,
        kind: RouteKind,
        is_head: bool,
        /// Its access-log line, as the hyper path logs its own answers.
        log: super::AccessLog,
    },
    /// Not for the fast path: hyper takes the connection over.
    Handoff,
    /// A head hyper would refuse: answer this status and close.
    Reject(StatusCode),
    /// Bytes hyper's HTTP/1 server closes on without an answer: close.
    Close,
}

/// A request ready to forward.
struct Plan {
    /// The routing table the decision was made with; the whole exchange uses it.
    routing: Arc<Routing>,
    head_len: usize,
    body_len: u64,
    /// The head for the backend, rewritten (any backend: it names none).
    out_head: Buf,
    backend: Arc<Backend>,
    issue_cookie: bool,
    session_bound: bool,
    kind: RouteKind,
    is_head: bool,
    client_close: bool,
    decision: &'static str,
    /// Unix seconds when the request was read: the issue time of a Set-Cookie.
    now: u64,
    /// For the access log only (method, path without query, who asked).
    log: Option<super::LineFields>,
}

/// What the fast path knows of a request before its head is parsed.
#[derive(Debug, Clone, Copy)]
struct Arrival {
    /// No request was read on the connection before it.
    first: bool,
    /// Unix seconds when it started (its first bytes were taken up): route cookies are checked
    /// and issued at this time.
    unix: u64,
}

/// How a response body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
    /// Until the backend closes.
    Close,
}

/// A hop-by-hop field: the static list (shared with the hyper path) or named in `Connection`.
fn is_hop_by_hop(name: &str, connection_tokens: &[&[u8]]) -> bool {
    super::headers::is_hop_by_hop_name(name)
        || connection_tokens
            .iter()
            .any(|t| name.as_bytes().eq_ignore_ascii_case(t))
}

/// What the fast path needs to know of a message's fields, found in one pass over them.
struct Fields<'a> {
    /// The tokens of every `Connection` field; `None` beyond [`MAX_TOKENS`] (such a message
    /// goes to hyper, or is refused).
    tokens: Option<Tokens<'a>>,
    /// The single Content-Length; `Err` when invalid or conflicting.
    content_length: Result<Option<u64>, BadContentLength>,
    /// The last `Transfer-Encoding` field, if any.
    transfer_encoding: Option<&'a [u8]>,
    /// How many `Host` fields.
    hosts: usize,
    /// An `Upgrade` or `Expect` field.
    upgrade_or_expect: bool,
}

impl Default for Fields<'_> {
    fn default() -> Self {
        Fields {
            tokens: Some(Tokens {
                items: [&[][..]; MAX_TOKENS],
                len: 0,
            }),
            content_length: Ok(None),
            transfer_encoding: None,
            hosts: 0,
            upgrade_or_expect: false,
        }
    }
}

impl<'a> Fields<'a> {
    /// Takes in `headers` (`self` starts as the default). Filled in place where the caller keeps
    /// it: a `Fields` returned by value was a copy of 184 bytes per message.
    #[inline(always)]
    fn scan(&mut self, headers: &'a [httparse::Header<'a>]) {
        for h in headers {
            let name = h.name;
            // By length first: most fields are none of these.
            match name.len() {
                4 if name.eq_ignore_ascii_case("host") => self.hosts += 1,
                6 if name.eq_ignore_ascii_case("expect") => self.upgrade_or_expect = true,
                7 if name.eq_ignore_ascii_case("upgrade") => self.upgrade_or_expect = true,
                10 if name.eq_ignore_ascii_case("connection") => self.add_tokens(h.value),
                14 if name.eq_ignore_ascii_case("content-length") => {
                    if let Ok(len) = self.content_length {
                        self.content_length = add_content_length(len, h.value);
                    }
                }
                17 if name.eq_ignore_ascii_case("transfer-encoding") => self.transfer_encoding = Some(h.value),
                _ => {}
            }
        }
    }

    fn add_tokens(&mut self, value: &'a [u8]) {
        let Some(t) = self.tokens.as_mut() else {
            return;
        };
        for token in value
            .split(|&b| b == b',')
            .map(<[u8]>::trim_ascii)
            .filter(|t| !t.is_empty())
        {
            let Some(slot) = t.items.get_mut(t.len) else {
                self.tokens = None;
                return;
            };
            *slot = token;
            t.len += 1;
        }
    }

    /// Whether the last transfer coding is `chunked`.
    fn chunked(&self) -> bool {
        self.transfer_encoding.is_some_and(|v| {
            v.rsplit(|&b| b == b',')
                .next()
                .is_some_and(|l| l.trim_ascii().eq_ignore_ascii_case(b"chunked"))
        })
    }
}

/// Most `X-Forwarded-For` fields in one request the fast path joins (more go to hyper).
const MAX_XFF: usize = 4;

/// Most `Connection` tokens handled without allocating.
const MAX_TOKENS: usize = 8;

/// `Connection` tokens of one message.
struct Tokens<'a> {
    items: [&'a [u8]; MAX_TOKENS],
    len: usize,
}

impl<'a> std::ops::Deref for Tokens<'a> {
    type Target = [&'a [u8]];
    fn deref(&self) -> &Self::Target {
        &self.items[..self.len]
    }
}

/// The last route cookie this connection presented and its verified pin: a keep-alive client
/// sends the same cookie with every request, so the MAC is checked once per connection.
struct CookieCache {
    /// The address of the issuer (secrets) that verified it, only compared: a reload installs
    /// a new issuer and so invalidates the cache.
    issuer: usize,
    value: [u8; ENCODED_LEN],
    pin: RoutePin,
}

impl CookieCache {
    /// Verifies `value`, skipping the MAC when it is the value verified last by this issuer.
    fn verify(
        cache: &mut Option<Self>,
        issuer: &Arc<CookieIssuer>,
        value: &[u8],
        now: u64,
    ) -> Result<RoutePin, Rejection> {
        let id = Arc::as_ptr(issuer) as usize;
        if let Some(c) = cache.as_ref().filter(|c| c.issuer == id && c.value[..] == *value) {
            return RouteCookieCodec::check_age(c.pin, now, issuer.max_age);
        }
        let pin = issuer.codec.verify(value, now, issuer.max_age)?;
        if let Ok(v) = value.try_into() {
            *cache = Some(Self {
                issuer: id,
                value: v,
                pin,
            });
        }
        Ok(pin)
    }
}

/// The time of the runtime's turn (see [`rt::Runtime::now`]): no clock read per request.
fn loop_now<R: rt::Runtime>() -> Instant {
    Instant::from_std(R::now())
}

/// A request-target byte the fast path forwards as it is: unreserved, sub-delims, `:@/?%`
/// (RFC 3986). Anything else (`#`, quotes, brackets, `<>`, backtick, spaces...) goes to hyper.
fn plain_target_byte(b: u8) -> bool {
    PLAIN_TARGET[usize::from(b)]
}

/// The punctuation a plain target may hold besides letters and digits.
const TARGET_PUNCTUATION: &[u8] = b"-._~!$&'()*+,;=:@/?%";

/// [`plain_target_byte`] as a table: a KBS path is some 30 bytes, each looked up once (a search
/// of the punctuation list per byte cost ~40 instructions, a tenth of a request's).
const PLAIN_TARGET: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = (b as u8).is_ascii_alphanumeric();
        b += 1;
    }
    let mut i = 0;
    while i < TARGET_PUNCTUATION.len() {
        table[TARGET_PUNCTUATION[i] as usize] = true;
        i += 1;
    }
    table
};

fn has_token(tokens: &[&[u8]], token: &[u8]) -> bool {
    tokens.iter().any(|t| t.eq_ignore_ascii_case(token))
}

/// No response head within the response timeout.
#[derive(Debug, Clone, Copy)]
struct NoHeadInTime;

/// A `Content-Length` that is not one non-negative number, or that disagrees with another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BadContentLength;

/// Adds one `Content-Length` field value to what earlier ones said: `Err` when invalid or
/// conflicting. A list ("5, 5") is refused, as hyper refuses it: forwarding it as it is would be
/// wrong (RFC 9110 §8.6); equal values in separate fields are allowed.
fn add_content_length(len: Option<u64>, value: &[u8]) -> Result<Option<u64>, BadContentLength> {
    let digits = value.trim_ascii();
    if digits.is_empty() {
        return Err(BadContentLength);
    }
    // Digits only, leading zeros allowed, no overflow: as hyper reads it.
    let mut n: u64 = 0;
    for &b in digits {
        if !b.is_ascii_digit() {
            return Err(BadContentLength);
        }
        n = n
            .checked_mul(10)
            .and_then(|n| n.checked_add(u64::from(b - b'0')))
            .ok_or(BadContentLength)?;
    }
    match len {
        Some(prev) if prev != n => Err(BadContentLength),
        _ => Ok(Some(n)),
    }
}

impl Worker {
    /// Keeps the deadlines of this worker's fast-path connections (see [`alarm`]) until
    /// dropped; after `shutdown`, wakes the idle ones so they close.
    pub(crate) async fn keep_fast_deadlines(self: Arc<Self>, idle_timeout: Duration, shutdown: CancellationToken) {
        let period = || alarm::sweep_period(idle_timeout.min(self.shared.routing.load().response_timeout));
        self.fast.alarms.sweep(shutdown, period).await;
    }

    /// Serves one client connection (plain or TLS) on the fast path's event loop; see the module docs.
    /// A connection the fast path does not serve goes to `handoff`: the bytes read so far (to be
    /// read again first) and the socket with its TLS session, out of the loop.
    // An async block, not an async fn: an async fn keeps its arguments twice in its state (moved
    // into locals beside the captured ones: 136 bytes here), and every idle connection holds it.
    #[allow(clippy::manual_async_fn)]
    pub(crate) fn serve_fast<R: FastRuntime, C: ClientIo>(
        self: Arc<Self>,
        mut stream: C,
        conn: Arc<ConnInfo>,
        idle_timeout: Duration,
        max_head: usize,
        shutdown: CancellationToken,
        handoff: impl FnOnce(Vec<u8>, Handoff),
    ) -> impl Future<Output = ()> {
        async move {
            let mut buf = Buf::default();
            let mut cookie_cache: Option<CookieCache> = None;
            let mut routing_cache = arc_swap::Cache::new(&*self.shared.routing);
            // The connection's deadline (idle waits, heads, response deadlines) and shutdown waiter.
            let mut alarm = self.fast.alarms.register();
            // When the connection last finished something: idle time counts from here.
            let mut last = loop_now::<R>();
            // No request read yet: the bytes are the connection's first.
            let mut first = true;
            loop {
                if buf.is_empty() {
                    // Idle between requests: hold no buffer, wake on data, the idle timeout or shutdown.
                    buf.release();
                    alarm.set(last + idle_timeout);
                    loop {
                        // Data first: a connection woken by its next request returns here without
                        // polling its alarm.
                        tokio::select! {
                            biased;
                            r = stream.readable() => if r.is_err() { return },
                            () = alarm.rung(true) => return,
                        }
                        if shutdown.is_cancelled() {
                            return; // a request arriving with the shutdown is not started
                        }
                        // The first read needs no deadline: a head mostly comes whole in one read.
                        buf = Buf::take();
                        match stream.try_read_vec(&mut buf) {
                            Ok(0) => return,
                            Ok(_) => break,
                            // Readiness left over from the last read that emptied the socket: now
                            // cleared, so wait again, holding no buffer.
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => buf.release(),
                            Err(_) => return,
                        }
                    }
                } else if shutdown.is_cancelled() {
                    return; // pipelined requests are not started once stopping
                }
                // The request's time (the loop's turn's): its deadlines and timings count from here.
                let started = loop_now::<R>();
                let arrival = Arrival {
                    first,
                    unix: self.fast.clock.unix_secs(started),
                };
                let mut head_deadline_set = false;
                // Read until the head is complete.
                let mut prepared = loop {
                    let routing = routing_cache.load();
                    match self.prepare(&buf, &conn, routing, max_head, &mut cookie_cache, arrival) {
                        Prepared::Partial => {}
                        other => break other,
                    }
                    if buf.len() >= max_head {
                        break Prepared::Reject(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
                    }
                    // The rest of the head is due within the idle timeout of its first bytes.
                    if !std::mem::replace(&mut head_deadline_set, true) {
                        alarm.set(started + idle_timeout);
                    }
                    tokio::select! {
                        biased;
                        r = stream.read_vec(&mut buf) => match r {
                            Ok(0) | Err(_) => return,
                            Ok(_) => {}
                        },
                        () = alarm.rung(false) => return,
                    }
                };
                first = false;
                match prepared {
                    Prepared::Partial => unreachable!("handled in the loop"),
                    Prepared::Close => return,
                    Prepared::Handoff => {
                        if let Ok(conn) = stream.into_handoff() {
                            handoff(buf.into_vec(), conn);
                        }
                        return;
                    }
                    Prepared::Reject(status) => {
                        let head = format!(
                            "HTTP/1.1 {} {}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                            status.as_u16(),
                            status.canonical_reason().unwrap_or("")
                        );
                        let _ = stream.write_all(head.as_bytes()).await;
                        return;
                    }
                    Prepared::Local {
                        resp,
                        head_len,
                        body_len,
                        close,
                        kind,
                        is_head,
                        log,
                    } => {
                        // Skip (discard) the request body, then answer.
                        let keep = match self.discard_body(&mut stream, &mut buf, head_len, body_len).await {
                            Ok(()) => !close,
                            Err(abort) => {
                                self.aborted(abort, "-");
                                false
                            }
                        };
                        let status = resp.status().as_u16();
                        self.shared.stats.count_local(kind, status);
                        let done = Instant::now();
                        let elapsed = done.saturating_duration_since(started);
                        self.latency.observe(kind, elapsed);
                        log.finish(kind, status, elapsed, done.into_std());
                        let answer = local_answer(resp, is_head, !keep);
                        if stream.write_all(&answer).await.is_err() {
                            self.aborted(Abort::ClientGone, "-");
                            return;
                        }
                        if !keep {
                            return;
                        }
                        last = loop_now::<R>();
                    }
                    Prepared::Forward(ref mut plan) => {
                        let close = plan.client_close;
                        let exchange = self.forward::<R, C>(&mut stream, &mut buf, &conn, plan, started, &mut alarm);
                        match exchange.await {
                            Ok(Some(done)) if !close => last = done,
                            // An abort was counted and logged where it happened.
                            Ok(_) | Err(_) => {
                                stream.shutdown_write();
                                return;
                            }
                        }
                    }
                }
            }
        }
    }

    /// Parses the head in `buf` and decides; see [`Prepared`].
    fn prepare(
        &self,
        buf: &[u8],
        conn: &ConnInfo,
        routing: &Arc<Routing>,
        max_head: usize,
        cookie_cache: &mut Option<CookieCache>,
        arrival: Arrival,
    ) -> Prepared {
        let Arrival { first, unix: now } = arrival;
        // HTTP/2 with prior knowledge: hyper's, when these are the connection's first bytes
        // (RFC 9113 §3.3). After HTTP/1.1 requests, hyper's HTTP/1 server, on the parse error,
        // drops leading CR and LF bytes and closes without an answer if the whole preface
        // follows; a part of it fails on the version with a 400, here as there.
        const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
        if first {
            let n = buf.len().min(H2_PREFACE.len());
            if buf[..n] == H2_PREFACE[..n] {
                return if n == H2_PREFACE.len() {
                    Prepared::Handoff
                } else {
                    Prepared::Partial
                };
            }
        } else {
            let start = buf.iter().position(|&b| b != b'\r' && b != b'\n').unwrap_or(buf.len());
            if buf[start..].starts_with(H2_PREFACE) {
                return Prepared::Close;
            }
        }
        let mut storage = header_storage();
        let mut req = httparse::Request::new(&mut []);
        let head_len = match req.parse_with_uninit_headers(buf, &mut storage) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Prepared::Partial,
            Err(httparse::Error::TooManyHeaders) => {
                return Prepared::Reject(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
            }
            // A connection's first request that does not parse (`HTTP/2.0` after empty lines,
            // say): whether hyper answers 400 or closes depends on how much its version sniffing
            // had read at the error, so hyper gets the bytes, as on the hyper path.
            Err(_) if first => return Prepared::Handoff,
            Err(_) => return Prepared::Reject(StatusCode::BAD_REQUEST),
        };
        if head_len > max_head {
            return Prepared::Reject(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
        }
        let (Some(method), Some(target), Some(1)) = (req.method, req.path, req.version) else {
            return Prepared::Handoff; // HTTP/1.0 and oddities: hyper's rules apply
        };
        let headers: &[httparse::Header<'_>] = req.headers;
        let mut fields = Fields::default();
        fields.scan(headers);
        let Some(tokens) = &fields.tokens else {
            return Prepared::Handoff;
        };
        if !target.starts_with('/')
            || fields.hosts != 1
            || fields.transfer_encoding.is_some()
            || fields.upgrade_or_expect
        {
            return Prepared::Handoff;
        }
        let body_len = match fields.content_length {
            Ok(n) => n.unwrap_or(0),
            Err(BadContentLength) => return Prepared::Reject(StatusCode::BAD_REQUEST),
        };
        let method_str = method;
        let Ok(method) = Method::from_bytes(method.as_bytes()) else {
            return Prepared::Reject(StatusCode::BAD_REQUEST);
        };
        // hyper's rules for these: CONNECT; a target with a fragment or a byte `http::Uri`
        // may refuse; `Connection` naming a field that frames or addresses the message (it
        // must not be dropped, and removing it would let a body be read as a second request).
        if method == Method::CONNECT
            || !target.bytes().all(plain_target_byte)
            || ["content-length", "host"]
                .iter()
                .any(|f| has_token(tokens, f.as_bytes()))
        {
            return Prepared::Handoff;
        }
        let path = memchr::memchr(b'?', target.as_bytes()).map_or(target, |q| &target[..q]);
        let kind = RouteKind::classify(&method, path);
        if matches!(kind, RouteKind::Auth | RouteKind::Attest)
            || routing.admin_fanout.as_ref().is_some_and(|f| f.matches(&method, path))
        {
            return Prepared::Handoff;
        }
        let client_close = has_token(tokens, b"close");

        // Routing, from the borrowed header bytes: the same step as the hyper path, with the
        // connection's cookie cache in front of the MAC.
        let issuer = &routing.cookie;
        let verify = |v: &[u8]| CookieCache::verify(cookie_cache, issuer, v, now);
        let super::Route {
            backend,
            issue_cookie,
            session_bound,
            decision,
        } = match self.route(headers, kind, routing, now, verify) {
            Ok(route) => route,
            Err((err, backend)) => {
                let fields = routing
                    .access_log
                    .then(|| self.local_fields(&method, path, headers, conn, routing));
                let mut log = super::AccessLog::with(fields);
                log.backend = backend;
                log.answered_locally(&err);
                let resp = err.into_response(kind, &self.shared.stats);
                return Prepared::Local {
                    resp,
                    head_len,
                    body_len,
                    close: client_close,
                    kind,
                    is_head: method == Method::HEAD,
                    log,
                };
            }
        };
        if backend.scheme != http::uri::Scheme::HTTP {
            return Prepared::Handoff; // TLS to the backend: hyper's client does it
        }

        // The head for the backend: request line, end-to-end fields, X-Forwarded-*, and one
        // X-Request-Id (the client's first acceptable one, else a new one).
        let mut out = Buf::take();
        let mut lines = Lines::new(buf);
        lines.request_line(&mut out, method_str, target);
        let mut xff: [&[u8]; MAX_XFF] = [b""; MAX_XFF];
        let mut xff_fields = 0;
        let mut host: &[u8] = b"";
        let mut length_sent = false;
        let mut request_id: Option<&[u8]> = None;
        for h in headers {
            let name = h.name;
            if is_hop_by_hop(name, tokens) {
                continue;
            }
            if name.len() == 14 && name.eq_ignore_ascii_case("content-length") {
                // Repeats (all equal, checked above) go as one field, as hyper sends them.
                if std::mem::replace(&mut length_sent, true) {
                    continue;
                }
            }
            if name.eq_ignore_ascii_case("x-forwarded-for") {
                // Joined below, in order, with the client's address last.
                let Some(slot) = xff.get_mut(xff_fields) else {
                    return Prepared::Handoff;
                };
                *slot = h.value;
                xff_fields += 1;
                continue;
            }
            if name.eq_ignore_ascii_case("x-forwarded-proto") || name.eq_ignore_ascii_case("x-forwarded-host") {
                continue;
            }
            if name.len() == request_id::NAME.len() && name.eq_ignore_ascii_case(request_id::NAME) {
                if request_id.is_none() && request_id::acceptable(h.value) {
                    request_id = Some(h.value);
                    lines.field(&mut out, name, h.value);
                }
                continue;
            }
            if name.eq_ignore_ascii_case("host") {
                host = h.value;
            }
            lines.field(&mut out, name, h.value);
        }
        lines.flush(&mut out);
        out.extend_from_slice(b"x-forwarded-for: ");
        for prev in &xff[..xff_fields] {
            out.extend_from_slice(prev);
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(conn.peer_ip.as_bytes());
        out.extend_from_slice(if conn.tls {
            b"\r\nx-forwarded-proto: https\r\n"
        } else {
            b"\r\nx-forwarded-proto: http\r\n"
        });
        out.extend_from_slice(b"x-forwarded-host: ");
        out.extend_from_slice(host);
        out.extend_from_slice(b"\r\n");
        let generated;
        let request_id = match request_id {
            Some(id) => id,
            None => {
                generated = self.request_ids.generate();
                out.extend_from_slice(b"x-request-id: ");
                out.extend_from_slice(&generated);
                out.extend_from_slice(b"\r\n");
                &generated[..]
            }
        };
        out.extend_from_slice(b"\r\n");

        let log = routing.access_log.then(|| {
            let chain = || xff[..xff_fields].iter().copied();
            super::LineFields::new(&method, path, request_id, conn, &routing.trusted_proxies, chain)
        });
        Prepared::Forward(Plan {
            routing: Arc::clone(routing),
            head_len,
            body_len,
            out_head: out,
            backend,
            issue_cookie,
            session_bound,
            kind,
            is_head: method == Method::HEAD,
            client_close,
            decision,
            now,
            log,
        })
    }

    /// Reads and drops a request body of `len` bytes following the head.
    async fn discard_body<C: ClientIo>(
        &self,
        stream: &mut C,
        buf: &mut Vec<u8>,
        head_len: usize,
        len: u64,
    ) -> Result<(), Abort> {
        let in_buf = (buf.len() - head_len) as u64;
        if in_buf >= len {
            buf.drain(..head_len + len as usize);
            return Ok(());
        }
        let mut left = len - in_buf;
        buf.clear();
        while left > 0 {
            let n = stream.read_vec(buf).await.map_err(|_| Abort::ClientBody)?;
            if n == 0 {
                return Err(Abort::ClientBody);
            }
            let take = (n as u64).min(left);
            left -= take;
            buf.drain(..take as usize);
        }
        Ok(())
    }

    /// Forwards one planned request and streams the response back. `Ok(Some(t))`: done at `t`,
    /// and the client connection can take another request; `Ok(None)`/`Err`: close it.
    async fn forward<R: FastRuntime, C: ClientIo>(
        &self,
        client: &mut C,
        buf: &mut Buf,
        conn: &ConnInfo,
        plan: &mut Plan,
        started: Instant,
        alarm: &mut AlarmHandle<'_>,
    ) -> Result<Option<Instant>, Abort> {
        let in_buf = (buf.len() - plan.head_len) as u64;
        let body_in_buf = in_buf.min(plan.body_len) as usize;
        let whole_body_here = in_buf >= plan.body_len;
        let body_start = plan.head_len;
        // The head and the body bytes at hand go in one write; the same buffer later carries
        // the response head.
        let mut out = std::mem::take(&mut plan.out_head);
        out.extend_from_slice(&buf[body_start..body_start + body_in_buf]);
        let mut attempts = Attempts::default();

        // Connect (pooled, else new), send, and wait for the response head; a stale pooled
        // connection or a refused connect may be retried when nothing reached a backend.
        let mut fresh_only = false;
        let mut up = loop {
            let backend = &plan.backend;
            let pooled_conn = if fresh_only {
                None
            } else {
                R::pool(&self.fast).take(backend.id, started)
            };
            let (pooled, mut bc) = match pooled_conn {
                Some(c) => (true, c),
                None => match self.connect(backend).await {
                    Ok(c) => (false, c),
                    Err(e) => {
                        let cause = UpstreamCause::of_connect(&e);
                        let next = attempts.refused(
                            &plan.routing,
                            backend,
                            cause,
                            plan.kind,
                            plan.session_bound,
                            whole_body_here,
                        );
                        let err = match next {
                            AfterRefusal::RetryOn(next) => {
                                plan.backend = next;
                                plan.issue_cookie = true;
                                plan.session_bound = false;
                                plan.decision = "retried";
                                fresh_only = false;
                                continue;
                            }
                            AfterRefusal::SessionLost => ProxyError::SessionLost,
                            AfterRefusal::GiveUp => ProxyError::Connect {
                                backend: backend.name.clone(),
                                source: e,
                            },
                        };
                        return self.fail(client, buf, plan, err, started).await;
                    }
                },
            };
            let in_flight = InFlight::new(&**backend);
            let sent = bc.write_all(&out).await;
            let mut rbuf = Buf::take();
            let answered = match sent {
                Ok(()) => {
                    let more = plan.body_len - body_in_buf as u64;
                    let mut sent_at = started;
                    if more > 0 {
                        if let Err(abort) = self.stream_request_body(client, &mut bc, more).await {
                            return Err(self.aborted(abort, &plan.backend.name));
                        }
                        sent_at = loop_now::<R>();
                    }
                    // The response head is due within the response timeout of the request sent.
                    alarm.set(sent_at + plan.routing.response_timeout);
                    tokio::select! {
                        biased;
                        // The loop's time of the turn the head came in: no clock read of our own.
                        head = read_response_head(&mut bc, &mut rbuf) => Ok(head.map(|()| {
                            loop_now::<R>().saturating_duration_since(sent_at)
                        })),
                        () = alarm.rung(false) => Err(NoHeadInTime),
                    }
                }
                Err(_) => Ok(Err(HeadError::Closed)),
            };
            match answered {
                Ok(Ok(response_time)) => {
                    break Upstream {
                        conn: bc,
                        head: rbuf,
                        response_time,
                        _in_flight: in_flight,
                    }
                }
                Ok(Err(HeadError::Closed)) if pooled && whole_body_here => {
                    // The backend had closed the pooled connection: once more, on a new one.
                    drop(in_flight);
                    fresh_only = true;
                    continue;
                }
                Ok(Err(e)) => {
                    backend.record_failure();
                    backend.stats.count_error(match e {
                        HeadError::Closed => UpstreamCause::Reset,
                        HeadError::Invalid => UpstreamCause::BadResponse,
                    });
                    let err = ProxyError::BadResponse {
                        backend: backend.name.clone(),
                    };
                    return self.fail(client, buf, plan, err, started).await;
                }
                Err(NoHeadInTime) => {
                    backend.record_failure();
                    backend.stats.count_error(UpstreamCause::ResponseTimeout);
                    let err = ProxyError::Timeout {
                        backend: backend.name.clone(),
                    };
                    return self.fail(client, buf, plan, err, started).await;
                }
            }
        };
        // The request is consumed from the client buffer; what follows is the next request.
        let consumed = (plan.head_len + body_in_buf).min(buf.len());
        buf.drain(..consumed);

        let backend = &plan.backend;
        out.clear();
        let result = self.relay_response(client, &mut up, out, conn, plan).await;
        if let Err(Relay::BadHead) = result {
            backend.record_failure();
            backend.stats.count_error(UpstreamCause::BadResponse);
            let err = ProxyError::BadResponse {
                backend: backend.name.clone(),
            };
            return self.fail(client, buf, plan, err, started).await;
        }
        backend.record_success();
        let done = loop_now::<R>();
        let elapsed = done.saturating_duration_since(started);
        self.latency.observe(plan.kind, elapsed);
        match result {
            Ok((status, reuse_backend, keep_client)) => {
                if reuse_backend {
                    R::pool(&self.fast).put(backend.id, up.conn, done);
                }
                log_access(plan, status, elapsed, done);
                Ok(keep_client.then_some(done))
            }
            Err(Relay::Broken(status)) => {
                // As on the hyper path, whose access line is written at the head: the status
                // the client was sent.
                log_access(plan, status, elapsed, done);
                Err(self.aborted(Abort::ResponseBody(status), &plan.backend.name))
            }
            Err(Relay::BadHead) => unreachable!("answered above"),
        }
    }

    /// Counts and logs an aborted exchange (with `backend`, or `-`); returns it for the caller
    /// to close on.
    fn aborted(&self, abort: Abort, backend: &str) -> Abort {
        self.shared.stats.count_aborted(abort.reason());
        tracing::debug!(backend, error = %abort, "exchange aborted; closing the client connection");
        abort
    }

    async fn connect<S: Stream>(&self, backend: &Backend) -> io::Result<S> {
        let timeout = self.shared.connect_timeout;
        let s: S = tokio::time::timeout(timeout, connect_authority(backend.authority.as_str()))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
        s.set_nodelay(true)?;
        Ok(s)
    }

    /// Copies `more` request body bytes from the client to the backend (the buffer held only
    /// body bytes, all sent already).
    async fn stream_request_body<C: ClientIo, S: Stream>(
        &self,
        client: &mut C,
        backend: &mut S,
        mut more: u64,
    ) -> Result<(), Abort> {
        let mut chunk = Buf::take();
        chunk.resize(STREAM_CHUNK, 0);
        while more > 0 {
            let limit = usize::try_from(more).unwrap_or(usize::MAX).min(STREAM_CHUNK);
            let n = client.read(&mut chunk[..limit]).await.map_err(|_| Abort::ClientBody)?;
            if n == 0 {
                return Err(Abort::ClientBody);
            }
            backend.write_all(&chunk[..n]).await.map_err(|_| Abort::BackendBody)?;
            more -= n as u64;
        }
        Ok(())
    }

    /// Writes the response head (rewritten) and streams the body. Returns (status, whether the
    /// backend connection can be reused, whether the client connection can); nothing is
    /// written when the head is refused.
    async fn relay_response<C: ClientIo, S: Stream>(
        &self,
        client: &mut C,
        up: &mut Upstream<'_, S>,
        mut out: Buf,
        conn: &ConnInfo,
        plan: &Plan,
    ) -> Result<(u16, bool, bool), Relay> {
        let (backend_conn, rbuf) = (&mut up.conn, &up.head[..]);
        let routing = &plan.routing;
        let (status, framing, head_len, backend_close) = {
            let mut storage = header_storage();
            let mut resp = httparse::Response::new(&mut []);
            let head_len = match parse_response(&mut resp, rbuf, &mut storage) {
                Ok(httparse::Status::Complete(n)) => n,
                _ => return Err(Relay::BadHead),
            };
            let status = resp.code.unwrap_or(502);
            let headers: &[httparse::Header<'_>] = resp.headers;
            let mut fields = Fields::default();
            fields.scan(headers);
            let Some(tokens) = &fields.tokens else {
                return Err(Relay::BadHead);
            };
            let framing = if plan.is_head || status == 204 || status == 304 {
                Framing::None
            } else if fields.chunked() {
                Framing::Chunked
            } else if fields.transfer_encoding.is_some() {
                return Err(Relay::BadHead); // a transfer coding that does not end in chunked: not framable
            } else {
                match fields.content_length {
                    Ok(Some(n)) => Framing::Length(n),
                    Ok(None) => Framing::Close,
                    Err(BadContentLength) => return Err(Relay::BadHead),
                }
            };
            let backend_close = has_token(tokens, b"close") || resp.version == Some(0);
            let mut lines = Lines::new(rbuf);
            lines.status_line(&mut out, status, resp.reason.unwrap_or(""));
            for h in headers {
                let is_length = h.name.len() == 14 && h.name.eq_ignore_ascii_case("content-length");
                // Transfer-Encoding stays: a chunked body is passed through as it is; a
                // Content-Length beside it goes (RFC 9112 §6.3).
                if framing == Framing::Chunked && is_length {
                    continue;
                }
                // The framing fields stay even when `Connection` names them: the client needs them.
                let framing_field =
                    is_length || (h.name.len() == 17 && h.name.eq_ignore_ascii_case("transfer-encoding"));
                if framing_field || !is_hop_by_hop(h.name, tokens) {
                    lines.field(&mut out, h.name, h.value);
                }
            }
            lines.flush(&mut out);
            (status, framing, head_len, backend_close)
        };
        let backend = &plan.backend;
        backend.stats.count_response(plan.kind, status);
        backend
            .stats
            .response_latency
            .observe(self.latency.slot, up.response_time);
        if plan.issue_cookie {
            let value = routing.cookie.set_cookie(backend.id, plan.now, conn.tls);
            out.extend_from_slice(b"set-cookie: ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
            self.shared.stats.cookies_issued.fetch_add(1, Ordering::Relaxed);
            backend.stats.sessions_pinned.fetch_add(1, Ordering::Relaxed);
        }
        let keep_client = !plan.client_close && framing != Framing::Close;
        if !keep_client {
            out.extend_from_slice(b"connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");

        // Body bytes already read come along with the head: one write for small responses.
        let body_here = &rbuf[head_len..];
        let result = match framing {
            Framing::None => {
                let clean = body_here.is_empty();
                client.write_all(&out).await.map(|()| (clean, keep_client))
            }
            Framing::Length(n) => {
                let take = (body_here.len() as u64).min(n) as usize;
                let clean = body_here.len() as u64 <= n;
                out.extend_from_slice(&body_here[..take]);
                let sent = client.write_all(&out).await;
                match sent {
                    Ok(()) => copy_exact(backend_conn, client, n - take as u64, &mut out)
                        .await
                        .map(|()| (clean, keep_client)),
                    Err(e) => Err(e),
                }
            }
            Framing::Chunked => {
                let mut scanner = ChunkedScanner::default();
                match scanner.feed(body_here) {
                    Ok(Some(end)) => {
                        out.extend_from_slice(&body_here[..end]);
                        let clean = end == body_here.len();
                        client.write_all(&out).await.map(|()| (clean, keep_client))
                    }
                    Ok(None) => {
                        out.extend_from_slice(body_here);
                        match client.write_all(&out).await {
                            Ok(()) => copy_chunked(backend_conn, client, &mut scanner, &mut out)
                                .await
                                .map(|clean| (clean, keep_client)),
                            Err(e) => Err(e),
                        }
                    }
                    Err(_) => Err(io::Error::new(io::ErrorKind::InvalidData, "bad chunked body")),
                }
            }
            Framing::Close => {
                out.extend_from_slice(body_here);
                match client.write_all(&out).await {
                    Ok(()) => copy_to_eof(backend_conn, client, &mut out)
                        .await
                        .map(|()| (false, false)),
                    Err(e) => Err(e),
                }
            }
        };
        match result {
            Ok((clean, keep)) => Ok((status, clean && !backend_close, keep)),
            Err(_) => Err(Relay::Broken(status)),
        }
    }

    /// Answers an error of our own before any response byte was sent. Boxed: rare, and its
    /// state (the error) would otherwise enlarge the exchange's future, which is part of every
    /// connection's task.
    fn fail<'a, C: ClientIo>(
        &'a self,
        client: &'a mut C,
        buf: &'a mut Vec<u8>,
        plan: &'a Plan,
        err: ProxyError,
        started: Instant,
    ) -> Pin<Box<dyn Future<Output = Result<Option<Instant>, Abort>> + Send + 'a>> {
        Box::pin(async move {
            tracing::debug!(route = plan.kind.as_str(), error = %err, "answered by the proxy");
            let resp = err.into_response(plan.kind, &self.shared.stats);
            let status = resp.status().as_u16();
            self.shared.stats.count_local(plan.kind, status);
            let done = Instant::now();
            let elapsed = done.saturating_duration_since(started);
            self.latency.observe(plan.kind, elapsed);
            log_access(plan, status, elapsed, done);
            // The body may not have been read in full: close after answering.
            buf.clear();
            let _ = client.write_all(&local_answer(resp, plan.is_head, true)).await;
            Ok(None)
        })
    }
}

/// Why a response was not relayed.
enum Relay {
    /// The head is not one the fast path can frame; nothing was sent to the client yet.
    BadHead,
    /// A connection failed midway, after the head with this status went to the client.
    Broken(u16),
}

/// Why an exchange on the fast path ended its client connection early (after the answer was
/// begun, or while a request body was moving). Counted in `kbs_proxy_aborted_exchanges_total`
/// and logged at debug: the client sees its connection close, as hyper closes it.
#[derive(Debug, Clone, Copy, thiserror::Error)]
enum Abort {
    /// The client closed or failed while its request body was read.
    #[error("the client closed or failed while sending its request body")]
    ClientBody,
    /// The backend failed while taking the request body.
    #[error("the KBS replica failed while taking the request body")]
    BackendBody,
    /// The response body broke off (either side) after its head was sent.
    #[error("the response body broke off after a {0} head was sent")]
    ResponseBody(u16),
    /// The client went away while its answer was written.
    #[error("the client went away before its answer was written")]
    ClientGone,
}

impl Abort {
    /// Its counter's reason.
    fn reason(self) -> AbortReason {
        match self {
            Self::ClientBody => AbortReason::ClientBody,
            Self::BackendBody => AbortReason::BackendBody,
            Self::ResponseBody(_) => AbortReason::ResponseBody,
            Self::ClientGone => AbortReason::ClientGone,
        }
    }
}

/// Why no response head was read.
enum HeadError {
    /// The backend closed (or reset) before sending anything.
    Closed,
    /// Something that is not an HTTP/1.1 response head, or a too large one.
    Invalid,
}

/// Reads a response head into `rbuf`, skipping 1xx informational responses. Only finds where
/// the head ends: it is parsed (and judged) once, when relayed.
async fn read_response_head<S: Stream>(bc: &mut S, rbuf: &mut Vec<u8>) -> Result<(), HeadError> {
    loop {
        if let Some(end) = head_end(rbuf) {
            // "HTTP/1.1 1xx": informational, parsed to be sure (rare).
            if rbuf.get(9) != Some(&b'1') {
                return Ok(());
            }
            if !informational(&rbuf[..end])? {
                return Ok(());
            }
            rbuf.drain(..end);
            continue;
        }
        let empty = rbuf.is_empty();
        // Incomplete (rare: a head mostly comes in one read): refuse garbage without waiting.
        if !empty && (rbuf.len() >= MAX_RESPONSE_HEAD || !could_be_response_head(rbuf)) {
            return Err(HeadError::Invalid);
        }
        if rbuf.capacity() == rbuf.len() {
            rbuf.reserve(STREAM_CHUNK);
        }
        match bc.read_vec(rbuf).await {
            Ok(0) if empty => return Err(HeadError::Closed),
            Ok(0) => return Err(HeadError::Invalid),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) if empty => return Err(HeadError::Closed),
            Err(_) => return Err(HeadError::Invalid),
        }
    }
}

// The two helpers below hold httparse's field array (3.2 KiB) in their own stack frames: in
// `read_response_head` it would be kept across its await, in the exchange's future, which is
// part of every connection's task.

/// Room for the fields of one head, left uninitialized: httparse writes what it parses (filling
/// 100 empty fields first costs more than parsing a typical head).
fn header_storage<'b>() -> [MaybeUninit<httparse::Header<'b>>; MAX_HEADERS] {
    [const { MaybeUninit::uninit() }; MAX_HEADERS]
}

/// Parses a response head with httparse's default rules (hyper's client's) into `storage`.
fn parse_response<'h, 'b>(
    resp: &mut httparse::Response<'h, 'b>,
    head: &'b [u8],
    storage: &'h mut [MaybeUninit<httparse::Header<'b>>],
) -> httparse::Result<usize> {
    httparse::ParserConfig::default().parse_response_with_uninit_headers(resp, head, storage)
}

/// Whether the complete response head `head` is a 1xx to skip (`Ok(false)`: a final answer).
fn informational(head: &[u8]) -> Result<bool, HeadError> {
    let mut storage = header_storage();
    let mut resp = httparse::Response::new(&mut []);
    match parse_response(&mut resp, head, &mut storage) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err(HeadError::Invalid),
    }
    match resp.code {
        Some(101) => Err(HeadError::Invalid), // no upgrade was asked for
        Some(100..=199) => Ok(true),
        _ => Ok(false),
    }
}

/// Whether the incomplete `head` may still become a valid response head.
fn could_be_response_head(head: &[u8]) -> bool {
    let mut storage = header_storage();
    parse_response(&mut httparse::Response::new(&mut []), head, &mut storage).is_ok()
}

/// Connects to a backend's `host:port`: an address as written straight away, a name through a
/// lookup (tokio's: the own loop's thread enters a tokio runtime's handle), each address it
/// gives in turn until one connects.
async fn connect_authority<S: Stream>(authority: &str) -> io::Result<S> {
    if let Ok(addr) = authority.parse::<SocketAddr>() {
        return S::connect(addr).await;
    }
    let mut last = None;
    for addr in tokio::net::lookup_host(authority).await? {
        match S::connect(addr).await {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, "the name has no address")))
}

/// The length of the head at the start of `buf` through its empty line, if it is all there.
/// Lines end in CRLF or a bare LF, as `httparse` reads them.
fn head_end(buf: &[u8]) -> Option<usize> {
    memchr::memchr_iter(b'\n', buf).find_map(|i| match buf.get(i + 1..) {
        Some([b'\n', ..]) => Some(i + 2),
        Some([b'\r', b'\n', ..]) => Some(i + 3),
        _ => None,
    })
}

/// Copies exactly `n` bytes from `from` to `to`.
async fn copy_exact<S: Stream, C: ClientIo>(from: &S, to: &mut C, mut n: u64, scratch: &mut Vec<u8>) -> io::Result<()> {
    if n == 0 {
        return Ok(()); // the common case: the whole body came with the head
    }
    init_scratch(scratch);
    while n > 0 {
        let want = usize::try_from(n).unwrap_or(usize::MAX).min(STREAM_CHUNK);
        let got = from.read(&mut scratch[..want]).await?;
        if got == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        to.write_all(&scratch[..got]).await?;
        n -= got as u64;
    }
    Ok(())
}

/// Copies a chunked body until its end; `Ok(false)` when the backend sent bytes past it.
async fn copy_chunked<S: Stream, C: ClientIo>(
    from: &S,
    to: &mut C,
    scanner: &mut ChunkedScanner,
    scratch: &mut Vec<u8>,
) -> io::Result<bool> {
    init_scratch(scratch);
    loop {
        let got = from.read(scratch).await?;
        if got == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let read = &scratch[..got];
        match scanner.feed(read) {
            Ok(Some(end)) => {
                to.write_all(&read[..end]).await?;
                return Ok(end == got);
            }
            Ok(None) => to.write_all(read).await?,
            Err(_) => return Err(io::Error::new(io::ErrorKind::InvalidData, "bad chunked body")),
        }
    }
}

/// Copies until `from` closes.
async fn copy_to_eof<S: Stream, C: ClientIo>(from: &S, to: &mut C, scratch: &mut Vec<u8>) -> io::Result<()> {
    init_scratch(scratch);
    loop {
        let got = from.read(scratch).await?;
        if got == 0 {
            return Ok(());
        }
        to.write_all(&scratch[..got]).await?;
    }
}

/// Makes `scratch` [`STREAM_CHUNK`] initialized bytes to read into (once per body, not per read).
fn init_scratch(scratch: &mut Vec<u8>) {
    scratch.clear();
    scratch.resize(STREAM_CHUNK, 0);
}

/// A response the proxy made (a `Full` body) as HTTP/1.1 bytes; to a `HEAD` request, without the
/// body (RFC 9110 §9.3.2). Not async: the response's parts never live across an await, so the
/// futures that write these bytes (an exchange's, an idle connection's) stay small.
fn local_answer(resp: Response<ProxyBody>, head: bool, close: bool) -> Vec<u8> {
    let (parts, body) = resp.into_parts();
    let body = match body {
        ProxyBody::Full(Some(b)) => b,
        ProxyBody::Full(None) | ProxyBody::Empty | ProxyBody::Stream(..) => bytes::Bytes::new(),
    };
    let mut out = Vec::with_capacity(256 + body.len());
    out.extend_from_slice(
        format!(
            "HTTP/1.1 {} {}\r\n",
            parts.status.as_u16(),
            parts.status.canonical_reason().unwrap_or("")
        )
        .as_bytes(),
    );
    for (name, value) in &parts.headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("content-length: {}\r\n", body.len()).as_bytes());
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if !head {
        out.extend_from_slice(&body);
    }
    out
}

fn log_access(plan: &Plan, status: u16, elapsed: Duration, done: Instant) {
    if let Some(fields) = &plan.log {
        fields.log(
            status,
            &plan.backend.name,
            plan.kind,
            plan.decision,
            elapsed,
            done.into_std(),
        );
    }
}

impl Worker {
    /// The access-log fields of a request `method path` the fast path answers itself: its
    /// first acceptable `X-Request-Id`, else a new one (nothing goes to a backend).
    fn local_fields(
        &self,
        method: &Method,
        path: &str,
        headers: &[httparse::Header<'_>],
        conn: &ConnInfo,
        routing: &Routing,
    ) -> super::LineFields {
        let given = headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(request_id::NAME) && request_id::acceptable(h.value));
        let generated;
        let id = match given {
            Some(h) => h.value,
            None => {
                generated = self.request_ids.generate();
                &generated[..]
            }
        };
        let chain = || {
            headers
                .iter()
                .filter(|h| h.name.eq_ignore_ascii_case("x-forwarded-for"))
                .map(|h| h.value)
        };
        super::LineFields::new(method, path, id, conn, &routing.trusted_proxies, chain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_target_table_holds_exactly_the_plain_bytes() {
        for b in 0..=255u8 {
            let plain = b.is_ascii_alphanumeric() || TARGET_PUNCTUATION.contains(&b);
            assert_eq!(plain_target_byte(b), plain, "byte {b:#04x}");
        }
    }
}
