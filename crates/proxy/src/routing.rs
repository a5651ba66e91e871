//! Routing: which replica a request goes to. Pure decisions over immutable data — no I/O, no
//! tokio — so every rule here is tested without a socket.
//!
//! - [`route_cookie`]: the signed route cookie's codec and the `Cookie` header scanner.
//! - [`affinity`]: the decision, one exhaustive `match` over the route cookie's states.
//! - [`sessions`]: affinity learned from `kbs-session-id` cookies and tokens, for clients
//!   without the route cookie.
//! - [`balance`]: choosing a backend for a new session (round-robin, least requests).
//! - [`table`]: the routing table ([`Routing`]) — backends, balancer, cookie issuer — one
//!   snapshot swapped whole by the control plane.

pub mod affinity;
pub mod balance;
pub mod route_cookie;
pub mod sessions;
pub mod table;

pub use table::{CookieIssuer, Routing};
