//! What the session needs of a client stream beyond reading and writing
//! (a write that goes out now without a future, when the stream can), and
//! the session's own flushes built on it. May call: tokio I/O, `buffers`.

use bytes::Buf;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::{buffers, Session, SessionError};

/// A client connection: plain TCP, TLS, a Unix-domain socket, or an
/// in-memory pipe in tests.
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

/// `try_write`, with a full socket as 0 bytes.
fn written(r: std::io::Result<usize>) -> std::io::Result<usize> {
    match r {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(0),
        r => r,
    }
}

impl WriteNow for tokio::net::TcpStream {
    fn write_now(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        written(self.try_write(buf))
    }
}

impl WriteNow for tokio::net::UnixStream {
    fn write_now(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        written(self.try_write(buf))
    }
}

impl WriteNow for tokio::io::DuplexStream {}

impl WriteNow for tokio_rustls::server::TlsStream<tokio::net::TcpStream> {}

impl<C: ClientIo> Session<C> {
    /// Writes what the sockets take now; `Ok(true)` when nothing is left,
    /// the common case, which then needs no future and no waiting.
    pub(super) fn flush_now(&mut self) -> Result<bool, SessionError> {
        // Counted before they can reach the client, so a client that read
        // a reply never sees a count without it; what this call leaves is
        // written by `flush_rest` next (a write that fails was counted).
        if !self.out_client.is_empty() {
            let n = self.out_client.len() as u64;
            self.shared.metrics.bytes_out.increment(n);
        }
        if !self.out_server.is_empty() {
            if let Some(co) = self.server.as_mut() {
                let n = co
                    .conn
                    .stream
                    .write_now(&self.out_server)
                    .map_err(SessionError::ServerIo)?;
                if n < self.out_server.len() {
                    self.out_server.advance(n);
                    return Ok(false);
                }
            }
            buffers::clear(&mut self.out_server);
        }
        if !self.out_client.is_empty() {
            let n = self
                .client
                .write_now(&self.out_client)
                .map_err(SessionError::ClientIo)?;
            if n < self.out_client.len() {
                self.out_client.advance(n);
                return Ok(false);
            }
            buffers::clear(&mut self.out_client);
        }
        Ok(true)
    }

    /// Writes everything out, waiting for the sockets when they are full.
    pub(super) async fn flush(&mut self) -> Result<(), SessionError> {
        if self.flush_now()? {
            return Ok(());
        }
        self.flush_rest().await
    }

    /// What [`Session::flush_now`] left (and counted): waits for the
    /// sockets to drain. Always called after it; hot paths call the two
    /// themselves, so the common case builds no future.
    pub(super) async fn flush_rest(&mut self) -> Result<(), SessionError> {
        if !self.out_server.is_empty() {
            if let Some(co) = self.server.as_mut() {
                co.conn
                    .stream
                    .write_all(&self.out_server)
                    .await
                    .map_err(SessionError::ServerIo)?;
            }
            buffers::clear(&mut self.out_server);
        }
        if !self.out_client.is_empty() {
            self.client
                .write_all(&self.out_client)
                .await
                .map_err(SessionError::ClientIo)?;
            buffers::clear(&mut self.out_client);
        }
        Ok(())
    }
}
