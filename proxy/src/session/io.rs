//! What the session needs of a client stream beyond reading and writing:
//! a write that goes out now without a future, when the stream can. May
//! call: tokio I/O.

use tokio::io::{AsyncRead, AsyncWrite};

/// A client connection: plain TCP, TLS, or an in-memory pipe in tests.
pub trait ClientIo: AsyncRead + AsyncWrite + WriteNow + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + WriteNow + Unpin + Send> ClientIo for T {}

/// A stream that can take bytes without a future: one `send` when the
/// socket has room, which is almost always. Saves the write future's
/// machinery twice per transaction. Streams that cannot tell (TLS, whose
/// records go out through the async path, and in-memory pipes) take
/// nothing here.
pub trait WriteNow {
    /// Bytes written now; 0 when the socket is full or cannot tell.
    fn write_now(&mut self, _buf: &[u8]) -> std::io::Result<usize> {
        Ok(0)
    }
}

impl WriteNow for tokio::net::TcpStream {
    fn write_now(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.try_write(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(0),
            r => r,
        }
    }
}

impl WriteNow for tokio::io::DuplexStream {}

impl WriteNow for tokio_rustls::server::TlsStream<tokio::net::TcpStream> {}
