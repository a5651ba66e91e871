//! Choosing a backend for a request that is not pinned: a pure function of the backend snapshot,
//! with health passed in as a predicate.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use rand::Rng;

use crate::upstream::backend::Backend;

/// The balance policy (`--balance`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Each accepted backend in turn.
    RoundRobin,
    /// Power of two choices: of two random accepted backends, the one with fewer requests in flight.
    LeastRequests,
}

/// A policy plus the little state it needs (the round-robin cursor).
#[derive(Debug)]
pub struct Balancer {
    /// Which policy picks.
    pub policy: Policy,
    /// Round-robin position; shared by all workers so turns are fair across them.
    next: AtomicUsize,
}

impl Balancer {
    /// A balancer for `policy`.
    pub fn new(policy: Policy) -> Self {
        Self {
            policy,
            next: AtomicUsize::new(0),
        }
    }

    /// Picks a backend from `backends` that `accept` allows; `None` when it allows none.
    pub fn select<'a>(
        &self,
        backends: &'a [Arc<Backend>],
        accept: impl Fn(&Backend) -> bool,
    ) -> Option<&'a Arc<Backend>> {
        let n = backends.len();
        if n == 0 {
            return None;
        }
        match self.policy {
            Policy::RoundRobin => {
                let start = self.next.fetch_add(1, Ordering::Relaxed);
                first_accepted(backends, start, &accept)
            }
            Policy::LeastRequests => {
                let mut rng = rand::rng();
                let i = rng.random_range(0..n);
                if n == 1 {
                    return accept(&backends[0]).then(|| &backends[0]);
                }
                // A second index distinct from the first, uniformly.
                let j = (i + rng.random_range(1..n)) % n;
                let (a, b) = (&backends[i], &backends[j]);
                match (accept(a), accept(b)) {
                    (true, true) => Some(if b.in_flight() < a.in_flight() { b } else { a }),
                    (true, false) => Some(a),
                    (false, true) => Some(b),
                    (false, false) => first_accepted(backends, i, &accept),
                }
            }
        }
    }
}

fn first_accepted<'a>(
    backends: &'a [Arc<Backend>],
    start: usize,
    accept: &impl Fn(&Backend) -> bool,
) -> Option<&'a Arc<Backend>> {
    let n = backends.len();
    (0..n).map(|k| &backends[(start + k) % n]).find(|b| accept(b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::uri::{Authority, Scheme};
    use proptest::prelude::*;

    fn set(n: usize) -> Vec<Arc<Backend>> {
        (0..n)
            .map(|i| {
                Arc::new(Backend::new(
                    format!("b{i}"),
                    Scheme::HTTP,
                    Authority::from_static("127.0.0.1:1"),
                ))
            })
            .collect()
    }

    #[test]
    fn round_robin_takes_turns() {
        let b = set(3);
        let bal = Balancer::new(Policy::RoundRobin);
        let names: Vec<_> = (0..6).map(|_| bal.select(&b, |_| true).unwrap().name.clone()).collect();
        assert_eq!(names, ["b0", "b1", "b2", "b0", "b1", "b2"]);
    }

    #[test]
    fn least_requests_prefers_the_idle_backend() {
        let b = set(2);
        let _busy: Vec<_> = (0..5).map(|_| b[0].start_request()).collect();
        let bal = Balancer::new(Policy::LeastRequests);
        for _ in 0..50 {
            assert_eq!(bal.select(&b, |_| true).unwrap().name, "b1");
        }
    }

    proptest! {
        #[test]
        fn never_picks_a_refused_backend(n in 0usize..8, mask in any::<u8>(), rr in any::<bool>()) {
            let b = set(n);
            let policy = if rr { Policy::RoundRobin } else { Policy::LeastRequests };
            let bal = Balancer::new(policy);
            let accept = |x: &Backend| {
                let i: usize = x.name[1..].parse().unwrap();
                mask & (1 << i) != 0
            };
            let any_ok = b.iter().any(|x| accept(x));
            for _ in 0..16 {
                match bal.select(&b, accept) {
                    Some(x) => prop_assert!(accept(x)),
                    None => prop_assert!(!any_ok),
                }
            }
        }

        #[test]
        fn spreads_over_every_accepted_backend(n in 1usize..6, rr in any::<bool>()) {
            let b = set(n);
            let policy = if rr { Policy::RoundRobin } else { Policy::LeastRequests };
            let bal = Balancer::new(policy);
            let mut seen = vec![false; n];
            for _ in 0..(n * 64) {
                let x = bal.select(&b, |_| true).unwrap();
                seen[x.name[1..].parse::<usize>().unwrap()] = true;
            }
            prop_assert!(seen.iter().all(|s| *s));
        }
    }
}
