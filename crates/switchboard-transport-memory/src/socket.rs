//! One in-memory socket: the state the service sends through, and the task that reads the
//! client's messages and reports the end.
//!
//! Every way a socket can end goes through [`MemorySocket::request_close`] under the lock of
//! its outgoing queue: the first request wins, fixes the [`CloseReason`], puts the close event
//! (if any) after every frame queued before it, and wakes the socket's task, which calls
//! [`Service::on_close`].

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use switchboard_core::{
    server_close, truncate_close_reason, CloseReason, Inbound, SendError, Service, Socket,
    GOING_AWAY_CODE, SLOW_CONSUMER_CODE,
};
use tokio::sync::Notify;

use crate::{lock, ClientEvent, Registered, Shared};

/// Close code for a client message larger than `max_message_size`.
const MESSAGE_TOO_BIG_CODE: u16 = 1009;

/// What a client sends, in order.
#[derive(Debug)]
pub(crate) enum FromClient {
    Text(String),
    Binary(Bytes),
    Ping,
    Close(u16, String),
}

/// The server → client side, behind one lock so that a close cannot overtake a frame.
struct Outgoing {
    /// None once the socket's end was requested: the client reads what is left, then `None`.
    to_client: Option<flume::Sender<ClientEvent>>,
    /// Data frames sent and not read by the client yet, and their bytes.
    frames: usize,
    bytes: usize,
    /// Why the socket ends: the first request.
    close: Option<CloseReason>,
    /// The socket's task has ended: what is left is no longer counted.
    released: bool,
}

pub(crate) struct MemorySocket {
    out: Mutex<Outgoing>,
    /// Mirrors `out.close.is_some()`, for [`Socket::is_closing`] without the lock.
    closing: AtomicBool,
    paused: AtomicBool,
    /// Wakes the socket's task: a close was requested, or reading resumed.
    wake: Notify,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for MemorySocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemorySocket")
            .field("closing", &self.is_closing())
            .finish_non_exhaustive()
    }
}

impl MemorySocket {
    pub(crate) fn new(to_client: flume::Sender<ClientEvent>, shared: Arc<Shared>) -> Self {
        MemorySocket {
            out: Mutex::new(Outgoing {
                to_client: Some(to_client),
                frames: 0,
                bytes: 0,
                close: None,
                released: false,
            }),
            closing: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            wake: Notify::new(),
            shared,
        }
    }

    /// Queues a data frame of `len` bytes, within the bounds.
    fn queue(&self, event: ClientEvent, len: usize) -> Result<(), SendError> {
        let mut out = lock(&self.out);
        let Some(to_client) = out.to_client.as_ref() else {
            return Err(SendError::Closed);
        };
        let options = &self.shared.options;
        let full = out.frames >= options.send_queue
            || (out.frames > 0 && out.bytes + len > options.send_queue_bytes);
        if full {
            self.request_close(
                &mut out,
                Some((SLOW_CONSUMER_CODE, "send queue full".into())),
                CloseReason::SlowConsumer,
            );
            return Err(SendError::Full);
        }
        // A client that has gone takes nothing; its task reports the drop.
        if to_client.send(event).is_ok() {
            out.frames += 1;
            out.bytes += len;
            self.shared.buffered(len as i64);
        }
        Ok(())
    }

    /// The client read a data frame of `len` bytes.
    pub(crate) fn taken(&self, len: usize) {
        let mut out = lock(&self.out);
        if out.released {
            return;
        }
        out.frames -= 1;
        out.bytes -= len;
        self.shared.buffered(-(len as i64));
    }

    /// Ends the socket (the first request only): `farewell` is the close event the client
    /// gets after what was queued before it; `reason` is what `on_close` is told.
    fn request_close(
        &self,
        out: &mut Outgoing,
        farewell: Option<(u16, String)>,
        reason: CloseReason,
    ) {
        if out.close.is_some() {
            return;
        }
        out.close = Some(reason);
        self.closing.store(true, Ordering::Release);
        if let (Some(to_client), Some((code, reason))) = (out.to_client.take(), farewell) {
            let _ = to_client.send(ClientEvent::Close { code, reason });
        }
        self.wake.notify_one();
    }

    fn close_with(&self, farewell: Option<(u16, String)>, reason: CloseReason) {
        self.request_close(&mut lock(&self.out), farewell, reason);
    }

    /// Closes with 1001 for the transport's shutdown.
    pub(crate) fn shut_down(&self) {
        self.close_with(
            Some((GOING_AWAY_CODE, "server shutting down".into())),
            CloseReason::Shutdown,
        );
    }

    /// A pong, unless the socket is closing or its queue is full (then it is dropped).
    fn pong(&self) {
        let out = lock(&self.out);
        if out.frames < self.shared.options.send_queue {
            if let Some(to_client) = &out.to_client {
                let _ = to_client.send(ClientEvent::Pong);
            }
        }
    }

    fn close_reason(&self) -> Option<CloseReason> {
        lock(&self.out).close.clone()
    }

    /// The socket has ended: what the client has not read no longer counts as buffered.
    fn release(&self) {
        let mut out = lock(&self.out);
        out.released = true;
        self.shared.buffered(-(out.bytes as i64));
        out.frames = 0;
        out.bytes = 0;
    }
}

impl Socket for MemorySocket {
    fn send_text(&self, text: Bytes) -> Result<(), SendError> {
        let len = text.len();
        let text = String::from_utf8_lossy(&text).into_owned();
        self.queue(ClientEvent::Text(text), len)
    }

    fn send_binary(&self, data: Bytes) -> Result<(), SendError> {
        let len = data.len();
        self.queue(ClientEvent::Binary(data), len)
    }

    fn close(&self, code: u16, reason: &str) {
        let (code, reason) = server_close(code, reason);
        let reason = reason.to_string();
        self.close_with(
            Some((code, reason.clone())),
            CloseReason::Server { code, reason },
        );
    }

    fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    fn pause_reading(&self) {
        self.paused.store(true, Ordering::Release);
    }

    fn resume_reading(&self) {
        self.paused.store(false, Ordering::Release);
        self.wake.notify_one();
    }

    fn peer_addr(&self) -> Option<SocketAddr> {
        None
    }

    fn transport(&self) -> &'static str {
        "memory"
    }
}

/// The socket's task: the client's messages in order, one at a time, until the socket ends;
/// then `on_close`, exactly once, from here.
pub(crate) async fn run<S: Service>(
    service: Arc<S>,
    session: S::Session,
    socket: Arc<MemorySocket>,
    from_client: flume::Receiver<FromClient>,
    registered: Registered,
) {
    let max_message_size = socket.shared.options.max_message_size;
    let reason = loop {
        if let Some(reason) = socket.close_reason() {
            break reason;
        }
        // Made before the checks below: a wake-up between them is not lost.
        let woken = socket.wake.notified();
        if socket.paused.load(Ordering::Acquire) {
            woken.await;
            continue;
        }
        let received = tokio::select! {
            biased;
            _ = woken => continue,
            received = from_client.recv_async() => received,
        };
        match received {
            Ok(FromClient::Text(text)) if text.len() > max_message_size => {
                socket.too_big(text.len(), max_message_size)
            }
            Ok(FromClient::Binary(data)) if data.len() > max_message_size => {
                socket.too_big(data.len(), max_message_size)
            }
            Ok(FromClient::Text(text)) => service.on_message(&session, Inbound::Text(text.into())),
            Ok(FromClient::Binary(data)) => service.on_message(&session, Inbound::Binary(data)),
            Ok(FromClient::Ping) => {
                if service.on_ping(&session) {
                    socket.pong();
                }
            }
            Ok(FromClient::Close(code, reason)) => {
                let reason = truncate_close_reason(&reason).to_string();
                // The close handshake: the client's close comes back to it.
                socket.close_with(
                    Some((code, reason.clone())),
                    CloseReason::Client { code, reason },
                );
            }
            Err(flume::RecvError::Disconnected) => socket.close_with(None, CloseReason::Dropped),
        }
    };
    socket.release();
    socket.shared.closed(&reason);
    service.on_close(session, reason);
    drop(registered);
}

impl MemorySocket {
    fn too_big(&self, len: usize, max: usize) {
        self.close_with(
            Some((MESSAGE_TOO_BIG_CODE, "message too big".into())),
            CloseReason::Protocol {
                code: MESSAGE_TOO_BIG_CODE,
                detail: format!("a message of {len} bytes; the limit is {max}"),
            },
        );
    }
}
