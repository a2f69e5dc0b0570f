//! Transports made of plain HTTP requests (an event stream, posts), served by an HTTP server
//! they share with others, so that every transport answers on one port.

use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;

use crate::{BoxFuture, HttpResponse, RequestParts};

/// An HTTP request whose body has been read whole (at most [`HttpEndpoint::max_body`]).
#[derive(Debug)]
pub struct HttpRequest {
    /// Method, URI and headers.
    pub parts: RequestParts,
    /// The body.
    pub body: Bytes,
    /// The client's address.
    pub peer: SocketAddr,
}

/// An endpoint's answer: whole, or a head followed by a body that streams.
#[non_exhaustive]
pub enum HttpReply {
    /// A response with its whole body.
    Full(HttpResponse),
    /// A long-lived response: the head now, then each chunk as the stream yields it, until
    /// it ends. The server stops polling the stream while the client does not read (so a
    /// stream must bound what it holds), and drops it when the client goes.
    Stream(http::Response<()>, Pin<Box<dyn BodyChunks>>),
}

impl std::fmt::Debug for HttpReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HttpReply::Full(res) => f.debug_tuple("Full").field(&res.status()).finish(),
            HttpReply::Stream(res, _) => f.debug_tuple("Stream").field(&res.status()).finish(),
        }
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
}
