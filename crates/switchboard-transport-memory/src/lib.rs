//! An in-memory transport for Switchboard: each socket is a pair of channels between a
//! [`MemoryClient`] and the [`Service`], with no TCP, no ports and no timers.
//!
//! It is for tests: a service (the `switchboard` gateway, or one of your own) runs on it
//! exactly as on the WebSocket transport — admission, messages in order, bounded send queues,
//! slow consumers, close codes, `on_close` once, shutdown with 1001 — but what a test sees
//! depends only on what it does, not on the kernel's buffers or a port being free. Depend on it
//! (usually as a dev-dependency) to test a service without the network; give it to
//! `switchboard::Container::transport` and start the container with `start_transports`. It
//! knows only `switchboard-core`.
//!
//! ```
//! use std::sync::Arc;
//! use switchboard_core::{
//!     CloseReason, HttpResponse, Inbound, RequestParts, Service, SocketRef, Transport,
//! };
//! use switchboard_transport_memory::{ClientEvent, MemoryOptions, MemoryTransport};
//!
//! struct Echo;
//!
//! impl Service for Echo {
//!     type Admission = ();
//!     type Session = SocketRef;
//!     fn admit(&self, _request: &RequestParts) -> Result<(), HttpResponse> {
//!         Ok(())
//!     }
//!     fn open(&self, _: (), socket: SocketRef) -> SocketRef {
//!         socket
//!     }
//!     fn on_message(&self, socket: &SocketRef, message: Inbound) {
//!         if let Inbound::Text(text) = message {
//!             let _ = socket.send_text(text);
//!         }
//!     }
//!     fn on_close(&self, _socket: SocketRef, _reason: CloseReason) {}
//! }
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let transport = MemoryTransport::new(MemoryOptions::default());
//! let serving = transport.clone().start(Arc::new(Echo)).await.unwrap();
//! let request = http::Request::get("/connect").body(()).unwrap();
//! let mut client = transport.connect(request).await.unwrap();
//! client.send_text("hello").unwrap();
//! assert_eq!(client.recv().await, Some(ClientEvent::Text("hello".into())));
//! serving.shutdown(std::time::Duration::from_secs(1)).await;
//! assert!(matches!(client.recv().await, Some(ClientEvent::Close { code: 1001, .. })));
//! assert_eq!(client.recv().await, None);
//! # }
//! ```
//!
//! What it promises, beyond what every transport does (see `switchboard_core`):
//! - [`MemoryTransport::connect`] returns once [`Service::open`] has run: the socket exists
//!   (and the gateway has registered it) when the client is handed over;
//! - a client's messages wait in its channel while the socket's reading is paused; a client
//!   dropped meanwhile is noticed when reading resumes;
//! - a close event reaches the client after every frame queued before it, and is the last
//!   event; [`MemoryClient::recv`] then returns `None`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use switchboard_core::{
    http, plain_response, BoxFuture, CloseCounts, CloseReason, HttpResponse, RequestParts,
    RunningTransport, Service, ShutdownReport, SocketRef, Transport, TransportCounters,
};
use tokio::sync::watch;

mod client;
mod socket;

pub use client::{ClientEvent, MemoryClient};
use socket::MemorySocket;

/// Options of a [`MemoryTransport`]; the defaults are the WebSocket transport's.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct MemoryOptions {
    /// Largest client message in bytes; a larger one closes the socket with `1009`.
    /// Default 64 KiB.
    pub max_message_size: usize,
    /// Frames that may wait for the client to read them, per socket. Default 256.
    pub send_queue: usize,
    /// Bytes that may wait for the client to read them, per socket (a frame is always taken
    /// when nothing waits, whatever its size). Default 1 MiB.
    pub send_queue_bytes: usize,
}

impl Default for MemoryOptions {
    fn default() -> Self {
        MemoryOptions {
            max_message_size: 64 * 1024,
            send_queue: 256,
            send_queue_bytes: 1 << 20,
        }
    }
}

/// Sockets made of channel pairs, opened with [`MemoryTransport::connect`]. Clones are the
/// same transport: keep one to connect through after giving another to a container.
#[derive(Clone)]
pub struct MemoryTransport {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for MemoryTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryTransport")
            .field("options", &self.shared.options)
            .field("counters", &self.shared.counters())
            .finish()
    }
}

/// What the transport, its serving handle and its sockets share.
pub(crate) struct Shared {
    options: MemoryOptions,
    state: Mutex<State>,
    /// Sockets registered; shutdown waits for 0.
    open: watch::Sender<usize>,
    counters: Mutex<TransportCounters>,
    /// Sockets ended, by why.
    closes: CloseCounts,
}

struct State {
    phase: Phase,
    sockets: HashMap<u64, Arc<MemorySocket>>,
    next_id: u64,
}

enum Phase {
    /// Not started: connecting is refused.
    Idle,
    RunningTransport(Arc<dyn Connector>),
    /// Shut down: connecting is refused.
    Stopped,
}

/// Longest wait for [`Service::prepare_admit`]'s work before `admit` runs anyway.
const PREPARE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Opens sockets for the service the transport was started with.
trait Connector: Send + Sync {
    /// [`Service::prepare_admit`] of the service.
    fn prepare(
        &self,
        headers: &http::HeaderMap,
    ) -> Option<switchboard_core::BoxFuture<'static, ()>>;

    // A refusal is moved once, as in `Service::admit`.
    #[allow(clippy::result_large_err)]
    fn connect(
        &self,
        shared: &Arc<Shared>,
        request: RequestParts,
    ) -> Result<MemoryClient, HttpResponse>;
}

struct Bound<S> {
    service: Arc<S>,
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

fn unavailable() -> HttpResponse {
    plain_response(
        http::StatusCode::SERVICE_UNAVAILABLE,
        "the memory transport is not serving\n",
    )
}

impl<S: Service> Connector for Bound<S> {
    fn prepare(
        &self,
        headers: &http::HeaderMap,
    ) -> Option<switchboard_core::BoxFuture<'static, ()>> {
        self.service.prepare_admit(headers)
    }

    fn connect(
        &self,
        shared: &Arc<Shared>,
        request: RequestParts,
    ) -> Result<MemoryClient, HttpResponse> {
        let admission = self.service.admit(&request).inspect_err(|_| {
            lock(&shared.counters).refused_by_service += 1;
        })?;
        // Bounded as a connection's kernel buffer is: a client cannot queue more than this
        // many messages the service has not taken (say, while its reading is paused).
        let (to_server, from_client) = flume::bounded(shared.options.send_queue.max(1));
        let (to_client, events) = flume::unbounded();
        let socket = Arc::new(MemorySocket::new(to_client, shared.clone()));
        let registered = Registered::enter(shared, socket.clone())?;
        let session = self.service.open(admission, socket.clone() as SocketRef);
        tokio::spawn(socket::run(
            self.service.clone(),
            session,
            socket.clone(),
            from_client,
            registered,
        ));
        Ok(MemoryClient::new(to_server, events, socket))
    }
}

/// A socket's place among the open ones, from before `open` until after `on_close`.
pub(crate) struct Registered {
    shared: Arc<Shared>,
    id: u64,
}

impl Registered {
    /// Registers `socket`, unless the transport has stopped serving (503).
    // A refusal is moved once, as in `Service::admit`.
    #[allow(clippy::result_large_err)]
    fn enter(shared: &Arc<Shared>, socket: Arc<MemorySocket>) -> Result<Registered, HttpResponse> {
        let mut state = lock(&shared.state);
        if !matches!(state.phase, Phase::RunningTransport(_)) {
            return Err(unavailable());
        }
        let id = state.next_id;
        state.next_id += 1;
        state.sockets.insert(id, socket);
        shared.open.send_replace(state.sockets.len());
        lock(&shared.counters).sockets_opened += 1;
        Ok(Registered {
            shared: shared.clone(),
            id,
        })
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        let mut state = lock(&self.shared.state);
        state.sockets.remove(&self.id);
        self.shared.open.send_replace(state.sockets.len());
    }
}

impl Shared {
    /// `delta` bytes more (or fewer) wait for clients to read them.
    fn buffered(&self, delta: i64) {
        let mut counters = lock(&self.counters);
        counters.buffered_bytes = counters.buffered_bytes.saturating_add_signed(delta);
        counters.buffered_bytes_peak = counters.buffered_bytes_peak.max(counters.buffered_bytes);
    }

    /// A socket ended for `reason`.
    fn closed(&self, reason: &CloseReason) {
        self.closes.record(reason);
    }

    fn counters(&self) -> TransportCounters {
        let mut counters = *lock(&self.counters);
        counters.sockets_open = *self.open.borrow() as u64;
        self.closes.fill(&mut counters);
        counters
    }
}

impl MemoryTransport {
    /// A transport with `options`, not serving yet: start it with [`Transport::start`] (or
    /// give it to a container).
    pub fn new(options: MemoryOptions) -> Self {
        MemoryTransport {
            shared: Arc::new(Shared {
                options,
                state: Mutex::new(State {
                    phase: Phase::Idle,
                    sockets: HashMap::new(),
                    next_id: 0,
                }),
                open: watch::Sender::new(0),
                counters: Mutex::new(TransportCounters::default()),
                closes: CloseCounts::default(),
            }),
        }
    }

    /// Opens a socket for `request` (its method, URI and headers; the body is ignored):
    /// [`Service::prepare_admit`]'s work is awaited, then [`Service::admit`] runs, and its refusal is returned as is; then
    /// [`Service::open`], before this returns. Before the transport is started, and after its
    /// shutdown, the answer is `503`.
    pub async fn connect(&self, request: http::Request<()>) -> Result<MemoryClient, HttpResponse> {
        let connector = match &lock(&self.shared.state).phase {
            Phase::RunningTransport(connector) => connector.clone(),
            Phase::Idle | Phase::Stopped => return Err(unavailable()),
        };
        let (parts, ()) = request.into_parts();
        if let Some(prepare) = connector.prepare(&parts.headers) {
            // Bounded as a network transport bounds it (its handshake deadline), whatever
            // the service's future does.
            let _ = tokio::time::timeout(PREPARE_TIMEOUT, prepare).await;
        }
        connector.connect(&self.shared, parts)
    }

    /// Its counters now (the same as its [`RunningTransport::counters`]).
    pub fn counters(&self) -> TransportCounters {
        self.shared.counters()
    }
}

impl Transport for MemoryTransport {
    /// Serves `service`; fails if this transport (or a clone) was started before.
    async fn start<S: Service>(
        self,
        service: Arc<S>,
    ) -> std::io::Result<Box<dyn RunningTransport>> {
        let mut state = lock(&self.shared.state);
        if !matches!(state.phase, Phase::Idle) {
            return Err(std::io::Error::other(
                "this memory transport was started before",
            ));
        }
        state.phase = Phase::RunningTransport(Arc::new(Bound { service }));
        drop(state);
        Ok(Box::new(MemoryServing {
            shared: self.shared,
        }))
    }
}

/// A started [`MemoryTransport`].
struct MemoryServing {
    shared: Arc<Shared>,
}

impl RunningTransport for MemoryServing {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn local_addr(&self) -> Option<SocketAddr> {
        None
    }

    fn counters(&self) -> TransportCounters {
        self.shared.counters()
    }

    fn shutdown(&self, drain: Duration) -> BoxFuture<'static, ShutdownReport> {
        let (first, sockets) = {
            let mut state = lock(&self.shared.state);
            let first = !matches!(state.phase, Phase::Stopped);
            // Dropping the service here too: nothing can reach it any more.
            state.phase = Phase::Stopped;
            let sockets: Vec<_> = state.sockets.values().cloned().collect();
            (first, sockets)
        };
        // Closing starts now, before the future is awaited.
        for socket in &sockets {
            socket.shut_down();
        }
        let mut open = self.shared.open.subscribe();
        Box::pin(async move {
            if !first {
                return ShutdownReport::new(*open.borrow() == 0);
            }
            let drained = tokio::time::timeout(drain, open.wait_for(|n| *n == 0))
                .await
                .is_ok_and(|waited| waited.is_ok());
            ShutdownReport::new(drained)
        })
    }
}
