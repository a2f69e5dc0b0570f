//! The TLS stream of an accepted connection, until its socket takes it: one that is dropped
//! without a shutdown still ends with a close_notify.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::stream_tuning::OverTcp;
use crate::upgrade::Accepted;
use crate::wire::Wire;

/// A TLS connection as the server accepts it.
pub(crate) type TlsStream = switchboard_tls::tokio_rustls::server::TlsStream<TcpStream>;

/// A TLS connection until it becomes a socket's [`Wire`]: dropped without a shutdown, it
/// still ends with a close_notify (as far as the kernel takes it at once). hyper drops the
/// connection of an upgrade request it answered with a refusal that way, and the client
/// would see its answer cut short rather than ended.
pub(crate) struct ClosingTls {
    /// `None` once taken for the socket.
    stream: Option<TlsStream>,
    /// A shutdown was asked for: it sends the close_notify itself.
    shut: bool,
}

impl ClosingTls {
    pub(crate) fn new(stream: TlsStream) -> Self {
        ClosingTls {
            stream: Some(stream),
            shut: false,
        }
    }

    fn stream(&mut self) -> Pin<&mut TlsStream> {
        Pin::new(self.stream.as_mut().expect("taken only by into_wire"))
    }
}

impl Drop for ClosingTls {
    fn drop(&mut self) {
        if let Some(stream) = self.stream.take().filter(|_| !self.shut) {
            let (tcp, session) = stream.into_inner();
            Wire::tls(tcp, session).shutdown();
        }
    }
}

impl AsyncRead for ClosingTls {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.stream().poll_read(cx, buf)
    }
}

impl AsyncWrite for ClosingTls {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.stream().poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.stream().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.as_ref().is_some_and(|s| s.is_write_vectored())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stream().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.shut = true;
        self.stream().poll_shutdown(cx)
    }
}

impl OverTcp for ClosingTls {
    fn tcp(&self) -> &TcpStream {
        self.stream
            .as_ref()
            .expect("taken only by into_wire")
            .get_ref()
            .0
    }
}

impl Accepted for ClosingTls {
    fn into_wire(mut self) -> Wire {
        // What rustls decrypted and reading the head did not take stays in the session, which
        // the socket reads first.
        let (tcp, session) = self.stream.take().expect("taken once").into_inner();
        Wire::tls(tcp, session)
    }
}
