//! The seam between Switchboard's gateway and its transports.
//!
//! A transport turns connections of some kind (WebSocket upgrades, Server-Sent Events
//! streams, in-memory channel pairs) into [`Socket`]s and calls a [`Service`] as they open,
//! speak and end; the gateway (`switchboard`) is such a service. Neither side knows the
//! other: both depend on this crate only, as `tower`/`axum-core` or `tracing-core` sit between
//! their users and their implementations.
//!
//! Depend on this crate to write a transport (implement [`Transport`], hand the service a
//! [`SocketRef`] per connection) or a service that should run on any transport (implement
//! [`Service`]). It holds no I/O and no runtime: plain traits and data, on `bytes` and `http`.
//!
//! What every transport promises its service:
//! - [`Service::admit`] runs before a socket exists; its refusal is the answer to the
//!   client's request and no socket is opened;
//! - messages reach [`Service::on_message`] whole, in order, never concurrently for one
//!   socket, never larger than the transport's limit; text is valid UTF-8;
//! - [`Service::on_close`] runs exactly once for every socket [`Service::open`] was called
//!   for, whatever ended it, and never from inside another call of the service for that socket;
//! - sending never waits: a [`Socket`] queues within a bound (in frames and bytes) and closes
//!   itself as a slow consumer rather than grow.

use std::sync::Arc;

pub use bytes::Bytes;
pub use http;

mod counters;
mod endpoint;
mod origin;
mod service;
mod socket;
mod transport;

pub use counters::{CloseCounts, TransportCounters};
pub use endpoint::{AbortSignal, BodyChunks, HttpEndpoint, HttpReply, HttpRequest, StreamReply};
pub use origin::OriginPolicy;
pub use service::Service;
pub use socket::{
    is_sendable_close_code, server_close, truncate_close_reason, CloseReason, Inbound, SendError,
    Socket, GOING_AWAY_CODE, OVER_BUDGET_CODE, SLOW_CONSUMER_CODE,
};
pub use transport::{BoxFuture, RunningTransport, ShutdownReport, Transport};

/// A request's method, URI and headers (the body, if any, is given apart).
pub type RequestParts = http::request::Parts;

/// An HTTP answer with its whole body: refusals, plain routes.
pub type HttpResponse = http::Response<Bytes>;

/// One socket, whichever transport carries it. Cheap to clone; every clone is the same socket.
pub type SocketRef = Arc<dyn Socket>;

/// The size of a request's head as it came in (request line and header lines), from what
/// the parser kept of it: what a server compares with its bound on heads, exactly, whatever
/// its parser's buffer let through.
pub fn request_head_len(
    uri: &http::Uri,
    method: &http::Method,
    headers: &http::HeaderMap,
) -> usize {
    let target = uri.path_and_query().map_or(1, |p| p.as_str().len());
    let line = method.as_str().len() + target + 12;
    let headers: usize = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    line + headers + 2
}

/// The answer to a request head over a server's bound on heads ([`request_head_len`]).
pub fn head_too_large() -> HttpResponse {
    plain_response(
        http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        "request headers too large\n",
    )
}

/// Whether a request is HTTP/1.1 with exactly one `Host` (RFC 9112 3.2: without one, or with
/// two, it is a `400`; a same-host origin check would read the first of two). What the
/// WebSocket upgrade and the endpoints on its port both require.
pub fn http11_with_one_host(version: http::Version, headers: &http::HeaderMap) -> bool {
    version == http::Version::HTTP_11 && headers.get_all(http::header::HOST).iter().count() == 1
}

/// A small text response, for refusals.
pub fn plain_response(status: http::StatusCode, text: &'static str) -> HttpResponse {
    let mut res = http::Response::new(Bytes::from_static(text.as_bytes()));
    *res.status_mut() = status;
    res.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    res
}
