//! The upgrade of a connection (plain TCP, or TLS once its handshake is done), written out
//! by hand for the request almost every client sends: an HTTP/1.1 `GET` head (read whole,
//! in one read or several, up to `max_request_head`), asking for a WebSocket at the socket
//! path and passing the cheap checks. Everything else (another path, HTTP/1.0, a body, a
//! refusal by the cheap checks, a head too long, a header hyper would refuse) goes to hyper,
//! with the bytes already read put back in front of the stream ([`Rewind`]), and is answered
//! exactly as before.
//!
//! Why: hyper's connection machinery (its buffers, dispatcher, upgrade channel and a task to
//! await the upgrade) was an eighth of the server's user-space instructions per JWT handshake
//! (callgrind: 97k → 85k). Here the head is parsed by the same parser hyper uses (`httparse`,
//! its default configuration and hyper's 100 headers), admitted by the same code
//! ([`super::admit_upgrade`]), and the `101` written in one system call. The one difference
//! a client can see: this `101` carries no `Date` (optional on a 1xx, RFC 9110 6.6.1).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use hyper::{Request, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::{
    admit_upgrade, handshakes, refusal_before_admission, serve_http, Admitted, HttpResponse,
    Service, Shared, SocketTask, TransportOptions, Wire,
};

/// Bytes of the first read, and what the buffer grows by while a head is not whole.
const FIRST_READ: usize = 4096;

/// Bytes a head as sent may take beyond `max_request_head` (which applies to it as parsed),
/// as hyper's buffer allowed.
const HEAD_SLACK: usize = 1024;

/// Header lines parsed at most, as hyper's default: a head with more is hyper's to refuse.
const MAX_HEADERS: usize = 100;

/// The stream of an accepted connection, plain or TLS (its handshake done): read for its
/// first request here or by hyper, then the socket's [`Wire`].
pub(crate) trait Accepted:
    AsyncRead + AsyncWrite + crate::stream_tuning::OverTcp + Unpin + Send + 'static
{
    fn into_wire(self) -> Wire;
}

impl Accepted for TcpStream {
    fn into_wire(self) -> Wire {
        Wire::plain(self)
    }
}

/// The stream of a connection hyper upgraded, if it is a `T` (as [`serve_first_request`]
/// handed it over, in a [`Rewind`]), with the bytes read but not yet the socket's: what hyper
/// buffered came first, from the front of the bytes put back; what it left of them follows.
pub(crate) fn taken_back<T: Accepted>(
    upgraded: hyper::upgrade::Upgraded,
) -> Result<(Wire, Bytes), hyper::upgrade::Upgraded> {
    use crate::stream_tuning::Tuned;
    let parts = upgraded.downcast::<hyper_util::rt::TokioIo<Tuned<Rewind<T>>>>()?;
    let (stream, unread) = parts.io.into_inner().into_inner().into_parts();
    Ok((stream.into_wire(), super::join(parts.read_buf, unread)))
}

/// Serves one accepted connection: its head read whole ([`read_head`]), the upgrade here
/// when it is a request this path takes, hyper otherwise.
pub(crate) async fn serve_first_request<S: Service, T: Accepted>(
    mut stream: T,
    peer: SocketAddr,
    in_progress: handshakes::InProgress,
    shared: Arc<Shared<S>>,
    deadline: Instant,
) {
    // The head read whole (it may come in pieces, or be larger than one read, with big
    // cookies): an upgrade this path takes is then registered before its `101`, however its
    // request came. What is not one goes to hyper.
    let limit = shared.options.max_request_head;
    let first = match read_head(&mut stream, deadline, limit).await {
        Ok(first) => first,
        Err(HeadRead::Ended(why)) => return tracing::debug!(%peer, "{why}"),
        Err(HeadRead::TooLarge) => {
            shared.hub.stats.refused_head_size.fetch_add(1, Relaxed);
            return send_refusal(stream, &switchboard_core::head_too_large(), peer, deadline).await;
        }
    };
    let Some((request, head_len)) = upgrade_request(&first, &shared.options) else {
        let rewound = Rewind::new(first.freeze(), stream);
        // Boxed: hyper's connection is large, and every accepted connection's task would
        // otherwise be that large (and copied whole when spawned) for this rarer path.
        let served = serve_http(rewound, peer, in_progress, shared, deadline);
        return Box::pin(served).await;
    };
    // As in `serve_http`: what the service must do before it can admit, awaited until a
    // second before the deadline so that the client still hears the service's answer.
    if let Some(prepare) = shared.service.prepare_admit(request.headers()) {
        let until = super::prepare_until(deadline, shared.options.handshake_timeout);
        let _ = tokio::time::timeout_at(until, prepare).await;
    }
    let (parts, ()) = request.into_parts();
    let Admitted { open, accept } = match admit_upgrade(&shared, &parts, peer) {
        Ok(admitted) => admitted,
        Err(answer) => return send_refusal(stream, &answer, peer, deadline).await,
    };
    let mut head = [0u8; 160];
    let len = switching_protocols(&accept, &mut head);
    // Admitted: no longer a handshake in progress. Frames the client sent right behind its
    // request are the socket's first bytes.
    drop(in_progress);
    // Copied (usually nothing): the reader takes them in at once, and the read buffer goes.
    let early = Bytes::copy_from_slice(&first[head_len..]);
    drop(first);
    // Opened (registered, its connect event published) before the `101` goes out, which its
    // task writes first: a send to the user the moment the client is upgraded reaches it.
    // (Was: the `101` first, and for some microseconds the client was upgraded but the socket
    // not registered.) A task of its own, holding just the socket.
    let task = SocketTask::open(stream.into_wire(), early, Some(&head[..len]), open, shared);
    tokio::spawn(task);
}

/// The request in `bytes` and its head's length, when it is one this path serves: a whole
/// HTTP/1.1 `GET` head with no body, every header one the `http` types take, passing the
/// cheap checks (path, upgrade, head size, origin).
fn upgrade_request(bytes: &[u8], options: &TransportOptions) -> Option<(Request<()>, usize)> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    let head_len = match parsed.parse(bytes) {
        Ok(httparse::Status::Complete(len)) => len,
        _ => return None,
    };
    if parsed.version != Some(1) || parsed.method != Some("GET") {
        return None;
    }
    let mut request = Request::builder()
        .method(hyper::Method::GET)
        .uri(parsed.path?)
        .body(())
        .ok()?;
    let map = request.headers_mut();
    map.reserve(parsed.headers.len());
    for header in parsed.headers.iter() {
        let name = http::HeaderName::from_bytes(header.name.as_bytes()).ok()?;
        // A body (hyper's to frame, or to refuse) is not an upgrade's.
        if name == http::header::CONTENT_LENGTH || name == http::header::TRANSFER_ENCODING {
            return None;
        }
        map.append(name, http::HeaderValue::from_bytes(header.value).ok()?);
    }
    refusal_before_admission(options, &request)
        .is_none()
        .then_some((request, head_len))
}

/// Why no head came to be looked at.
enum HeadRead {
    /// The client closed, stalled past the deadline, or the read failed: nothing to answer.
    Ended(String),
    /// More than the limit and its slack was read and the head had not ended: `431`.
    TooLarge,
}

/// Reads until the head is whole: what was read (the head and what came behind it in the
/// same read), or bytes that can be no request head (hyper answers those). The buffer holds
/// one read of 4 KiB, and when the head is longer, `limit` + 1 KiB + 1 bytes at most,
/// allocated once; each byte is looked at once for the head's end, however the client splits
/// its writes.
async fn read_head<T: AsyncRead + Unpin>(
    stream: &mut T,
    deadline: Instant,
    limit: usize,
) -> Result<BytesMut, HeadRead> {
    // As hyper allowed before this path read long heads: the limit applies to the head as
    // parsed (`request_head_len`), and what was sent may be a little longer (spaces around
    // values, empty lines before the request line).
    let most = limit + HEAD_SLACK;
    let mut read = BytesMut::with_capacity(FIRST_READ);
    // The head's end is looked for from here on: the bytes before were looked at.
    let mut looked_at = 0;
    // Where the request line begins, after the empty lines a request may begin with.
    let mut begins = None;
    loop {
        if read.len() == read.capacity() {
            // Grown once to what a head may take (never doubled past it).
            let mut bigger = BytesMut::with_capacity(most + 1);
            bigger.extend_from_slice(&read);
            read = bigger;
        }
        match tokio::time::timeout_at(
            deadline,
            tokio::io::AsyncReadExt::read_buf(stream, &mut read),
        )
        .await
        {
            Ok(Ok(n)) if n > 0 => {}
            Ok(Ok(_)) if read.is_empty() => {
                return Err(HeadRead::Ended("closed before a byte".into()))
            }
            Ok(Ok(_)) => return Err(HeadRead::Ended("closed in the middle of its head".into())),
            Ok(Err(e)) => {
                return Err(HeadRead::Ended(format!(
                    "read before the request failed: {e}"
                )))
            }
            Err(_) => return Err(HeadRead::Ended("handshake timed out".into())),
        }
        let begun_now = begins.is_none();
        if begins.is_none() {
            begins = read[looked_at..]
                .iter()
                .position(|&b| b != b'\r' && b != b'\n')
                .map(|at| looked_at + at);
        }
        if begins.is_some_and(|begins| head_ends_after(&read, looked_at.max(begins))) {
            return Ok(read);
        }
        // Not whole in the read its request line began in: parsed once, so that what is no
        // request head at all goes to hyper now rather than after the limit or the deadline.
        if begun_now && begins.is_some() && !may_be_a_head(&read) {
            return Ok(read);
        }
        if read.len() > most {
            return Err(HeadRead::TooLarge);
        }
        // An end split across reads (`\r\n` | `\r\n`) is found from the last two bytes on.
        looked_at = if begins.is_some() {
            read.len().saturating_sub(2)
        } else {
            read.len()
        };
    }
}

/// Whether the first bytes read could begin a request head (else hyper answers them).
fn may_be_a_head(bytes: &[u8]) -> bool {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    httparse::Request::new(&mut headers).parse(bytes).is_ok()
}

/// Whether the head in `bytes` ends at or after `from` (at or after its request line): a
/// blank line, `\r\n\r\n` or bare `\n\n` as httparse takes it.
fn head_ends_after(bytes: &[u8], from: usize) -> bool {
    bytes.get(from..).is_some_and(|rest| {
        rest.windows(2)
            .enumerate()
            .any(|(i, w)| w == b"\n\n" || (w == b"\n\r" && rest.get(i + 2) == Some(&b'\n')))
    })
}

/// Answers a request refused here with `answer`, then closes the connection (one request
/// per connection), within the handshake's deadline.
async fn send_refusal<T: AsyncWrite + Unpin>(
    mut stream: T,
    answer: &HttpResponse,
    peer: SocketAddr,
    deadline: Instant,
) {
    let answer = serialize_refusal(answer);
    let sent = tokio::time::timeout_at(deadline, async {
        stream.write_all(&answer).await?;
        stream.shutdown().await
    });
    if let Ok(Err(e)) = sent.await {
        tracing::debug!(%peer, error = %e, "refusal not sent");
    }
}

/// Writes the `101` for `accept` into `out` and returns its length.
fn switching_protocols(accept: &http::HeaderValue, out: &mut [u8; 160]) -> usize {
    const START: &[u8] = b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\n\
        upgrade: websocket\r\nsec-websocket-accept: ";
    // The accept key is base64 of a SHA-1: always 28 bytes.
    let key = accept.as_bytes();
    let len = START.len() + key.len() + 4;
    assert!(len <= out.len(), "an accept key of {} bytes", key.len());
    out[..START.len()].copy_from_slice(START);
    out[START.len()..START.len() + key.len()].copy_from_slice(key);
    out[len - 4..len].copy_from_slice(b"\r\n\r\n");
    len
}

/// A refusal as HTTP/1.1 bytes, framed as hyper frames it for a connection that closes:
/// its headers, `connection: close`, `content-length` (with the body, for a status that may
/// have one) and `date` (unless the answer has its own).
fn serialize_refusal(answer: &HttpResponse) -> Vec<u8> {
    let status: StatusCode = answer.status();
    // As hyper: a 1xx, 204 or 304 carries neither a length nor a body.
    let bodiless = status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let body: &[u8] = if bodiless { &[] } else { answer.body() };
    let mut out = Vec::with_capacity(256 + body.len());
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in answer.headers() {
        if name == http::header::CONNECTION || name == http::header::CONTENT_LENGTH {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"connection: close\r\n");
    if !bodiless {
        out.extend_from_slice(format!("content-length: {}\r\n", body.len()).as_bytes());
    }
    if !answer.headers().contains_key(http::header::DATE) {
        let date = httpdate::fmt_http_date(std::time::SystemTime::now());
        out.extend_from_slice(format!("date: {date}\r\n").as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

/// A stream with bytes already read from it put back in front: hyper reads `unread` first.
pub(crate) struct Rewind<T> {
    unread: Bytes,
    inner: T,
}

impl<T> Rewind<T> {
    pub(crate) fn new(unread: Bytes, inner: T) -> Self {
        Rewind { unread, inner }
    }

    /// The stream, and what of the bytes put back was not read yet.
    pub(crate) fn into_parts(self) -> (T, Bytes) {
        (self.inner, self.unread)
    }
}

impl<T: crate::stream_tuning::OverTcp> crate::stream_tuning::OverTcp for Rewind<T> {
    fn tcp(&self) -> &TcpStream {
        self.inner.tcp()
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.unread.is_empty() {
            return Pin::new(&mut self.inner).poll_read(cx, buf);
        }
        let n = self.unread.len().min(buf.remaining());
        buf.put_slice(&self.unread[..n]);
        self.unread.advance(n);
        if self.unread.is_empty() {
            // Let the first read's buffer go now, not when the connection ends (an event
            // stream lives on).
            self.unread = Bytes::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> TransportOptions {
        TransportOptions {
            path: "/ws".into(),
            ..TransportOptions::default()
        }
    }

    const UPGRADE: &str = "GET /ws?token=t HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\n\
        Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

    #[test]
    fn a_whole_upgrade_head_is_taken_and_its_length_known() {
        let mut bytes = UPGRADE.as_bytes().to_vec();
        bytes.extend_from_slice(b"\x81\x80early frame");
        let (request, len) = upgrade_request(&bytes, &options()).expect("taken");
        assert_eq!(len, UPGRADE.len());
        assert_eq!(request.uri().query(), Some("token=t"));
        assert_eq!(
            request.headers()["sec-websocket-key"],
            "dGhlIHNhbXBsZSBub25jZQ=="
        );
    }

    #[test]
    fn anything_else_is_left_to_hyper() {
        let options = options();
        let cases = [
            UPGRADE[..UPGRADE.len() - 2].to_string(), // head not complete yet
            UPGRADE.replace("HTTP/1.1", "HTTP/1.0"),
            UPGRADE.replace("GET", "POST"),
            UPGRADE.replace("/ws?", "/metrics?"),
            UPGRADE.replace("Upgrade: websocket\r\n", ""),
            UPGRADE.replace("Host: a\r\n", "Host: a\r\nContent-Length: 0\r\n"),
            UPGRADE.replace("Host: a\r\n", "Host: a\r\nTransfer-Encoding: chunked\r\n"),
            UPGRADE.replace("Host: a", "Host: a\u{1}b"), // not a header value
            UPGRADE.replace("Host: a\r\n", &"X-A: b\r\n".repeat(MAX_HEADERS)),
        ];
        for case in cases {
            assert!(
                upgrade_request(case.as_bytes(), &options).is_none(),
                "{case:?}"
            );
        }
        let mut small = options.clone();
        small.max_request_head = 64;
        assert!(
            upgrade_request(UPGRADE.as_bytes(), &small).is_none(),
            "431 is hyper's"
        );
    }

    #[test]
    fn the_101_carries_the_accept_key() {
        let accept = http::HeaderValue::from_static("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        let mut out = [0u8; 160];
        let len = switching_protocols(&accept, &mut out);
        let mut headers = [httparse::EMPTY_HEADER; 8];
        let mut response = httparse::Response::new(&mut headers);
        assert_eq!(
            response.parse(&out[..len]).unwrap(),
            httparse::Status::Complete(len)
        );
        assert_eq!(response.code, Some(101));
        let accept_header = response
            .headers
            .iter()
            .find(|h| h.name == "sec-websocket-accept")
            .unwrap();
        assert_eq!(accept_header.value, accept.as_bytes());
    }

    #[test]
    fn a_refusal_is_framed_with_its_headers_and_body() {
        let mut answer = switchboard_core::plain_response(StatusCode::UNAUTHORIZED, "no token\n");
        answer
            .headers_mut()
            .insert("www-authenticate", http::HeaderValue::from_static("Bearer"));
        let bytes = serialize_refusal(&answer);
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut response = httparse::Response::new(&mut headers);
        let httparse::Status::Complete(head) = response.parse(&bytes).unwrap() else {
            panic!("incomplete");
        };
        assert_eq!(response.code, Some(401));
        assert_eq!(response.reason, Some("Unauthorized"));
        let get = |name: &str| {
            response
                .headers
                .iter()
                .find(|h| h.name == name)
                .map(|h| std::str::from_utf8(h.value).unwrap().to_string())
        };
        assert_eq!(get("www-authenticate").as_deref(), Some("Bearer"));
        assert_eq!(get("connection").as_deref(), Some("close"));
        assert_eq!(get("content-length").as_deref(), Some("9"));
        assert!(get("date").is_some());
        assert_eq!(&bytes[head..], b"no token\n");
    }

    #[test]
    fn a_bodiless_refusal_has_no_length_and_a_given_date_is_not_repeated() {
        let mut answer = switchboard_core::plain_response(StatusCode::NOT_MODIFIED, "dropped");
        answer.headers_mut().insert(
            "date",
            http::HeaderValue::from_static("Mon, 30 Nov 2026 00:00:00 GMT"),
        );
        let text = String::from_utf8(serialize_refusal(&answer)).unwrap();
        assert!(text.starts_with("HTTP/1.1 304 Not Modified\r\n"), "{text}");
        assert!(!text.contains("content-length"), "{text}");
        assert_eq!(text.matches("date: ").count(), 1, "{text}");
        assert!(text.ends_with("\r\n\r\n"), "no body: {text}");
    }

    #[tokio::test]
    async fn a_rewind_read_in_part_keeps_the_rest_in_order() {
        use tokio::io::AsyncReadExt;
        let inner: &[u8] = b"!";
        let mut rewound = Rewind::new(Bytes::from_static(b"hello"), inner);
        let mut two = [0u8; 2];
        rewound.read_exact(&mut two).await.unwrap();
        assert_eq!(&two, b"he");
        let (_, unread) = rewound.into_parts();
        assert_eq!(&unread[..], b"llo");
        // What hyper buffered came before what it left.
        assert_eq!(
            &super::super::join(Bytes::from_static(b"he"), unread)[..],
            b"hello"
        );
    }

    #[tokio::test]
    async fn rewind_gives_back_the_bytes_first() {
        use tokio::io::AsyncReadExt;
        let inner: &[u8] = b" world";
        let mut rewound = Rewind::new(Bytes::from_static(b"hello"), inner);
        let mut all = String::new();
        rewound.read_to_string(&mut all).await.unwrap();
        assert_eq!(all, "hello world");
    }
}
