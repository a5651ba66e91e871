//! The data plane: what every client request goes through.
//!
//! - [`server`]: the listeners (SO_REUSEPORT, one per worker), one single-threaded runtime per
//!   worker, client-facing TLS and the choice of transport per connection.
//! - [`proxy`]: the request pipeline — classify, decide (with [`crate::routing`]), pick the next
//!   attempt (one retry policy), forward, observe (access log, metrics, local answers) — and its
//!   two transports: hyper (HTTP/2, anything unusual) and the HTTP/1.1 fast path, plain or over
//!   TLS (`proxy/fast.rs`, on the event loop of the `kbs-proxy-runtime` crate).

pub mod proxy;
pub mod server;
