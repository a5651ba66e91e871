//! The affinity decision: from the route cookie's state and the request's kind to where it goes.

use std::sync::Arc;

use http::header::{HeaderMap, COOKIE};

use crate::kbs::RouteKind;
use crate::routing::route_cookie::{cookie_values, BackendId, Pin, Rejection, RouteCookieCodec};
use crate::upstream::backend::{Backend, Backends};

/// What the request's route cookie says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CookieState {
    /// A cookie with a valid signature and age.
    Valid(Pin),
    /// No cookie of that name.
    Absent,
    /// One or more cookies of that name, none valid (forged, altered, truncated, expired).
    /// Treated exactly as absent; kept apart for counting.
    Rejected(Rejection),
}

/// Read access to a request's header values by name, borrowed: routing is decided from the
/// bytes as they arrived, whether hyper parsed them into a `HeaderMap` or the HTTP/1 fast path
/// left them in its read buffer.
pub trait HeaderView {
    /// Every value of the field `name` (lower case), in order.
    fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a;
}

impl HeaderView for HeaderMap {
    fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.get_all(name).into_iter().map(|v| v.as_bytes())
    }
}

impl HeaderView for [httparse::Header<'_>] {
    fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    }
}

/// Reads the route cookie from every `Cookie` field (HTTP/2 may split them), borrowing the bytes.
/// The first valid value wins, so a stray extra `route` cookie cannot break a session.
pub fn read_route_cookie(
    headers: &(impl HeaderView + ?Sized),
    name: &str,
    codec: &RouteCookieCodec,
    now: u64,
    max_age: u64,
) -> CookieState {
    read_route_cookie_with(headers, name, |v| codec.verify(v, now, max_age))
}

/// The same with the verification given, so a caller may cache verified values.
pub(crate) fn read_route_cookie_with(
    headers: &(impl HeaderView + ?Sized),
    name: &str,
    mut verify: impl FnMut(&[u8]) -> Result<Pin, Rejection>,
) -> CookieState {
    let mut state = CookieState::Absent;
    for field in headers.values(COOKIE.as_str()) {
        for value in cookie_values(field, name.as_bytes()) {
            match verify(value) {
                Ok(pin) => return CookieState::Valid(pin),
                Err(why) => state = CookieState::Rejected(why),
            }
        }
    }
    state
}

/// What pins a request to a backend when its route cookie does not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Learned {
    /// A `kbs-session-id` the backend issued.
    SessionId(BackendId),
    /// An attestation token the backend issued.
    Token(BackendId),
}

impl Learned {
    fn backend(self) -> BackendId {
        match self {
            Self::SessionId(b) | Self::Token(b) => b,
        }
    }
}

/// Where a request goes.
#[derive(Debug)]
pub enum Decision<'a> {
    /// To the backend the cookie (or a learned session id or token: `learned`) names. `refresh`:
    /// (re-)issue the route cookie for it.
    Pinned {
        /// The pinned backend.
        backend: &'a Arc<Backend>,
        /// Whether to send a fresh cookie.
        refresh: bool,
        /// Set when the pin came from a learned session id or token instead of the cookie.
        learned: Option<Learned>,
    },
    /// To a backend the balancer picks; the response carries a new cookie. `repin`: the
    /// request had a valid cookie for a backend that is down or gone.
    Balance {
        /// Whether a valid pin is being replaced.
        repin: bool,
    },
    /// Nowhere: the session lives on a replica that is down or drained past its timeout;
    /// answer a KBS 401.
    SessionLost(&'a Arc<Backend>),
}

/// Decides. One exhaustive match over what pins the request (its cookie, else what was
/// learned) and whether the request needs its session's replica (`session_bound`: attest, and
/// resource calls unless they carry a token every replica accepts).
///
/// A valid cookie on an `auth` is refreshed once it is past half its age, so a cookie never
/// expires in the middle of the auth → attest → resource sequence that follows. A pin from a
/// learned session id or token re-issues the cookie the client lacks.
pub fn decide<'a>(
    session_bound: bool,
    kind: RouteKind,
    cookie: CookieState,
    learned: Option<Learned>,
    backends: &'a Backends,
    now: u64,
    max_age: u64,
) -> Decision<'a> {
    let pinned = match (cookie, learned) {
        (CookieState::Valid(pin), _) => Some((Some(pin), None, backends.by_id(pin.backend))),
        (CookieState::Absent | CookieState::Rejected(_), Some(l)) => Some((None, Some(l), backends.by_id(l.backend()))),
        (CookieState::Absent | CookieState::Rejected(_), None) => None,
    };
    match (pinned, session_bound) {
        (Some((pin, learned, Some(backend))), _) if backend.serves_pinned(backends.drain_timeout) => Decision::Pinned {
            backend,
            refresh: match pin {
                Some(pin) => kind == RouteKind::Auth && now.saturating_sub(pin.issued_at) > max_age / 2,
                None => true,
            },
            learned,
        },
        // Pinned to a replica that is down, or drained past its timeout.
        (Some((_, _, Some(backend))), true) => Decision::SessionLost(backend),
        (Some((_, _, Some(_))), false) => Decision::Balance { repin: true },
        // A pin naming a backend this proxy does not have is treated as absent (and counted).
        (Some((_, _, None)), _) => Decision::Balance { repin: false },
        (None, _) => Decision::Balance { repin: false },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::route_cookie::{BackendId, CookieSecret};
    use http::uri::{Authority, Scheme};
    use http::HeaderValue;

    const NOW: u64 = 1_800_000_000;
    const MAX_AGE: u64 = 1000;

    fn codec() -> RouteCookieCodec {
        RouteCookieCodec::new(&CookieSecret::new(vec![9; 32]).unwrap())
    }

    fn backends() -> Backends {
        let mk = |n: &str| {
            Arc::new(Backend::new(
                n.into(),
                Scheme::HTTP,
                Authority::from_static("127.0.0.1:1"),
            ))
        };
        Backends {
            list: vec![mk("a"), mk("b")],
            drain_timeout: std::time::Duration::from_secs(300),
        }
    }

    fn headers(cookie: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.append(COOKIE, HeaderValue::from_str(cookie).unwrap());
        h
    }

    fn route(name: &str, at: u64) -> String {
        String::from_utf8(codec().mint(BackendId::from_name(name), at).to_vec()).unwrap()
    }

    #[test]
    fn first_valid_cookie_wins_over_junk() {
        let h = headers(&format!("route=junk; route={}", route("b", NOW)));
        assert!(
            matches!(read_route_cookie(&h, "route", &codec(), NOW, MAX_AGE), CookieState::Valid(p) if p.backend == BackendId::from_name("b"))
        );
        let h = headers("route=junk");
        assert_eq!(
            read_route_cookie(&h, "route", &codec(), NOW, MAX_AGE),
            CookieState::Rejected(Rejection::Malformed)
        );
        assert_eq!(
            read_route_cookie(&HeaderMap::new(), "route", &codec(), NOW, MAX_AGE),
            CookieState::Absent
        );
    }

    #[test]
    fn decision_table() {
        let set = backends();
        let pin = |n: &str, at| {
            CookieState::Valid(Pin {
                backend: BackendId::from_name(n),
                issued_at: at,
            })
        };
        let d = |kind: RouteKind, state| decide(kind.needs_session(), kind, state, None, &set, NOW, MAX_AGE);
        assert!(
            matches!(d(RouteKind::Attest, pin("a", NOW)), Decision::Pinned { backend, refresh: false, learned: None } if backend.name == "a")
        );
        assert!(matches!(
            d(RouteKind::Auth, pin("a", NOW - 600)),
            Decision::Pinned { refresh: true, .. }
        ));
        assert!(matches!(
            d(RouteKind::Attest, pin("gone", NOW)),
            Decision::Balance { repin: false }
        ));
        assert!(matches!(
            d(RouteKind::Auth, pin("gone", NOW)),
            Decision::Balance { repin: false }
        ));
        set.list[1].drain();
        assert!(
            matches!(d(RouteKind::Attest, pin("b", NOW)), Decision::Pinned { .. }),
            "draining keeps pins"
        );
        set.list[0].record_failure();
        assert!(matches!(
            d(RouteKind::Resource, pin("a", NOW)),
            Decision::SessionLost(_)
        ));
        assert!(matches!(
            d(RouteKind::Auth, pin("a", NOW)),
            Decision::Balance { repin: true }
        ));
        assert!(matches!(
            d(RouteKind::Other, pin("a", NOW)),
            Decision::Balance { repin: true }
        ));
        let rejected = CookieState::Rejected(Rejection::BadSignature);
        assert!(matches!(
            d(RouteKind::Attest, rejected),
            Decision::Balance { repin: false }
        ));
    }
}
