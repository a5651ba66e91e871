//! Finding the end of a chunked body (RFC 9112 §7.1) while passing its bytes through verbatim.
//! As strict as hyper's decoder: hex sizes only, CRLF line ends, bounded extensions and
//! trailers; anything else is an error and the connection is closed, never guessed at.

/// Longest chunk extension or trailer section accepted, like hyper's limit.
const MAX_LINE_EXTRA: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading the hex size; `digits` seen so far.
    Size { digits: u8 },
    /// Spaces or tabs after the size.
    SizeSpace,
    /// In a chunk extension, until CR.
    Extension,
    /// Expecting the LF after the size line.
    SizeLf,
    /// Inside chunk data with bytes left.
    Data,
    /// Expecting CR after chunk data.
    DataCr,
    /// Expecting LF after chunk data.
    DataLf,
    /// At the start of a trailer line (or the final CRLF).
    TrailerStart,
    /// Inside a trailer line, until CR.
    Trailer,
    /// Expecting the LF ending a trailer line.
    TrailerLf,
    /// Expecting the LF of the final CRLF.
    EndLf,
    /// The body is complete.
    Done,
}

/// The framing is broken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid chunked encoding")]
pub(crate) struct ChunkError;

/// Scans a chunked body as it streams by.
#[derive(Debug, Clone)]
pub(crate) struct ChunkedScanner {
    state: State,
    /// Data bytes left in the current chunk; the size being read while in `Size`.
    size: u64,
    /// Extension or trailer bytes seen, against [`MAX_LINE_EXTRA`].
    extra: usize,
}

impl Default for ChunkedScanner {
    fn default() -> Self {
        Self {
            state: State::Size { digits: 0 },
            size: 0,
            extra: 0,
        }
    }
}

impl ChunkedScanner {
    /// Whether the body ended.
    #[cfg(test)]
    pub(crate) fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Scans `data`, the next bytes of the body. `Ok(Some(n))`: the body ended after `n` bytes
    /// of `data` (the rest belongs to what follows); `Ok(None)`: all of it is body, more to come.
    pub(crate) fn feed(&mut self, data: &[u8]) -> Result<Option<usize>, ChunkError> {
        let mut i = 0;
        while i < data.len() {
            if self.state == State::Data {
                let take = usize::try_from(self.size).unwrap_or(usize::MAX).min(data.len() - i);
                i += take;
                self.size -= take as u64;
                if self.size == 0 {
                    self.state = State::DataCr;
                }
                continue;
            }
            let b = data[i];
            i += 1;
            self.state = match (self.state, b) {
                (State::Size { digits }, b) if b.is_ascii_hexdigit() => {
                    if digits >= 15 {
                        return Err(ChunkError); // more than 60 bits of size
                    }
                    self.size = self.size * 16 + u64::from(hex(b));
                    State::Size { digits: digits + 1 }
                }
                (State::Size { digits: 1.. }, b' ' | b'\t') | (State::SizeSpace, b' ' | b'\t') => State::SizeSpace,
                (State::Size { digits: 1.. } | State::SizeSpace, b';') => State::Extension,
                (State::Size { digits: 1.. } | State::SizeSpace | State::Extension, b'\r') => State::SizeLf,
                (State::Extension, b'\n') => return Err(ChunkError),
                (State::Extension, _) => {
                    self.extra += 1;
                    if self.extra > MAX_LINE_EXTRA {
                        return Err(ChunkError);
                    }
                    State::Extension
                }
                (State::SizeLf, b'\n') if self.size == 0 => State::TrailerStart,
                (State::SizeLf, b'\n') => State::Data,
                (State::DataCr, b'\r') => State::DataLf,
                (State::DataLf, b'\n') => State::Size { digits: 0 },
                (State::TrailerStart, b'\r') => State::EndLf,
                (State::Trailer, b'\r') => State::TrailerLf,
                (State::TrailerStart | State::Trailer, b'\n') => return Err(ChunkError),
                (State::TrailerStart | State::Trailer, _) => {
                    self.extra += 1;
                    if self.extra > MAX_LINE_EXTRA {
                        return Err(ChunkError);
                    }
                    State::Trailer
                }
                (State::TrailerLf, b'\n') => State::TrailerStart,
                (State::EndLf, b'\n') => {
                    self.state = State::Done;
                    return Ok(Some(i));
                }
                (State::Done, _) => return Ok(Some(i - 1)),
                _ => return Err(ChunkError),
            };
        }
        Ok(None)
    }
}

fn hex(b: u8) -> u8 {
    match b {
        b'0'..=b'9' => b - b'0',
        b'a'..=b'f' => b - b'a' + 10,
        _ => b - b'A' + 10,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn encode(chunks: &[Vec<u8>], trailers: &[&str]) -> Vec<u8> {
        let mut out = Vec::new();
        for c in chunks.iter().filter(|c| !c.is_empty()) {
            out.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
            out.extend_from_slice(c);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"0\r\n");
        for t in trailers {
            out.extend_from_slice(t.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out
    }

    #[test]
    fn finds_the_end_and_leaves_what_follows() {
        let mut body = encode(&[b"hello".to_vec(), b" world".to_vec()], &["x-t: 1"]);
        let len = body.len();
        body.extend_from_slice(b"GET /next HTTP/1.1\r\n");
        let mut s = ChunkedScanner::default();
        assert_eq!(s.feed(&body), Ok(Some(len)));
        assert!(s.is_done());
    }

    #[test]
    fn extensions_and_size_whitespace() {
        let mut s = ChunkedScanner::default();
        assert_eq!(s.feed(b"5 ;name=value\r\nhello\r\n0\r\n\r\n"), Ok(Some(27)));
    }

    #[test]
    fn rejects_broken_framing() {
        for bad in [
            &b"zz\r\n"[..],
            b"5\nhello\r\n",
            b"5\r\nhelloXX",
            b"\r\n",
            b"5;ext\nhello",
            b"1111111111111111\r\n",
        ] {
            assert_eq!(
                ChunkedScanner::default().feed(bad),
                Err(ChunkError),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    proptest! {
        #[test]
        fn any_split_finds_the_exact_end(
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..6),
            cut in proptest::collection::vec(1usize..64, 1..40),
        ) {
            let body = encode(&chunks, &[]);
            let mut s = ChunkedScanner::default();
            let mut pos = 0;
            let mut end = None;
            for step in cut.iter().cycle() {
                if pos >= body.len() { break; }
                let next = (pos + step).min(body.len());
                if let Some(n) = s.feed(&body[pos..next]).unwrap() {
                    end = Some(pos + n);
                    break;
                }
                pos = next;
            }
            prop_assert_eq!(end, Some(body.len()));
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = ChunkedScanner::default().feed(&data);
        }
    }
}
