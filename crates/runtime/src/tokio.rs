//! The fast path on tokio: each worker's `current_thread` runtime serves its connections too.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Instant;

use crate::reserve_read_room;

/// tokio, on the calling thread's runtime.
#[derive(Debug)]
pub struct Tokio;

impl crate::Runtime for Tokio {
    type Stream = TcpStream;
    type Listener = TcpListener;

    fn listener(socket: std::net::TcpListener) -> io::Result<TcpListener> {
        socket.set_nonblocking(true)?;
        tokio::net::TcpListener::from_std(socket).map(TcpListener)
    }

    fn spawn(task: impl Future<Output = ()> + Send + 'static) {
        tokio::spawn(task);
    }

    /// tokio's clock: paused with `tokio::time::pause`, so tests move it by hand.
    fn now() -> Instant {
        tokio::time::Instant::now().into_std()
    }
}

/// A tokio TCP stream.
#[derive(Debug)]
pub struct TcpStream(tokio::net::TcpStream);

impl crate::Stream for TcpStream {
    async fn connect(addr: SocketAddr) -> io::Result<Self> {
        tokio::net::TcpStream::connect(addr).await.map(Self)
    }

    async fn readable(&self) -> io::Result<()> {
        self.0.readable().await
    }

    fn try_read_vec(&self, buf: &mut Vec<u8>) -> io::Result<usize> {
        reserve_read_room(buf);
        // Without readiness, tokio answers `WouldBlock` without a system call.
        self.0.try_read_buf(buf)
    }

    async fn read_vec(&self, buf: &mut Vec<u8>) -> io::Result<usize> {
        loop {
            match self.try_read_vec(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.0.readable().await?,
                other => return other,
            }
        }
    }

    async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.0.try_read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.0.readable().await?,
                other => return other,
            }
        }
    }

    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.try_read(buf)
    }

    fn try_write(&self, data: &[u8]) -> io::Result<usize> {
        self.0.try_write(data)
    }

    async fn writable(&self) -> io::Result<()> {
        self.0.writable().await
    }

    async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            match self.0.try_write(data) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => data = &data[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.0.writable().await?,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn shutdown_write(&self) -> io::Result<()> {
        rustix::net::shutdown(&self.0, rustix::net::Shutdown::Write).map_err(io::Error::from)
    }

    fn set_nodelay(&self, nodelay: bool) -> io::Result<()> {
        self.0.set_nodelay(nodelay)
    }

    fn into_std(self) -> io::Result<std::net::TcpStream> {
        self.0.into_std()
    }
}

/// A tokio TCP listener.
#[derive(Debug)]
pub struct TcpListener(tokio::net::TcpListener);

impl crate::Listener for TcpListener {
    type Stream = TcpStream;

    async fn accept(&self) -> io::Result<(TcpStream, SocketAddr)> {
        let (stream, peer) = self.0.accept().await?;
        Ok((TcpStream(stream), peer))
    }
}
