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
    pub(super) backend: Option<Arc<Backend>>,
    /// How the backend was chosen.
    pub(super) decision: &'static str,
}

/// What a line takes from its request, copied when the request is read: method, path, its
/// `X-Request-Id`, the client's address and the `X-Forwarded-For` chain it sent when it is a
/// trusted proxy (from others it could be forged).
///
/// All in one string sized once: a logged request costs one allocation here, where owning each
/// field cost three or four, which paced clients (every line made cache-cold) paid for
/// measurably (docs/history/tuning-journal.md).
pub(super) struct Fields {
    /// The five fields, one after another.
    text: String,
    /// Where each of the first four ends in `text` (the last runs to its end).
    ends: [u32; 4],
}

/// The fields of [`Fields`], in order.
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
        let mut text =
            String::with_capacity(method.as_str().len() + path.len() + request_id.len() + client.len() + chain_len);
        // Bytes that are not UTF-8 (a trusted proxy's X-Forwarded-For may carry some) become
        // U+FFFD.
        let push = |text: &mut String, part: &[u8]| text.push_str(&String::from_utf8_lossy(part));
        let mut ends = [0; 4];
        for (end, field) in ends
            .iter_mut()
            .zip([method.as_str().as_bytes(), path.as_bytes(), request_id, client])
        {
            push(&mut text, field);
            *end = u32::try_from(text.len()).unwrap_or(u32::MAX);
        }
        if forwarded {
            for (i, part) in chain().enumerate() {
                if i > 0 {
                    text.push_str(", ");
                }
                push(&mut text, part);
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
            let backend = self.backend.as_ref().map_or("-", |b| b.name.as_str());
            fields.log(status, backend, kind, self.decision, elapsed);
        }
    }
}
