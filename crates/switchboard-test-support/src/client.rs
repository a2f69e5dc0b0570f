//! A gateway started on one transport, and a client of it that reads the same whatever the
//! transport: each transport's arm is in one `match` per operation, so a new one is a variant
//! and an arm in each.

use std::ops::Deref;
use std::time::Duration;

use serde_json::Value;
use switchboard::{Config, Container, Running, ShutdownReport};
use switchboard_transport_memory::{ClientEvent, MemoryClient, MemoryOptions, MemoryTransport};

use crate::sse::{self, SseClient};
use crate::websocket::{self, Ws};
use crate::{request, token, wait_until, WAIT};

/// A transport the semantic tests run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Kind {
    /// Real WebSocket clients on 127.0.0.1 (`Container::start_on`).
    WebSocket,
    /// `switchboard-transport-memory`, alone (`Container::start_transports`).
    Memory,
    /// The Server-Sent Events fallback on 127.0.0.1 (`Container::sse_fallback`, whatever the
    /// config): an event stream, posts, a delete. It carries text only and has no pings.
    Sse,
}

/// Starts `container` serving on `kind`.
pub async fn start(kind: Kind, mut container: Container) -> Gateway {
    let (running, memory) = match kind {
        Kind::WebSocket | Kind::Sse => {
            if kind == Kind::Sse {
                container.sse_fallback();
            }
            let running = container.start_on("127.0.0.1:0".parse().unwrap()).await;
            (running, None)
        }
        Kind::Memory => {
            let memory = MemoryTransport::new(memory_options(container.config()));
            container.transport(memory.clone());
            (container.start_transports().await, Some(memory))
        }
    };
    Gateway {
        running: running.unwrap(),
        kind,
        memory,
    }
}

/// The memory transport's bounds as the config sets the WebSocket transport's.
fn memory_options(config: &Config) -> MemoryOptions {
    let socket = &config.gateway.socket;
    let mut options = MemoryOptions::default();
    options.max_message_size = socket.max_message_size;
    options.send_queue = socket.send_queue;
    options.send_queue_bytes = socket.send_queue_bytes;
    options
}

/// A started gateway and the way to reach it. Derefs to its [`Running`].
pub struct Gateway {
    /// The gateway.
    pub running: Running,
    kind: Kind,
    /// With [`Kind::Memory`]: the transport clients connect through.
    memory: Option<MemoryTransport>,
}

impl Deref for Gateway {
    type Target = Running;

    fn deref(&self) -> &Running {
        &self.running
    }
}

impl Gateway {
    /// The transport it serves.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Connects as `user` (a valid token as the `ID_TOKEN` cookie), in `namespace`.
    pub async fn connect(&self, user: &str, namespace: Option<&str>) -> Client {
        self.connect_request(request(&token(user), namespace))
            .await
            .unwrap_or_else(|status| panic!("{user} refused with {status}"))
    }

    /// Connects with `request` (path, query and headers as given; see [`crate::request`]);
    /// a refusal's HTTP status as the error.
    pub async fn connect_request(&self, request: http::Request<()>) -> Result<Client, u16> {
        let connection = match (self.kind, &self.memory) {
            (Kind::WebSocket, _) => {
                let addr = self.running.local_addr().expect("a listening gateway");
                Connection::WebSocket(Box::new(websocket::connect_request(addr, request).await?))
            }
            (Kind::Memory, Some(memory)) => match memory.connect(request).await {
                Ok(client) => Connection::Memory(client),
                Err(refusal) => return Err(refusal.status().as_u16()),
            },
            (Kind::Memory, None) => unreachable!("a memory gateway has its transport"),
            (Kind::Sse, _) => {
                let addr = self.running.local_addr().expect("a listening gateway");
                Connection::Sse(Box::new(sse::connect_request(addr, request).await?))
            }
        };
        Ok(Client { connection })
    }

    /// Waits (up to 5 s) until the gateway's registry holds `n` sockets.
    pub async fn wait_for_sockets(&self, n: usize) {
        let what = format!("{n} sockets");
        wait_until(&what, WAIT, || self.sockets().count() == n).await;
    }

    /// Shuts the gateway down (see [`Running::shutdown`]).
    pub async fn shutdown(self, drain: Duration) -> ShutdownReport {
        self.running.shutdown(drain).await
    }
}

/// What a [`Client`] reads next.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// A text message, as JSON.
    Json(Value),
    /// The answer to a [`Client::ping`].
    Pong,
    /// A close, with its code.
    Close(u16),
    /// The connection ended without a close.
    Ended,
}

/// A connection that yields [`Event`]s.
pub(crate) trait Events {
    /// The next event (binary messages and pings skipped).
    async fn next_event(&mut self) -> Event;
}

/// The next text message within `within` (pongs skipped); panics on the end.
pub(crate) async fn next_json(events: &mut impl Events, within: Duration) -> Value {
    loop {
        let event = tokio::time::timeout(within, events.next_event())
            .await
            .unwrap_or_else(|_| panic!("a message within {within:?}"));
        match event {
            Event::Json(v) => return v,
            Event::Pong => continue,
            other => panic!("expected a message, the socket ended: {other:?}"),
        }
    }
}

/// Asserts that no text message comes within `ms` and that the socket stays open.
pub(crate) async fn assert_silent(events: &mut impl Events, ms: u64) {
    let quiet = async {
        loop {
            match events.next_event().await {
                Event::Pong => continue,
                other => panic!("expected silence, got {other:?}"),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_millis(ms), quiet).await;
}

/// Reads until a close (within 10 s); returns its code.
pub(crate) async fn close_code(events: &mut impl Events) -> u16 {
    let close = async {
        loop {
            match events.next_event().await {
                Event::Close(code) => return code,
                Event::Ended => panic!("the socket ended without a close"),
                Event::Json(_) | Event::Pong => continue,
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), close)
        .await
        .expect("a close within 10 s")
}

/// One socket of a [`Gateway`], on its transport.
pub struct Client {
    connection: Connection,
}

enum Connection {
    // Boxed: a WebSocket stream is much larger than a memory client.
    WebSocket(Box<Ws>),
    Memory(MemoryClient),
    Sse(Box<SseClient>),
}

impl Events for MemoryClient {
    async fn next_event(&mut self) -> Event {
        loop {
            return match self.recv().await {
                Some(ClientEvent::Text(text)) => Event::Json(serde_json::from_str(&text).unwrap()),
                Some(ClientEvent::Pong) => Event::Pong,
                Some(ClientEvent::Close { code, .. }) => Event::Close(code),
                Some(ClientEvent::Binary(_)) => continue,
                None => Event::Ended,
            };
        }
    }
}

impl Events for Client {
    async fn next_event(&mut self) -> Event {
        match &mut self.connection {
            Connection::WebSocket(ws) => ws.next_event().await,
            Connection::Memory(client) => client.next_event().await,
            Connection::Sse(client) => client.next_event().await,
        }
    }
}

impl Client {
    /// Sends `v` as a text message.
    pub async fn send(&mut self, v: Value) {
        self.send_text(&v.to_string()).await
    }

    /// Sends a text message; panics if the socket has ended.
    pub async fn send_text(&mut self, text: &str) {
        assert!(self.try_send_text(text).await, "the socket has ended");
    }

    /// Sends a text message; false if the socket has ended.
    pub async fn try_send_text(&mut self, text: &str) -> bool {
        match &mut self.connection {
            Connection::WebSocket(ws) => {
                use futures_util::SinkExt;
                let message = tokio_tungstenite::tungstenite::Message::text(text);
                ws.send(message).await.is_ok()
            }
            Connection::Memory(client) => client.send_text(text).is_ok(),
            Connection::Sse(client) => client.post(text.as_bytes()).await == 202,
        }
    }

    /// Sends a binary message.
    pub async fn send_binary(&mut self, data: Vec<u8>) {
        match &mut self.connection {
            Connection::WebSocket(ws) => {
                use futures_util::SinkExt;
                let message = tokio_tungstenite::tungstenite::Message::binary(data);
                ws.send(message).await.unwrap();
            }
            Connection::Memory(client) => client.send_binary(data.into()).unwrap(),
            Connection::Sse(_) => panic!("SSE carries no binary messages"),
        }
    }

    /// Sends a ping; its pong (if the gateway answers) is read as [`Event::Pong`].
    pub async fn ping(&mut self) {
        match &mut self.connection {
            Connection::WebSocket(ws) => {
                use futures_util::SinkExt;
                let message = tokio_tungstenite::tungstenite::Message::Ping(Vec::new());
                ws.send(message).await.unwrap();
            }
            // As a WebSocket client's ping goes into the kernel whether or not the server has
            // closed meanwhile (the close is read afterwards), a ping to a socket that has just
            // ended is no error here either.
            Connection::Memory(client) => {
                let _ = client.ping();
            }
            Connection::Sse(_) => panic!("SSE has no pings"),
        }
    }

    /// Closes with `code`; read on to see the close come back.
    pub async fn close(&mut self, code: u16) {
        match &mut self.connection {
            Connection::WebSocket(ws) => websocket::close(ws, code).await,
            Connection::Memory(client) => client.close(code, "").unwrap(),
            Connection::Sse(client) => assert_eq!(client.close(code, "").await, 204),
        }
    }

    /// The next text message as JSON, within 5 s (pongs skipped); panics on a close.
    pub async fn recv(&mut self) -> Value {
        next_json(self, WAIT).await
    }

    /// The next event, or `None` if none comes within `within`.
    pub async fn next(&mut self, within: Duration) -> Option<Event> {
        tokio::time::timeout(within, self.next_event()).await.ok()
    }

    /// Asserts that no text message comes within `ms` and that the socket stays open.
    pub async fn assert_silent(&mut self, ms: u64) {
        assert_silent(self, ms).await
    }

    /// Reads until a close (within 10 s), skipping messages; returns its code.
    pub async fn close_code(&mut self) -> u16 {
        close_code(self).await
    }
}
