//! One socket's life: a reader (this task), a writer (its own task) fed by a bounded queue,
//! and the close handshake between them.
//!
//! Every way a socket can end goes through [`SocketState::request_close`]: the first request
//! wins and fixes the [`CloseReason`] reported to [`Service::on_close`].

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use fastwebsockets::{Frame, OpCode, Payload, Role, WebSocket, WebSocketError, WebSocketRead};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::Notify;
use tokio::time::{timeout, Instant};

use crate::{Inbound, Service, Shared};

type Io = TokioIo<Upgraded>;
type Reader = WebSocketRead<ReadHalf<Io>>;

/// How many queued frames the writer sends before it flushes.
const MAX_BATCH: usize = 64;
/// A batch stops growing at this many bytes (big frames would otherwise pile up).
const MAX_BATCH_BYTES: usize = 64 * 1024;

/// Why a socket ended, as reported to [`Service::on_close`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CloseReason {
    /// The client sent a close frame (`code` 1005 when it had none).
    Client {
        /// The client's close code.
        code: u16,
        /// The client's reason text.
        reason: String,
    },
    /// The connection dropped without a close frame.
    Dropped,
    /// The client did not answer a heartbeat ping in time.
    HeartbeatTimeout,
    /// The client broke the protocol; we closed with `code` (1002, 1007 or 1009).
    Protocol {
        /// The close code sent.
        code: u16,
        /// What was wrong.
        detail: String,
    },
    /// The server side closed it ([`SocketHandle::close`]).
    Server {
        /// The close code sent.
        code: u16,
        /// The reason sent.
        reason: String,
    },
    /// The server is shutting down; closed with 1001.
    Shutdown,
    /// The send queue was full; closed with 1008.
    SlowConsumer,
    /// Reading or writing the connection failed.
    Io(String),
}

/// Why [`SocketHandle::send_text`] did not queue a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// The socket is closing or closed.
    #[error("socket is closed")]
    Closed,
    /// The send queue was full; the socket is being closed as a slow consumer.
    #[error("send queue full; socket closed as a slow consumer")]
    Full,
}

/// Close code sent to a slow consumer.
pub const SLOW_CONSUMER_CODE: u16 = 1008;

enum Outbound {
    Text(Bytes),
    Binary(Bytes),
    Pong(Bytes),
    Close(u16, String),
}

/// The frame to end with, if any.
enum Farewell {
    Code(u16, String),
    Echo(Bytes),
}

struct CloseRequest {
    farewell: Option<Farewell>,
    reason: CloseReason,
}

pub(crate) struct SocketState {
    peer: SocketAddr,
    queue: flume::Sender<Outbound>,
    closing: AtomicBool,
    request: Mutex<Option<CloseRequest>>,
    closed_signal: Notify,
    pong_seen: AtomicBool,
}

impl SocketState {
    /// Records how the socket ends; the first request wins. Returns true if this one did.
    fn request_close(&self, farewell: Option<Farewell>, reason: CloseReason) -> bool {
        let won = {
            let mut slot = self.request.lock().unwrap_or_else(|e| e.into_inner());
            if slot.is_none() {
                *slot = Some(CloseRequest { farewell, reason });
                true
            } else {
                false
            }
        };
        self.closing.store(true, Ordering::Release);
        self.closed_signal.notify_waiters();
        won
    }

    async fn close_requested(&self) {
        loop {
            let notified = self.closed_signal.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self
                .request
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some()
            {
                return;
            }
            notified.await;
        }
    }

    fn take_farewell(&self) -> Option<Farewell> {
        self.request
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
            .and_then(|r| r.farewell.take())
    }

    fn reason(&self) -> CloseReason {
        self.request
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|r| r.reason.clone())
            .unwrap_or(CloseReason::Dropped)
    }

    fn enqueue(&self, out: Outbound) -> Result<(), SendError> {
        if self.closing.load(Ordering::Acquire) {
            return Err(SendError::Closed);
        }
        match self.queue.try_send(out) {
            Ok(()) => Ok(()),
            Err(flume::TrySendError::Disconnected(_)) => Err(SendError::Closed),
            Err(flume::TrySendError::Full(_)) => {
                self.request_close(
                    Some(Farewell::Code(SLOW_CONSUMER_CODE, "send queue full".into())),
                    CloseReason::SlowConsumer,
                );
                Err(SendError::Full)
            }
        }
    }
}

/// Sends to one socket. Cheap to clone; every clone refers to the same socket. Sending never
/// waits: a full queue closes the socket as a slow consumer.
#[derive(Clone)]
pub struct SocketHandle {
    state: Arc<SocketState>,
}

impl std::fmt::Debug for SocketHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SocketHandle")
            .field("peer", &self.state.peer)
            .field("closing", &self.is_closing())
            .finish()
    }
}

impl SocketHandle {
    /// Queues a text frame. `text` must be valid UTF-8 (it is sent as is); share one `Bytes`
    /// across many sockets to encode once.
    pub fn send_text(&self, text: Bytes) -> Result<(), SendError> {
        self.state.enqueue(Outbound::Text(text))
    }

    /// Queues a binary frame.
    pub fn send_binary(&self, data: Bytes) -> Result<(), SendError> {
        self.state.enqueue(Outbound::Binary(data))
    }

    /// Closes the socket with `code` and `reason` after the frames already queued; later
    /// sends fail. If the queue is full, closes at once. A code that may not be sent on the
    /// wire (RFC 6455 7.4) becomes 1011.
    pub fn close(&self, code: u16, reason: &str) {
        let code = if is_sendable_close_code(code) {
            code
        } else {
            1011
        };
        let reason = truncate_reason(reason);
        if self.state.closing.swap(true, Ordering::AcqRel) {
            return;
        }
        if self
            .state
            .queue
            .try_send(Outbound::Close(code, reason.clone()))
            .is_err()
        {
            self.state.request_close(
                Some(Farewell::Code(code, reason.clone())),
                CloseReason::Server { code, reason },
            );
        }
    }

    /// True once the socket is closing or closed: sends will fail.
    pub fn is_closing(&self) -> bool {
        self.state.closing.load(Ordering::Acquire)
    }

    /// The client's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.state.peer
    }

    /// Frames waiting in the send queue.
    pub fn queued(&self) -> usize {
        self.state.queue.len()
    }
}

/// Codes an endpoint may send in a close frame (RFC 6455 7.4.1, 7.4.2).
fn is_sendable_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999)
}

/// Close reasons are limited to 123 bytes by RFC 6455.
fn truncate_reason(reason: &str) -> String {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end].to_string()
}

/// Runs a socket from the completed upgrade to its end.
pub(crate) async fn run<S: Service>(
    ws: WebSocket<Io>,
    admission: S::Admission,
    peer: SocketAddr,
    shared: &Shared<S>,
) {
    let opts = &shared.options;
    // fastwebsockets reads; we encode and write ourselves (see `Writer`).
    let (r, w) = tokio::io::split(ws.into_inner());
    let (mut reader, _) = fastwebsockets::after_handshake_split(r, tokio::io::sink(), Role::Server);
    let writer = Writer {
        io: w,
        buf: Vec::new(),
    };
    // fastwebsockets rejects frames of `max_message_size` or more; we allow exactly the max.
    reader.set_max_message_size(opts.max_message_size.saturating_add(1));
    let (queue, outbox) = flume::bounded(opts.send_queue);
    let state = Arc::new(SocketState {
        peer,
        queue,
        closing: AtomicBool::new(false),
        request: Mutex::new(None),
        closed_signal: Notify::new(),
        pong_seen: AtomicBool::new(false),
    });
    shared
        .stats
        .sockets_opened
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let session = shared.service.open(
        admission,
        SocketHandle {
            state: state.clone(),
        },
    );
    let mut writer_task = tokio::spawn(write_loop(
        writer,
        outbox,
        state.clone(),
        opts.heartbeat_interval,
    ));
    let mut shutdown = shared.shutdown.clone();
    {
        let read = read_loop(
            &mut reader,
            shared.service.as_ref(),
            &session,
            &state,
            opts.max_message_size,
        );
        let mut read = std::pin::pin!(read);

        let read_ended = tokio::select! {
            end = &mut read => Some(end),
            _ = async { drop(shutdown.wait_for(|down| *down).await) } => {
                state.request_close(
                    Some(Farewell::Code(1001, "server shutting down".into())),
                    CloseReason::Shutdown,
                );
                None
            }
            _ = state.close_requested() => None,
        };
        match read_ended {
            Some((farewell, reason)) => {
                state.request_close(farewell, reason);
                if timeout(opts.close_timeout, &mut writer_task).await.is_err() {
                    writer_task.abort();
                }
            }
            // Closing from our side: the writer sends the close frame (or gives up).
            None => match timeout(opts.close_timeout, &mut writer_task).await {
                Ok(Ok(true)) => {
                    // We sent a close frame: give the client a moment to answer it.
                    let _ = timeout(opts.close_timeout, &mut read).await;
                }
                Ok(_) => {}
                Err(_) => writer_task.abort(),
            },
        }
    }
    let reason = state.reason();
    shared.stats.closed(&reason);
    shared.service.on_close(session, reason);
}

/// Reads until the connection ends; returns the frame to answer with and why it ended.
async fn read_loop<S: Service>(
    reader: &mut Reader,
    service: &S,
    session: &S::Session,
    state: &SocketState,
    max_message_size: usize,
) -> (Option<Farewell>, CloseReason) {
    // Pings are answered through the send queue; a full queue just drops the pong.
    let mut obligations = |frame: Frame<'_>| {
        if frame.opcode == OpCode::Pong {
            let _ = state
                .queue
                .try_send(Outbound::Pong(Bytes::copy_from_slice(&frame.payload)));
        }
        std::future::ready(Ok::<(), std::io::Error>(()))
    };
    // A fragmented message in progress: its opcode and the bytes so far.
    let mut partial: Option<(OpCode, BytesMut)> = None;
    loop {
        let frame = match reader.read_frame(&mut obligations).await {
            Ok(frame) => frame,
            Err(e) => return read_error(e, max_message_size),
        };
        let fin = frame.fin;
        if is_control(frame.opcode) && frame.payload.len() > 125 {
            return protocol(1002, "control frame payload over 125 bytes");
        }
        match frame.opcode {
            OpCode::Text | OpCode::Binary if partial.is_some() => {
                return protocol(1002, "new message before the previous one finished");
            }
            OpCode::Text | OpCode::Binary if fin => {
                deliver(
                    service,
                    session,
                    state,
                    frame.opcode,
                    into_bytes(frame.payload),
                );
            }
            OpCode::Text | OpCode::Binary => {
                partial = Some((frame.opcode, BytesMut::from(&frame.payload[..])));
            }
            OpCode::Continuation => {
                let Some((opcode, buf)) = partial.as_mut() else {
                    return protocol(1002, "continuation frame without a message");
                };
                if buf.len() + frame.payload.len() > max_message_size {
                    return protocol(1009, "message too big");
                }
                buf.extend_from_slice(&frame.payload);
                if fin {
                    let opcode = *opcode;
                    let whole = partial.take().map(|(_, b)| b.freeze()).unwrap_or_default();
                    if opcode == OpCode::Text && std::str::from_utf8(&whole).is_err() {
                        return protocol(1007, "invalid UTF-8 in text message");
                    }
                    deliver(service, session, state, opcode, whole);
                }
            }
            OpCode::Close => {
                let payload = into_bytes(frame.payload);
                let (code, reason) = match payload.len() {
                    0 => (1005, String::new()),
                    _ => (
                        u16::from_be_bytes([payload[0], payload[1]]),
                        String::from_utf8_lossy(&payload[2..]).into_owned(),
                    ),
                };
                return (
                    Some(Farewell::Echo(payload)),
                    CloseReason::Client { code, reason },
                );
            }
            OpCode::Pong => state.pong_seen.store(true, Ordering::Release),
            OpCode::Ping => {}
        }
    }
}

fn is_control(opcode: OpCode) -> bool {
    matches!(opcode, OpCode::Close | OpCode::Ping | OpCode::Pong)
}

/// Hands a whole message to the service, unless the socket is already closing. A panic in
/// the service closes this socket (1011) and nothing else.
fn deliver<S: Service>(
    service: &S,
    session: &S::Session,
    state: &SocketState,
    opcode: OpCode,
    data: Bytes,
) {
    if state.closing.load(Ordering::Acquire) {
        return;
    }
    let message = if opcode == OpCode::Text {
        Inbound::Text(data)
    } else {
        Inbound::Binary(data)
    };
    let delivered = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        service.on_message(session, message)
    }));
    if delivered.is_err() {
        tracing::error!(peer = %state.peer, "service panicked in on_message; closing the socket");
        state.request_close(
            Some(Farewell::Code(1011, "internal error".into())),
            CloseReason::Server {
                code: 1011,
                reason: "internal error".into(),
            },
        );
    }
}

fn into_bytes(payload: Payload<'_>) -> Bytes {
    match payload {
        Payload::Bytes(b) => b.freeze(),
        other => Bytes::from(Vec::from(other)),
    }
}

fn protocol(code: u16, detail: &str) -> (Option<Farewell>, CloseReason) {
    (
        Some(Farewell::Code(code, detail.to_string())),
        CloseReason::Protocol {
            code,
            detail: detail.to_string(),
        },
    )
}

fn read_error(e: WebSocketError, max_message_size: usize) -> (Option<Farewell>, CloseReason) {
    match e {
        WebSocketError::UnexpectedEOF => (None, CloseReason::Dropped),
        WebSocketError::IoError(io) => (None, CloseReason::Io(io.to_string())),
        WebSocketError::FrameTooLarge => protocol(
            1009,
            &format!("message too big (limit {max_message_size} bytes)"),
        ),
        WebSocketError::InvalidUTF8 => protocol(1007, "invalid UTF-8"),
        other => protocol(1002, &other.to_string().to_lowercase()),
    }
}

/// Writes queued frames in batches and pings on schedule. Returns true if it sent a close frame.
///
/// Every write must finish within one heartbeat interval: a client that accepts no bytes for
/// that long is not consuming, and waiting longer would pin the socket (and block shutdown).
async fn write_loop(
    mut ws: Writer,
    outbox: flume::Receiver<Outbound>,
    state: Arc<SocketState>,
    heartbeat: Duration,
) -> bool {
    let mut tick = tokio::time::interval_at(Instant::now() + heartbeat, heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut awaiting_pong = false;
    let stalled = || state.request_close(None, CloseReason::SlowConsumer);
    let sent_close = loop {
        // Order matters: a close beats everything, and the heartbeat must not starve behind
        // a queue that never empties.
        tokio::select! {
            biased;
            _ = state.close_requested() => break farewell(&mut ws, &outbox, &state).await,
            _ = tick.tick() => {
                if awaiting_pong && !state.pong_seen.swap(false, Ordering::AcqRel) {
                    state.request_close(None, CloseReason::HeartbeatTimeout);
                    break false;
                }
                state.pong_seen.store(false, Ordering::Release);
                awaiting_pong = true;
                ws.push(OpCode::Ping, b"");
                match timeout(heartbeat, ws.flush()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        state.request_close(None, CloseReason::Io(e.to_string()));
                        break false;
                    }
                    Err(_) => {
                        stalled();
                        break false;
                    }
                }
            }
            first = outbox.recv_async() => {
                let Ok(first) = first else { break false };
                match timeout(heartbeat, write_batch(&mut ws, &outbox, first, &state)).await {
                    Ok(Ok(true)) => break farewell(&mut ws, &outbox, &state).await,
                    Ok(Ok(false)) => {}
                    Ok(Err(e)) => {
                        state.request_close(None, CloseReason::Io(e.to_string()));
                        break false;
                    }
                    Err(_) => {
                        stalled();
                        break false;
                    }
                }
            }
        }
    };
    // Free whatever is still queued now, not when the last handle goes.
    outbox.drain().for_each(drop);
    sent_close
}

/// The socket's write side. Frames are encoded into one buffer per batch and go out in a
/// single `write_all`; the buffer is released after every batch, so an idle socket holds no
/// write buffer at all (fastwebsockets' writer, or a `BufWriter`, would keep one per socket).
struct Writer {
    io: WriteHalf<Io>,
    buf: Vec<u8>,
}

impl Writer {
    /// Appends one unmasked, final frame.
    fn push(&mut self, opcode: OpCode, payload: &[u8]) {
        let mut head = [0u8; 14];
        let len = Frame::new(true, opcode, None, Payload::Borrowed(payload)).fmt_head(&mut head);
        self.buf.reserve(len + payload.len());
        self.buf.extend_from_slice(&head[..len]);
        self.buf.extend_from_slice(payload);
    }

    /// Appends a data or pong frame (a queued close is the caller's business).
    fn push_outbound(&mut self, out: &Outbound) {
        match out {
            Outbound::Text(b) => self.push(OpCode::Text, b),
            Outbound::Binary(b) => self.push(OpCode::Binary, b),
            Outbound::Pong(b) => self.push(OpCode::Pong, b),
            Outbound::Close(..) => {}
        }
    }

    /// Writes what was appended and releases the buffer.
    async fn flush(&mut self) -> std::io::Result<()> {
        let buf = std::mem::take(&mut self.buf);
        if !buf.is_empty() {
            self.io.write_all(&buf).await?;
            self.io.flush().await?;
        }
        Ok(())
    }
}

/// Writes `first` and whatever else is queued (up to [`MAX_BATCH`] frames or
/// [`MAX_BATCH_BYTES`]) in one write. Returns true when a queued close was reached (the close
/// is recorded, not yet written).
async fn write_batch(
    ws: &mut Writer,
    outbox: &flume::Receiver<Outbound>,
    first: Outbound,
    state: &SocketState,
) -> std::io::Result<bool> {
    let mut next = Some(first);
    let mut written = 0;
    while let Some(out) = next.take() {
        if let Outbound::Close(code, reason) = out {
            ws.flush().await?;
            state.request_close(
                Some(Farewell::Code(code, reason.clone())),
                CloseReason::Server { code, reason },
            );
            return Ok(true);
        }
        ws.push_outbound(&out);
        written += 1;
        if written < MAX_BATCH && ws.buf.len() < MAX_BATCH_BYTES {
            next = outbox.try_recv().ok();
        }
    }
    ws.flush().await?;
    Ok(false)
}

/// Writes the close frame the winning request asked for. Returns true if one was sent.
///
/// After a client close, a protocol error or a server close, frames queued before it still go
/// out first (an echo of the message before a bad frame, say). After a slow-consumer or
/// shutdown close they are dropped: the client is not reading, or we are leaving.
async fn farewell(
    ws: &mut Writer,
    outbox: &flume::Receiver<Outbound>,
    state: &SocketState,
) -> bool {
    let flush_first = matches!(
        state.reason(),
        CloseReason::Client { .. } | CloseReason::Protocol { .. } | CloseReason::Server { .. }
    );
    if flush_first {
        for out in outbox.try_iter() {
            if matches!(out, Outbound::Close(..)) {
                break;
            }
            ws.push_outbound(&out);
        }
    }
    match state.take_farewell() {
        Some(Farewell::Code(code, reason)) => {
            let mut payload = code.to_be_bytes().to_vec();
            payload.extend_from_slice(reason.as_bytes());
            ws.push(OpCode::Close, &payload);
        }
        Some(Farewell::Echo(payload)) => ws.push(OpCode::Close, &payload),
        None => return false,
    }
    ws.flush().await.is_ok()
}
