//! The WebSocket transport of Switchboard: HTTP/1.1 upgrades (the common one parsed by hand with
//! `httparse`, everything else through hyper 1), frames, a bounded
//! send queue per socket, server heartbeats and the close handshake.
//!
//! Depend on this crate when you want a fast, careful WebSocket server and will decide
//! yourself what the bytes mean. It knows nothing of topics, JSON or users: you implement
//! [`Service`] (admission before the upgrade, what to do with each message, what to do when a
//! socket ends) and get a [`SocketRef`] per socket to send frames through.
//!
//! What it guarantees:
//! - upgrades only at [`TransportOptions::path`]; a plain `GET` there gets `426`, any other
//!   path goes to [`Service::http`] (default `404`);
//! - [`Service::admit`] runs before the upgrade; its refusal is sent as the HTTP response and
//!   no socket exists;
//! - messages reach [`Service::on_message`] whole (fragments reassembled), in order, text
//!   always valid UTF-8, never larger than [`TransportOptions::max_message_size`] (else close
//!   `1009`); protocol errors close with `1002`, invalid UTF-8 with `1007`;
//! - [`Service::on_close`] is called exactly once for every socket [`Service::open`] was
//!   called for, whatever ended it;
//! - sending never waits: a frame is written to the kernel from the sender's own task when
//!   nothing is queued before it, and queued (in order) otherwise;
//! - a socket whose send queue is full (in frames or bytes) is closed (`1008`, "send queue
//!   full") instead of growing memory; a client that misses a heartbeat pong, or takes no
//!   bytes of its backlog between two heartbeats, is dropped;
//! - every byte a client can make the server buffer (an incomplete message, queued frames)
//!   counts against one budget per server ([`TransportOptions::buffer_budget`]); at the budget
//!   the sockets holding the most are closed ([`OVER_BUDGET_CODE`]) and it is never exceeded;
//! - connections that have not finished their upgrade are capped, in total and per client
//!   address, and bounded in time; an upgrade request whose head is larger than
//!   [`TransportOptions::max_request_head`] gets `431`; every connection serves one request
//!   (a refusal closes it).
//!
//! An echo server: every text message comes back to its sender.
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use switchboard_transport::{
//!     CloseReason, HttpResponse, Inbound, RequestParts, Server, Service, SocketRef,
//!     TransportOptions,
//! };
//!
//! struct Echo;
//!
//! impl Service for Echo {
//!     type Admission = ();
//!     type Session = SocketRef;
//!     fn admit(&self, _request: &RequestParts) -> Result<(), HttpResponse> {
//!         Ok(()) // check a token here; an Err is sent as the HTTP response
//!     }
//!     fn open(&self, _: (), socket: SocketRef) -> SocketRef {
//!         socket
//!     }
//!     fn on_message(&self, socket: &SocketRef, message: Inbound) {
//!         if let Inbound::Text(text) = message {
//!             let _ = socket.send_text(text); // Err: queue full, the socket is being closed
//!         }
//!     }
//!     fn on_close(&self, _socket: SocketRef, _reason: CloseReason) {}
//! }
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> std::io::Result<()> {
//! let mut options = TransportOptions::default();
//! options.path = "/echo".into();
//! let server = Server::bind("127.0.0.1:0".parse().unwrap(), options, Arc::new(Echo)).await?;
//!
//! # use futures_util::{SinkExt, StreamExt};
//! # use tokio_tungstenite::tungstenite::Message;
//! let url = format!("ws://{}/echo", server.local_addr());
//! let (mut client, _) = tokio_tungstenite::connect_async(url).await.unwrap();
//! client.send(Message::text("hello")).await.unwrap();
//! assert_eq!(client.next().await.unwrap().unwrap(), Message::text("hello"));
//!
//! server.shutdown(Duration::from_secs(1)).await; // every socket gets 1001
//! # Ok(()) }
//! ```
//!
//! See `examples/echo.rs` for the complete echo server used for conformance runs.

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::header::{
    HeaderName, HeaderValue, CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY,
    SEC_WEBSOCKET_VERSION, UPGRADE,
};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

mod budget;
pub mod codec;
mod frame;
mod handshakes;
mod outbox;
mod reader;
mod socket;
mod socket_task;
mod sockets;
mod stats;
mod upgrade;
mod wire;
use handshakes::Handshakes;
use socket::lock;
use socket_task::SocketTask;
use sockets::Hub;
pub use stats::TransportStats;
pub use switchboard_core::{
    http, plain_response, CloseReason, HttpEndpoint, HttpResponse, Inbound, OriginPolicy,
    RequestParts, SendError, Service, ShutdownReport, Socket, SocketRef, TransportCounters,
    OVER_BUDGET_CODE, SLOW_CONSUMER_CODE,
};
pub use switchboard_tls::ServerTls;
use wire::Wire;

mod closing_tls;
mod endpoints;
mod stream_tuning;
mod transport;
pub use transport::WebSocketTransport;

use endpoints::ReplyBody;

/// Options of the transport. Plain data with defaults; the `switchboard` facade fills it from
/// the config file.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct TransportOptions {
    /// Path that accepts upgrades. Default `/connect`.
    pub path: String,
    /// Interval between server pings; a client that has not answered one ping by the next
    /// is dropped. Default 30 s.
    pub heartbeat_interval: Duration,
    /// Largest inbound message (after reassembly) in bytes; larger closes with `1009`.
    /// Default 64 KiB.
    pub max_message_size: usize,
    /// Frames that may wait in one socket's send queue. Default 256.
    pub send_queue: usize,
    /// Bytes that may wait in one socket's send queue (a frame is always taken into an empty
    /// queue, whatever its size). Default 1 MiB.
    pub send_queue_bytes: usize,
    /// Bytes buffered across all sockets, at most: incomplete inbound messages and queued
    /// outbound frames. At the budget, the sockets holding the most are closed with
    /// [`OVER_BUDGET_CODE`]. Default 256 MiB.
    pub buffer_budget: usize,
    /// How long a connection may take from being accepted to completing its upgrade (or to
    /// its one HTTP response). Default 10 s.
    pub handshake_timeout: Duration,
    /// Connections that have not completed their upgrade, at most; more are closed as soon as
    /// they are accepted. Default 1,024.
    pub max_handshakes: usize,
    /// The same, per client (an IPv4 address, an IPv6 /64). Default 64.
    pub max_handshakes_per_address: usize,
    /// Largest upgrade request head in bytes (request line and headers); larger gets `431`.
    /// Default 32 KiB.
    pub max_request_head: usize,
    /// How long to wait for the peer's half of a close handshake. Default 2 s.
    pub close_timeout: Duration,
    /// Which pages may open sockets, by their `Origin` header. Default: same host.
    pub origins: OriginPolicy,
    /// Most sockets open at once (upgrades in progress included); more get 503. Default:
    /// no limit.
    pub max_connections: Option<usize>,
    /// Other transports made of plain HTTP requests (Server-Sent Events), served on the same
    /// port at their own paths. Default: none.
    pub endpoints: Endpoints,
    /// Serve TLS (`wss://`, and `https://` for the endpoints) with this certificate; a
    /// reload serves the new one to new connections. The TLS handshake is part of the
    /// handshake that `handshake_timeout` bounds. Default: plain TCP.
    pub tls: Option<ServerTls>,
}

/// The [`HttpEndpoint`]s a server hosts beside its upgrade path.
#[derive(Clone, Default)]
pub struct Endpoints(pub Vec<Arc<dyn HttpEndpoint>>);

impl fmt::Debug for Endpoints {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|e| e.path()))
            .finish()
    }
}

impl Default for TransportOptions {
    fn default() -> Self {
        TransportOptions {
            path: "/connect".into(),
            heartbeat_interval: Duration::from_secs(30),
            max_message_size: 64 * 1024,
            send_queue: 256,
            send_queue_bytes: 1 << 20,
            buffer_budget: 256 << 20,
            handshake_timeout: Duration::from_secs(10),
            max_handshakes: 1024,
            max_handshakes_per_address: 64,
            max_request_head: 32 << 10,
            close_timeout: Duration::from_secs(2),
            origins: OriginPolicy::SameHost,
            max_connections: None,
            endpoints: Endpoints::default(),
            tls: None,
        }
    }
}

/// A running server. Dropping it does not stop it; call [`Server::shutdown`].
pub struct Server {
    local_addr: SocketAddr,
    stats: Arc<TransportStats>,
    shutdown: watch::Sender<bool>,
    /// Taken by the first shutdown.
    running: std::sync::Mutex<Option<Running>>,
}

/// What a shutdown stops and waits for.
struct Running {
    accept_loop: JoinHandle<()>,
    alive: mpsc::Sender<Infallible>,
    sockets_done: mpsc::Receiver<Infallible>,
}

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Binds `addr` and starts serving `service`.
    pub async fn bind<S: Service>(
        addr: SocketAddr,
        options: TransportOptions,
        service: Arc<S>,
    ) -> std::io::Result<Server> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| std::io::Error::new(e.kind(), format!("listener {addr}: {e}")))?;
        Self::from_listener(listener, options, service)
    }

    /// Starts serving `service` on a bound listener.
    pub fn from_listener<S: Service>(
        listener: TcpListener,
        options: TransportOptions,
        service: Arc<S>,
    ) -> std::io::Result<Server> {
        let local_addr = listener.local_addr()?;
        ack_with_the_answer(&listener);
        if let Some(clash) = options
            .endpoints
            .0
            .iter()
            .find(|e| e.path() == options.path)
        {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("endpoint path {} is the upgrade path", clash.path()),
            ));
        }
        let (shutdown, shutdown_rx) = watch::channel(false);
        // The server and every socket task hold a strong `alive` sender; once the server drops
        // its own at shutdown, `recv` returns None when the last socket task has ended.
        let (alive, sockets_done) = mpsc::channel::<Infallible>(1);
        let stats = Arc::new(TransportStats::default());
        stats.budget.set_limit(options.buffer_budget);
        let hub = Arc::new(Hub::new(stats.clone()));
        tokio::spawn(sockets::heartbeat_until_shutdown(
            hub.clone(),
            options.heartbeat_interval,
            shutdown_rx.clone(),
        ));
        let endpoints = options
            .endpoints
            .0
            .iter()
            .map(|e| (e.path().to_string(), e.clone()))
            .collect();
        let shared = Arc::new(Shared {
            hub,
            endpoints,
            handshakes: Arc::new(Handshakes::new(
                options.max_handshakes,
                options.max_handshakes_per_address,
                stats.clone(),
            )),
            options,
            service,
            shutdown: shutdown_rx.clone(),
            alive: alive.downgrade(),
        });
        let accept_loop = tokio::spawn(accept_loop(listener, shared, shutdown_rx));
        Ok(Server {
            local_addr,
            stats,
            shutdown,
            running: std::sync::Mutex::new(Some(Running {
                accept_loop,
                alive,
                sockets_done,
            })),
        })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The live counters.
    pub fn stats(&self) -> Arc<TransportStats> {
        self.stats.clone()
    }

    /// Stops accepting, closes every socket with `1001` (going away), and waits until each
    /// has ended and [`Service::on_close`] has run for it, or until `drain` has passed.
    pub async fn shutdown(self, drain: Duration) -> ShutdownReport {
        self.stop(drain).await
    }

    /// [`Server::shutdown`] through a shared reference; a second call reports at once.
    fn stop(&self, drain: Duration) -> impl std::future::Future<Output = ShutdownReport> {
        let _ = self.shutdown.send(true);
        let running = self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        async move {
            let Some(Running {
                accept_loop,
                alive,
                mut sockets_done,
            }) = running
            else {
                return ShutdownReport::new(true);
            };
            accept_loop.abort();
            let _ = accept_loop.await;
            // Every socket task holds a clone: `recv` returns None once the last has ended.
            drop(alive);
            let drained = tokio::time::timeout(drain, sockets_done.recv())
                .await
                .is_ok();
            ShutdownReport::new(drained)
        }
    }
}

struct Shared<S> {
    hub: Arc<Hub>,
    /// The options' endpoints, by path.
    endpoints: std::collections::HashMap<String, Arc<dyn HttpEndpoint>>,
    handshakes: Arc<Handshakes>,
    options: TransportOptions,
    service: Arc<S>,
    shutdown: watch::Receiver<bool>,
    alive: mpsc::WeakSender<Infallible>,
}

async fn accept_loop<S: Service>(
    listener: TcpListener,
    shared: Arc<Shared<S>>,
    mut shutdown: watch::Receiver<bool>,
) {
    // Accept failures are logged at most once per 10 s, with how many there were since.
    let mut failures_unlogged = 0u64;
    let mut logged_at: Option<tokio::time::Instant> = None;
    loop {
        let accepted = tokio::select! {
            biased;
            _ = shutdown.changed() => return,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                failures_unlogged += 1;
                if logged_at.is_none_or(|at| at.elapsed() >= Duration::from_secs(10)) {
                    tracing::warn!(error = %e, failures = failures_unlogged, "accept failed");
                    (failures_unlogged, logged_at) = (0, Some(tokio::time::Instant::now()));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Counted from here until the upgrade completes or the connection ends; over the cap,
        // the connection is closed before a byte is read, so a flood of half-open upgrades
        // cannot take the file descriptors that `max_connections` is there to share out.
        let stats = &shared.hub.stats;
        let in_progress = match Handshakes::enter(&shared.handshakes, peer.ip()) {
            Ok(slot) => slot,
            Err(handshakes::Refused::Total) => {
                stats.refused_handshakes.fetch_add(1, Relaxed);
                continue;
            }
            Err(handshakes::Refused::PerAddress) => {
                stats.refused_handshakes_per_address.fetch_add(1, Relaxed);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        tokio::spawn(serve_connection(stream, peer, in_progress, shared));
    }
}

/// What one connection's task shares with its request's handler.
struct Connection {
    in_progress: Option<handshakes::InProgress>,
    abort: Option<Arc<switchboard_core::AbortSignal>>,
}

fn stream_abort(
    state: &std::sync::Mutex<Connection>,
) -> Option<Arc<switchboard_core::AbortSignal>> {
    lock(state).abort.clone()
}

/// One accepted connection: its one request (an upgrade, an endpoint's, a plain one), within
/// `handshake_timeout`, unless an endpoint answers with a stream (which lives on, no longer
/// counted as a handshake).
async fn serve_connection<S: Service>(
    stream: TcpStream,
    peer: SocketAddr,
    in_progress: handshakes::InProgress,
    shared: Arc<Shared<S>>,
) {
    // Checked: a timeout of centuries (options set by hand; the config caps it at ten years)
    // must not overflow the clock and panic on every connection.
    let now = tokio::time::Instant::now();
    let deadline = now
        .checked_add(shared.options.handshake_timeout)
        .unwrap_or_else(|| now + Duration::from_secs(86_400 * 365 * 30));
    match &shared.options.tls {
        None => upgrade::serve_first_request(stream, peer, in_progress, shared, deadline).await,
        // Boxed, as `serve_first_request` boxes its hyper path: the upgrade's task stays small.
        Some(tls) => {
            let accept = tls.acceptor().accept(stream);
            Box::pin(serve_tls(accept, peer, in_progress, shared, deadline)).await
        }
    }
}

/// A TLS connection: its handshake, then its one request (as on plain TCP: see
/// [`upgrade::serve_first_request`]).
async fn serve_tls<S: Service>(
    accept: switchboard_tls::tokio_rustls::Accept<TcpStream>,
    peer: SocketAddr,
    in_progress: handshakes::InProgress,
    shared: Arc<Shared<S>>,
    deadline: tokio::time::Instant,
) {
    match tokio::time::timeout_at(deadline, accept).await {
        Ok(Ok(stream)) => {
            let stream = closing_tls::ClosingTls::new(stream);
            upgrade::serve_first_request(stream, peer, in_progress, shared, deadline).await
        }
        Ok(Err(e)) => {
            shared.hub.stats.refused_tls.fetch_add(1, Relaxed);
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
        }
        Err(_) => {
            shared.hub.stats.refused_tls.fetch_add(1, Relaxed);
            tracing::debug!(%peer, "TLS handshake timed out");
        }
    }
}

/// The connection's one request, over plain TCP or TLS, within `deadline`.
async fn serve_http<S: Service, I>(
    io: I,
    peer: SocketAddr,
    in_progress: handshakes::InProgress,
    shared: Arc<Shared<S>>,
    deadline: tokio::time::Instant,
) where
    I: tokio::io::AsyncRead
        + tokio::io::AsyncWrite
        + stream_tuning::OverTcp
        + Unpin
        + Send
        + 'static,
{
    // Set on the socket when an endpoint answers with a stream (hyper holds the IO by then).
    let tuning = Arc::new(stream_tuning::StreamTuning::default());
    let io = TokioIo::new(stream_tuning::Tuned::new(io, tuning.clone()));
    // While the request is served: its handshake slot, then (for a streamed answer) the
    // stream's abort signal in its place.
    let state = Arc::new(std::sync::Mutex::new(Connection {
        in_progress: Some(in_progress),
        abort: None,
    }));
    let svc_shared = shared.clone();
    let svc_state = state.clone();
    let svc = service_fn(move |req: Request<Incoming>| {
        let shared = svc_shared.clone();
        let state = svc_state.clone();
        let tuning = tuning.clone();
        async move {
            let mut response = match shared.endpoints.get(req.uri().path()) {
                Some(endpoint) => {
                    let mut streaming = None;
                    let response = endpoints::serve(
                        endpoint.as_ref(),
                        req,
                        peer,
                        &shared.options,
                        &mut streaming,
                    )
                    .await;
                    if let Some(streaming) = streaming {
                        tuning.request(streaming.unacked_limit);
                        // Long-lived from here: no longer a handshake in progress.
                        let mut state = lock(&state);
                        state.in_progress = None;
                        state.abort = Some(streaming.abort);
                    }
                    response
                }
                None => {
                    // What the service must do before it can admit (fetch keys a token
                    // names) is awaited here, for a request that passed the cheap checks,
                    // and only until a second before the handshake deadline, so that the
                    // client still gets the service's answer (a refusal, say) rather than a
                    // dropped connection.
                    let refusal = refusal_before_admission(&shared.options, &req);
                    if refusal.is_none() {
                        if let Some(prepare) = shared.service.prepare_admit(req.headers()) {
                            let until = prepare_until(deadline, shared.options.handshake_timeout);
                            let _ = tokio::time::timeout_at(until, prepare).await;
                        }
                    }
                    handle_request(shared, req, peer, refusal).map(ReplyBody::full)
                }
            };
            // One request per connection: after a refusal (or any plain HTTP answer) the
            // connection closes, so it cannot be kept to try again and again.
            if response.status() != StatusCode::SWITCHING_PROTOCOLS {
                response
                    .headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
            }
            Ok::<_, Infallible>(response)
        }
    });
    let options = &shared.options;
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(options.handshake_timeout)
        // hyper answers 431 itself for a head larger than its buffer (8 KiB at least);
        // `handle_request` applies the exact limit.
        .max_buf_size(options.max_request_head.saturating_add(1024).max(8192))
        .serve_connection(io, svc)
        .with_upgrades();
    let mut conn = std::pin::pin!(conn);
    let mut deadline = std::pin::pin!(tokio::time::sleep_until(deadline));
    // The request must be served within the deadline, unless its answer is a stream: that
    // lasts until it ends, or until its endpoint aborts it (a client that stopped reading).
    let ended = std::future::poll_fn(|cx| {
        if let Poll::Ready(ended) = conn.as_mut().poll(cx) {
            return Poll::Ready(Some(ended));
        }
        match stream_abort(&state) {
            Some(abort) => abort.poll_aborted(cx).map(|()| Some(Ok(()))),
            None => deadline.as_mut().poll(cx).map(|()| None),
        }
    })
    .await;
    match ended {
        Some(Ok(())) => {}
        Some(Err(e)) if e.is_parse_too_large() => {
            shared.hub.stats.refused_head_size.fetch_add(1, Relaxed);
        }
        Some(Err(e)) => {
            tracing::debug!(%peer, error = %e, "http connection ended with an error")
        }
        None => tracing::debug!(%peer, "handshake timed out"),
    }
}

/// Why a request is answered before it reaches [`Service::admit`]: the cheap checks, in
/// the order they are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// Another path: the service's plain HTTP routes answer it.
    OtherPath,
    NotAnUpgrade,
    NotGet,
    HeadTooLarge,
    ForeignOrigin,
    /// Not HTTP/1.1, not version 13, or a key that is not base64 of 1-16 bytes: `400` before
    /// the service looks at it (a key set is not fetched for it).
    BadUpgrade,
}

/// The cheap checks of an upgrade request, made once: the answer (see [`handle_request`])
/// and whether the service's `prepare_admit` work is worth awaiting both follow from it.
fn refusal_before_admission<B>(options: &TransportOptions, req: &Request<B>) -> Option<Refusal> {
    if req.uri().path() != options.path {
        Some(Refusal::OtherPath)
    } else if !fastwebsockets::upgrade::is_upgrade_request(req) {
        Some(Refusal::NotAnUpgrade)
    } else if req.method() != hyper::Method::GET {
        Some(Refusal::NotGet)
    } else if switchboard_core::request_head_len(req.uri(), req.method(), req.headers())
        > options.max_request_head
    {
        Some(Refusal::HeadTooLarge)
    } else if !options.origins.allows(req.headers()) {
        Some(Refusal::ForeignOrigin)
    } else if !valid_upgrade(req.version(), req.headers()) {
        Some(Refusal::BadUpgrade)
    } else {
        None
    }
}

/// Answers `req`, refused already by `refusal` ([`refusal_before_admission`]) or not.
fn handle_request<S: Service>(
    shared: Arc<Shared<S>>,
    req: Request<Incoming>,
    peer: SocketAddr,
    refusal: Option<Refusal>,
) -> HttpResponse {
    let stats = &shared.hub.stats;
    match refusal {
        None => {}
        Some(Refusal::OtherPath) => {
            let (parts, _body) = req.into_parts();
            return shared.service.http(&parts);
        }
        Some(Refusal::NotAnUpgrade) => {
            let mut res = plain_response(
                StatusCode::UPGRADE_REQUIRED,
                "this endpoint speaks WebSocket only\n",
            );
            res.headers_mut()
                .insert(UPGRADE, HeaderValue::from_static("websocket"));
            return res;
        }
        Some(Refusal::NotGet) => {
            return plain_response(StatusCode::METHOD_NOT_ALLOWED, "upgrade requests use GET\n");
        }
        Some(Refusal::HeadTooLarge) => {
            stats.refused_head_size.fetch_add(1, Relaxed);
            return switchboard_core::head_too_large();
        }
        Some(Refusal::ForeignOrigin) => {
            stats.refused_origin.fetch_add(1, Relaxed);
            return plain_response(StatusCode::FORBIDDEN, "origin not allowed\n");
        }
        Some(Refusal::BadUpgrade) => return bad_upgrade(),
    }
    let (parts, body) = req.into_parts();
    let Admitted { open, accept } = match admit_upgrade(&shared, &parts, peer) {
        Ok(admitted) => admitted,
        Err(answer) => return answer,
    };
    let mut req = Request::from_parts(parts, body);
    let on_upgrade = hyper::upgrade::on(&mut req);
    // Boxed until the upgrade completes, so that waiting for it stays small.
    let open = Box::new(open);
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(e) => return tracing::debug!(%peer, error = %e, "upgrade did not complete"),
        };
        // The connection was served over plain TCP or TLS, behind the bytes
        // `upgrade::serve_first_request` read first; taking the stream back lets the socket
        // read and write it without hyper's buffers in between.
        let taken = match upgrade::taken_back::<TcpStream>(upgraded) {
            Ok(taken) => Some(taken),
            Err(upgraded) => upgrade::taken_back::<closing_tls::ClosingTls>(upgraded).ok(),
        };
        let Some((wire, read_buf)) = taken else {
            return tracing::error!(%peer, "upgraded connection is neither TCP nor TLS");
        };
        // A task of its own, holding just the socket: this one (and what it held while
        // waiting for the upgrade) ends here.
        tokio::spawn(SocketTask::open(wire, read_buf, None, *open, shared));
    });
    switching_protocols(accept)
}

/// How long to await the service's `prepare_admit` within a handshake that ends at
/// `deadline` and lasts `timeout`: until a second before the deadline (half the timeout, when
/// it is shorter than two), so that the client still hears the service's answer.
fn prepare_until(deadline: tokio::time::Instant, timeout: Duration) -> tokio::time::Instant {
    let margin = Duration::from_secs(1).min(timeout / 2);
    deadline.checked_sub(margin).unwrap_or(deadline)
}

/// An upgrade request admitted: what its socket starts with, and its `Sec-WebSocket-Accept`.
pub(crate) struct Admitted<A> {
    open: Open<A>,
    accept: HeaderValue,
}

/// Admits an upgrade request that passed the cheap checks: a socket slot, the service's
/// [`Service::admit`], the key. `Err` is the answer to send instead (the type
/// `Service::admit` refuses with; a refusal is the uncommon path).
#[allow(clippy::result_large_err)]
pub(crate) fn admit_upgrade<S: Service>(
    shared: &Arc<Shared<S>>,
    parts: &RequestParts,
    peer: SocketAddr,
) -> Result<Admitted<S::Admission>, HttpResponse> {
    let stats = &shared.hub.stats;
    // Refused before already ([`Refusal::BadUpgrade`]); checked again here, where the key is
    // needed, so that no path admits a malformed upgrade.
    let Some(accept) = accept_key(parts) else {
        return Err(bad_upgrade());
    };
    // Reserve a socket slot before the (costlier) admission; released when the socket ends.
    let Some(slot) = SocketSlot::reserve(stats, shared.options.max_connections) else {
        stats.refused_capacity.fetch_add(1, Relaxed);
        let mut res = plain_response(StatusCode::SERVICE_UNAVAILABLE, "too many sockets\n");
        res.headers_mut()
            .insert(hyper::header::RETRY_AFTER, HeaderValue::from_static("5"));
        return Err(res);
    };
    let admission = match shared.service.admit(parts) {
        Ok(a) => a,
        Err(refusal) => {
            stats.refused_by_service.fetch_add(1, Relaxed);
            return Err(refusal);
        }
    };
    let open = Open {
        admission,
        peer,
        alive: shared.alive.upgrade(),
        slot,
    };
    Ok(Admitted { open, accept })
}

/// The `101` that completes an upgrade.
fn switching_protocols(accept: HeaderValue) -> HttpResponse {
    let mut res = Response::new(Bytes::new());
    *res.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = res.headers_mut();
    headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(SEC_WEBSOCKET_ACCEPT, accept);
    res
}

/// `first` then `then`, copied only when both hold bytes.
fn join(first: Bytes, then: Bytes) -> Bytes {
    if first.is_empty() {
        then
    } else if then.is_empty() {
        first
    } else {
        [first, then].concat().into()
    }
}

/// The size of a request's head as it came in: request line and header lines.
fn request_head_len(parts: &RequestParts) -> usize {
    switchboard_core::request_head_len(&parts.uri, &parts.method, &parts.headers)
}

/// The answer to a malformed upgrade request.
fn bad_upgrade() -> HttpResponse {
    let mut res = plain_response(StatusCode::BAD_REQUEST, "bad websocket upgrade request\n");
    res.headers_mut().insert(
        HeaderName::from_static("sec-websocket-version"),
        HeaderValue::from_static("13"),
    );
    res
}

/// Whether an upgrade is HTTP/1.1 with version 13 and a key in base64 (RFC 6455 4.2.1). The
/// RFC's key is 16 bytes; the spec's own `curl` example sends 13 (`Hello, world!`), so 1 to
/// 16 are taken (docs/CONFORMANCE.md).
fn valid_upgrade(version: http::Version, headers: &http::HeaderMap) -> bool {
    use base64::Engine;
    let Some(key) = headers.get(SEC_WEBSOCKET_KEY) else {
        return false;
    };
    // One key and one version (RFC 6455 4.1): with two, which one the answer is for would
    // be a guess.
    let once = |name| headers.get_all(name).iter().count() == 1;
    switchboard_core::http11_with_one_host(version, headers)
        && once(SEC_WEBSOCKET_KEY)
        && once(SEC_WEBSOCKET_VERSION)
        && headers
            .get(SEC_WEBSOCKET_VERSION)
            .is_some_and(|v| v.as_bytes() == b"13")
        && base64::engine::general_purpose::STANDARD
            .decode(key.as_bytes())
            .is_ok_and(|nonce| (1..=16).contains(&nonce.len()))
}

/// `Sec-WebSocket-Accept` for a valid upgrade ([`valid_upgrade`]), `None` for any other
/// request (RFC 6455 4.2.2).
fn accept_key(parts: &RequestParts) -> Option<HeaderValue> {
    use base64::Engine;
    use sha1::Digest;
    let headers = &parts.headers;
    if !valid_upgrade(parts.version, headers) {
        return None;
    }
    let key = headers.get(SEC_WEBSOCKET_KEY)?;
    let mut sha1 = sha1::Sha1::new();
    sha1.update(key.as_bytes());
    sha1.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    let accept = base64::engine::general_purpose::STANDARD.encode(sha1.finalize());
    HeaderValue::from_str(&accept).ok()
}

/// What an admitted, upgraded connection brings to its socket.
pub(crate) struct Open<A> {
    admission: A,
    peer: SocketAddr,
    /// Keeps [`Server::shutdown`] waiting until the socket has ended.
    alive: Option<mpsc::Sender<Infallible>>,
    slot: SocketSlot,
}

/// One reserved place among `max_connections`; gives it back when dropped.
pub(crate) struct SocketSlot(Arc<TransportStats>);

impl SocketSlot {
    fn reserve(stats: &Arc<TransportStats>, max: Option<usize>) -> Option<SocketSlot> {
        let before = stats.sockets_open.fetch_add(1, Relaxed);
        if max.is_some_and(|max| before >= max as u64) {
            stats.sockets_open.fetch_sub(1, Relaxed);
            return None;
        }
        Some(SocketSlot(stats.clone()))
    }
}

impl Drop for SocketSlot {
    fn drop(&mut self) {
        self.0.sockets_open.fetch_sub(1, Relaxed);
    }
}

/// No ACK of its own for a client's first bytes (the upgrade request): it rides on the answer,
/// which follows within microseconds. Sockets accepted on `listener` inherit the setting
/// (Linux), which saves one packet of the eight of a connection's upgrade and reset, most of it
/// paid for in the client's kernel on loopback (10-13% more handshakes a second than the
/// build before, in the benchmark's A/B turns). HAProxy does the same in HTTP mode
/// (`option tcp-smart-accept`). Elsewhere, or if refused, nothing changes.
fn ack_with_the_answer(listener: &TcpListener) {
    #[cfg(target_os = "linux")]
    let _ = socket2::SockRef::from(listener).set_tcp_quickack(false);
    #[cfg(not(target_os = "linux"))]
    let _ = listener;
}

#[cfg(test)]
mod test_support {
    use std::net::SocketAddr;
    use tokio::net::{TcpListener, TcpStream};

    /// A connected loopback pair: the accepted (server's) side with its peer's address, and
    /// the peer.
    pub(crate) async fn loopback_pair() -> (TcpStream, SocketAddr, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, addr) = listener.accept().await.unwrap();
        (accepted, addr, peer)
    }
}

#[cfg(all(test, target_os = "linux"))]
mod quick_ack_tests {
    use super::*;

    /// The accepted socket is in delayed-ACK mode from the start (`TCP_QUICKACK` reads 0): it
    /// took the listener's setting. A socket accepted without it reads 1.
    #[tokio::test]
    async fn accepted_sockets_ack_with_their_answer() {
        for (set, quick) in [(true, false), (false, true)] {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            if set {
                ack_with_the_answer(&listener);
            }
            let addr = listener.local_addr().unwrap();
            let _client = TcpStream::connect(addr).await.unwrap();
            let (accepted, _) = listener.accept().await.unwrap();
            assert_eq!(
                socket2::SockRef::from(&accepted).tcp_quickack().unwrap(),
                quick,
                "set on the listener: {set}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The service's preparation (a key set fetch) gets most of a short handshake, and the
    /// client still hears its answer before the deadline.
    #[tokio::test]
    async fn preparing_to_admit_leaves_time_to_answer_within_any_handshake_timeout() {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        for (timeout, margin_ms) in [(10_000, 1000), (2_000, 1000), (1_000, 500), (100, 50)] {
            let until = prepare_until(deadline, Duration::from_millis(timeout));
            assert_eq!(
                deadline - until,
                Duration::from_millis(margin_ms),
                "{timeout} ms"
            );
        }
    }
}
