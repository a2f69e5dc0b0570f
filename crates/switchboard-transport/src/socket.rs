//! One socket's shared state and its [`Socket`] face: what any task may do to it.
//!
//! Sending writes straight to the kernel from the sender's own task (a `try_write`, never
//! waiting) whenever nothing is queued before it: a reply or a broadcast costs one system
//! call per socket and no task wake-up. Only what the kernel does not take goes to the
//! socket's queue ([`crate::outbox`]), which the socket's own task
//! ([`crate::socket_task`]) writes as the connection drains.
//!
//! Every way a socket can end goes through [`SocketState::request_close`]: the first request
//! wins and fixes the [`CloseReason`] reported to the service's `on_close`.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{Buf, Bytes, BytesMut};

use futures_util::task::AtomicWaker;

use crate::budget::Holding;
use crate::frame::{self, MAX_SERVER_HEAD};
use crate::outbox::{CloseRequest, Farewell, Flushed, Outbound, Outbox, QueueLimits, WhenFull};
use crate::sockets::Hub;
use crate::wire::Wire;
use switchboard_core::{server_close, CloseReason, SendError, Socket, SLOW_CONSUMER_CODE};

/// Heartbeat sweeps a socket whose server close waits behind its backlog may take to drain
/// it (5 minutes at the default 30 s); then the backlog is dropped and the socket closed as a
/// slow consumer.
const MAX_CLOSING_SWEEPS: u32 = 10;

/// The socket's task encodes at most this many queued bytes per write.
const MAX_BATCH_BYTES: usize = 64 * 1024;
/// Pings and pongs that may wait ahead of queued data.
const MAX_QUEUED_CONTROL: usize = 4;

pub(crate) struct SocketState {
    pub(crate) peer: SocketAddr,
    /// The connection: plain TCP, or TCP with a TLS session.
    pub(crate) wire: Wire,
    pub(crate) out: Mutex<Outbox>,
    pub(crate) capacity: usize,
    /// Most bytes the outbox may hold (a frame is always taken into an empty one).
    pub(crate) capacity_bytes: usize,
    /// The server's sockets and buffer budget.
    pub(crate) hub: Arc<Hub>,
    /// Bytes this socket holds (inbound and outbound), as counted in the budget.
    pub(crate) holding: Holding,
    /// The socket's task, woken when `work` is set (a backlog to write, or a close request).
    pub(crate) task: AtomicWaker,
    pub(crate) work: AtomicBool,
    /// Set by [`Socket::close`] and every close request: sends fail from then on.
    pub(crate) closing: AtomicBool,
    pub(crate) close_requested: AtomicBool,
    /// Boxed: only a closing socket has one.
    pub(crate) request: Mutex<Option<Box<CloseRequest>>>,
    /// Heartbeat state, kept by the server's heartbeat sweep (see [`SocketState::heartbeat`]).
    pub(crate) pong_seen: AtomicBool,
    pub(crate) awaiting_pong: AtomicBool,
    pub(crate) was_backlogged: AtomicBool,
    /// Heartbeat sweeps since a server close was queued behind the backlog.
    closing_sweeps: std::sync::atomic::AtomicU32,
    /// [`Socket::pause_reading`]: the socket's task reads nothing until resumed.
    pub(crate) reading_paused: AtomicBool,
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl SocketState {
    /// A just-opened socket: nothing queued, no close requested, no ping outstanding.
    pub(crate) fn new(
        wire: Wire,
        peer: SocketAddr,
        limits: QueueLimits,
        hub: Arc<Hub>,
    ) -> SocketState {
        SocketState {
            peer,
            wire,
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
            closing_sweeps: std::sync::atomic::AtomicU32::new(0),
            reading_paused: AtomicBool::new(false),
        }
    }

    /// `head` (the `101` of the upgrade) is the first thing the socket's task writes, before
    /// any frame: until it is out, senders queue. The socket can then be opened (registered,
    /// its connect event published) before its client hears the `101`, so that nothing sent
    /// to it once the client is upgraded can miss it.
    pub(crate) fn with_head(self, head: &[u8]) -> SocketState {
        {
            let mut outbox = lock(&self.out);
            outbox.unsent = BytesMut::from(head);
            outbox.backlogged = true;
        }
        self.work.store(true, Ordering::Release);
        self
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
                // Data the kernel took in part counts for something; the `101` of a socket
                // opened before it went out counts for nothing, and goes out first whatever
                // follows (the close frame, here).
                let mid_frame = !outbox.unsent.is_empty() && outbox.unsent_counted > 0;
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
    pub(crate) fn refuse_for_budget(&self, mid_frame: bool) {
        self.request_close(
            (!mid_frame).then(Farewell::over_budget),
            CloseReason::OverBudget,
        );
    }

    /// Counts `n` more outbound bytes in `outbox`, within the budget.
    pub(crate) fn reserve_out(&self, outbox: &mut Outbox, n: usize) -> bool {
        if !self.hub.reserve(self, n) {
            return false;
        }
        outbox.bytes += n;
        true
    }

    /// Gives back `n` outbound bytes that were written or dropped.
    pub(crate) fn release_out(&self, outbox: &mut Outbox, n: usize) {
        let n = n.min(outbox.bytes);
        outbox.bytes -= n;
        self.hub.release(self, n);
    }

    /// Records how the socket ends; the first request wins. Returns true if this one did.
    pub(crate) fn request_close(&self, farewell: Option<Farewell>, reason: CloseReason) -> bool {
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
    pub(crate) fn wake(&self) {
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
        if self.closing.load(Ordering::Acquire) {
            // A server close waits behind the backlog: no ping can be queued now, so no pong
            // is owed. The progress check above bounds a client that stops reading; this
            // bounds one that trickles (a closed socket must not keep its place for ever,
            // a `disconnect`ed one least of all).
            if self.closing_sweeps.fetch_add(1, Ordering::AcqRel) + 1 >= MAX_CLOSING_SWEEPS {
                self.request_close(None, CloseReason::SlowConsumer);
            }
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

    pub(crate) fn is_close_requested(&self) -> bool {
        self.close_requested.load(Ordering::Acquire)
    }

    pub(crate) fn take_farewell(&self) -> Option<Farewell> {
        lock(&self.request).as_mut().and_then(|r| r.farewell.take())
    }

    pub(crate) fn reason(&self) -> CloseReason {
        lock(&self.request)
            .as_ref()
            .map(|r| r.reason.clone())
            .unwrap_or(CloseReason::Dropped)
    }

    /// Sends one frame: written at once if nothing waits before it and the kernel takes it,
    /// queued otherwise.
    pub(crate) fn push(&self, out: Outbound, when_full: WhenFull) -> Result<(), SendError> {
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
        let written = match self.wire.send_now(&bufs) {
            Ok(n) => n,
            Err(e) if is_retry(&e) => 0,
            Err(e) => {
                drop(outbox);
                self.request_close(None, CloseReason::Io(e.to_string()));
                return Err(SendError::Closed);
            }
        };
        let total = head_len + payload.len();
        // With TLS, records rustls encrypted but the kernel has not taken yet.
        let encrypted_waiting = self.wire.is_tls() && self.wire.has_pending_output();
        if written == total && !encrypted_waiting {
            return Ok(());
        }
        // Counted until it is all out: the rest of the frame, or with TLS the whole frame
        // (its records wait in rustls, at most one chunk of them).
        let counted = if encrypted_waiting {
            total
        } else {
            total - written
        };
        if !self.reserve_out(&mut outbox, counted) {
            // Nothing of it is counted (`reserve_out` failed), so nothing is given back. Half
            // a frame on the wire cannot be followed by a close frame, whoever closes.
            let mid_frame = written > 0 && written < total;
            outbox.torn |= mid_frame;
            drop(outbox);
            self.refuse_for_budget(mid_frame);
            return Err(SendError::OverBudget);
        }
        if written == 0 {
            outbox.queue.push_back(out);
        } else {
            outbox.unsent_counted += counted;
            // The connection took part of the frame: the rest goes next, before anything else.
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
    pub(crate) fn flush(&self) -> io::Result<Flushed> {
        let mut guard = lock(&self.out);
        let outbox = &mut *guard;
        loop {
            if self.wire.is_tls() {
                // Records encrypted earlier go first (nothing to do when none wait).
                let mut wrote = false;
                let flushed = self.wire.flush_output(&mut wrote);
                outbox.progressed |= wrote;
                match flushed {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Flushed::Blocked),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
            }
            if outbox.unsent.is_empty() {
                // The batch is out (or the `101`, which counts for nothing): its allocation
                // and its count go together. (Emptied by advancing, it may report no
                // capacity and still hold its allocation.)
                outbox.unsent = BytesMut::new();
                let counted = std::mem::take(&mut outbox.unsent_counted);
                if counted > 0 {
                    self.release_out(outbox, counted);
                }
            }
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
            // With TLS, a batch counts until its records are out too (see the loop's top).
            match self.wire.write(&outbox.unsent) {
                Ok(n) => {
                    outbox.unsent.advance(n);
                    outbox.progressed = true;
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
    pub(crate) fn begin_closing(&self, keep_queued: bool) {
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
    pub(crate) fn queue_farewell(&self, payload: Bytes) {
        let mut outbox = lock(&self.out);
        outbox.queue.push_back(Outbound::Farewell(payload));
        outbox.backlogged = true;
    }

    /// Whether a backlog waits, and whether any bytes went out since the last call.
    pub(crate) fn take_progress(&self) -> (bool, bool) {
        let mut outbox = lock(&self.out);
        let progressed = std::mem::take(&mut outbox.progressed);
        (outbox.backlogged, progressed)
    }

    /// Frees whatever is still queued: the socket has ended, though handles may live on.
    pub(crate) fn release_buffers(&self) {
        let mut outbox = lock(&self.out);
        outbox.queue = VecDeque::new();
        outbox.unsent = BytesMut::new();
        outbox.unsent_counted = 0;
        let held = outbox.bytes;
        self.release_out(&mut outbox, held);
    }

    /// Ends the TCP connection now, even while handles to the socket live on.
    pub(crate) fn shutdown_stream(&self) {
        self.wire.shutdown();
    }

    /// With TLS, reading may leave records for the peer (a key update's answer) that the
    /// kernel did not take: the socket's task writes them as the connection drains, and a
    /// client that never takes them is dropped like any other that stops reading.
    pub(crate) fn after_read(&self) {
        if self.wire.is_tls() && self.wire.has_pending_output() {
            lock(&self.out).backlogged = true;
            self.wake();
        }
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
        let (code, reason) = server_close(code, reason);
        let reason = reason.to_string();
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A socket whose peer never reads, with the kernel's buffers full: every send queues.
    async fn backlogged_socket(capacity: usize) -> (SocketState, tokio::net::TcpStream) {
        let (stream, addr, peer) = crate::test_support::loopback_pair().await;
        let limits = QueueLimits {
            frames: capacity,
            bytes: usize::MAX,
        };
        let state = SocketState::new(Wire::plain(stream), addr, limits, Arc::default());
        let big = Bytes::from(vec![b'x'; 64 * 1024]);
        while !lock(&state.out).backlogged {
            state
                .push(Outbound::Text(big.clone()), WhenFull::CloseSocket)
                .unwrap();
        }
        (state, peer)
    }

    /// A TLS socket whose peer has not read yet, and the peer's side of the session.
    async fn tls_pair() -> (
        SocketState,
        switchboard_tls::tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    ) {
        use switchboard_tls::{rustls::pki_types::ServerName, tokio_rustls, ServerTls, TestCa};
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new();
        let tls = ServerTls::load(ca.write_server_files(dir.path(), "s")).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let connect = tokio::net::TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(connect, listener.accept());
        let (server, addr) = accepted.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let (client, server) = tokio::join!(
            tokio_rustls::TlsConnector::from(ca.client_config()).connect(name, client.unwrap()),
            tls.acceptor().accept(server)
        );
        let (tcp, session) = server.unwrap().into_inner();
        let limits = QueueLimits {
            frames: 10_000,
            bytes: usize::MAX,
        };
        let state = SocketState::new(Wire::tls(tcp, session), addr, limits, Arc::default());
        (state, client.unwrap())
    }

    #[tokio::test]
    async fn tls_records_stay_counted_until_the_kernel_has_taken_them() {
        use tokio::io::AsyncReadExt;
        let (state, mut client) = tls_pair().await;
        let frame = Bytes::from(vec![b'x'; 40_000]);
        // Frames until the kernel's buffers are full and the backlog waits.
        let mut sent = 0;
        loop {
            for _ in 0..20 {
                state
                    .push(Outbound::Text(frame.clone()), WhenFull::CloseSocket)
                    .unwrap();
                sent += 1;
            }
            if matches!(state.flush().unwrap(), Flushed::Blocked) {
                break;
            }
        }
        let expected = sent * (frame.len() + 4); // a 4-byte head per frame
        let mut received = 0;
        let mut buf = vec![0u8; 4096]; // small reads: the kernel frees room in small steps
        let mut done = false;
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
        while received < expected {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{received} of {expected}"
            );
            match state.flush().unwrap() {
                Flushed::Done => {
                    // Done means every record is out, and nothing is counted any more.
                    assert!(!state.wire.has_pending_output(), "records left in rustls");
                    assert_eq!(state.hub.stats.budget.used(), 0);
                    done = true;
                }
                Flushed::Blocked => assert!(state.hub.stats.budget.used() > 0),
                Flushed::CloseReached(..) => unreachable!(),
            }
            let read =
                tokio::time::timeout(std::time::Duration::from_millis(100), client.read(&mut buf));
            if let Ok(n) = read.await {
                received += n.unwrap();
            }
        }
        assert_eq!(received, expected);
        assert!(done || matches!(state.flush().unwrap(), Flushed::Done));
        assert_eq!(state.hub.stats.budget.used(), 0);
    }

    #[tokio::test]
    async fn a_shed_before_the_101_is_out_keeps_it_and_sends_the_close_frame_after_it() {
        use tokio::io::AsyncReadExt;
        let (stream, addr, mut peer) = crate::test_support::loopback_pair().await;
        let limits = QueueLimits {
            frames: 100,
            bytes: usize::MAX,
        };
        let head = b"HTTP/1.1 101 Switching Protocols\r\n\r\n";
        let state =
            SocketState::new(Wire::plain(stream), addr, limits, Arc::default()).with_head(head);
        // Queued behind the 101 (counted), then shed before the task wrote anything.
        state.send_text(Bytes::from_static(b"data")).unwrap();
        assert!(state.shed_for_budget().is_some());
        assert!(!lock(&state.out).torn, "the 101 is no frame in progress");
        assert_eq!(&lock(&state.out).unsent[..], &head[..], "the 101 is kept");
        // What the socket's task then writes: the 101, and the close frame (1013) after it.
        state.begin_closing(true);
        loop {
            match state.flush().unwrap() {
                Flushed::Done => break,
                Flushed::CloseReached(..) => {}
                Flushed::Blocked => tokio::task::yield_now().await,
            }
        }
        if let Some(farewell) = state.take_farewell() {
            state.queue_farewell(farewell.payload());
            while !matches!(state.flush().unwrap(), Flushed::Done) {
                tokio::task::yield_now().await;
            }
        }
        drop(state);
        let mut got = Vec::new();
        peer.read_to_end(&mut got).await.unwrap();
        assert!(got.starts_with(head), "{got:?}");
        let close = &got[head.len()..];
        assert_eq!(close.first(), Some(&0x88), "a close frame next: {close:?}");
        assert_eq!(&close[2..4], &1013u16.to_be_bytes());
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
