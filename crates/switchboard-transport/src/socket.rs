//! One socket's life in one task, and the handle that sends to it.
//!
//! Sending writes straight to the kernel from the sender's own task (a `try_write`, never
//! waiting) whenever nothing is queued before it: a reply or a broadcast costs one system
//! call per socket and no task wake-up. Only what the kernel does not take goes to the
//! socket's queue, and the socket's task writes it as the connection drains. The same task
//! reads, answers pings, sends heartbeats and runs the close handshake, so an open socket is
//! one task, one small shared state and no buffers while idle.
//!
//! Every way a socket can end goes through [`SocketState::request_close`]: the first request
//! wins and fixes the [`CloseReason`] reported to [`Service::on_close`].

use std::collections::VecDeque;
use std::convert::Infallible;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use tokio::net::TcpStream;

use futures_util::task::AtomicWaker;
use tokio::sync::mpsc;
use tokio::time::timeout;

use crate::budget::Holding;
use crate::codec::Event;
use crate::frame::{self, MAX_SERVER_HEAD};
use crate::reader::{CloseReader, Drained, FrameReader, ReadEnd};
use crate::sockets::Hub;
use crate::{Open, Shared, SocketSlot};
use switchboard_core::{
    is_sendable_close_code, truncate_close_reason, CloseReason, Inbound, SendError, Service,
    Socket, SocketRef, OVER_BUDGET_CODE, SLOW_CONSUMER_CODE,
};

/// The socket's task encodes at most this many queued bytes per write.
const MAX_BATCH_BYTES: usize = 64 * 1024;
/// Pings and pongs that may wait ahead of queued data.
const MAX_QUEUED_CONTROL: usize = 4;

enum Outbound {
    Text(Bytes),
    Binary(Bytes),
    Ping,
    Pong(Bytes),
    /// [`Socket::close`]: frames before it go out, then the close handshake starts.
    Close(u16, String),
    /// The close frame itself, queued by the closing socket's task.
    Farewell(Bytes),
}

impl Outbound {
    /// A ping or pong, which may overtake queued data.
    fn is_control(&self) -> bool {
        matches!(self, Outbound::Ping | Outbound::Pong(_))
    }

    /// Bytes on the wire: header and payload (0 for the `Close` marker, which is no frame).
    fn wire_len(&self) -> usize {
        match self {
            Outbound::Close(..) => 0,
            other => {
                let payload = other.frame().1.len();
                frame::head_len(payload) + payload
            }
        }
    }

    /// Bytes this frame counts for in the buffer budget: its wire length, but for the close
    /// frame (a few bytes, the last a socket sends, queued when its other buffers have just
    /// been given back), which is not counted.
    fn counted_len(&self) -> usize {
        match self {
            Outbound::Farewell(_) => 0,
            other => other.wire_len(),
        }
    }

    /// The frame to write; `Close` is a marker, not a frame.
    fn frame(&self) -> (u8, &[u8]) {
        match self {
            Outbound::Text(b) => (frame::TEXT, b),
            Outbound::Binary(b) => (frame::BINARY, b),
            Outbound::Ping => (frame::PING, b""),
            Outbound::Pong(b) => (frame::PONG, b),
            Outbound::Farewell(b) => (frame::CLOSE, b),
            Outbound::Close(..) => unreachable!("a close marker is not written"),
        }
    }
}

/// The frame to end with, if any.
enum Farewell {
    Code(u16, String),
    Echo(Bytes),
}

impl Farewell {
    /// The close frame of a socket shed (or refused) for the buffer budget.
    fn over_budget() -> Farewell {
        Farewell::Code(OVER_BUDGET_CODE, "buffer budget exceeded".into())
    }

    fn payload(self) -> Bytes {
        match self {
            Farewell::Code(code, reason) => {
                let mut payload = code.to_be_bytes().to_vec();
                payload.extend_from_slice(reason.as_bytes());
                payload.into()
            }
            Farewell::Echo(payload) => payload,
        }
    }
}

struct CloseRequest {
    farewell: Option<Farewell>,
    reason: CloseReason,
}

/// What happens to a frame that finds the queue full.
#[derive(Clone, Copy, PartialEq, Eq)]
enum WhenFull {
    /// The socket is closed as a slow consumer (data frames).
    CloseSocket,
    /// The frame is dropped (pongs and pings: the heartbeat deals with such a client).
    Drop,
}

/// The write side's state, behind one lock: whoever holds it may write to the socket.
#[derive(Default)]
struct Outbox {
    /// Frames not written yet, in order.
    queue: VecDeque<Outbound>,
    /// Encoded bytes the kernel has not taken yet; they go out before `queue`.
    unsent: BytesMut,
    /// What `unsent` counts for in the budget: the whole batch until the last of it is
    /// written (the allocation stays as long), the close frame not at all.
    unsent_counted: usize,
    /// True while the socket's task does the writing: senders queue instead of writing.
    backlogged: bool,
    /// Some bytes were written since the heartbeat last looked (stall detection).
    progressed: bool,
    /// This socket's outbound share of the buffer budget: the counted bytes of `queue` plus
    /// `unsent_counted`.
    bytes: usize,
    /// The rest of a frame the kernel took in part was dropped: the stream ends inside a
    /// frame, so no close frame may follow.
    torn: bool,
}

/// What [`SocketState::flush`] got to.
enum Flushed {
    /// Everything is written; senders write directly again.
    Done,
    /// The kernel's buffer is full: wait until the socket is writable.
    Blocked,
    /// A [`Socket::close`] marker came next (everything before it is written).
    CloseReached(u16, String),
}

pub(crate) struct SocketState {
    peer: SocketAddr,
    stream: TcpStream,
    out: Mutex<Outbox>,
    capacity: usize,
    /// Most bytes the outbox may hold (a frame is always taken into an empty one).
    capacity_bytes: usize,
    /// The server's sockets and buffer budget.
    hub: Arc<Hub>,
    /// Bytes this socket holds (inbound and outbound), as counted in the budget.
    pub(crate) holding: Holding,
    /// The socket's task, woken when `work` is set (a backlog to write, or a close request).
    task: AtomicWaker,
    work: AtomicBool,
    /// Set by [`Socket::close`] and every close request: sends fail from then on.
    closing: AtomicBool,
    close_requested: AtomicBool,
    /// Boxed: only a closing socket has one.
    request: Mutex<Option<Box<CloseRequest>>>,
    /// Heartbeat state, kept by the server's heartbeat sweep (see [`SocketState::heartbeat`]).
    pong_seen: AtomicBool,
    awaiting_pong: AtomicBool,
    was_backlogged: AtomicBool,
    /// [`Socket::pause_reading`]: the socket's task reads nothing until resumed.
    reading_paused: AtomicBool,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl SocketState {
    /// A just-opened socket: nothing queued, no close requested, no ping outstanding.
    fn new(stream: TcpStream, peer: SocketAddr, limits: QueueLimits, hub: Arc<Hub>) -> SocketState {
        SocketState {
            peer,
            stream,
            out: Mutex::default(),
            capacity: limits.frames,
            capacity_bytes: limits.bytes,
            hub,
            holding: Holding::default(),
            task: AtomicWaker::new(),
            work: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            close_requested: AtomicBool::new(false),
            request: Mutex::new(None),
            pong_seen: AtomicBool::new(false),
            awaiting_pong: AtomicBool::new(false),
            was_backlogged: AtomicBool::new(false),
            reading_paused: AtomicBool::new(false),
        }
    }

    /// Closes this socket to bring the server back within its buffer budget; returns the bytes
    /// it held for the caller to take off the budget (`None` if it was shed already). What it
    /// queued is freed here when no one else holds its queue at this moment (else by its own
    /// task, which the close request wakes at once); a frame the kernel took in part is then
    /// dropped too, and the connection with it (no close frame can follow half a frame).
    pub(crate) fn shed_for_budget(&self) -> Option<usize> {
        let held = self.holding.write_off()?;
        match self.out.try_lock() {
            Ok(mut outbox) => {
                let mid_frame = !outbox.unsent.is_empty();
                let won = self.request_close(
                    (!mid_frame).then(Farewell::over_budget),
                    CloseReason::OverBudget,
                );
                // Queued data goes now, whoever closes; a close that began first keeps its
                // marker, its close frame and the frame the kernel took in part.
                outbox
                    .queue
                    .retain(|o| matches!(o, Outbound::Farewell(_) | Outbound::Close(..)));
                if won && mid_frame {
                    outbox.unsent = BytesMut::new();
                    outbox.unsent_counted = 0;
                    outbox.torn = true;
                }
                outbox.bytes = outbox.unsent_counted;
            }
            Err(_) => {
                self.request_close(Some(Farewell::over_budget()), CloseReason::OverBudget);
            }
        }
        Some(held)
    }

    /// Closes this socket because it asked for more than the budget lets it have.
    fn refuse_for_budget(&self, mid_frame: bool) {
        self.request_close(
            (!mid_frame).then(Farewell::over_budget),
            CloseReason::OverBudget,
        );
    }

    /// Counts `n` more outbound bytes in `outbox`, within the budget.
    fn reserve_out(&self, outbox: &mut Outbox, n: usize) -> bool {
        if !self.hub.reserve(self, n) {
            return false;
        }
        outbox.bytes += n;
        true
    }

    /// Gives back `n` outbound bytes that were written or dropped.
    fn release_out(&self, outbox: &mut Outbox, n: usize) {
        let n = n.min(outbox.bytes);
        outbox.bytes -= n;
        self.hub.release(self, n);
    }

    /// Records how the socket ends; the first request wins. Returns true if this one did.
    fn request_close(&self, farewell: Option<Farewell>, reason: CloseReason) -> bool {
        let won = {
            let mut slot = lock(&self.request);
            if slot.is_none() {
                *slot = Some(Box::new(CloseRequest { farewell, reason }));
                true
            } else {
                false
            }
        };
        self.closing.store(true, Ordering::Release);
        self.close_requested.store(true, Ordering::Release);
        self.wake();
        won
    }

    /// Tells the socket's task there is work: a backlog or a close request.
    fn wake(&self) {
        self.work.store(true, Ordering::Release);
        self.task.wake();
    }

    /// One heartbeat, from the server's sweep: closes a socket whose client answered no ping
    /// since the last sweep, or accepted no bytes of a waiting backlog since then (it is not
    /// consuming, and waiting longer would pin the socket and block shutdown); pings the rest.
    pub(crate) fn heartbeat(&self) {
        if self.is_close_requested() {
            return;
        }
        let (backlogged, progressed) = self.take_progress();
        let was_backlogged = self.was_backlogged.swap(backlogged, Ordering::AcqRel);
        if was_backlogged && backlogged && !progressed {
            self.request_close(None, CloseReason::SlowConsumer);
            return;
        }
        // A paused socket reads nothing, so its pongs wait unread; whoever paused it bounds
        // the pause.
        let paused = self.reading_paused.load(Ordering::Acquire);
        if self.awaiting_pong.load(Ordering::Acquire)
            && !self.pong_seen.swap(false, Ordering::AcqRel)
            && !paused
        {
            self.request_close(None, CloseReason::HeartbeatTimeout);
            return;
        }
        self.awaiting_pong.store(true, Ordering::Release);
        let _ = self.push(Outbound::Ping, WhenFull::Drop);
    }

    /// The server is shutting down: close with 1001.
    pub(crate) fn shut_down(&self) {
        self.request_close(
            Some(Farewell::Code(1001, "server shutting down".into())),
            CloseReason::Shutdown,
        );
    }

    fn is_close_requested(&self) -> bool {
        self.close_requested.load(Ordering::Acquire)
    }

    fn take_farewell(&self) -> Option<Farewell> {
        lock(&self.request).as_mut().and_then(|r| r.farewell.take())
    }

    fn reason(&self) -> CloseReason {
        lock(&self.request)
            .as_ref()
            .map(|r| r.reason.clone())
            .unwrap_or(CloseReason::Dropped)
    }

    /// Sends one frame: written at once if nothing waits before it and the kernel takes it,
    /// queued otherwise.
    fn push(&self, out: Outbound, when_full: WhenFull) -> Result<(), SendError> {
        let mut outbox = lock(&self.out);
        // Checked under the lock: once the closing task holds it, nothing is written after
        // the close frame.
        if self.closing.load(Ordering::Acquire) {
            return Err(SendError::Closed);
        }
        if outbox.backlogged {
            if out.is_control() {
                // Pings and pongs go ahead of queued data (a control frame may go between
                // any two frames), so a client that is reading a long backlog still
                // answers the heartbeat in time. A few at most: a client that pings without
                // reading does not grow the queue.
                let at = outbox.queue.iter().take_while(|o| o.is_control()).count();
                if at >= MAX_QUEUED_CONTROL || !self.reserve_out(&mut outbox, out.counted_len()) {
                    return Err(SendError::Full);
                }
                outbox.queue.insert(at, out);
                return Ok(());
            }
            let size = out.counted_len();
            let over_bytes = outbox.bytes > 0 && outbox.bytes + size > self.capacity_bytes;
            if outbox.queue.len() >= self.capacity || over_bytes {
                drop(outbox);
                if when_full == WhenFull::CloseSocket {
                    self.request_close(
                        Some(Farewell::Code(SLOW_CONSUMER_CODE, "send queue full".into())),
                        CloseReason::SlowConsumer,
                    );
                }
                return Err(SendError::Full);
            }
            if !self.reserve_out(&mut outbox, size) {
                drop(outbox);
                if when_full == WhenFull::CloseSocket {
                    self.refuse_for_budget(false);
                }
                return Err(SendError::OverBudget);
            }
            outbox.queue.push_back(out);
            return Ok(());
        }
        let (opcode, payload) = out.frame();
        let mut head = [0u8; MAX_SERVER_HEAD];
        let head_len = frame::encode_head(opcode, payload.len(), &mut head);
        let bufs = [IoSlice::new(&head[..head_len]), IoSlice::new(payload)];
        let written = match self.stream.try_write_vectored(&bufs) {
            Ok(n) => n,
            Err(e) if is_retry(&e) => 0,
            Err(e) => {
                drop(outbox);
                self.request_close(None, CloseReason::Io(e.to_string()));
                return Err(SendError::Closed);
            }
        };
        if written == head_len + payload.len() {
            return Ok(());
        }
        let rest = head_len + payload.len() - written;
        if !self.reserve_out(&mut outbox, rest) {
            // Nothing of it is counted (`reserve_out` failed), so nothing is given back. Half
            // a frame on the wire cannot be followed by a close frame, whoever closes.
            outbox.torn |= written > 0;
            drop(outbox);
            self.refuse_for_budget(written > 0);
            return Err(SendError::OverBudget);
        }
        if written == 0 {
            outbox.queue.push_back(out);
        } else {
            outbox.unsent_counted += rest;
            // The kernel took part of the frame: the rest goes next, before anything else.
            if written < head_len {
                outbox.unsent.extend_from_slice(&head[written..head_len]);
                outbox.unsent.extend_from_slice(payload);
            } else {
                outbox
                    .unsent
                    .extend_from_slice(&payload[written - head_len..]);
            }
            outbox.progressed = true;
        }
        outbox.backlogged = true;
        drop(outbox);
        self.wake();
        Ok(())
    }

    /// Writes the backlog until it is gone, the kernel's buffer is full, or a close marker is
    /// next. Called by the socket's task only.
    fn flush(&self) -> io::Result<Flushed> {
        let mut guard = lock(&self.out);
        let outbox = &mut *guard;
        loop {
            if outbox.unsent.is_empty() {
                match outbox.queue.front() {
                    None => {
                        outbox.backlogged = false;
                        return Ok(Flushed::Done);
                    }
                    Some(Outbound::Close(..)) => {
                        let Some(Outbound::Close(code, reason)) = outbox.queue.pop_front() else {
                            unreachable!("just seen")
                        };
                        return Ok(Flushed::CloseReached(code, reason));
                    }
                    Some(_) => {}
                }
                // The batch's buffer is sized once, so its allocation is what it counts for.
                let mut size = 0;
                for next in outbox.queue.iter() {
                    if matches!(next, Outbound::Close(..)) || size >= MAX_BATCH_BYTES {
                        break;
                    }
                    size += next.wire_len();
                }
                outbox.unsent = BytesMut::with_capacity(size);
                while let Some(next) = outbox.queue.front() {
                    if matches!(next, Outbound::Close(..)) || outbox.unsent.len() >= MAX_BATCH_BYTES
                    {
                        break;
                    }
                    let (opcode, payload) = next.frame();
                    frame::encode_frame(opcode, payload, &mut outbox.unsent);
                    outbox.unsent_counted += next.counted_len();
                    outbox.queue.pop_front();
                }
            }
            match self.stream.try_write(&outbox.unsent) {
                Ok(n) => {
                    outbox.unsent.advance(n);
                    outbox.progressed = true;
                    if outbox.unsent.is_empty() {
                        // The batch is out: its allocation and its count go together.
                        outbox.unsent = BytesMut::new();
                        let counted = std::mem::take(&mut outbox.unsent_counted);
                        self.release_out(outbox, counted);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Flushed::Blocked),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Starts the close: from here on only the socket's task writes. Keeps the frames queued
    /// before any close marker when `keep_queued`, drops them otherwise (a frame the kernel
    /// took in part is always finished, or the close frame would land inside it).
    fn begin_closing(&self, keep_queued: bool) {
        let mut outbox = lock(&self.out);
        outbox.backlogged = true;
        let keep = if keep_queued {
            outbox
                .queue
                .iter()
                .position(|o| matches!(o, Outbound::Close(..)))
                .unwrap_or(outbox.queue.len())
        } else {
            0
        };
        let dropped: usize = outbox
            .queue
            .iter()
            .skip(keep)
            .map(Outbound::counted_len)
            .sum();
        outbox.queue.truncate(keep);
        self.release_out(&mut outbox, dropped);
    }

    /// Queues the close frame after everything else; only the closing task calls this.
    fn queue_farewell(&self, payload: Bytes) {
        let mut outbox = lock(&self.out);
        outbox.queue.push_back(Outbound::Farewell(payload));
        outbox.backlogged = true;
    }

    /// Whether a backlog waits, and whether any bytes went out since the last call.
    fn take_progress(&self) -> (bool, bool) {
        let mut outbox = lock(&self.out);
        let progressed = std::mem::take(&mut outbox.progressed);
        (outbox.backlogged, progressed)
    }

    /// Frees whatever is still queued: the socket has ended, though handles may live on.
    fn release_buffers(&self) {
        let mut outbox = lock(&self.out);
        outbox.queue = VecDeque::new();
        outbox.unsent = BytesMut::new();
        outbox.unsent_counted = 0;
        let held = outbox.bytes;
        self.release_out(&mut outbox, held);
    }

    /// Ends the TCP connection now, even while handles to the socket live on.
    fn shutdown_stream(&self) {
        let _ = socket2::SockRef::from(&self.stream).shutdown(std::net::Shutdown::Both);
    }
}

fn is_retry(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

/// The WebSocket transport's [`Socket`]: what the service is given as a [`SocketRef`].
/// Sending writes at once when the connection takes the frame and queues it otherwise; a
/// full queue closes the socket as a slow consumer.
impl Socket for SocketState {
    fn send_text(&self, text: Bytes) -> Result<(), SendError> {
        self.push(Outbound::Text(text), WhenFull::CloseSocket)
    }

    fn send_binary(&self, data: Bytes) -> Result<(), SendError> {
        self.push(Outbound::Binary(data), WhenFull::CloseSocket)
    }

    /// If the queue is full, closes at once (dropping what is queued).
    fn close(&self, code: u16, reason: &str) {
        let code = if is_sendable_close_code(code) {
            code
        } else {
            1011
        };
        let reason = truncate_close_reason(reason).to_string();
        let mut outbox = lock(&self.out);
        if self.closing.swap(true, Ordering::AcqRel) {
            return;
        }
        if outbox.queue.len() >= self.capacity {
            // At once: what is queued is dropped (a frame the kernel took in part is still
            // finished before the close frame).
            let dropped: usize = outbox.queue.iter().map(Outbound::counted_len).sum();
            outbox.queue.clear();
            self.release_out(&mut outbox, dropped);
            drop(outbox);
            self.request_close(
                Some(Farewell::Code(code, reason.clone())),
                CloseReason::Server { code, reason },
            );
            return;
        }
        outbox.queue.push_back(Outbound::Close(code, reason));
        outbox.backlogged = true;
        drop(outbox);
        self.wake();
    }

    fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    /// While paused, a missed heartbeat pong does not close the socket (the pong is simply
    /// not read yet).
    fn pause_reading(&self) {
        self.reading_paused.store(true, Ordering::Release);
    }

    fn resume_reading(&self) {
        if self.reading_paused.swap(false, Ordering::AcqRel) {
            self.wake();
        }
    }

    fn peer_addr(&self) -> Option<SocketAddr> {
        Some(self.peer)
    }

    fn transport(&self) -> &'static str {
        "websocket"
    }
}

/// How much one socket's send queue may hold.
#[derive(Debug, Clone, Copy)]
pub(crate) struct QueueLimits {
    pub(crate) frames: usize,
    pub(crate) bytes: usize,
}

/// One open socket, from the completed upgrade to [`Service::on_close`]: the future its task
/// runs.
///
/// Written by hand rather than as an `async fn` so that an idle socket's task holds exactly
/// these fields: an `async fn` would keep its arguments and every nested future's locals side
/// by side for the socket's whole life (1.4 KB here). Reading and writing wait on the
/// stream's own per-direction waker slots and work from other tasks arrives through one
/// `AtomicWaker`, so there are no waiter nodes, timers or `select!` futures either; the close
/// handshake's future is boxed and exists only while closing.
pub(crate) struct SocketTask<S: Service> {
    state: Arc<SocketState>,
    reader: FrameReader,
    /// `None` once handed to [`Service::on_close`].
    session: Option<S::Session>,
    shared: Arc<Shared<S>>,
    /// The socket's number in the server's [`SocketList`](crate::sockets::SocketList).
    listed: u64,
    /// Frames the client sent right behind its upgrade request have not been looked at yet.
    fresh: bool,
    /// Bytes the reader holds, as counted in the buffer budget.
    inbound: usize,
    /// Waiting for the kernel to take more of the backlog.
    blocked: bool,
    closing: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    /// Held for the socket's life: the place among `max_connections`, and the sender that
    /// keeps [`Server::shutdown`](crate::Server::shutdown) waiting for this socket.
    _slot: SocketSlot,
    _alive: Option<mpsc::Sender<Infallible>>,
}

// Nothing is pinned structurally: the closing future is boxed, the rest is plain data.
impl<S: Service> Unpin for SocketTask<S> {}

impl<S: Service> SocketTask<S> {
    /// Opens the socket for the service. `early`: bytes the client sent right behind its
    /// upgrade request.
    pub(crate) fn open(
        stream: TcpStream,
        early: Bytes,
        open: Open<S::Admission>,
        shared: Arc<Shared<S>>,
    ) -> SocketTask<S> {
        let Open {
            admission,
            peer,
            alive,
            slot,
        } = open;
        let opts = &shared.options;
        let limits = QueueLimits {
            frames: opts.send_queue,
            bytes: opts.send_queue_bytes,
        };
        let state = Arc::new(SocketState::new(stream, peer, limits, shared.hub.clone()));
        shared
            .hub
            .stats
            .sockets_opened
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let socket: SocketRef = state.clone();
        let session = shared.service.open(admission, socket);
        // Listed only once `open` has returned: if it panics, nothing holds the stream and
        // the connection closes as the panic unwinds.
        let listed = shared.hub.sockets.insert(state.clone());
        // After listing it: a shutdown that started before has already swept the list.
        if *shared.shutdown.borrow() {
            state.shut_down();
        }
        SocketTask {
            reader: FrameReader::new(opts.max_message_size, early),
            state,
            session: Some(session),
            shared,
            listed,
            fresh: true,
            inbound: 0,
            blocked: false,
            closing: None,
            _slot: slot,
            _alive: alive,
        }
    }

    /// The open socket: reads, and writes the backlog; ready once a close is requested.
    fn poll_serve(&mut self, cx: &mut std::task::Context<'_>) -> Poll<()> {
        let state = &*self.state;
        let service = self.shared.service.as_ref();
        let Some(session) = self.session.as_ref() else {
            return Poll::Ready(());
        };
        let mut reading = Reading {
            state,
            reader: &mut self.reader,
            inbound: &mut self.inbound,
        };
        loop {
            if state.is_close_requested() {
                return Poll::Ready(());
            }
            state.task.register(cx.waker());
            // Closing and writing come before reading.
            if state.work.swap(false, Ordering::AcqRel) {
                self.blocked = write_backlog(state);
                continue;
            }
            if state.reading_paused.load(Ordering::Acquire) {
                // `resume_reading` wakes the task; until then only writing goes on.
                if write_when_ready(state, &mut self.blocked, cx) {
                    continue;
                }
                return Poll::Pending;
            }
            if std::mem::take(&mut self.fresh) {
                reading.read(service, session);
                continue;
            }
            if write_when_ready(state, &mut self.blocked, cx) {
                continue;
            }
            match state.stream.poll_read_ready(cx) {
                Poll::Ready(Ok(())) => {
                    if reading.read(service, session) == Some(Drained::No) {
                        // More is waiting; let other sockets run first.
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                }
                Poll::Ready(Err(e)) => {
                    state.request_close(None, CloseReason::Io(e.to_string()));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// Gives the reader's bytes back to the budget.
    fn release_inbound(&mut self) {
        let held = std::mem::take(&mut self.inbound);
        self.shared.hub.release(&self.state, held);
    }

    /// Closes the connection, frees the socket's buffers (and their share of the budget) and
    /// takes it off the server's list.
    fn leave(&mut self) {
        self.state.shutdown_stream();
        self.state.release_buffers();
        self.release_inbound();
        self.shared.hub.sockets.remove(self.listed);
    }

    /// The socket has ended: the connection is closed, the service hears of it.
    fn end(&mut self) {
        self.leave();
        let reason = self.state.reason();
        self.shared.hub.stats.closed(&reason);
        if let Some(session) = self.session.take() {
            self.shared.service.on_close(session, reason);
        }
    }
}

impl<S: Service> Drop for SocketTask<S> {
    /// A task dropped before it ended (its runtime shut down) still leaves the server's list
    /// and gives its bytes back; `on_close` is not called from a drop.
    fn drop(&mut self) {
        if self.session.is_some() {
            // Sends fail from here on, so nothing is queued (or counted) for it any more.
            self.state.request_close(None, CloseReason::Dropped);
            self.leave();
        }
    }
}

impl<S: Service> Future for SocketTask<S> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        loop {
            if let Some(closing) = this.closing.as_mut() {
                if closing.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                this.closing = None;
                this.end();
                return Poll::Ready(());
            }
            if this.poll_serve(cx).is_pending() {
                return Poll::Pending;
            }
            // While closing, the reader only looks for the client's close frame and keeps no
            // data, so its bytes leave the budget now.
            let reader = std::mem::replace(&mut this.reader, FrameReader::new(0, Bytes::new()));
            let reader = reader.for_closing();
            this.release_inbound();
            let close_timeout = this.shared.options.close_timeout;
            this.closing = Some(Box::pin(finish(this.state.clone(), reader, close_timeout)));
        }
    }
}

/// The read side of an open socket, borrowed from its task for one poll.
struct Reading<'a> {
    state: &'a SocketState,
    reader: &'a mut FrameReader,
    /// What the reader holds, as counted in the budget.
    inbound: &'a mut usize,
}

impl Reading<'_> {
    /// Reads what the socket has and hands it on; `None` once reading has ended the socket.
    fn read<S: Service>(&mut self, service: &S, session: &S::Session) -> Option<Drained> {
        let state = self.state;
        let mut on_event = |event: Event<'_>| match event {
            Event::Message { text, data } => deliver(service, session, state, text, data),
            Event::Ping(payload) => {
                if ping_allowed(service, session, state) {
                    let pong = Outbound::Pong(Bytes::copy_from_slice(payload));
                    let _ = state.push(pong, WhenFull::Drop);
                }
            }
            Event::Pong => state.pong_seen.store(true, Ordering::Release),
        };
        let inbound = &mut *self.inbound;
        // After every read: the reader's bytes, counted in the budget before more are read.
        let mut settle = |held: usize| {
            if held > *inbound {
                if !state.hub.reserve(state, held - *inbound) {
                    return false;
                }
            } else {
                state.hub.release(state, *inbound - held);
            }
            *inbound = held;
            true
        };
        match self.reader.read(&state.stream, &mut on_event, &mut settle) {
            Ok(drained) => Some(drained),
            Err(end) => {
                let (farewell, reason) = read_end(end);
                state.request_close(farewell, reason);
                None
            }
        }
    }
}

/// Whether to answer a ping: the service may count it against a rate limit. A panic counts
/// as no.
fn ping_allowed<S: Service>(service: &S, session: &S::Session, state: &SocketState) -> bool {
    if state.closing.load(Ordering::Acquire) {
        return false;
    }
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| service.on_ping(session)))
        .unwrap_or(false)
}

/// While the kernel's buffer is full (`blocked`), writes the backlog as soon as the socket is
/// writable again. True when something happened (the caller looks at the socket again).
fn write_when_ready(
    state: &SocketState,
    blocked: &mut bool,
    cx: &mut std::task::Context<'_>,
) -> bool {
    if !*blocked {
        return false;
    }
    match state.stream.poll_write_ready(cx) {
        Poll::Ready(Ok(())) => {
            *blocked = write_backlog(state);
            true
        }
        Poll::Ready(Err(e)) => {
            state.request_close(None, CloseReason::Io(e.to_string()));
            true
        }
        Poll::Pending => false,
    }
}

/// Writes the backlog after a wake-up or writability; true while the kernel is full.
fn write_backlog(state: &SocketState) -> bool {
    match state.flush() {
        Ok(Flushed::Done) => false,
        Ok(Flushed::Blocked) => true,
        Ok(Flushed::CloseReached(code, reason)) => {
            state.request_close(
                Some(Farewell::Code(code, reason.clone())),
                CloseReason::Server { code, reason },
            );
            false
        }
        Err(e) => {
            state.request_close(None, CloseReason::Io(e.to_string()));
            false
        }
    }
}

/// The close handshake, as the winning close request asked for it.
///
/// After a client close, a protocol error or a server close, frames queued before it still go
/// out first (an echo of the message before a bad frame, say). After a slow-consumer or
/// shutdown close they are dropped: the client is not reading, or we are leaving. When we
/// started the close, the client gets `close_timeout` to answer it.
async fn finish(state: Arc<SocketState>, mut reader: CloseReader, close_timeout: Duration) {
    let state = &*state;
    let reader = &mut reader;
    let reason = state.reason();
    let keep_queued = matches!(
        reason,
        CloseReason::Client { .. } | CloseReason::Protocol { .. } | CloseReason::Server { .. }
    );
    state.begin_closing(keep_queued);
    let Some(farewell) = state.take_farewell() else {
        return;
    };
    if lock(&state.out).torn {
        return; // the stream ends inside a frame: no close frame can follow
    }
    state.queue_farewell(farewell.payload());
    let written = timeout(close_timeout, async {
        loop {
            match state.flush()? {
                Flushed::Done => return Ok::<(), io::Error>(()),
                Flushed::Blocked => state.stream.writable().await?,
                Flushed::CloseReached(..) => unreachable!("begin_closing removed the markers"),
            }
        }
    })
    .await;
    let started_by_us = !matches!(
        reason,
        CloseReason::Client { .. } | CloseReason::Protocol { .. }
    );
    if matches!(written, Ok(Ok(()))) && started_by_us {
        let _ = timeout(close_timeout, await_close_reply(state, reader)).await;
    }
}

/// Reads (and skips) until the client's close frame, the end of the connection, or an error.
async fn await_close_reply(state: &SocketState, reader: &mut CloseReader) {
    loop {
        if state.stream.readable().await.is_err() {
            return;
        }
        match reader.read(&state.stream) {
            Ok(Some(Drained::Yes)) => {}
            Ok(Some(Drained::No)) => tokio::task::yield_now().await,
            Ok(None) | Err(_) => return,
        }
    }
}

/// Hands a whole message to the service, unless the socket is already closing. A panic in
/// the service closes this socket (1011) and nothing else.
fn deliver<S: Service>(
    service: &S,
    session: &S::Session,
    state: &SocketState,
    text: bool,
    data: Bytes,
) {
    if state.closing.load(Ordering::Acquire) {
        return;
    }
    let message = if text {
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

/// The close frame to answer with, and why the socket ended, when reading ended it.
fn read_end(end: ReadEnd) -> (Option<Farewell>, CloseReason) {
    match end {
        ReadEnd::Eof => (None, CloseReason::Dropped),
        ReadEnd::Io(e) => (None, CloseReason::Io(e.to_string())),
        ReadEnd::Close {
            payload,
            code,
            reason,
        } => (
            Some(Farewell::Echo(payload)),
            CloseReason::Client { code, reason },
        ),
        ReadEnd::Violation { code, detail } => (
            Some(Farewell::Code(code, detail.clone())),
            CloseReason::Protocol { code, detail },
        ),
        ReadEnd::OverBudget => (Some(Farewell::over_budget()), CloseReason::OverBudget),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A socket whose peer never reads, with the kernel's buffers full: every send queues.
    async fn backlogged_socket(capacity: usize) -> (SocketState, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (stream, addr) = listener.accept().await.unwrap();
        let limits = QueueLimits {
            frames: capacity,
            bytes: usize::MAX,
        };
        let state = SocketState::new(stream, addr, limits, Arc::default());
        let big = Bytes::from(vec![b'x'; 64 * 1024]);
        while !lock(&state.out).backlogged {
            state
                .push(Outbound::Text(big.clone()), WhenFull::CloseSocket)
                .unwrap();
        }
        (state, peer)
    }

    fn kinds(state: &SocketState) -> Vec<&'static str> {
        lock(&state.out)
            .queue
            .iter()
            .map(|o| match o {
                Outbound::Text(_) => "text",
                Outbound::Ping => "ping",
                Outbound::Pong(_) => "pong",
                _ => "other",
            })
            .collect()
    }

    #[tokio::test]
    async fn pings_and_pongs_overtake_queued_data_in_their_own_order() {
        let (state, _peer) = backlogged_socket(100).await;
        let data = || Outbound::Text(Bytes::from_static(b"data"));
        state.push(data(), WhenFull::CloseSocket).unwrap();
        state.push(Outbound::Ping, WhenFull::Drop).unwrap();
        state.push(data(), WhenFull::CloseSocket).unwrap();
        state
            .push(Outbound::Pong(Bytes::from_static(b"1")), WhenFull::Drop)
            .unwrap();
        let queued = kinds(&state);
        let controls = queued.iter().take_while(|k| **k != "text").count();
        assert_eq!(&queued[..controls], ["ping", "pong"]);
        assert!(queued[controls..].iter().all(|k| *k == "text"));
        // A client that pings without reading cannot grow the queue with pongs.
        for _ in 0..10 {
            let _ = state.push(Outbound::Pong(Bytes::new()), WhenFull::Drop);
        }
        let controls = kinds(&state).iter().filter(|k| **k != "text").count();
        assert_eq!(controls, MAX_QUEUED_CONTROL);
        assert!(
            !state.is_close_requested(),
            "dropping a pong closes nothing"
        );
    }

    #[tokio::test]
    async fn a_full_queue_closes_as_a_slow_consumer_and_a_later_close_drops_the_queue() {
        let (state, _peer) = backlogged_socket(3).await;
        let data = || Outbound::Text(Bytes::from_static(b"data"));
        while state.push(data(), WhenFull::CloseSocket).is_ok() {}
        assert_eq!(state.reason(), CloseReason::SlowConsumer);

        let (state, _peer) = backlogged_socket(3).await;
        while lock(&state.out).queue.len() < 3 {
            state.send_text(Bytes::from_static(b"data")).unwrap();
        }
        state.close(4000, "bye");
        assert!(lock(&state.out).queue.is_empty(), "closes at once");
        assert!(matches!(
            state.reason(),
            CloseReason::Server { code: 4000, .. }
        ));
    }
}
