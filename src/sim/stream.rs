//! Boxed byte streams (plain TCP or TLS) with access to the TCP socket.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A connection's byte stream.
pub(crate) trait Io: AsyncRead + AsyncWrite + Unpin + Send {
    /// The underlying TCP socket.
    fn tcp(&self) -> Option<&TcpStream>;
    /// The plain TCP socket, if this is one (for a TLS upgrade).
    fn into_tcp(self: Box<Self>) -> Option<TcpStream>;
}

impl Io for TcpStream {
    fn tcp(&self) -> Option<&TcpStream> {
        Some(self)
    }
    fn into_tcp(self: Box<Self>) -> Option<TcpStream> {
        Some(*self)
    }
}

impl Io for tokio_rustls::server::TlsStream<TcpStream> {
    fn tcp(&self) -> Option<&TcpStream> {
        Some(self.get_ref().0)
    }
    fn into_tcp(self: Box<Self>) -> Option<TcpStream> {
        None
    }
}

impl Io for tokio_rustls::client::TlsStream<TcpStream> {
    fn tcp(&self) -> Option<&TcpStream> {
        Some(self.get_ref().0)
    }
    fn into_tcp(self: Box<Self>) -> Option<TcpStream> {
        None
    }
}

/// Placeholder stream while a TLS handshake owns the socket: EOF / broken pipe.
pub(crate) struct Dead;

impl AsyncRead for Dead {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        _: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Dead {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, _: &[u8]) -> Poll<io::Result<usize>> {
        Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl Io for Dead {
    fn tcp(&self) -> Option<&TcpStream> {
        None
    }
    fn into_tcp(self: Box<Self>) -> Option<TcpStream> {
        None
    }
}

/// Make the next close of this socket send a TCP RST (SO_LINGER 0).
pub(crate) fn arm_rst(io: &dyn Io) {
    if let Some(t) = io.tcp() {
        // With a zero timeout, close() does not block: it discards and resets.
        #[allow(deprecated)]
        let _ = t.set_linger(Some(Duration::ZERO));
    }
}
