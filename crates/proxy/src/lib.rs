//! kbs-proxy: the session-affine reverse proxy for Trustee's Key Broker Service, as a library.
//!
//! Trustee keeps each attestation session in one replica's memory, so a client's `auth`,
//! `attest` and `resource` calls must reach the same replica. The proxy pins a client to a
//! replica with a signed route cookie issued on the first response, answers in the KBS's own
//! error shape when the pinned replica is gone so the client redoes its handshake, and sends
//! admin writes to every replica, replaying them to one that comes back empty.
//!
//! # Layout
//! The folders are the architecture:
//! - [`dataplane`]: listeners, the request pipeline and its two transports (hyper and the
//!   HTTP/1.1 fast path).
//! - [`routing`]: the route cookie, the affinity decision, learned sessions, balancing — pure,
//!   no I/O.
//! - [`upstream`]: the replicas and the connections to them.
//! - [`control`]: the control plane — health, discovery, the admin-write journal and replica
//!   sync, the admin port, metrics, reloads.
//! - [`kbs`]: facts of the KBS protocol: which step a request is, the KBS error body.
//! - [`config`]: settings layers (file, environment, flags) → a validated [`config::Config`].
//! - [`tls`]: rustls configurations, client-facing and to the replicas; [`telemetry`]: logging.
//!
//! The fast path's event loop is the `kbs-proxy-runtime` crate (`crates/runtime`); the simulated
//! KBS, the KBS client, the load generator and the demo are the `kbs-proxy-harness` crate
//! (`crates/harness`), kept out of this library; the binary is the workspace's root package.

pub mod config;
pub mod control;
pub mod dataplane;
pub mod kbs;
pub mod routing;
pub mod telemetry;
pub mod tls;
pub mod upstream;
