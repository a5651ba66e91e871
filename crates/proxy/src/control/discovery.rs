//! Backends from DNS: every address a name resolves to is a backend (a Kubernetes headless
//! Service gives one address per pod). A backend's name is its address, so its cookie id is
//! stable across re-resolution and the same on every proxy replica.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;

use http::uri::Authority;

use crate::config::{BackendSpec, DnsSource};

/// Resolves a DNS source to addresses. The system resolver in production; tests plug in their own.
pub trait Resolve: Send + Sync + 'static {
    /// The addresses of `source`, ports included.
    fn resolve<'a>(
        &'a self,
        source: &'a DnsSource,
    ) -> Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'a>>;
}

/// The system resolver (getaddrinfo, via tokio).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve<'a>(
        &'a self,
        source: &'a DnsSource,
    ) -> Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'a>> {
        Box::pin(async move {
            Ok(tokio::net::lookup_host((source.host.as_str(), source.port))
                .await?
                .collect())
        })
    }
}

/// The backends for `addrs` of `source`, sorted and without duplicates.
pub(crate) fn specs_for(source: &DnsSource, mut addrs: Vec<SocketAddr>) -> Vec<BackendSpec> {
    addrs.sort();
    addrs.dedup();
    addrs
        .into_iter()
        .filter_map(|addr| {
            let authority: Authority = addr.to_string().parse().ok()?;
            Some(BackendSpec {
                name: authority.as_str().to_owned(),
                scheme: source.scheme.clone(),
                authority,
                tls_name: source.tls_name.clone(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::uri::Scheme;

    #[test]
    fn one_backend_per_address_named_by_it() {
        let src = DnsSource {
            scheme: Scheme::HTTPS,
            host: "kbs.ns.svc".into(),
            port: 8080,
            tls_name: "kbs.ns.svc".into(),
        };
        let addrs = vec![
            "10.0.0.2:8080".parse().unwrap(),
            "10.0.0.1:8080".parse().unwrap(),
            "[fd00::1]:8080".parse().unwrap(),
            "10.0.0.1:8080".parse().unwrap(),
        ];
        let specs = specs_for(&src, addrs);
        let names: Vec<_> = specs.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["10.0.0.1:8080", "10.0.0.2:8080", "[fd00::1]:8080"]);
        assert!(specs
            .iter()
            .all(|s| s.tls_name == "kbs.ns.svc" && s.scheme == Scheme::HTTPS));
    }

    #[tokio::test]
    async fn the_system_resolver_resolves_localhost() {
        let src = DnsSource {
            scheme: Scheme::HTTP,
            host: "localhost".into(),
            port: 8080,
            tls_name: "localhost".into(),
        };
        let addrs = SystemResolver.resolve(&src).await.unwrap();
        assert!(
            addrs.iter().any(|a| a.ip().is_loopback() && a.port() == 8080),
            "{addrs:?}"
        );
    }
}
