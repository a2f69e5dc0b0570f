//! The client's end of an in-memory socket.

use std::sync::Arc;

use bytes::Bytes;
use switchboard_core::SendError;

use crate::socket::{FromClient, MemorySocket};

/// What a [`MemoryClient`] receives, in the order the server sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    /// A text message.
    Text(String),
    /// A binary message.
    Binary(Bytes),
    /// The answer to a [`MemoryClient::ping`] (when the service answers pings).
    Pong,
    /// The socket closed: the last event. The server's code and reason, or the client's own
    /// close coming back.
    Close {
        /// The close code (1001 at shutdown, 1008 for a slow consumer, 1009 for a message too
        /// big, or what the closing side gave).
        code: u16,
        /// The reason text.
        reason: String,
    },
}

/// The client's end of one socket: send to the service, receive what it sends. Dropping it
/// drops the connection (the service sees `CloseReason::Dropped`).
#[derive(Debug)]
pub struct MemoryClient {
    to_server: flume::Sender<FromClient>,
    events: flume::Receiver<ClientEvent>,
    socket: Arc<MemorySocket>,
}

impl MemoryClient {
    pub(crate) fn new(
        to_server: flume::Sender<FromClient>,
        events: flume::Receiver<ClientEvent>,
        socket: Arc<MemorySocket>,
    ) -> Self {
        MemoryClient {
            to_server,
            events,
            socket,
        }
    }

    fn send(&self, frame: FromClient) -> Result<(), SendError> {
        self.to_server.try_send(frame).map_err(|e| match e {
            flume::TrySendError::Full(_) => SendError::Full,
            flume::TrySendError::Disconnected(_) => SendError::Closed,
        })
    }

    /// Sends a text message. [`SendError::Closed`] once the socket has ended;
    /// [`SendError::Full`] while `send_queue` messages wait that the service has not taken
    /// (its reading paused, say).
    pub fn send_text(&self, text: impl Into<String>) -> Result<(), SendError> {
        self.send(FromClient::Text(text.into()))
    }

    /// Sends a binary message. [`SendError::Closed`] once the socket has ended.
    pub fn send_binary(&self, data: Bytes) -> Result<(), SendError> {
        self.send(FromClient::Binary(data))
    }

    /// Sends a ping; the service decides whether it is answered ([`ClientEvent::Pong`]).
    pub fn ping(&self) -> Result<(), SendError> {
        self.send(FromClient::Ping)
    }

    /// Closes the socket with `code` and `reason`: the service sees
    /// `CloseReason::Client`, and the close comes back as the last [`ClientEvent::Close`]
    /// (after what the server sent before it).
    pub fn close(&self, code: u16, reason: &str) -> Result<(), SendError> {
        self.send(FromClient::Close(code, reason.to_string()))
    }

    /// The next event; `None` once the socket has ended and every event was read.
    pub async fn recv(&mut self) -> Option<ClientEvent> {
        let event = self.events.recv_async().await.ok()?;
        Some(self.took(event))
    }

    /// The next event if one is waiting now; `None` if none is (or the socket has ended and
    /// every event was read).
    pub fn try_recv(&mut self) -> Option<ClientEvent> {
        let event = self.events.try_recv().ok()?;
        Some(self.took(event))
    }

    /// Gives the event's room in the send queue back.
    fn took(&self, event: ClientEvent) -> ClientEvent {
        match &event {
            ClientEvent::Text(text) => self.socket.taken(text.len()),
            ClientEvent::Binary(data) => self.socket.taken(data.len()),
            ClientEvent::Pong | ClientEvent::Close { .. } => {}
        }
        event
    }
}
