//! Transports made of plain HTTP requests (an event stream, posts), served by an HTTP server
//! they share with others, so that every transport answers on one port.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;

use crate::{BoxFuture, HttpResponse, RequestParts};

/// An HTTP request whose body has been read whole (at most [`HttpEndpoint::max_body`]).
#[derive(Debug)]
#[non_exhaustive]
pub struct HttpRequest {
    /// Method, URI and headers.
    pub parts: RequestParts,
    /// The body.
    pub body: Bytes,
    /// The client's address.
    pub peer: SocketAddr,
}

/// An endpoint's answer: whole, or a head followed by a body that streams.
#[derive(Debug)]
#[non_exhaustive]
pub enum HttpReply {
    /// A response with its whole body.
    Full(HttpResponse),
    /// A long-lived response.
    Stream(StreamReply),
}

impl HttpRequest {
    /// A request, as a hosting server hands it to an endpoint.
    pub fn new(parts: RequestParts, body: Bytes, peer: SocketAddr) -> Self {
        HttpRequest { parts, body, peer }
    }
}

/// A long-lived response: the head now, then each chunk as the stream yields it, until it
/// ends. The server stops polling the stream while the client does not read (so a stream
/// must bound what it holds; the server keeps the kernel's share of a stream small, so that
/// this happens within some tens of kilobytes), drops it when the client goes, and drops the
/// connection when `abort` fires (a client that stopped reading cannot hold it).
#[non_exhaustive]
pub struct StreamReply {
    /// Status and headers.
    pub head: http::Response<()>,
    /// The body.
    pub chunks: Pin<Box<dyn BodyChunks>>,
    /// Fired by the endpoint to drop the connection at once.
    pub abort: Arc<AbortSignal>,
    /// Drop the connection when what was sent stays unacknowledged this long
    /// (`TCP_USER_TIMEOUT`): a client that vanished without closing (a laptop shut, a network
    /// gone) holds nothing longer. `None`: the kernel's own retransmission limit (minutes).
    pub unacked_limit: Option<std::time::Duration>,
}

impl std::fmt::Debug for StreamReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamReply")
            .field("status", &self.head.status())
            .finish_non_exhaustive()
    }
}

impl StreamReply {
    /// A streamed answer: its head, its body, and the signal that drops its connection.
    pub fn new(
        head: http::Response<()>,
        chunks: Pin<Box<dyn BodyChunks>>,
        abort: Arc<AbortSignal>,
    ) -> Self {
        StreamReply {
            head,
            chunks,
            abort,
            unacked_limit: None,
        }
    }

    /// Sets [`StreamReply::unacked_limit`] (zero: none; at most 24.8 days, the kernel's bound).
    pub fn with_unacked_limit(mut self, limit: std::time::Duration) -> Self {
        self.unacked_limit = Some(limit);
        self
    }
}

/// A one-way signal from an endpoint to the server hosting it: drop this connection.
#[derive(Debug, Default)]
pub struct AbortSignal {
    aborted: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

impl AbortSignal {
    /// Fires the signal (again is harmless).
    pub fn abort(&self) {
        self.aborted.store(true, Ordering::Release);
        let waker = self.waker.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// True once fired.
    pub fn is_aborted(&self) -> bool {
        self.aborted.load(Ordering::Acquire)
    }

    /// Ready once fired; wakes the last task that polled.
    pub fn poll_aborted(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.is_aborted() {
            return Poll::Ready(());
        }
        *self.waker.lock().unwrap_or_else(|e| e.into_inner()) = Some(cx.waker().clone());
        if self.is_aborted() {
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

/// The body of a streamed answer, chunk by chunk.
pub trait BodyChunks: Send + 'static {
    /// The next chunk; `Ready(None)` ends the body.
    fn poll_chunk(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Bytes>>;
}

/// Requests to one path, served by whichever HTTP server hosts the endpoint (the WebSocket
/// transport serves its endpoints on its own port, beside the upgrade path).
pub trait HttpEndpoint: Send + Sync + 'static {
    /// The path it answers, exactly.
    fn path(&self) -> &str;

    /// The largest body it takes; the server answers `413` to a larger one without reading
    /// it.
    fn max_body(&self) -> usize;

    /// Answers one request.
    fn call(&self, request: HttpRequest) -> BoxFuture<'static, HttpReply>;

    /// Adds what the endpoint's own answers carry to a refusal the hosting server made without
    /// calling it (`413` for a body over [`HttpEndpoint::max_body`], `431` for a head over
    /// the bound): CORS headers, say, so that a page of another origin can read the status.
    /// Nothing by default.
    fn decorate_refusal(&self, request: &crate::RequestParts, refusal: &mut crate::HttpResponse) {
        let _ = (request, refusal);
    }
}
