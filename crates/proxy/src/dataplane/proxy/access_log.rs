//! The observe step both transports share: one access-log line per request, proxied or answered
//! by the proxy itself, in one format.

use super::*;

/// One access-log line per request: method, path (no query: it may carry tokens), status,
/// backend, duration, routing decision and who asked. Cookies, tokens and bodies are never
/// logged.
pub(super) struct AccessLog {
    /// The request's own fields; `None` when the log is off (nothing is recorded).
    pub(super) fields: Option<Fields>,
    /// The backend the request went (or was pinned) to.
    pub(super) backend: Option<String>,
    /// How the backend was chosen.
    pub(super) decision: &'static str,
}

/// What a line takes from its request, copied when the request is read: method, path, its
/// `X-Request-Id`, the client's address and the `X-Forwarded-For` chain it sent when it is a
/// trusted proxy (from others it could be forged).
///
/// All in one buffer sized once, as length-prefixed segments: a logged request costs one
/// allocation here, where owning each field cost three or four (paced clients, where every
/// line is made cache-cold, paid about 0.3 µs per request for them; docs/benchmarks.md).
pub(super) struct Fields(Vec<u8>);

/// The segments of [`Fields`], in order.
const METHOD: usize = 0;
const PATH: usize = 1;
const REQUEST_ID: usize = 2;
const CLIENT: usize = 3;
const FORWARDED_FOR: usize = 4;

impl Fields {
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
        let mut buf = Vec::with_capacity(
            5 * 4 + method.as_str().len() + path.len() + request_id.len() + client.len() + chain_len,
        );
        // Each segment: its length, then its parts joined by ", " as UTF-8 (bytes that are not
        // UTF-8, as a trusted proxy's X-Forwarded-For may carry, become U+FFFD).
        let mut segment = |parts: &mut dyn Iterator<Item = &[u8]>| {
            let at = buf.len();
            buf.extend_from_slice(&[0; 4]);
            for (i, part) in parts.enumerate() {
                if i > 0 {
                    buf.extend_from_slice(b", ");
                }
                buf.extend_from_slice(String::from_utf8_lossy(part).as_bytes());
            }
            let len = (buf.len() - at - 4) as u32;
            buf[at..at + 4].copy_from_slice(&len.to_le_bytes());
        };
        for field in [method.as_str().as_bytes(), path.as_bytes(), request_id, client] {
            segment(&mut std::iter::once(field));
        }
        if forwarded {
            segment(&mut chain());
        } else {
            segment(&mut std::iter::empty());
        }
        Self(buf)
    }

    /// Segment `i` as text (`-` for none: `new` writes five, all UTF-8).
    fn get(&self, i: usize) -> &str {
        let mut rest = &self.0[..];
        for n in 0..=i {
            let Some((len, tail)) = rest.split_first_chunk::<4>() else {
                return "-";
            };
            let len = (u32::from_le_bytes(*len) as usize).min(tail.len());
            if n == i {
                return std::str::from_utf8(&tail[..len]).unwrap_or("-");
            }
            rest = &tail[len..];
        }
        "-"
    }

    /// Writes the line of this request: the one format both transports use.
    pub(super) fn log(
        &self,
        status: u16,
        backend: &str,
        kind: RouteKind,
        decision: &str,
        elapsed: std::time::Duration,
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
            request_id: self.get(REQUEST_ID),
            client: self.get(CLIENT),
            forwarded_for: (!forwarded_for.is_empty()).then_some(forwarded_for),
        });
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
            Fields::new(req.method(), req.uri().path(), id, conn, trusted, chain)
        });
        Self::with(fields)
    }

    /// The line of a request whose `fields` were read (`None`: the log is off).
    pub(super) fn with(fields: Option<Fields>) -> Self {
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

    pub(super) fn finish(self, kind: RouteKind, status: u16, elapsed: std::time::Duration) {
        if let Some(fields) = &self.fields {
            let backend = self.backend.as_deref().unwrap_or("-");
            fields.log(status, backend, kind, self.decision, elapsed);
        }
    }
}
