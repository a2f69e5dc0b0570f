//! A small HTTP/1.1 server on an address of its own, for the admin and API listeners: off the
//! public port, one async answer per request, over TLS when given a certificate, stopped with
//! its connections.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::Request;
use hyper_util::rt::{TokioIo, TokioTimer};
use switchboard_core::{BoxFuture, HttpResponse};
use switchboard_tls::ServerTls;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Connections one listener serves at once; more are closed as they are accepted.
const MAX_CONNECTIONS: usize = 128;

/// The largest request head taken: a larger one gets `431` before the key is checked (hyper's
/// buffer is bounded to it, and the head is measured exactly once parsed). Was hyper's
/// default, about 400 KiB a connection, times [`MAX_CONNECTIONS`].
const MAX_HEAD: usize = 64 * 1024;

/// How long a connection may take to send its request head (and, with TLS, to finish the
/// TLS handshake before that).
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a write may wait for the client to take bytes: a client that stops reading its
/// answers (say, after pipelining many requests) is dropped then, instead of holding one of
/// the [`MAX_CONNECTIONS`] places for ever.
const WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(10);

/// How far a connection's writes may wait for its client more than they go without waiting:
/// one that takes a little of its answers every few seconds, never stalling
/// [`WRITE_STALL_TIMEOUT`] at a time but keeping the server waiting most of the time, is
/// dropped once its waits outrun the time between them by this much. Time not spent waiting
/// pays waits back, so a scraper whose large answers wait a moment every few seconds never
/// gets near it, however long its connection lives.
const WRITE_WAIT_BUDGET: Duration = Duration::from_secs(30);

/// Answers one request.
pub(crate) type Respond =
    Arc<dyn Fn(Request<Incoming>) -> BoxFuture<'static, HttpResponse> + Send + Sync>;

/// A running listener; [`Listener::stop`] ends it and its connections.
pub(crate) struct Listener {
    local_addr: SocketAddr,
    stop: watch::Sender<bool>,
    accept_loop: JoinHandle<()>,
}

impl Listener {
    /// Binds `addr` and answers every request with `respond`, over TLS with `tls`; `what`
    /// names it in errors.
    pub(crate) async fn bind(
        addr: SocketAddr,
        what: &'static str,
        respond: Respond,
        tls: Option<ServerTls>,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| std::io::Error::new(e.kind(), format!("{what} listener {addr}: {e}")))?;
        let local_addr = listener.local_addr()?;
        let (stop, stopped) = watch::channel(false);
        let accept_loop = tokio::spawn(accept_loop(listener, what, respond, tls, stopped));
        Ok(Listener {
            local_addr,
            stop,
            accept_loop,
        })
    }

    /// The address it listens on.
    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting and closes open connections after their current request.
    pub(crate) fn stop(self) {
        let _ = self.stop.send(true);
        self.accept_loop.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    what: &'static str,
    respond: Respond,
    tls: Option<ServerTls>,
    mut stopped: watch::Receiver<bool>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = tokio::select! {
            _ = stopped.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "{what} listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // At most MAX_CONNECTIONS at once: these listeners share the process's file
        // descriptors with the public one, and anyone who can reach them can connect.
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "{what} listener: too many connections; closed");
            continue;
        };
        let respond = respond.clone();
        let stopped = stopped.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let stream = WriteStall::new(stream);
            let Some(tls) = tls else {
                return serve(TokioIo::new(stream), peer, what, respond, stopped).await;
            };
            match tokio::time::timeout(HEAD_TIMEOUT, tls.acceptor().accept(stream)).await {
                Ok(Ok(stream)) => serve(TokioIo::new(stream), peer, what, respond, stopped).await,
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "{what}: TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "{what}: TLS handshake timed out"),
            }
        });
    }
}

/// One connection's requests, until it ends or the listener stops.
async fn serve<I>(
    io: TokioIo<I>,
    peer: SocketAddr,
    what: &'static str,
    respond: Respond,
    mut stopped: watch::Receiver<bool>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req: Request<Incoming>| {
        // hyper's own bound on its buffer lets a little more through: this one is exact.
        let too_large =
            switchboard_core::request_head_len(req.uri(), req.method(), req.headers()) > MAX_HEAD;
        let answer = (!too_large).then(|| respond(req));
        async move {
            let answer = match answer {
                Some(answer) => answer.await,
                None => switchboard_core::head_too_large(),
            };
            Ok::<_, Infallible>(answer.map(Full::new))
        }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .max_buf_size(MAX_HEAD)
        .serve_connection(io, svc);
    let mut conn = std::pin::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = stopped.changed() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "{what} connection ended with an error");
    }
}

/// A connection whose writes must make progress: a write, flush or shutdown that stays
/// pending (the client takes no bytes) for [`WRITE_STALL_TIMEOUT`] fails, and the connection
/// with it, as does one whose waits outrun the time between them by [`WRITE_WAIT_BUDGET`].
/// Reads are bounded elsewhere (the head timeout, the API's body timeout).
struct WriteStall<I> {
    io: I,
    /// Running while a write is pending: it ends at the stall timeout or where the budget
    /// runs out, whichever comes first; reset by any write that goes through.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Since when the pending write waits.
    pending_since: Option<tokio::time::Instant>,
    /// When the last wait ended (or the connection began).
    last_wait_end: tokio::time::Instant,
    /// The earlier waits, less the time between them (never below zero).
    waited: Duration,
}

impl<I> WriteStall<I> {
    fn new(io: I) -> Self {
        WriteStall {
            io,
            stalled: None,
            pending_since: None,
            last_wait_end: tokio::time::Instant::now(),
            waited: Duration::ZERO,
        }
    }

    /// `poll` is the inner write's outcome: pending past the timeout or the budget turns into
    /// an error.
    fn check<T>(
        &mut self,
        cx: &mut Context<'_>,
        poll: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        if poll.is_ready() {
            if let Some(since) = self.pending_since.take() {
                let now = tokio::time::Instant::now();
                self.waited += now - since;
                self.last_wait_end = now;
            }
            self.stalled = None;
            return poll;
        }
        let since = match self.pending_since {
            Some(since) => since,
            None => {
                // A wait begins: the time since the last one pays earlier waits back.
                let now = tokio::time::Instant::now();
                self.waited = self.waited.saturating_sub(now - self.last_wait_end);
                *self.pending_since.insert(now)
            }
        };
        let wait = WRITE_STALL_TIMEOUT.min(WRITE_WAIT_BUDGET.saturating_sub(self.waited));
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(since + wait)));
        match stalled.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "the client took its answers too slowly (nothing for {:?}, or waits \
                     {:?} longer than the time between them)",
                    WRITE_STALL_TIMEOUT, WRITE_WAIT_BUDGET
                ),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for WriteStall<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for WriteStall<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_write(cx, buf);
        this.check(cx, poll)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.check(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_flush(cx);
        this.check(cx, poll)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_shutdown(cx);
        this.check(cx, poll)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Waker;

    /// `n` writes that each wait `wait` for the client, `gap` apart (on tokio's paused
    /// clock): whether the connection is cut.
    async fn cut_after(n: usize, wait: Duration, gap: Duration) -> bool {
        let mut writes = WriteStall::new(());
        let mut cx = Context::from_waker(Waker::noop());
        for _ in 0..n {
            tokio::time::advance(gap).await;
            let mut left = wait;
            loop {
                if writes.check::<()>(&mut cx, Poll::Pending).is_ready() {
                    return true;
                }
                if left.is_zero() {
                    break;
                }
                let step = left.min(Duration::from_millis(100));
                tokio::time::advance(step).await;
                left -= step;
            }
            assert!(writes.check(&mut cx, Poll::Ready(Ok(()))).is_ready());
        }
        false
    }

    #[tokio::test(start_paused = true)]
    async fn waits_are_paid_back_by_the_time_between_them() {
        // A scraper whose answers wait 1 s of every 3, for an hour: never cut.
        assert!(!cut_after(1200, Duration::from_secs(1), Duration::from_secs(2)).await);
        // A client that keeps the server waiting 1.9 s of every 2: cut.
        assert!(cut_after(100, Duration::from_millis(1900), Duration::from_millis(100)).await);
        // And one that takes nothing for longer than the stall timeout, at once.
        assert!(cut_after(1, Duration::from_secs(11), Duration::ZERO).await);
        assert!(!cut_after(1, Duration::from_secs(9), Duration::ZERO).await);
    }
}
