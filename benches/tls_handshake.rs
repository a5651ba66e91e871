//! What a client-facing TLS handshake costs the proxy, in memory (no sockets): a full TLS 1.3
//! handshake with the proxy's server configuration and an ECDSA P-256 certificate, by the number
//! of session tickets sent after it, and a resumed handshake.
//!
//! `cargo bench --bench tls_handshake`. The client's side runs in the same loop, so the figures
//! are client + server; the differences between them are the server's ticket work (sealing
//! each ticket) plus the client's reading it.

use std::sync::Arc;

use criterion::{criterion_main, BenchmarkId, Criterion};
use kbs_proxy::config::TlsFiles;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, ClientConnection, ServerConfig, ServerConnection};

/// A self-signed ECDSA P-256 certificate for `kbs.test`, and a client trusting it.
fn configs(dir: &std::path::Path) -> (Arc<ServerConfig>, ClientConfig) {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["kbs.test".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let files = TlsFiles {
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
    };
    std::fs::write(&files.cert, cert.pem()).unwrap();
    std::fs::write(&files.key, key.serialize_pem()).unwrap();
    let server = kbs_proxy::tls::server_config(&files).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(cert.pem().as_bytes()).unwrap())
        .unwrap();
    let client = ClientConfig::builder_with_provider(kbs_proxy::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    (server, client)
}

/// Runs one handshake to the end, tickets delivered; returns whether it resumed.
fn handshake(client: &Arc<ClientConfig>, server: &Arc<ServerConfig>) -> bool {
    let mut c = ClientConnection::new(Arc::clone(client), "kbs.test".try_into().unwrap()).unwrap();
    let mut s = ServerConnection::new(Arc::clone(server)).unwrap();
    let mut buf = Vec::with_capacity(16 * 1024);
    for _ in 0..10 {
        relay(&mut c, &mut s, &mut buf);
        relay(&mut s, &mut c, &mut buf);
        if !c.is_handshaking() && !s.is_handshaking() && !s.wants_write() && !c.wants_write() {
            break;
        }
    }
    assert!(!c.is_handshaking() && !s.is_handshaking());
    c.handshake_kind() == Some(rustls::HandshakeKind::Resumed)
}

/// Moves what `from` has to send into `to`, and lets `to` process it.
fn relay<A, B, DA, DB>(from: &mut A, to: &mut B, buf: &mut Vec<u8>)
where
    A: std::ops::DerefMut<Target = rustls::ConnectionCommon<DA>>,
    B: std::ops::DerefMut<Target = rustls::ConnectionCommon<DB>>,
    DA: rustls::SideData,
    DB: rustls::SideData,
{
    buf.clear();
    while from.wants_write() {
        from.write_tls(buf).unwrap();
    }
    if !buf.is_empty() {
        to.read_tls(&mut &buf[..]).unwrap();
        to.process_new_packets().unwrap();
    }
}

fn bench(crit: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let (server, client) = configs(dir.path());
    let mut group = crit.benchmark_group("tls13_handshake");
    for tickets in [0, 1, 2, 4] {
        let mut s = (*server).clone();
        s.send_tls13_tickets = tickets;
        let s = Arc::new(s);
        // No resumption on the client: every handshake is a full one.
        let mut c = client.clone();
        c.resumption = rustls::client::Resumption::disabled();
        let c = Arc::new(c);
        group.bench_with_input(BenchmarkId::new("full", tickets), &tickets, |b, _| {
            b.iter(|| assert!(!handshake(&c, &s)))
        });
    }
    // Resumed: each handshake uses a ticket the one before it left.
    let c = Arc::new(client.clone());
    assert!(!handshake(&c, &server));
    group.bench_function("resumed", |b| b.iter(|| assert!(handshake(&c, &server))));
    group.finish();
}

#[allow(missing_docs)] // the macro generates an undocumented function
mod group {
    criterion::criterion_group!(benches, super::bench);
}

criterion_main!(group::benches);
