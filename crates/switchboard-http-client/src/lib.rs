//! Switchboard's outbound HTTP client: the one the gateway uses to fetch an identity
//! provider's keys (JWKS) and to call handlers bound to HTTP endpoints.
//!
//! Depend on it when you need what those callers need and no more: connections kept alive and
//! reused (HTTP/1.1, or HTTP/2 when a TLS endpoint offers it by ALPN), TLS that trusts the
//! system's roots plus an optional CA file, a deadline on the whole exchange and a byte bound
//! on the response body. It is hyper-util's pooled client with hyper-rustls underneath;
//! this crate only fixes those choices and turns every failure into one [`ClientError`].
//!
//! Nothing it holds is unbounded in time, including what no caller waits for: a connection
//! the pool finishes on its own (one a request started before an idle one freed up) must be
//! made, TLS included, within `connect_timeout`, and an HTTP/2 connection that stops answering
//! PINGs is dropped (its requests' deadlines alone reset their streams and kept it in the
//! pool, where every later request found it).

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

/// How a client connects.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClientOptions {
    /// A CA (PEM) trusted beside the system's roots, for endpoints with a private CA.
    pub ca_file: Option<PathBuf>,
    /// Longest wait for a connection: TCP, then the TLS handshake. Default 5 s.
    pub connect_timeout: Duration,
    /// How long an idle connection stays in the pool. Default 60 s.
    pub idle_timeout: Duration,
    /// Idle connections kept per host. Default 32.
    pub max_idle_per_host: usize,
    /// Most bytes of a response's head (status line and headers; for HTTP/2 the header list),
    /// at least 8 KiB. Default 64 KiB: a hostile server cannot make a call buffer more.
    pub max_response_head: usize,
    /// An HTTP/2 connection that has received nothing for this long (idle or not) is sent a
    /// PING, and dropped when the PING is not answered within as long again. Default 10 s.
    pub http2_keep_alive: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            ca_file: None,
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(60),
            max_idle_per_host: 32,
            max_response_head: 64 * 1024,
            http2_keep_alive: Duration::from_secs(10),
        }
    }
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The CA file could not be used.
    #[error("TLS: {0}")]
    Tls(#[from] switchboard_tls::TlsError),
    /// The exchange did not finish within its deadline.
    #[error("no complete answer within {0:?}")]
    Timeout(Duration),
    /// Connecting, sending or receiving failed.
    #[error("{0}")]
    Transport(String),
    /// The response body was larger than the bound.
    #[error("response body over {0} bytes")]
    TooLarge(usize),
    /// The response head was larger than [`ClientOptions::max_response_head`] (HTTP/1.1; an
    /// HTTP/2 header list over it is a stream reset, reported as [`ClientError::Transport`]).
    #[error("response head over {0} bytes")]
    HeadTooLarge(usize),
}

/// A pooled client. Cheap to clone; clones share the pool.
#[derive(Clone, Debug)]
pub struct HttpClient {
    inner: Client<Bounded<HttpsConnector<HttpConnector>>, Full<Bytes>>,
    max_head: usize,
}

/// A connector whose connections (TCP and TLS together) are made within `within`, or fail.
/// `HttpConnector`'s own timeout covers TCP only; a request's deadline covers the rest only
/// while the request waits, not when the pool finishes the connection for itself.
#[derive(Clone, Debug)]
struct Bounded<C> {
    inner: C,
    within: Duration,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<C> tower_service::Service<http::Uri> for Bounded<C>
where
    C: tower_service::Service<http::Uri>,
    C::Error: Into<BoxError>,
    C::Future: Send + 'static,
{
    type Response = C::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<C::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let within = self.within;
        let connecting = self.inner.call(uri);
        Box::pin(async move {
            match tokio::time::timeout(within, connecting).await {
                Ok(connected) => connected.map_err(Into::into),
                Err(_) => Err(format!("no connection within {within:?}").into()),
            }
        })
    }
}

impl HttpClient {
    /// A client with these options; fails only on a CA file it cannot use.
    pub fn new(options: &ClientOptions) -> Result<Self, ClientError> {
        let tls = switchboard_tls::client_config(options.ca_file.as_deref())?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(options.connect_timeout));
        http.set_nodelay(true);
        let connector = HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_all_versions()
            .wrap_connector(http);
        let connector = Bounded {
            inner: connector,
            within: options.connect_timeout,
        };
        let inner = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(options.idle_timeout)
            .pool_max_idle_per_host(options.max_idle_per_host)
            // hyper's read buffer holds the head; it panics below 8 KiB.
            .http1_max_buf_size(options.max_response_head.max(8192))
            .http2_max_header_list_size(
                u32::try_from(options.max_response_head).unwrap_or(u32::MAX),
            )
            .http2_keep_alive_interval(options.http2_keep_alive)
            .http2_keep_alive_timeout(options.http2_keep_alive)
            .http2_keep_alive_while_idle(true)
            .build(connector);
        Ok(HttpClient {
            inner,
            max_head: options.max_response_head,
        })
    }

    /// Sends `request` and reads the whole answer, within `deadline` for the whole exchange
    /// and `max_body` bytes of body (more is [`ClientError::TooLarge`], and the connection is
    /// not reused).
    pub async fn send(
        &self,
        request: Request<Bytes>,
        deadline: Duration,
        max_body: usize,
    ) -> Result<Response<Bytes>, ClientError> {
        let exchange = async {
            let response = self
                .inner
                .request(request.map(Full::new))
                .await
                .map_err(|e| {
                    // An answer whose head is over hyper's bound is too large, not a failed
                    // connection (the caller tells the two apart).
                    if head_too_large(&e) {
                        ClientError::HeadTooLarge(self.max_head)
                    } else {
                        ClientError::Transport(error_chain(&e))
                    }
                })?;
            // hyper's buffer bounds the head only roughly (it reads past its size), so the
            // bound is checked again on what it parsed: each header as `name: value\r\n` (the
            // status line, a few dozen bytes, aside).
            let head: usize = response
                .headers()
                .iter()
                .map(|(name, value)| name.as_str().len() + value.len() + 4)
                .sum();
            if head > self.max_head {
                return Err(ClientError::HeadTooLarge(self.max_head));
            }
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, max_body)
                .collect()
                .await
                .map_err(|e| {
                    if e.is::<http_body_util::LengthLimitError>() {
                        ClientError::TooLarge(max_body)
                    } else {
                        ClientError::Transport(error_chain(e.as_ref()))
                    }
                })?
                .to_bytes();
            Ok(Response::from_parts(parts, body))
        };
        tokio::time::timeout(deadline, exchange)
            .await
            .map_err(|_| ClientError::Timeout(deadline))?
    }
}

/// Whether hyper refused the answer's head as too large, somewhere in `e`'s causes.
fn head_too_large(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(e) = cause {
        if e.downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_parse_too_large)
        {
            return true;
        }
        cause = e.source();
    }
    false
}

/// An error and its causes on one line: hyper's outer errors alone say little
/// ("client error (Connect)").
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A one-shot HTTP server on loopback that answers with `body` after `delay`.
    async fn serve_once(body: Vec<u8>, delay: Duration) -> std::net::SocketAddr {
        let mut answer =
            format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len()).into_bytes();
        answer.extend(body);
        serve_raw(answer, delay).await
    }

    /// A one-shot server whose answer has `headers` (each line ending in CRLF) in its head.
    async fn serve_head_once(headers: String) -> std::net::SocketAddr {
        let answer = format!("HTTP/1.1 200 OK\r\n{headers}content-length: 2\r\n\r\nok");
        serve_raw(answer.into_bytes(), Duration::ZERO).await
    }

    /// A one-shot server that writes `answer` as it is, after `delay`.
    async fn serve_raw(answer: Vec<u8>, delay: Duration) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf).await;
            tokio::time::sleep(delay).await;
            let _ = stream.write_all(&answer).await;
        });
        addr
    }

    fn get(addr: std::net::SocketAddr) -> Request<Bytes> {
        Request::get(format!("http://{addr}/"))
            .body(Bytes::new())
            .unwrap()
    }

    #[tokio::test]
    async fn bodies_and_deadlines_are_bounded() {
        let client = HttpClient::new(&ClientOptions::default()).unwrap();
        let addr = serve_once(b"hello".to_vec(), Duration::ZERO).await;
        let ok = client.send(get(addr), Duration::from_secs(5), 64).await;
        assert_eq!(ok.unwrap().body().as_ref(), b"hello");

        let addr = serve_once(vec![b'x'; 1000], Duration::ZERO).await;
        let big = client.send(get(addr), Duration::from_secs(5), 100).await;
        assert!(matches!(big, Err(ClientError::TooLarge(100))), "{big:?}");

        let addr = serve_once(b"late".to_vec(), Duration::from_secs(3)).await;
        let late = client.send(get(addr), Duration::from_millis(200), 64).await;
        assert!(matches!(late, Err(ClientError::Timeout(_))), "{late:?}");

        // A head over the bound is refused, not buffered, and counted as too large: far
        // over it (hyper's buffer stops it) and just over it (70 KB against 64 KiB, which
        // hyper's buffer lets through), while just under it passes.
        for (size, passes) in [(200_000, false), (70_000, false), (60_000, true)] {
            let addr = serve_head_once(format!("x-big: {}\r\n", "y".repeat(size))).await;
            let answer = client.send(get(addr), Duration::from_secs(5), 64).await;
            match passes {
                true => assert!(answer.is_ok(), "{size}: {:?}", answer.err()),
                false => assert!(
                    matches!(answer, Err(ClientError::HeadTooLarge(65_536))),
                    "{size}: {:?}",
                    answer.map(|r| r.status())
                ),
            }
        }

        // A chunked body over the bound: too large as well.
        let mut chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
        for _ in 0..50 {
            chunked.extend_from_slice(b"64\r\n");
            chunked.extend(vec![b'x'; 100]);
            chunked.extend_from_slice(b"\r\n");
        }
        chunked.extend_from_slice(b"0\r\n\r\n");
        let addr = serve_raw(chunked, Duration::ZERO).await;
        let long = client.send(get(addr), Duration::from_secs(5), 1000).await;
        assert!(matches!(long, Err(ClientError::TooLarge(1000))), "{long:?}");

        // Nothing listens there any more: the error says why.
        let gone = client.send(get(addr), Duration::from_secs(5), 64).await;
        let Err(ClientError::Transport(why)) = gone else {
            panic!("{gone:?}")
        };
        assert!(why.to_lowercase().contains("connect"), "{why}");
    }
}
