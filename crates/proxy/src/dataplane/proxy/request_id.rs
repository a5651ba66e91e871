//! `X-Request-Id`, so a proxy line can be joined with the ingress's and the KBS's: the client's
//! when it is acceptable, else one the worker makes. Made without the OS's random source per
//! request: a random prefix drawn once per process, the worker's slot and its counter, in hex.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// The field's name, lower case as HTTP/1.1 fields are written here.
pub(crate) const NAME: &str = "x-request-id";

/// Longest client value kept; longer ones are replaced.
pub(crate) const MAX_LEN: usize = 128;

/// Whether a client's value is kept: 1 to [`MAX_LEN`] visible ASCII characters (no spaces, no
/// control bytes, nothing a log line would have to escape beyond quotes).
pub(crate) fn acceptable(value: &[u8]) -> bool {
    !value.is_empty() && value.len() <= MAX_LEN && value.iter().all(|b| b.is_ascii_graphic())
}

/// Length of a generated id: 16 hex digits of the process prefix, 4 of the worker's slot, 12
/// of its counter.
pub(crate) const GENERATED_LEN: usize = 32;

/// One worker's id maker.
#[derive(Debug)]
pub(crate) struct RequestIds {
    /// The process prefix and the worker's slot, in hex: the first 20 digits of every id.
    head: [u8; 20],
    /// Ids made so far (the fast path's loop and the worker's tokio thread both make them).
    next: AtomicU64,
}

impl RequestIds {
    /// The maker of the worker with `slot`.
    pub(crate) fn new(slot: usize) -> Self {
        static PREFIX: OnceLock<u64> = OnceLock::new();
        let prefix = *PREFIX.get_or_init(rand::random::<u64>);
        let mut head = [0u8; 20];
        hex(&mut head[..16], prefix);
        hex(&mut head[16..], slot as u64);
        Self {
            head,
            next: AtomicU64::new(0),
        }
    }

    /// A new id: unique in the process, and across processes but by a 2^-64 chance.
    pub(crate) fn generate(&self) -> [u8; GENERATED_LEN] {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let mut id = [0u8; GENERATED_LEN];
        id[..20].copy_from_slice(&self.head);
        hex(&mut id[20..], n);
        id
    }
}

/// The low `out.len()` hex digits of `n`, into `out`.
fn hex(out: &mut [u8], mut n: u64) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for slot in out.iter_mut().rev() {
        *slot = DIGITS[(n & 0xf) as usize];
        n >>= 4;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_are_hex_unique_and_acceptable() {
        let (a, b) = (RequestIds::new(0), RequestIds::new(1));
        let ids = [a.generate(), a.generate(), b.generate()];
        for id in &ids {
            assert!(id.iter().all(u8::is_ascii_hexdigit), "{id:?}");
            assert!(acceptable(id));
        }
        assert_ne!(ids[0], ids[1]);
        assert_ne!(ids[0], ids[2], "workers differ by their slot");
        assert_eq!(ids[0][..16], ids[2][..16], "one prefix per process");
        assert_eq!(&ids[1][20..], b"000000000001");
    }

    #[test]
    fn client_values_are_kept_only_when_short_and_printable() {
        assert!(acceptable(b"4bf92f3577b34da6a3ce929d0e0e4736"));
        assert!(acceptable(&[b'a'; MAX_LEN]));
        for bad in [
            &b""[..],
            &[b'a'; MAX_LEN + 1],
            b"a b",
            b"a\tb",
            b"caf\xc3\xa9",
            b"a\x7f",
        ] {
            assert!(!acceptable(bad), "{bad:?}");
        }
    }
}
