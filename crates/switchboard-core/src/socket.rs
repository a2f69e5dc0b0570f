//! A socket as the service sees it, whatever carries it, and what it says when it ends.

use std::net::SocketAddr;

use bytes::Bytes;

/// Close code sent to a slow consumer (its send queue was full).
pub const SLOW_CONSUMER_CODE: u16 = 1008;
/// Close code sent to a socket shed to keep the server within its buffer budget (1013, "try
/// again later": the server is overloaded, not the client at fault).
pub const OVER_BUDGET_CODE: u16 = 1013;
/// Close code of a server going away (shutdown).
pub const GOING_AWAY_CODE: u16 = 1001;

/// Sends to one client. Implemented by each transport; the service holds it as a
/// [`crate::SocketRef`].
///
/// Sending never waits: a frame goes out at once when the connection takes it and is queued
/// otherwise; a queue that is full (in frames or bytes) closes the socket as a slow consumer
/// ([`SLOW_CONSUMER_CODE`]) instead of growing.
pub trait Socket: Send + Sync + 'static {
    /// Sends a text message. `text` must be valid UTF-8 (it is sent as is); share one
    /// `Bytes` across many sockets to encode once.
    fn send_text(&self, text: Bytes) -> Result<(), SendError>;

    /// Sends a binary message ([`SendError::Unsupported`] on a transport that carries text
    /// only).
    fn send_binary(&self, data: Bytes) -> Result<(), SendError>;

    /// Closes the socket with `code` and `reason` after what is already queued; later sends
    /// fail. A code that may not be sent (RFC 6455 7.4) becomes 1011; the reason is cut to
    /// 123 bytes.
    fn close(&self, code: u16, reason: &str);

    /// True once the socket is closing or closed: sends will fail.
    fn is_closing(&self) -> bool;

    /// Stops taking messages from this client: what it sends waits (in the kernel, or in its
    /// request) until [`Socket::resume_reading`]. Sending still works. Whoever pauses must
    /// bound the pause (a paused socket may not notice a dead client).
    fn pause_reading(&self);

    /// Takes messages again after [`Socket::pause_reading`], starting with what arrived
    /// meanwhile.
    fn resume_reading(&self);

    /// The client's address, if the transport has one.
    fn peer_addr(&self) -> Option<SocketAddr>;

    /// The transport's name: `"websocket"`, `"sse"`, `"memory"`.
    fn transport(&self) -> &'static str;
}

/// One complete inbound message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    /// A text message; the bytes are valid UTF-8.
    Text(Bytes),
    /// A binary message.
    Binary(Bytes),
}

/// Why a socket ended, as reported to [`crate::Service::on_close`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CloseReason {
    /// The client closed it (`code` 1005 when it gave none).
    Client {
        /// The client's close code.
        code: u16,
        /// The client's reason text.
        reason: String,
    },
    /// The connection dropped without a close.
    Dropped,
    /// The client did not answer a heartbeat in time.
    HeartbeatTimeout,
    /// The client broke the protocol; closed with `code` (1002, 1007 or 1009).
    Protocol {
        /// The close code sent.
        code: u16,
        /// What was wrong.
        detail: String,
    },
    /// The server side closed it ([`Socket::close`]).
    Server {
        /// The close code sent.
        code: u16,
        /// The reason sent.
        reason: String,
    },
    /// The server is shutting down; closed with [`GOING_AWAY_CODE`].
    Shutdown,
    /// The send queue was full, or the client took nothing of it between two heartbeats;
    /// closed with [`SLOW_CONSUMER_CODE`].
    SlowConsumer,
    /// Reading or writing the connection failed.
    Io(String),
    /// Shed to keep the server's buffered bytes within its budget; closed with
    /// [`OVER_BUDGET_CODE`] (or dropped, when a frame was half written).
    OverBudget,
}

/// Why a [`Socket`] did not take a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// The socket is closing or closed.
    #[error("socket is closed")]
    Closed,
    /// The send queue was full; the socket is being closed as a slow consumer.
    #[error("send queue full; socket closed as a slow consumer")]
    Full,
    /// The server's buffer budget is spent and this socket holds more than its share; it is
    /// being closed.
    #[error("buffer budget exceeded; socket closed")]
    OverBudget,
    /// The transport cannot carry this kind of message (binary over Server-Sent Events).
    #[error("this transport does not carry binary messages")]
    Unsupported,
}

/// Whether `code` may be sent in a close frame (RFC 6455 7.4.1, 7.4.2).
pub fn is_sendable_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999)
}

/// What a server sends for [`Socket::close`]`(code, reason)`: `code`, or 1011 when it may
/// not be sent; `reason` cut to 123 bytes. Every transport's `close` starts here.
pub fn server_close(code: u16, reason: &str) -> (u16, &str) {
    let code = if is_sendable_close_code(code) {
        code
    } else {
        1011
    };
    (code, truncate_close_reason(reason))
}

/// `reason` cut to the 123 bytes a close frame has room for, on a character boundary.
pub fn truncate_close_reason(reason: &str) -> &str {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}
