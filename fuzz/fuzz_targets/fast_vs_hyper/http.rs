//! HTTP/1.1 as the harness reads it: chunked bodies, fields as HTTP means them, what a client was
//! sent (how many answers to wait for) and what it got (the answers, taken apart).
//!
//! This is a third reader beside the two under test, so it is plain and strict: anything it does
//! not understand stays as raw bytes (`tail`), and raw bytes are compared too.

use std::fmt;

/// Header fields read per message; the proxies allow 100, the mirror adds a few.
const MAX_FIELDS: usize = 128;

/// The end of a chunked body (RFC 9112 §7.1), if `buf` holds it all.
pub enum Chunked {
    /// More bytes are needed.
    Partial,
    /// The body is complete: its decoded bytes and the length of its encoding in `buf`.
    Done { body: Vec<u8>, len: usize },
    /// Not a chunked body.
    Bad,
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

/// Decodes the chunked body at the start of `buf` (extensions and trailers dropped: RFC 9112
/// §7.1.1 and RFC 9110 §6.5.1 let a recipient that removes the coding discard both).
pub fn dechunk(buf: &[u8]) -> Chunked {
    let mut body = Vec::new();
    let mut i = 0;
    loop {
        let Some(eol) = find_crlf(&buf[i..]) else {
            return Chunked::Partial;
        };
        let line = &buf[i..i + eol];
        let digits = line.split(|&b| b == b';').next().unwrap_or(b"").trim_ascii_end();
        if digits.is_empty() || !digits.iter().all(u8::is_ascii_hexdigit) {
            return Chunked::Bad;
        }
        // Leading zeros are fine (hyper takes any number of them); too large is not.
        let mut size: usize = 0;
        for &d in digits {
            let v = usize::from(if d.is_ascii_digit() {
                d - b'0'
            } else {
                (d | 0x20) - b'a' + 10
            });
            match size.checked_mul(16).and_then(|s| s.checked_add(v)) {
                Some(s) if s <= 1 << 40 => size = s,
                _ => return Chunked::Bad,
            }
        }
        i += eol + 2;
        if size == 0 {
            loop {
                let Some(eol) = find_crlf(&buf[i..]) else {
                    return Chunked::Partial;
                };
                i += eol + 2;
                if eol == 0 {
                    return Chunked::Done { body, len: i };
                }
            }
        }
        if buf.len() < i.saturating_add(size).saturating_add(2) {
            return Chunked::Partial;
        }
        body.extend_from_slice(&buf[i..i + size]);
        if &buf[i + size..i + size + 2] != b"\r\n" {
            return Chunked::Bad;
        }
        i += size + 2;
    }
}

/// How a message body is framed, from its fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body field: empty (request) or until close (response).
    Unframed,
    Length(usize),
    Chunked,
    /// Conflicting or invalid framing fields.
    Invalid,
}

/// Whether a comma-separated field value list holds `token` (any case).
pub fn has_token(headers: &[httparse::Header<'_>], name: &str, token: &str) -> bool {
    headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case(name))
        .flat_map(|h| h.value.split(|&b| b == b','))
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// The framing RFC 9112 §6.3 gives a message with `headers`.
pub fn framing(headers: &[httparse::Header<'_>]) -> Framing {
    let te: Vec<&[u8]> = headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("transfer-encoding"))
        .map(|h| h.value)
        .collect();
    if let Some(last) = te.last() {
        let chunked_last = last
            .rsplit(|&b| b == b',')
            .next()
            .is_some_and(|c| c.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        return if chunked_last {
            Framing::Chunked
        } else {
            Framing::Invalid
        };
    }
    let mut len = None;
    for h in headers.iter().filter(|h| h.name.eq_ignore_ascii_case("content-length")) {
        let v = h.value.trim_ascii();
        let n = std::str::from_utf8(v)
            .ok()
            .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|s| s.parse::<usize>().ok());
        match (n, len) {
            (None, _) => return Framing::Invalid,
            (Some(n), Some(prev)) if n != prev => return Framing::Invalid,
            (Some(n), _) => len = Some(n),
        }
    }
    len.map_or(Framing::Unframed, Framing::Length)
}

/// Fields as HTTP means them: names lower-cased, order kept per name (a stable sort by name),
/// minus what legitimately differs between the two paths: `date` (hyper adds it), `connection`
/// (each path manages its own connections), the `chunked` coding in `transfer-encoding` (each
/// path frames its own way; any other coding is kept, since dropping it changes the content), and
/// the value of a `set-cookie` (a fresh route cookie carries its issue second; the attributes
/// still count). tests/fastpath.rs `normalize_fields` drops all of `transfer-encoding`; this is
/// the same, except that it keeps the codings other than `chunked`.
pub fn normalize_fields(headers: &[httparse::Header<'_>]) -> Vec<(String, String)> {
    let mut fields: Vec<(String, String)> = headers
        .iter()
        .map(|h| {
            (
                h.name.to_ascii_lowercase(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .filter(|(n, _)| !matches!(n.as_str(), "date" | "connection"))
        .filter_map(|(n, v)| match n.as_str() {
            "set-cookie" => {
                let attrs = v.split(';').skip(1).collect::<Vec<_>>().join(";");
                Some((n, attrs))
            }
            "transfer-encoding" => {
                let codings: Vec<String> = v
                    .split(',')
                    .map(|c| c.trim().to_ascii_lowercase())
                    .filter(|c| !c.is_empty() && c != "chunked")
                    .collect();
                (!codings.is_empty()).then(|| (n, codings.join(", ")))
            }
            _ => Some((n, v)),
        })
        .collect();
    fields.sort_by(|a, b| a.0.cmp(&b.0));
    fields
}

/// A request the proxies should answer, as far as the harness can tell.
#[derive(Debug, Clone, Copy)]
pub struct Expected {
    /// `HEAD`: its answer has no body.
    pub head: bool,
    /// It asks to close the connection after its answer (or cannot be framed, so it is refused).
    pub closes: bool,
    /// Where it starts in the bytes sent.
    pub start: usize,
}

/// What was sent on one connection: one entry per request the proxies should answer, in order
/// (up to the first that closes the connection, or that cannot be framed).
pub fn expected_answers(raw: &[u8]) -> Vec<Expected> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < raw.len() {
        let rest = &raw[start..];
        let mut storage = [httparse::EMPTY_HEADER; MAX_FIELDS];
        let mut req = httparse::Request::new(&mut storage);
        let head_len = match req.parse(rest) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => break,
            Err(_) => {
                // Refused: one answer, then close.
                out.push(Expected {
                    head: false,
                    closes: true,
                    start,
                });
                break;
            }
        };
        let closes = has_token(req.headers, "connection", "close")
            || (req.version == Some(0) && !has_token(req.headers, "connection", "keep-alive"));
        let body_len = match framing(req.headers) {
            Framing::Unframed => Some(0),
            Framing::Length(n) => Some(n),
            Framing::Chunked => match dechunk(&rest[head_len..]) {
                Chunked::Done { len, .. } => Some(len),
                Chunked::Partial => None,
                Chunked::Bad => None,
            },
            Framing::Invalid => None,
        };
        out.push(Expected {
            head: req.method == Some("HEAD"),
            closes: closes || body_len.is_none(),
            start,
        });
        let Some(body_len) = body_len else { break };
        if closes || rest.len() < head_len + body_len {
            break;
        }
        start += head_len + body_len;
    }
    out
}

/// Whether `bytes` hold no end of a head (an empty line after the request line; the empty lines
/// before it are skipped, RFC 9112 §2.2). hyper parses a head that arrived in parts only once
/// one is there (`is_complete_fast` in hyper's `proto/h1/role.rs`), so it refuses an invalid
/// unfinished head only when it is finished; the fast path parses every read.
pub fn head_unfinished(bytes: &[u8]) -> bool {
    let start = bytes
        .iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .unwrap_or(bytes.len());
    let bytes = &bytes[start..];
    !bytes.windows(4).any(|w| w == b"\r\n\r\n") && !bytes.windows(2).any(|w| w == b"\n\n")
}

/// What the backend saw, as the mirror reported it: request line, fields, decoded body.
#[derive(PartialEq)]
pub struct View {
    pub line: String,
    pub fields: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl fmt::Debug for View {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("View")
            .field("line", &self.line)
            .field("fields", &self.fields)
            .field("body", &Escaped(&self.body))
            .finish()
    }
}

/// Parses the mirror's report (the raw request head, then the decoded body).
pub fn parse_view(raw: &[u8]) -> Result<View, String> {
    let mut storage = [httparse::EMPTY_HEADER; MAX_FIELDS];
    let mut req = httparse::Request::new(&mut storage);
    let n = match req.parse(raw) {
        Ok(httparse::Status::Complete(n)) => n,
        other => return Err(format!("unreadable mirrored head ({other:?}): {:?}", Escaped(raw))),
    };
    Ok(View {
        line: format!(
            "{} {} HTTP/1.{}",
            req.method.unwrap_or(""),
            req.path.unwrap_or(""),
            req.version.unwrap_or(9)
        ),
        fields: normalize_fields(req.headers),
        body: raw[n..].to_vec(),
    })
}

/// A response body: the mirror's report of the request, or bytes.
#[derive(Debug, PartialEq)]
pub enum Body {
    Mirrored(Result<View, String>),
    Bytes(Escaped<Vec<u8>>),
}

/// One response as HTTP means it.
#[derive(Debug, PartialEq)]
pub struct Answer {
    pub status: u16,
    pub fields: Vec<(String, String)>,
    pub body: Body,
}

/// Everything one client connection got.
#[derive(Debug, PartialEq)]
pub struct Transcript {
    pub answers: Vec<Answer>,
    /// Whether each answer said `Connection: close` (not compared: framing; see `compare`).
    pub closing: Vec<bool>,
    /// Bytes after the last complete answer.
    pub tail: Escaped<Vec<u8>>,
    /// The proxy closed the connection (else the harness stopped reading).
    pub closed: bool,
}

impl Transcript {
    /// Answers other than 1xx.
    pub fn finals(&self) -> usize {
        self.answers.iter().filter(|a| a.status >= 200).count()
    }

    /// Keeps the first `n` final answers (and the 1xx before them) and no tail: the harness
    /// stopped reading there, so whatever came after is a matter of timing.
    pub fn keep_finals(&mut self, n: usize) {
        let mut finals = 0;
        let end = self
            .answers
            .iter()
            .position(|a| {
                finals += usize::from(a.status >= 200);
                finals == n && a.status >= 200
            })
            .map_or(self.answers.len(), |i| i + 1);
        self.answers.truncate(end);
        self.closing.truncate(end);
        self.tail = Escaped(Vec::new());
    }
}

/// Takes apart the bytes a client got, answering `sent`. `closed`: the connection ended, so an
/// unframed body is complete.
pub fn read_answers(raw: &[u8], sent: &[Expected], closed: bool) -> Transcript {
    let mut answers = Vec::new();
    let mut closing = Vec::new();
    let mut rest = raw;
    loop {
        if rest.is_empty() {
            break;
        }
        let mut storage = [httparse::EMPTY_HEADER; MAX_FIELDS];
        let mut resp = httparse::Response::new(&mut storage);
        let head_len = match resp.parse(rest) {
            Ok(httparse::Status::Complete(n)) => n,
            _ => break,
        };
        let status = resp.code.unwrap_or(0);
        let finals = answers.iter().filter(|a: &&Answer| a.status >= 200).count();
        let is_head = sent.get(finals).is_some_and(|e| e.head);
        let after = &rest[head_len..];
        let (body, body_len) = if status < 200 || status == 204 || status == 304 || is_head {
            (Vec::new(), 0)
        } else {
            match framing(resp.headers) {
                Framing::Length(n) if after.len() >= n => (after[..n].to_vec(), n),
                Framing::Chunked => match dechunk(after) {
                    Chunked::Done { body, len } => (body, len),
                    Chunked::Partial | Chunked::Bad => break,
                },
                Framing::Unframed if closed => (after.to_vec(), after.len()),
                Framing::Length(_) | Framing::Unframed | Framing::Invalid => break,
            }
        };
        let mut fields = normalize_fields(resp.headers);
        let mirrored = fields.iter().any(|(n, v)| n == "x-mirror" && v == "yes");
        let body = if mirrored {
            // The report of what the backend got; its length (content-length) follows from the
            // head each path wrote, which is compared through the report itself.
            let in_field = fields.iter().find(|(n, _)| n == "x-mirror-view").map(|(_, v)| unhex(v));
            fields.retain(|(n, _)| n != "content-length" && n != "x-mirror-view");
            Body::Mirrored(match in_field {
                Some(Some(view)) => parse_view(&view),
                Some(None) => Err("x-mirror-view is not hex".into()),
                None => parse_view(&body),
            })
        } else {
            Body::Bytes(Escaped(body))
        };
        closing.push(has_token(resp.headers, "connection", "close"));
        answers.push(Answer { status, fields, body });
        rest = &after[body_len..];
    }
    Transcript {
        answers,
        closing,
        tail: Escaped(rest.to_vec()),
        closed,
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    let s = s.as_bytes();
    if !s.len().is_multiple_of(2) {
        return None;
    }
    s.chunks(2)
        .map(|p| u8::from_str_radix(std::str::from_utf8(p).ok()?, 16).ok())
        .collect()
}

/// Bytes shown as an escaped string in reports.
#[derive(Clone, PartialEq, Eq)]
pub struct Escaped<T: AsRef<[u8]>>(pub T);

impl<T: AsRef<[u8]>> fmt::Debug for Escaped<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bytes = self.0.as_ref();
        const SHOWN: usize = 4096;
        write!(f, "\"")?;
        for &b in bytes.iter().take(SHOWN) {
            write!(f, "{}", std::ascii::escape_default(b))?;
        }
        if bytes.len() > SHOWN {
            write!(f, "...({} bytes more)", bytes.len() - SHOWN)?;
        }
        write!(f, "\"")
    }
}
