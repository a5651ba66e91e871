//! The client side of a fast-path connection: plain TCP, or TLS with rustls driven in the
//! connection's own task.
//!
//! [`ClientIo`] is what the fast path asks of a client connection: [`Plain`] is a socket as it is;
//! [`TlsClient`] puts a `rustls::ServerConnection` between the socket and the fast path:
//! ciphertext is read by rustls straight from the socket (`read_tls`, one system call into its
//! buffer), decrypted in place, and the plaintext copied once into the request buffer; answers are
//! encrypted by rustls into records and written with `write_tls`. No task, channel or buffer
//! sits between the two (measured against hyper over tokio-rustls in docs/benchmarks.md).
//!
//! The buffered `ServerConnection` rather than rustls' unbuffered API: it handles alerts,
//! KeyUpdate, post-handshake tickets and close_notify itself, and costs one plaintext copy per
//! read (a few hundred bytes per KBS request); its receive buffer shrinks when drained, so an
//! idle TLS connection holds no record buffer.

use std::future::Future;
use std::io::{self, BufRead as _, Write as _};
use std::sync::Arc;

use rustls::{ServerConfig, ServerConnection};

/// What the fast path does with a client connection. `&mut self` throughout: one task owns it.
pub trait ClientIo: Send + Sync + Sized + 'static {
    /// Waits until a read would not block (data, the peer's close, or an error to report).
    fn readable(&mut self) -> impl Future<Output = io::Result<()>> + Send;
    /// Reads what is at hand into `buf`'s spare capacity (made if there is none), without
    /// waiting: `WouldBlock` when there is nothing. `Ok(0)`: the peer closed.
    fn try_read_vec(&mut self, buf: &mut Vec<u8>) -> io::Result<usize>;
    /// Reads into `buf`'s spare capacity (made if there is none), waiting for data.
    fn read_vec(&mut self, buf: &mut Vec<u8>) -> impl Future<Output = io::Result<usize>> + Send;
    /// Reads into `buf`, waiting for data.
    fn read(&mut self, buf: &mut [u8]) -> impl Future<Output = io::Result<usize>> + Send;
    /// Writes all of `data`, waiting for room as needed.
    fn write_all(&mut self, data: &[u8]) -> impl Future<Output = io::Result<()>> + Send;
    /// Ends the client's stream (TLS: a close_notify first), without waiting.
    fn shutdown_write(&mut self);
    /// Leaves the fast path: the socket (non-blocking) and the TLS session on it, for hyper.
    fn into_handoff(self) -> io::Result<Handoff>;
}

/// A connection the fast path gives up: its socket and, over TLS, the session on it (with any
/// records it still has to send).
pub struct Handoff {
    pub socket: std::net::TcpStream,
    pub tls: Option<Box<ServerConnection>>,
}

/// A plain-TCP client connection.
pub struct Plain<S>(pub S);

impl<S: rt::Stream> ClientIo for Plain<S> {
    fn readable(&mut self) -> impl Future<Output = io::Result<()>> + Send {
        self.0.readable()
    }

    fn try_read_vec(&mut self, buf: &mut Vec<u8>) -> io::Result<usize> {
        self.0.try_read_vec(buf)
    }

    fn read_vec(&mut self, buf: &mut Vec<u8>) -> impl Future<Output = io::Result<usize>> + Send {
        self.0.read_vec(buf)
    }

    fn read(&mut self, buf: &mut [u8]) -> impl Future<Output = io::Result<usize>> + Send {
        self.0.read(buf)
    }

    fn write_all(&mut self, data: &[u8]) -> impl Future<Output = io::Result<()>> + Send {
        self.0.write_all(data)
    }

    fn shutdown_write(&mut self) {
        let _ = self.0.shutdown_write();
    }

    fn into_handoff(self) -> io::Result<Handoff> {
        Ok(Handoff {
            socket: self.0.into_std()?,
            tls: None,
        })
    }
}

/// A client connection over TLS, served in the fast path's task. Dropped, it sends the client a
/// close_notify (a body framed by the connection's end is then known to be whole).
pub struct TlsClient<S: rt::Stream> {
    /// `None` once handed over.
    inner: Option<Session<S>>,
}

/// A socket and the TLS session on it.
struct Session<S> {
    io: S,
    conn: Box<ServerConnection>,
}

/// A socket as `std::io` sees it, for rustls: reads and writes that do not wait.
struct SyncIo<'a, S>(&'a S);

impl<S: rt::Stream> io::Read for SyncIo<'_, S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.try_read(buf)
    }
}

impl<S: rt::Stream> io::Write for SyncIo<'_, S> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.0.try_write(data)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Why a handshake did not complete.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("the client closed during the handshake")]
    Closed,
}

impl<S: rt::Stream> Session<S> {
    /// Writes the records rustls has queued, waiting for room as needed.
    async fn flush(&mut self) -> io::Result<()> {
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut SyncIo(&self.io)) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.io.writable().await?,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Writes what the socket takes of the queued records now; the rest goes with the next
    /// write (rustls keeps their order).
    fn try_flush(&mut self) {
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut SyncIo(&self.io)) {
                Ok(n) if n > 0 => {}
                _ => break,
            }
        }
    }

    /// Reads what the socket has into rustls and decrypts it. `Ok(0)`: the socket's end (rustls
    /// reports it through its reader).
    fn read_tls(&mut self) -> io::Result<usize> {
        let n = self.conn.read_tls(&mut SyncIo(&self.io))?;
        if let Err(e) = self.conn.process_new_packets() {
            // The alert rustls queued, if the socket takes it.
            self.try_flush();
            return Err(io::Error::new(io::ErrorKind::InvalidData, e));
        }
        // A KeyUpdate's answer, say: sent now if the socket takes it, else before the next answer.
        self.try_flush();
        Ok(n)
    }

    /// Decrypted bytes into `out`, reading the socket when rustls has none: `Ok(0)` at the
    /// client's close_notify; `UnexpectedEof` when the socket closed without one.
    fn try_read_with(&mut self, mut out: impl FnMut(&[u8]) -> usize) -> io::Result<usize> {
        loop {
            match self.conn.reader().fill_buf() {
                Ok(chunk) => {
                    let n = out(chunk);
                    self.conn.reader().consume(n);
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            self.read_tls()?;
        }
    }
}

impl<S: rt::Stream> TlsClient<S> {
    /// Completes a TLS handshake on `io` with `config` (the caller bounds its time).
    pub async fn accept(io: S, config: Arc<ServerConfig>) -> Result<Self, HandshakeError> {
        let mut s = Session {
            io,
            conn: Box::new(ServerConnection::new(config)?),
        };
        loop {
            s.flush().await?;
            if !s.conn.is_handshaking() {
                return Ok(Self { inner: Some(s) });
            }
            match s.read_tls() {
                Ok(0) => return Err(HandshakeError::Closed),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    s.io.readable().await?;
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
            // TLS 1.3 done: all the server has left to send is its session ticket, which the
            // client does not wait for. It goes in the same write as the first answer (rustls
            // keeps the order): one system call less per new connection. TLS 1.2 ends with
            // the server's Finished, which the client does wait for: flushed above.
            if !s.conn.is_handshaking() && s.conn.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3) {
                return Ok(Self { inner: Some(s) });
            }
        }
    }

    /// The ALPN protocol the handshake chose.
    pub fn alpn(&self) -> Option<&[u8]> {
        self.inner.as_ref().and_then(|s| s.conn.alpn_protocol())
    }

    fn session(&mut self) -> &mut Session<S> {
        self.inner.as_mut().expect("present until handed over")
    }
}

impl<S: rt::Stream> ClientIo for TlsClient<S> {
    async fn readable(&mut self) -> io::Result<()> {
        let s = self.session();
        let mut reader = s.conn.reader();
        if !matches!(reader.fill_buf(), Err(e) if e.kind() == io::ErrorKind::WouldBlock) {
            return Ok(()); // plaintext, or its end, without the socket
        }
        s.io.readable().await
    }

    fn try_read_vec(&mut self, buf: &mut Vec<u8>) -> io::Result<usize> {
        self.session().try_read_with(|chunk| {
            buf.extend_from_slice(chunk);
            chunk.len()
        })
    }

    async fn read_vec(&mut self, buf: &mut Vec<u8>) -> io::Result<usize> {
        loop {
            match self.try_read_vec(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.session().io.readable().await?,
                other => return other,
            }
        }
    }

    async fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let copied = self.session().try_read_with(|chunk| {
                let n = chunk.len().min(buf.len());
                buf[..n].copy_from_slice(&chunk[..n]);
                n
            });
            match copied {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.session().io.readable().await?,
                other => return other,
            }
        }
    }

    async fn write_all(&mut self, mut data: &[u8]) -> io::Result<()> {
        let s = self.session();
        while !data.is_empty() {
            // Encrypted into records as far as rustls' send buffer limit allows, then written.
            let n = s.conn.writer().write(data)?;
            data = &data[n..];
            s.flush().await?;
        }
        Ok(())
    }

    fn shutdown_write(&mut self) {
        let s = self.session();
        s.conn.send_close_notify();
        s.try_flush();
        let _ = s.io.shutdown_write();
    }

    fn into_handoff(mut self) -> io::Result<Handoff> {
        let Session { io, conn } = self.inner.take().expect("present until handed over");
        Ok(Handoff {
            socket: io.into_std()?,
            tls: Some(conn),
        })
    }
}

impl<S: rt::Stream> Drop for TlsClient<S> {
    fn drop(&mut self) {
        if let Some(mut s) = self.inner.take() {
            if !s.conn.is_handshaking() {
                s.conn.send_close_notify();
                s.try_flush();
            }
        }
    }
}
