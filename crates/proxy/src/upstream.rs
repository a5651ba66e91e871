//! Upstream: the KBS replicas and the connections to them.
//!
//! - [`backend`]: a replica's state — load, passive health, drain, admin-write sync — and the
//!   backend set.
//! - [`connector`]: connections to a replica (TCP, TLS with SNI from [`crate::tls`]).

pub mod backend;
pub mod connector;
