//! The kernel's side of a streamed answer (an endpoint's [`StreamReply`]): how much of it the
//! kernel may hold for a client that does not read, and how long what was sent may go
//! unacknowledged.
//!
//! hyper owns the connection by the time an endpoint answers with a stream, so the options
//! are asked for through [`StreamTuning`] and set by the connection's IO ([`Tuned`]) on its
//! next write, before the answer's first byte goes out.
//!
//! [`StreamReply`]: switchboard_core::StreamReply

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// The kernel's send buffer for a streamed answer (Linux doubles what it is asked for). With
/// send-buffer autotuning, the kernel takes up to `tcp_wmem`'s maximum (4 MiB by default) of a
/// stream its client does not read, so the endpoint would go on handing out its queue and
/// never see the client stop; bounded, the stream stops being polled within this many bytes,
/// and the endpoint's own check (nothing taken between two heartbeats) finds it.
pub(crate) const STREAM_SEND_BUFFER: usize = 64 * 1024;

/// What a connection's handler asks of its IO once its answer is a stream. `0`: nothing (yet);
/// [`NO_LIMIT`]: the send buffer only; otherwise also `TCP_USER_TIMEOUT` in milliseconds.
#[derive(Debug, Default)]
pub(crate) struct StreamTuning(AtomicU64);

const NO_LIMIT: u64 = u64::MAX;

impl StreamTuning {
    /// The answer is a stream: bound the send buffer, and drop the connection when what was
    /// sent stays unacknowledged for `unacked_limit` (a client that vanished without a FIN or
    /// a reset would otherwise hold its place until TCP gives up, about 15 minutes).
    pub(crate) fn request(&self, unacked_limit: Option<Duration>) {
        // Zero would be the kernel's default to the option, not "at once": no limit then. The
        // kernel takes at most `i32::MAX` milliseconds (24.8 days).
        let ms = match unacked_limit {
            Some(d) if !d.is_zero() => d.as_millis().clamp(1, i32::MAX as u128) as u64,
            _ => NO_LIMIT,
        };
        self.0.store(ms, Relaxed);
    }

    /// What was asked and not applied yet (taken: applied once).
    fn take(&self) -> Option<Option<Duration>> {
        if self.0.load(Relaxed) == 0 {
            return None;
        }
        match self.0.swap(0, Relaxed) {
            0 => None,
            NO_LIMIT => Some(None),
            ms => Some(Some(Duration::from_millis(ms))),
        }
    }
}

/// A connection's IO whose TCP socket can be reached, for [`Tuned`].
pub(crate) trait OverTcp {
    fn tcp(&self) -> &TcpStream;
}

impl OverTcp for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }
}

/// A connection's IO that applies the [`StreamTuning`] asked for before its next write.
pub(crate) struct Tuned<I> {
    io: I,
    tuning: Arc<StreamTuning>,
}

impl<I: OverTcp> Tuned<I> {
    pub(crate) fn new(io: I, tuning: Arc<StreamTuning>) -> Self {
        Tuned { io, tuning }
    }

    pub(crate) fn into_inner(self) -> I {
        self.io
    }

    fn apply_asked(&self) {
        let Some(unacked_limit) = self.tuning.take() else {
            return;
        };
        // Best effort: a socket that refuses an option streams as before.
        let socket = socket2::SockRef::from(self.io.tcp());
        if let Err(e) = socket.set_send_buffer_size(STREAM_SEND_BUFFER) {
            tracing::debug!(error = %e, "send buffer of a stream not bounded");
        }
        if let Some(limit) = unacked_limit {
            if let Err(e) = socket.set_tcp_user_timeout(Some(limit)) {
                tracing::debug!(error = %e, "TCP_USER_TIMEOUT of a stream not set");
            }
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Tuned<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + OverTcp + Unpin> AsyncWrite for Tuned<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.apply_asked();
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.apply_asked();
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn the_options_asked_for_are_set_before_the_next_write_and_only_then() {
        let (server, _, _client) = crate::test_support::loopback_pair().await;
        let tuning = Arc::new(StreamTuning::default());
        let mut io = Tuned::new(server, tuning.clone());
        io.write_all(b"head").await.unwrap();
        let untouched = socket2::SockRef::from(io.io.tcp());
        assert_eq!(
            untouched.tcp_user_timeout().unwrap(),
            None,
            "nothing asked yet"
        );
        let autotuned = untouched.send_buffer_size().unwrap();

        tuning.request(Some(Duration::from_secs(60)));
        io.write_all(b"stream").await.unwrap();
        let socket = socket2::SockRef::from(io.io.tcp());
        assert_eq!(
            socket.tcp_user_timeout().unwrap(),
            Some(Duration::from_secs(60))
        );
        // Linux reports twice what was set (its bookkeeping share).
        let bounded = socket.send_buffer_size().unwrap();
        assert_eq!(bounded, 2 * STREAM_SEND_BUFFER, "was {autotuned}");

        // Without a limit, only the buffer.
        let (server, _, _client) = crate::test_support::loopback_pair().await;
        let tuning = Arc::new(StreamTuning::default());
        let mut io = Tuned::new(server, tuning.clone());
        tuning.request(None);
        io.write_all(b"stream").await.unwrap();
        let socket = socket2::SockRef::from(io.io.tcp());
        assert_eq!(socket.tcp_user_timeout().unwrap(), None);
        assert_eq!(socket.send_buffer_size().unwrap(), 2 * STREAM_SEND_BUFFER);
    }
}
