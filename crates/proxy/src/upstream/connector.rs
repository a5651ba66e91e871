//! Connections to backends: TCP with `TCP_NODELAY`, then TLS for `https://` backends with the
//! backend's own server name (SNI), all within the connect timeout. Plugged into hyper-util's
//! pooled client, which keys its pool by scheme and authority, so each backend gets its own pool.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::routing::Routing;

/// Makes backend connections for the pooled client.
#[derive(Clone)]
pub struct BackendConnector {
    /// Limit on TCP connect plus TLS handshake.
    connect_timeout: Duration,
    /// TLS client for `https://` backends.
    tls: TlsConnector,
    /// The current routing table, to find an `https` backend's certificate name by authority.
    routing: Arc<ArcSwap<Routing>>,
}

impl std::fmt::Debug for BackendConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendConnector")
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

impl BackendConnector {
    /// A connector using `tls` for `https` backends.
    pub fn new(connect_timeout: Duration, tls: Arc<rustls::ClientConfig>, routing: Arc<ArcSwap<Routing>>) -> Self {
        Self {
            connect_timeout,
            tls: TlsConnector::from(tls),
            routing,
        }
    }

    /// Connects to `uri`'s authority; TLS when its scheme is `https`.
    pub async fn connect(&self, uri: &Uri) -> io::Result<BackendStream> {
        let host = uri
            .host()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no host"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let https = uri.scheme_str() == Some("https");
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let work = async {
            let tcp = TcpStream::connect((host, port)).await?;
            tcp.set_nodelay(true)?;
            if !https {
                return Ok(BackendStream(Inner::Plain(TokioIo::new(tcp))));
            }
            let name = uri
                .authority()
                .and_then(|a| {
                    self.routing
                        .load()
                        .backends
                        .list
                        .iter()
                        .find(|b| &b.authority == a)
                        .map(|b| b.tls_name.clone())
                })
                .unwrap_or_else(|| host.to_owned());
            let server_name =
                ServerName::try_from(name).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
            let tls = self.tls.connect(server_name, tcp).await?;
            Ok(BackendStream(Inner::Tls(Box::new(TokioIo::new(tls)))))
        };
        match tokio::time::timeout(self.connect_timeout, work).await {
            Ok(result) => result,
            Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "backend connect timed out")),
        }
    }
}

impl tower_service::Service<Uri> for BackendConnector {
    type Response = BackendStream;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<BackendStream>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { this.connect(&uri).await })
    }
}

/// A connection to a backend, plain or TLS.
#[derive(Debug)]
pub struct BackendStream(Inner);

impl BackendStream {
    /// The address it is connected to.
    pub(crate) fn peer_addr(&self) -> io::Result<std::net::SocketAddr> {
        match &self.0 {
            Inner::Plain(tcp) => tcp.inner().peer_addr(),
            Inner::Tls(tls) => tls.inner().get_ref().0.peer_addr(),
        }
    }
}

#[derive(Debug)]
enum Inner {
    Plain(TokioIo<TcpStream>),
    Tls(Box<TokioIo<TlsStream<TcpStream>>>),
}

impl Connection for BackendStream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for BackendStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().0 {
            Inner::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Inner::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl hyper::rt::Write for BackendStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().0 {
            Inner::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Inner::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().0 {
            Inner::Plain(s) => Pin::new(s).poll_flush(cx),
            Inner::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().0 {
            Inner::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Inner::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().0 {
            Inner::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Inner::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.0 {
            Inner::Plain(s) => s.is_write_vectored(),
            Inner::Tls(s) => s.is_write_vectored(),
        }
    }
}
