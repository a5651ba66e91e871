//! kbs-proxy-harness: what tests, benchmarks and the `demo` use around the proxy, kept out of
//! the proxy library.
//!
//! - [`sim`]: a simulated KBS replica that behaves like the real one in everything routing and
//!   state depend on (sessions in memory, resources in its own storage, the admin API).
//! - [`kbs_client`]: a client that behaves like Trustee's `kbs-client` (cookie jar, handshake).
//! - [`loadgen`]: full KBS sessions from many clients: latency histograms, errors, affinity.
//! - [`demo`]: the binary's `demo` subcommand: simulated replicas behind the proxy.
//! - [`compare_chart`]: the bar chart of `benches/compare.sh`'s runs; [`chart`]: what it
//!   shares with the loadgen's plot.

pub mod chart;
pub mod compare_chart;
pub mod demo;
pub mod kbs_client;
pub mod loadgen;
pub mod sim;
#[cfg(test)]
mod svg_check;
