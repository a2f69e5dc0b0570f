//! Serving [`HttpEndpoint`]s: a bounded body in, a whole or streamed answer out.

use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::{Request, Response, StatusCode};
use std::sync::Arc;

use switchboard_core::{
    plain_response, AbortSignal, BodyChunks, HttpEndpoint, HttpReply, HttpRequest, HttpResponse,
};

use crate::TransportOptions;

/// The body of every answer the server sends: whole, or a stream from an endpoint.
pub(crate) enum ReplyBody {
    Full(Option<Bytes>),
    Stream(Pin<Box<dyn BodyChunks>>),
}

impl ReplyBody {
    pub(crate) fn full(bytes: Bytes) -> ReplyBody {
        ReplyBody::Full((!bytes.is_empty()).then_some(bytes))
    }
}

impl Body for ReplyBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            ReplyBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            ReplyBody::Stream(chunks) => chunks
                .as_mut()
                .poll_chunk(cx)
                .map(|chunk| chunk.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, ReplyBody::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReplyBody::Full(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            ReplyBody::Stream(_) => SizeHint::default(),
        }
    }
}

/// What a streamed answer asks of its connection.
pub(crate) struct Streaming {
    /// Fired by the endpoint to drop the connection.
    pub(crate) abort: Arc<AbortSignal>,
    /// See [`switchboard_core::StreamReply::unacked_limit`].
    pub(crate) unacked_limit: Option<std::time::Duration>,
}

/// Reads the body (refusing one larger than the endpoint takes, unread) and asks the endpoint;
/// a streamed answer leaves what it asks of its connection in `streaming`.
pub(crate) async fn serve(
    endpoint: &dyn HttpEndpoint,
    req: Request<Incoming>,
    peer: SocketAddr,
    options: &TransportOptions,
    streaming: &mut Option<Streaming>,
) -> Response<ReplyBody> {
    let (parts, body) = req.into_parts();
    // Refused here, without the endpoint: it adds what its answers carry (CORS headers).
    let refuse = |parts: &http::request::Parts, mut refusal: HttpResponse| {
        endpoint.decorate_refusal(parts, &mut refusal);
        refusal.map(ReplyBody::full)
    };
    if crate::request_head_len(&parts) > options.max_request_head {
        return refuse(&parts, switchboard_core::head_too_large());
    }
    let max = endpoint.max_body();
    if body.size_hint().lower() > max as u64 {
        return refuse(&parts, body_too_large());
    }
    let body = match http_body_util::Limited::new(body, max).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => return refuse(&parts, body_too_large()),
    };
    let request = HttpRequest::new(parts, body, peer);
    match endpoint.call(request).await {
        HttpReply::Full(res) => res.map(ReplyBody::full),
        HttpReply::Stream(stream) => {
            *streaming = Some(Streaming {
                abort: stream.abort,
                unacked_limit: stream.unacked_limit,
            });
            stream.head.map(|()| ReplyBody::Stream(stream.chunks))
        }
        _ => plain_response(StatusCode::INTERNAL_SERVER_ERROR, "unknown answer\n")
            .map(ReplyBody::full),
    }
}

/// The answer to a body over the endpoint's `max_body`.
fn body_too_large() -> HttpResponse {
    plain_response(StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n")
}
