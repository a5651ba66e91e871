//! Writing a rewritten message head with as few copies as possible.
//!
//! The fast path writes every kept line as `name: value\r\n` (request line: `METHOD target
//! HTTP/1.1\r\n`). Most messages already hold their lines in exactly that form, so a line that
//! does is copied from the received head as it is, and adjacent such lines in one copy: a
//! typical head goes out in one or two copies instead of four per field. A line in any other
//! form (other whitespace, a bare LF, HTTP/1.0) is written field by field, as before; the bytes
//! sent are the same either way.

use std::ops::Range;

/// Appends lines to `out`, copying runs of lines already in their written form from `src`.
pub(super) struct Lines<'s> {
    src: &'s [u8],
    /// The run of `src` not yet copied (empty: none).
    run: Range<usize>,
}

impl<'s> Lines<'s> {
    /// Lines taken from `src`, the received head their slices borrow from.
    pub(super) fn new(src: &'s [u8]) -> Self {
        Lines { src, run: 0..0 }
    }

    /// Where `part` starts in `src`, if it is a slice of it.
    #[inline]
    fn offset(&self, part: &[u8]) -> Option<usize> {
        let at = (part.as_ptr() as usize).checked_sub(self.src.as_ptr() as usize)?;
        (at.checked_add(part.len())? <= self.src.len()).then_some(at)
    }

    /// Whether `src[at..]` starts with `expected`.
    #[inline]
    fn holds(&self, at: usize, expected: &[u8]) -> bool {
        self.src.get(at..).is_some_and(|rest| rest.starts_with(expected))
    }

    /// Appends `range` of `src`, joining the pending run when adjacent.
    #[inline]
    fn copy(&mut self, out: &mut Vec<u8>, range: Range<usize>) {
        if !self.run.is_empty() && self.run.end == range.start {
            self.run.end = range.end;
        } else {
            self.flush(out);
            self.run = range;
        }
    }

    /// Copies what is pending; call before writing anything else to `out`.
    pub(super) fn flush(&mut self, out: &mut Vec<u8>) {
        if !self.run.is_empty() {
            out.extend_from_slice(&self.src[self.run.clone()]);
        }
        self.run = 0..0;
    }

    /// Appends the request line `METHOD target HTTP/1.1\r\n` (`method` and `target` are slices
    /// of the received head).
    pub(super) fn request_line(&mut self, out: &mut Vec<u8>, method: &str, target: &str) {
        const VERSION: &[u8] = b" HTTP/1.1\r\n";
        if let (Some(m), Some(t)) = (self.offset(method.as_bytes()), self.offset(target.as_bytes())) {
            let t_end = t + target.len();
            if m + method.len() + 1 == t && self.holds(t - 1, b" ") && self.holds(t_end, VERSION) {
                return self.copy(out, m..t_end + VERSION.len());
            }
        }
        self.flush(out);
        out.extend_from_slice(method.as_bytes());
        out.push(b' ');
        out.extend_from_slice(target.as_bytes());
        out.extend_from_slice(VERSION);
    }

    /// Appends the status line `HTTP/1.1 status reason\r\n` (`reason` a slice of the received
    /// head, which starts with the status line).
    pub(super) fn status_line(&mut self, out: &mut Vec<u8>, status: u16, reason: &str) {
        // "HTTP/1.1 200 " is 13 bytes; the reason follows.
        if !reason.is_empty()
            && self.offset(reason.as_bytes()) == Some(13)
            && self.holds(0, b"HTTP/1.1 ")
            && self.src.get(9..12).is_some_and(|d| d == status_digits(status))
            && self.holds(12, b" ")
            && self.holds(13 + reason.len(), b"\r\n")
        {
            return self.copy(out, 0..13 + reason.len() + 2);
        }
        self.flush(out);
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(&status_digits(status));
        out.push(b' ');
        out.extend_from_slice(reason.as_bytes());
        out.extend_from_slice(b"\r\n");
    }

    /// Appends the field line `name: value\r\n` (`name` and `value` slices of the received head).
    /// Inlined into the caller's loop: a line in written form only extends the pending run.
    #[inline(always)]
    pub(super) fn field(&mut self, out: &mut Vec<u8>, name: &str, value: &[u8]) {
        match self.written_line(name, value) {
            Some(line) => self.copy(out, line),
            None => self.write_field(out, name, value),
        }
    }

    /// Where the line of `name` and `value` is in `src`, if in written form: `value` starts right
    /// after `name: ` and `\r\n` follows it (one offset computed, the value's place checked by
    /// address).
    #[inline(always)]
    fn written_line(&self, name: &str, value: &[u8]) -> Option<Range<usize>> {
        let n = self.offset(name.as_bytes())?;
        let v = n + name.len() + 2;
        let end = v + value.len() + 2;
        if !std::ptr::eq(value.as_ptr(), self.src.as_ptr().wrapping_add(v)) {
            return None;
        }
        let line = self.src.get(n..end)?;
        (line[name.len()..name.len() + 2] == *b": " && line[line.len() - 2..] == *b"\r\n").then_some(n..end)
    }

    /// Writes the field line out of its parts (a line in another form, or from elsewhere).
    #[cold]
    #[inline(never)]
    fn write_field(&mut self, out: &mut Vec<u8>, name: &str, value: &[u8]) {
        self.flush(out);
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
}

/// A status code (100-999, as httparse reads it) as three ASCII digits.
fn status_digits(status: u16) -> [u8; 3] {
    [
        b'0' + (status / 100 % 10) as u8,
        b'0' + (status / 10 % 10) as u8,
        b'0' + (status % 10) as u8,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes a request head the way the fast path does, both through `Lines` and field by
    /// field, and checks the bytes are equal; returns them.
    fn request(head: &[u8]) -> Vec<u8> {
        let mut storage = [httparse::EMPTY_HEADER; 16];
        let mut req = httparse::Request::new(&mut storage);
        assert!(req.parse(head).unwrap().is_complete());
        let (method, target) = (req.method.unwrap(), req.path.unwrap());
        let mut out = Vec::new();
        let mut lines = Lines::new(head);
        lines.request_line(&mut out, method, target);
        for h in req.headers.iter().filter(|h| !h.name.eq_ignore_ascii_case("drop")) {
            lines.field(&mut out, h.name, h.value);
        }
        lines.flush(&mut out);
        out.extend_from_slice(b"x-added: 1\r\n");

        let mut expected = format!("{method} {target} HTTP/1.1\r\n").into_bytes();
        for h in req.headers.iter().filter(|h| !h.name.eq_ignore_ascii_case("drop")) {
            expected.extend_from_slice(h.name.as_bytes());
            expected.extend_from_slice(b": ");
            expected.extend_from_slice(h.value);
            expected.extend_from_slice(b"\r\n");
        }
        expected.extend_from_slice(b"x-added: 1\r\n");
        assert_eq!(String::from_utf8_lossy(&out), String::from_utf8_lossy(&expected));
        out
    }

    #[test]
    fn lines_in_written_form_are_copied_as_they_are() {
        let out = request(b"GET /a?b HTTP/1.1\r\nHost: x\r\nCookie: route=1\r\n\r\n");
        assert_eq!(
            out,
            b"GET /a?b HTTP/1.1\r\nHost: x\r\nCookie: route=1\r\nx-added: 1\r\n"
        );
    }

    #[test]
    fn other_forms_are_written_as_the_field_by_field_path_writes_them() {
        request(b"GET / HTTP/1.1\r\nHost:x\r\nA:  b \r\nDrop: 1\r\nC: d\r\n\r\n");
        request(b"GET / HTTP/1.1\nHost: x\nA: b\n\n");
        request(b"\r\nGET / HTTP/1.1\r\nHost: x\r\nEmpty:\r\nE: \r\n\r\n");
        request(b"GET / HTTP/1.1\r\nDrop: 1\r\nHost: x\r\nDrop: 2\r\n\r\n");
        let out = request(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n");
        assert!(out.starts_with(b"GET / HTTP/1.1\r\n"));
    }

    #[test]
    fn status_lines() {
        let write = |head: &[u8]| {
            let mut storage = [httparse::EMPTY_HEADER; 4];
            let mut resp = httparse::Response::new(&mut storage);
            assert!(resp.parse(head).unwrap().is_complete());
            let mut out = Vec::new();
            let mut lines = Lines::new(head);
            lines.status_line(&mut out, resp.code.unwrap(), resp.reason.unwrap());
            lines.flush(&mut out);
            out
        };
        assert_eq!(write(b"HTTP/1.1 200 OK\r\n\r\n"), b"HTTP/1.1 200 OK\r\n");
        assert_eq!(write(b"HTTP/1.0 404 Not Found\r\n\r\n"), b"HTTP/1.1 404 Not Found\r\n");
        assert_eq!(write(b"HTTP/1.1 204 \r\n\r\n"), b"HTTP/1.1 204 \r\n");
        assert_eq!(write(b"HTTP/1.1 500 Oops\n\n"), b"HTTP/1.1 500 Oops\r\n");
    }

    #[test]
    fn slices_from_elsewhere_are_written_not_copied() {
        let head = b"GET / HTTP/1.1\r\n";
        let mut out = Vec::new();
        let mut lines = Lines::new(head);
        lines.field(&mut out, "Host", b"x");
        lines.flush(&mut out);
        assert_eq!(out, b"Host: x\r\n");
    }
}
