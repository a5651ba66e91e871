//! kbs-affinity-proxy: a session-affine reverse proxy for Trustee's Key Broker Service.
//!
//! Trustee keeps each attestation session in one replica's memory, so a client's `auth`,
//! `attest` and `resource` calls must reach the same replica. The proxy pins a client to a
//! replica with a signed route cookie issued on the first response, and answers in the KBS's own
//! error shape when the pinned replica is gone so the client redoes its handshake.
//!
//! # Layout
//! - [`config`]: settings layers (file, environment, flags) → a validated [`config::Config`].
//! - [`server`]: listeners (SO_REUSEPORT), one single-threaded runtime per worker, HTTP/1.1+h2c.
//! - [`proxy`]: the request path: cookie → decision → forward → response; errors in one place;
//!   the HTTP/1.1 fast path (`proxy/fast.rs`) and hyper for everything else.
//! - [`affinity`]: the decision, one `match` over the route cookie's states.
//! - [`route_cookie`]: the signed cookie codec and the `Cookie` header scanner.
//! - [`backend`], [`balance`]: the replicas, their load and passive health; choosing one.
//! - [`kbs`]: protocol facts: which step a request is, the KBS error body.
//! - [`sim`], [`kbs_client`]: a simulated KBS replica and a client that behaves like the real one.
//! - [`loadgen`]: full KBS sessions from many clients: latency histograms, errors, affinity check.
//! - [`routing`]: the routing table (backends, balancer, cookie issuer), swapped whole.
//! - [`connector`], [`tls`]: backend connections (TCP, TLS with SNI); client-facing TLS.
//! - [`control`]: the control plane: [`health`] checks, [`discovery`] by DNS, drains, reloads.
//! - [`admin`]: the admin port; [`metrics`]: counters and their Prometheus exposition.
//! - [`journal`]: admin writes broadcast to every replica, and the catch-up of those that missed some.
//! - [`sync`]: replicas that lost their state (restarted empty) found and resynced; the periodic
//!   reconciliation; following a journal owner when several proxies run.
//! - [`sessions`]: affinity learned from `kbs-session-id` cookies and tokens, for cookie-less clients.
//! - [`demo`]: the `demo` subcommand; [`telemetry`]: logging.

pub mod admin;
pub mod affinity;
pub mod backend;
pub mod balance;
pub mod config;
pub mod connector;
pub mod control;
pub mod demo;
pub mod discovery;
pub mod health;
pub mod journal;
pub mod kbs;
pub mod kbs_client;
pub mod loadgen;
pub mod metrics;
pub mod proxy;
pub mod route_cookie;
pub mod routing;
pub mod server;
pub mod sessions;
pub mod sim;
pub mod sync;
pub mod telemetry;
pub mod tls;
