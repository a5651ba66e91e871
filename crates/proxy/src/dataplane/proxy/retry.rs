//! The retry policy, one for both transports: when a backend refuses the connection (nothing
//! reached it), the request may go to another backend, each backend at most once, if its body
//! is still at hand and it is not bound to a session that only the refusing replica holds.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::kbs::RouteKind;
use crate::routing::route_cookie::BackendId;
use crate::routing::Routing;
use crate::upstream::backend::{Backend, UpstreamCause};

/// What follows a refused connection.
#[derive(Debug)]
pub(crate) enum AfterRefusal {
    /// Send the request to this backend instead (it answers with a new route cookie).
    RetryOn(Arc<Backend>),
    /// The request belongs to a session the refusing replica holds: the client must redo its
    /// handshake.
    SessionLost,
    /// No other attempt: the body is gone, or every backend has been tried.
    GiveUp,
}

/// The backends a request has been refused by so far.
#[derive(Debug, Default)]
pub(crate) struct Attempts {
    /// Backends already tried (a request is re-sent rarely: no allocation until then).
    tried: Vec<BackendId>,
}

impl Attempts {
    /// Whether the attempt about to be made could be followed by another: a transport that
    /// would give its request away keeps a copy only then.
    pub(crate) fn may_retry(&self, routing: &Routing, session_bound: bool, replayable: bool) -> bool {
        replayable && !session_bound && routing.backends.list.len() > self.tried.len() + 1
    }

    /// Counts `backend`'s refusal (a connect that failed for `cause`) and decides what follows.
    pub(crate) fn refused(
        &mut self,
        routing: &Routing,
        backend: &Backend,
        cause: UpstreamCause,
        kind: RouteKind,
        session_bound: bool,
        replayable: bool,
    ) -> AfterRefusal {
        backend.record_failure();
        backend.stats.count_error(cause);
        if session_bound {
            tracing::warn!(
                backend = backend.name,
                route = kind.as_str(),
                "pinned replica unreachable"
            );
            backend.stats.pinned_refused.fetch_add(1, Ordering::Relaxed);
            return AfterRefusal::SessionLost;
        }
        if !self.may_retry(routing, session_bound, replayable) {
            return AfterRefusal::GiveUp;
        }
        self.tried.push(backend.id);
        match super::balance(routing, &self.tried) {
            Some(next) => {
                backend.stats.retries.fetch_add(1, Ordering::Relaxed);
                tracing::info!(from = backend.name, to = next.name, "re-sent after a failed connect");
                AfterRefusal::RetryOn(next)
            }
            None => AfterRefusal::GiveUp,
        }
    }
}
