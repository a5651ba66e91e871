//! The hyper transport: HTTP/2 (h2c, or `h2` by ALPN over TLS), every request the fast path
//! hands over, and everything when the fast path is off. It runs the
//! pipeline's shared steps — [`super::route`] to decide, [`super::retry`] to pick the next
//! attempt, [`super::access_log`] and the counters to observe — around hyper's client.

use super::*;

/// Where the request is going and what the response must carry.
struct Target {
    /// The backend to send to.
    backend: Arc<Backend>,
    /// Whether the response gets a new route cookie.
    issue_cookie: bool,
    /// Whether the request belongs to the session on this backend, so it must not go elsewhere.
    session_bound: bool,
}

impl Worker {
    /// Handles one request. Never fails: errors become responses here, in one place.
    pub async fn handle(&self, mut req: Request<Incoming>, conn: &ConnInfo) -> Response<ProxyBody> {
        let started = Instant::now();
        self.settle_request_id(req.headers_mut());
        let kind = RouteKind::classify(req.method(), req.uri().path());
        let routing = self.shared.routing.load_full();
        let mut log = AccessLog::begin(routing.access_log, &req, conn, &routing.trusted_proxies);
        let resp = match self.handle_inner(req, kind, conn, &routing, &mut log).await {
            Ok(resp) => resp,
            Err(err) => {
                log.answered_locally(&err);
                tracing::debug!(route = kind.as_str(), error = %err, cause = ?std::error::Error::source(&err), "answered by the proxy");
                let resp = err.into_response(kind, &self.shared.stats);
                self.shared.stats.count_local(kind, resp.status().as_u16());
                resp
            }
        };
        let done = Instant::now();
        let elapsed = done.saturating_duration_since(started);
        self.latency.observe(kind, elapsed);
        log.finish(kind, resp.status().as_u16(), elapsed, done);
        resp
    }

    /// Leaves one `X-Request-Id`, the one the backend gets and the log shows: the client's first
    /// acceptable one, else a new one (as the fast path does).
    fn settle_request_id(&self, headers: &mut HeaderMap) {
        let mut given = headers.get_all(request_id::NAME).iter();
        let only_one_good =
            given.next().is_some_and(|v| request_id::acceptable(v.as_bytes())) && given.next().is_none();
        if only_one_good {
            return;
        }
        let chosen = headers
            .get_all(request_id::NAME)
            .iter()
            .find(|v| request_id::acceptable(v.as_bytes()))
            .cloned()
            .unwrap_or_else(|| {
                HeaderValue::from_bytes(&self.request_ids.generate()).expect("hex digits are a valid value")
            });
        headers.insert(http::HeaderName::from_static(request_id::NAME), chosen);
    }

    async fn handle_inner(
        &self,
        req: Request<Incoming>,
        kind: RouteKind,
        conn: &ConnInfo,
        routing: &Routing,
        log: &mut AccessLog,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        if let Some(fanout) = &routing.admin_fanout {
            if fanout.matches(req.method(), req.uri().path()) {
                log.decision = "broadcast";
                return self.broadcast(req, conn, routing, fanout).await;
            }
        }
        let stats = &*self.shared.stats;
        let now = unix_now();
        let cookie = &*routing.cookie;
        let verify = |v: &[u8]| cookie.codec.verify(v, now, cookie.max_age);
        let route = match self.route(req.headers(), kind, routing, now, verify) {
            Ok(route) => route,
            Err((err, backend)) => {
                log.backend = backend;
                return Err(err);
            }
        };
        log.decision = route.decision;
        let mut target = Target {
            backend: route.backend,
            issue_cookie: route.issue_cookie,
            session_bound: route.session_bound,
        };

        let (parts, body) = req.into_parts();
        let body = prepare_body(kind, &parts.headers, body, routing.auth_body_limit).await?;
        let replayable = !matches!(body, ProxyBody::Stream(..));
        let headers = forward_headers(parts.headers, &parts.uri, conn);
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let mut outgoing = Outgoing {
            method: parts.method,
            path,
            headers,
            body,
        };

        // Re-sending to another backend is decided by the one retry policy (retry.rs).
        let mut attempts = Attempts::default();
        loop {
            log.backend = Some(Arc::clone(&target.backend));
            let may_retry = attempts.may_retry(routing, target.session_bound, replayable);
            let req = if may_retry {
                outgoing.copy_for(&target.backend)
            } else {
                outgoing.take_request(&target.backend)
            };
            let in_flight = target.backend.start_request();
            let sent_at = Instant::now();
            let sent = tokio::time::timeout(routing.response_timeout, self.client.request(req)).await;
            match sent {
                Ok(Ok(resp)) => {
                    let response_time = sent_at.elapsed();
                    let backend_stats = &target.backend.stats;
                    target.backend.record_success();
                    let (mut parts, body) = resp.into_parts();
                    target.backend.stats.count_response(kind, parts.status.as_u16());
                    if !headers::settle_decoded_framing(&mut parts.headers) {
                        target.backend.record_failure();
                        backend_stats.count_error(UpstreamCause::BadResponse);
                        return Err(ProxyError::BadResponse {
                            backend: target.backend.name.clone(),
                        });
                    }
                    // A head the fast path would relay too: timed on both alike.
                    backend_stats.response_latency.observe(self.latency.slot, response_time);
                    headers::remove_hop_by_hop(&mut parts.headers);
                    if matches!(kind, RouteKind::Auth | RouteKind::Attest) {
                        self.learn_session(&parts.headers, &target.backend, routing, now);
                    }
                    if target.issue_cookie {
                        let value = cookie.set_cookie(target.backend.id, now, conn.tls);
                        parts.headers.append(SET_COOKIE, value);
                        stats.cookies_issued.fetch_add(1, Ordering::Relaxed);
                        target.backend.stats.sessions_pinned.fetch_add(1, Ordering::Relaxed);
                    }
                    if kind == RouteKind::Attest && parts.status.is_success() && !routing.tokens_portable {
                        let body = self.learn_token(body, &target.backend, routing, now).await?;
                        return Ok(Response::from_parts(parts, body));
                    }
                    return Ok(Response::from_parts(parts, ProxyBody::Stream(body, Some(in_flight))));
                }
                Ok(Err(e)) if e.is_connect() => {
                    let cause = connect_cause(&e);
                    match attempts.refused(routing, &target.backend, cause, kind, target.session_bound, replayable) {
                        AfterRefusal::RetryOn(next) => {
                            log.decision = "retried";
                            target = Target {
                                backend: next,
                                issue_cookie: true,
                                session_bound: false,
                            };
                        }
                        AfterRefusal::SessionLost => return Err(ProxyError::SessionLost),
                        AfterRefusal::GiveUp => {
                            return Err(ProxyError::Unreachable {
                                backend: target.backend.name.clone(),
                                source: e,
                            })
                        }
                    }
                }
                Ok(Err(e)) => {
                    target.backend.stats.count_error(exchange_cause(&e));
                    return Err(ProxyError::Backend {
                        backend: target.backend.name.clone(),
                        source: e,
                    });
                }
                Err(_elapsed) => {
                    target.backend.record_failure();
                    target.backend.stats.count_error(UpstreamCause::ResponseTimeout);
                    return Err(ProxyError::Timeout {
                        backend: target.backend.name.clone(),
                    });
                }
            }
            // Only reached when `may_retry` held, so `outgoing` was copied, not taken.
        }
    }
}

/// Why hyper's client could not connect: its connector's timeout, or no connection.
fn connect_cause(e: &hyper_util::client::legacy::Error) -> UpstreamCause {
    sources::<std::io::Error>(e)
        .next()
        .map_or(UpstreamCause::ConnectRefused, UpstreamCause::of_connect)
}

/// Why an exchange failed after connecting: a response hyper could not parse, else the
/// connection closing or resetting under it.
fn exchange_cause(e: &hyper_util::client::legacy::Error) -> UpstreamCause {
    let unparsable = |h: &hyper::Error| h.is_parse() || h.is_parse_status() || h.is_parse_too_large();
    if sources::<hyper::Error>(e).any(unparsable) {
        UpstreamCause::BadResponse
    } else {
        UpstreamCause::Reset
    }
}

/// The errors of type `T` in `e`'s chain of sources.
fn sources<'a, T: std::error::Error + 'static>(
    e: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a T> {
    std::iter::successors(e.source(), |s| s.source()).filter_map(|s| s.downcast_ref::<T>())
}

/// `auth` bodies are buffered (they are small and must be re-sendable when the pinned replica
/// is gone); empty bodies stay empty; everything else streams.
async fn prepare_body(
    kind: RouteKind,
    headers: &HeaderMap,
    body: Incoming,
    limit: usize,
) -> Result<ProxyBody, ProxyError> {
    if body.is_end_stream() {
        return Ok(ProxyBody::Empty);
    }
    if kind != RouteKind::Auth {
        return Ok(ProxyBody::Stream(body, None));
    }
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ProxyError::BodyTooLarge { limit });
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(ProxyBody::full(collected.to_bytes())),
        Err(e) => match e.downcast::<hyper::Error>() {
            Ok(e) => Err(ProxyError::ClientBody(*e)),
            Err(_length_limit) => Err(ProxyError::BodyTooLarge { limit }),
        },
    }
}

/// The parts of a request that go to a backend, kept whole until the last attempt.
struct Outgoing {
    method: Method,
    path: PathAndQuery,
    headers: HeaderMap,
    body: ProxyBody,
}
impl Outgoing {
    fn uri(&self, backend: &Backend) -> Uri {
        backend_uri(backend, self.path.clone())
    }

    fn build(&self, backend: &Backend, headers: HeaderMap, body: ProxyBody) -> Request<ProxyBody> {
        let mut req = Request::new(body);
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri(backend);
        *req.version_mut() = Version::HTTP_11;
        *req.headers_mut() = headers;
        req
    }

    /// A copy to send while keeping the original for another attempt (replayable bodies only).
    fn copy_for(&self, backend: &Backend) -> Request<ProxyBody> {
        let body = match &self.body {
            ProxyBody::Full(Some(b)) => ProxyBody::full(Bytes::clone(b)),
            ProxyBody::Full(None) | ProxyBody::Empty | ProxyBody::Stream(..) => ProxyBody::Empty,
        };
        self.build(backend, self.headers.clone(), body)
    }

    /// The request itself, for the last attempt: headers and body move out.
    fn take_request(&mut self, backend: &Backend) -> Request<ProxyBody> {
        let headers = std::mem::take(&mut self.headers);
        let body = std::mem::replace(&mut self.body, ProxyBody::Empty);
        self.build(backend, headers, body)
    }
}

/// Rewrites the client's headers for the backend: hop-by-hop out, `Host` kept (taken from the
/// URI for HTTP/2 clients, which send `:authority` instead), `X-Forwarded-*` set.
pub(super) fn forward_headers(mut headers: HeaderMap, uri: &Uri, conn: &ConnInfo) -> HeaderMap {
    headers::remove_hop_by_hop(&mut headers);
    let host = match headers.get(HOST) {
        Some(h) => Some(h.clone()),
        None => {
            let from_uri = uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok());
            if let Some(h) = &from_uri {
                headers.insert(HOST, h.clone());
            }
            from_uri
        }
    };
    headers::set_forwarded(&mut headers, &conn.peer_ip, conn.tls, host);
    headers
}
