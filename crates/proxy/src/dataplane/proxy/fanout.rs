//! Admin writes sent to every replica (`--admin-writes broadcast`).
//!
//! A proxy with `journal-owner` set does none of this itself: it forwards the write to the
//! journal owner's admin port, which broadcasts and journals it, and passes the owner's answer
//! on. One writer orders every write, so replicas cannot end with different values when writes
//! arrive through different proxies. If the owner cannot be reached the answer is a KBS-shaped
//! 503 and nothing is acknowledged.
//!
//! The write goes to every backend that is not draining and has applied the whole journal, all
//! at once, under the journal's ordering lock so every replica sees writes in one order. The
//! answer is 2xx only when every replica accepted; otherwise the worst status, with a KBS-shaped
//! body saying which replicas accepted and which did not, and why. A write at least one replica
//! accepted is journaled; replicas that missed it are caught up by the control plane before they
//! take new sessions.

use std::fmt::Write as _;
use std::sync::Arc;

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Limited};
use hyper::body::{Body, Incoming};

use super::{forward_headers, headers, ConnInfo, ProxyBody, ProxyError, Worker};
use crate::config::AdminFanout;
use crate::control::journal::AdminWrite;
use crate::kbs::RouteKind;
use crate::routing::Routing;
use crate::upstream::backend::Backend;

/// Marks an admin write a proxy forwarded to its journal owner (a loop guard).
pub(crate) const FORWARDED_HEADER: &str = "kbs-affinity-proxy-forwarded";

/// Says on a broadcast's answer how durable the journal is: `disk`, or `memory` (lost with
/// the proxy; run the journal owner with `--admin-journal` on a persistent volume).
pub(crate) const JOURNAL_HEADER: &str = "kbs-affinity-proxy-journal";

/// What one replica did with the write.
enum Outcome {
    /// 2xx: the response, kept to pass on when everyone accepted.
    Accepted(Response<Bytes>),
    /// Another status; the response is kept to pass on when everyone refused alike.
    Refused(Response<Bytes>),
    /// No connection.
    Unreachable(String),
    /// No answer in time.
    TimedOut,
    /// Not sent: the replica has not applied earlier writes yet.
    Behind(usize),
}

impl Outcome {
    /// The status this outcome stands for, to find the worst.
    fn status(&self) -> StatusCode {
        match self {
            Self::Accepted(r) | Self::Refused(r) => r.status(),
            Self::Unreachable(_) => StatusCode::BAD_GATEWAY,
            Self::TimedOut => StatusCode::GATEWAY_TIMEOUT,
            Self::Behind(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// Reads a response whole (admin answers are small; bounded anyway).
async fn collect(resp: Response<Incoming>) -> Result<Response<Bytes>, String> {
    let (mut parts, body) = resp.into_parts();
    if !headers::settle_decoded_framing(&mut parts.headers) {
        return Err("a transfer coding other than chunked".into());
    }
    // The body is passed on whole: its own length frames it.
    parts.headers.remove(http::header::CONTENT_LENGTH);
    headers::remove_hop_by_hop(&mut parts.headers);
    let bytes = Limited::new(body, 1024 * 1024)
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok(Response::from_parts(parts, bytes))
}

impl Worker {
    /// Broadcasts an admin write; see the module docs.
    pub(super) async fn broadcast(
        &self,
        req: Request<Incoming>,
        conn: &ConnInfo,
        routing: &Routing,
        fanout: &AdminFanout,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let (parts, body) = req.into_parts();
        let limit = fanout.body_limit;
        if body.size_hint().lower() > limit as u64 {
            return Err(ProxyError::BodyTooLarge { limit });
        }
        let body = match Limited::new(body, limit).collect().await {
            Ok(c) => c.to_bytes(),
            Err(e) => {
                return Err(match e.downcast::<hyper::Error>() {
                    Ok(e) => ProxyError::ClientBody(*e),
                    Err(_) => ProxyError::BodyTooLarge { limit },
                })
            }
        };
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        if let Some(owner) = &self.shared.journal_owner {
            if parts.headers.contains_key(FORWARDED_HEADER) {
                return Err(ProxyError::JournalLoop);
            }
            let headers = forward_headers(parts.headers, &parts.uri, conn);
            let timeout = routing.response_timeout;
            return self
                .forward_to_owner(owner, parts.method, path, headers, body, timeout)
                .await;
        }
        let write = AdminWrite::new(
            parts.method.clone(),
            path.as_str().to_owned(),
            &parts.headers,
            body.clone(),
        );
        let headers = forward_headers(parts.headers, &parts.uri, conn);

        let journal = Arc::clone(&self.shared.journal);
        let _order = journal.order().await;
        let targets: Vec<Arc<Backend>> = routing
            .backends
            .list
            .iter()
            .filter(|b| !b.is_draining())
            .cloned()
            .collect();
        if targets.is_empty() {
            return Err(ProxyError::NoBackend);
        }
        let mut outcomes: Vec<(Arc<Backend>, Outcome)> = Vec::with_capacity(targets.len());
        let mut sends = tokio::task::JoinSet::new();
        for (i, backend) in targets.iter().enumerate() {
            let behind = journal.behind(&backend.name);
            if behind > 0 {
                outcomes.push((Arc::clone(backend), Outcome::Behind(behind)));
                continue;
            }
            let uri = super::backend_uri(backend, path.clone());
            let mut req = Request::new(ProxyBody::full(body.clone()));
            *req.method_mut() = parts.method.clone();
            *req.uri_mut() = uri;
            *req.version_mut() = Version::HTTP_11;
            *req.headers_mut() = headers.clone();
            let client = self.client.clone();
            let timeout = routing.response_timeout;
            let backend = Arc::clone(backend);
            sends.spawn(async move {
                let _in_flight = backend.start_request();
                let outcome = match tokio::time::timeout(timeout, client.request(req)).await {
                    Ok(Ok(resp)) => match collect(resp).await {
                        Ok(r) if r.status().is_success() => Outcome::Accepted(r),
                        Ok(r) => Outcome::Refused(r),
                        Err(e) => Outcome::Unreachable(format!("response body failed: {e}")),
                    },
                    Ok(Err(e)) if e.is_connect() => {
                        backend.record_failure();
                        Outcome::Unreachable(error_chain(&e))
                    }
                    Ok(Err(e)) => Outcome::Unreachable(error_chain(&e)),
                    Err(_) => Outcome::TimedOut,
                };
                (i, backend, outcome)
            });
        }
        let mut sent: Vec<(usize, Arc<Backend>, Outcome)> = Vec::new();
        while let Some(done) = sends.join_next().await {
            match done {
                Ok(r) => sent.push(r),
                Err(e) => tracing::error!(error = %e, "an admin write task failed"),
            }
        }
        sent.sort_by_key(|(i, _, _)| *i);
        outcomes.extend(sent.into_iter().map(|(_, b, o)| (b, o)));
        for (b, o) in &outcomes {
            b.stats.count_response(RouteKind::Admin, o.status().as_u16());
        }

        let accepted: Vec<&Arc<Backend>> = outcomes
            .iter()
            .filter(|(_, o)| matches!(o, Outcome::Accepted(_)))
            .map(|(b, _)| b)
            .collect();
        if !accepted.is_empty() {
            let journaled = journal.append(write).and_then(|seq| {
                accepted.iter().try_for_each(|b| journal.mark_applied(&b.name, seq))?;
                Ok(seq)
            });
            journal.refresh_lags(&routing.backends);
            if let Err(e) = journaled {
                tracing::error!(error = %e, "admin write accepted but not journaled");
                return Err(ProxyError::AdminWrite {
                    status: StatusCode::INTERNAL_SERVER_ERROR,
                    detail: format!(
                        "admin write accepted by {} but the proxy could not journal it ({e}); replicas added later will miss it",
                        names(&accepted)
                    ),
                });
            }
        }
        let everyone = accepted.len() == outcomes.len();
        let refused_alike = accepted.is_empty()
            && outcomes
                .iter()
                .all(|(_, o)| matches!(o, Outcome::Refused(r) if r.status() == outcomes[0].1.status()));
        if everyone || refused_alike {
            // Every replica said the same: pass its answer on as it is (the KBS's own body).
            let Some((_, Outcome::Accepted(resp) | Outcome::Refused(resp))) = outcomes.into_iter().next() else {
                unreachable!("outcomes checked above");
            };
            let (mut parts, body) = resp.into_parts();
            if everyone {
                let durability = if journal.is_durable() { "disk" } else { "memory" };
                parts
                    .headers
                    .insert(JOURNAL_HEADER, HeaderValue::from_static(durability));
            }
            return Ok(Response::from_parts(parts, ProxyBody::full(body)));
        }
        let status = outcomes
            .iter()
            .map(|(_, o)| o.status())
            .max_by_key(|s| rank(*s))
            .unwrap_or(StatusCode::BAD_GATEWAY);
        Err(ProxyError::AdminWrite {
            status,
            detail: describe(&outcomes, accepted.len()),
        })
    }
}

impl Worker {
    /// Sends an admin write to the journal owner and passes its answer on.
    async fn forward_to_owner(
        &self,
        owner: &Uri,
        method: Method,
        path: PathAndQuery,
        mut headers: HeaderMap,
        body: Bytes,
        timeout: std::time::Duration,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let unreachable = |why: String| {
            ProxyError::JournalOwner {
            detail: format!(
                "the admin journal owner {owner} {why}; this proxy acknowledges no admin write the owner has not journaled: retry"
            ),
        }
        };
        let Some(uri) = crate::control::sync::owner_url(owner, path.as_str()) else {
            return Err(unreachable("cannot be addressed with this path".into()));
        };
        headers.insert(FORWARDED_HEADER, HeaderValue::from_static("1"));
        headers.remove(http::header::HOST);
        let mut req = Request::new(ProxyBody::full(body));
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        *req.version_mut() = Version::HTTP_11;
        *req.headers_mut() = headers;
        match tokio::time::timeout(timeout, self.client.request(req)).await {
            Ok(Ok(resp)) => match collect(resp).await {
                Ok(resp) => {
                    let (parts, body) = resp.into_parts();
                    Ok(Response::from_parts(parts, ProxyBody::full(body)))
                }
                Err(e) => Err(unreachable(format!(
                    "sent an answer that could not be read ({e}); the write may have been applied"
                ))),
            },
            Ok(Err(e)) if e.is_connect() => Err(unreachable(format!(
                "cannot be reached ({}); the write was not applied",
                error_chain(&e)
            ))),
            Ok(Err(e)) => Err(unreachable(format!(
                "failed ({}); the write may have been applied",
                error_chain(&e)
            ))),
            Err(_) => Err(unreachable(format!(
                "did not answer within {} s; the write may have been applied",
                timeout.as_secs()
            ))),
        }
    }
}

/// Worse is higher: server and gateway errors, then client errors, then anything else.
fn rank(s: StatusCode) -> (u8, u16) {
    let class = match s.as_u16() {
        500..=599 => 3,
        400..=499 => 2,
        200..=299 => 0,
        _ => 1,
    };
    (class, s.as_u16())
}

fn names(backends: &[&Arc<Backend>]) -> String {
    backends.iter().map(|b| b.name.as_str()).collect::<Vec<_>>().join(", ")
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let _ = write!(s, ": {c}");
        cur = c.source();
    }
    s
}

/// `detail` of a partial failure: who accepted, who did not and why.
fn describe(outcomes: &[(Arc<Backend>, Outcome)], accepted: usize) -> String {
    let mut s = format!("admin write applied on {accepted} of {} replicas.", outcomes.len());
    for (b, o) in outcomes {
        let _ = match o {
            Outcome::Accepted(r) => write!(s, " {}: accepted ({}).", b.name, r.status().as_u16()),
            Outcome::Refused(r) => {
                let reason = serde_json::from_slice::<serde_json::Value>(r.body())
                    .ok()
                    .and_then(|v| v.get("detail").and_then(|d| d.as_str()).map(str::to_owned))
                    .unwrap_or_default();
                write!(s, " {}: refused ({}) {reason}.", b.name, r.status().as_u16())
            }
            Outcome::Unreachable(e) => write!(s, " {}: unreachable ({e}).", b.name),
            Outcome::TimedOut => write!(s, " {}: no answer in time.", b.name),
            Outcome::Behind(n) => write!(s, " {}: not sent, still catching up on {n} earlier write(s).", b.name),
        };
    }
    if accepted > 0 {
        s.push_str(" The write is journaled; replicas that missed it get it before they take new sessions.");
    } else {
        s.push_str(" No replica applied it.");
    }
    s
}
