//! The task of one open socket: reading frames into messages for the service, writing the
//! backlog as the connection drains, heartbeats, and the close handshake.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::time::timeout;

use crate::codec::Event;
use crate::outbox::{Farewell, Flushed, Outbound, QueueLimits, WhenFull};
use crate::reader::{CloseReader, Drained, FrameReader, ReadEnd};
use crate::socket::{lock, SocketState};
use crate::wire::Wire;
use crate::{Open, Shared, SocketSlot};
use switchboard_core::{CloseReason, Inbound, Service, SocketRef};

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
    /// Opens the socket of an upgraded connection: the service hears of it (and registers it)
    /// here. `early`: bytes the client sent right behind its upgrade request. With `head`, the
    /// `101` is not written yet: the task writes it first (see [`SocketState::with_head`]).
    pub(crate) fn open(
        wire: Wire,
        early: Bytes,
        head: Option<&[u8]>,
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
        let mut state = SocketState::new(wire, peer, limits, shared.hub.clone());
        if let Some(head) = head {
            state = state.with_head(head);
        }
        let state = Arc::new(state);
        // With TLS, records the handshake left unwritten go first.
        state.after_read();
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
    pub(crate) fn poll_serve(&mut self, cx: &mut std::task::Context<'_>) -> Poll<()> {
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
        // Once per poll: a wake after this (a frame queued, a close requested) takes the
        // waker and schedules another poll, so the loop below need not register again (two
        // atomic operations per turn saved).
        state.task.register(cx.waker());
        loop {
            if state.is_close_requested() {
                return Poll::Ready(());
            }
            // Closing and writing come before reading. A plain load first: the swap is an
            // atomic write, and almost every turn finds nothing to do.
            if state.work.load(Ordering::Acquire) && state.work.swap(false, Ordering::AcqRel) {
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
            match state.wire.tcp().poll_read_ready(cx) {
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
    pub(crate) fn release_inbound(&mut self) {
        let held = std::mem::take(&mut self.inbound);
        self.shared.hub.release(&self.state, held);
    }

    /// Closes the connection, frees the socket's buffers (and their share of the budget) and
    /// takes it off the server's list.
    pub(crate) fn leave(&mut self) {
        self.state.shutdown_stream();
        self.state.release_buffers();
        self.release_inbound();
        self.shared.hub.sockets.remove(self.listed);
    }

    /// The socket has ended: the connection is closed, the service hears of it.
    pub(crate) fn end(&mut self) {
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
pub(crate) struct Reading<'a> {
    state: &'a SocketState,
    reader: &'a mut FrameReader,
    /// What the reader holds, as counted in the budget.
    inbound: &'a mut usize,
}

impl Reading<'_> {
    /// Reads what the socket has and hands it on; `None` once reading has ended the socket.
    pub(crate) fn read<S: Service>(
        &mut self,
        service: &S,
        session: &S::Session,
    ) -> Option<Drained> {
        let state = self.state;
        let mut on_event = |event: Event<'_>| match event {
            Event::Text(text) => deliver(service, session, state, |s, session| {
                s.on_text(session, text)
            }),
            Event::Message { text, data } => deliver(service, session, state, |s, session| {
                let message = if text {
                    Inbound::Text(data)
                } else {
                    Inbound::Binary(data)
                };
                s.on_message(session, message)
            }),
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
        let read = self.reader.read(&state.wire, &mut on_event, &mut settle);
        state.after_read();
        match read {
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
pub(crate) fn ping_allowed<S: Service>(
    service: &S,
    session: &S::Session,
    state: &SocketState,
) -> bool {
    if state.closing.load(Ordering::Acquire) {
        return false;
    }
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| service.on_ping(session)))
        .unwrap_or(false)
}

/// While the kernel's buffer is full (`blocked`), writes the backlog as soon as the socket is
/// writable again. True when something happened (the caller looks at the socket again).
pub(crate) fn write_when_ready(
    state: &SocketState,
    blocked: &mut bool,
    cx: &mut std::task::Context<'_>,
) -> bool {
    if !*blocked {
        return false;
    }
    match state.wire.tcp().poll_write_ready(cx) {
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
pub(crate) fn write_backlog(state: &SocketState) -> bool {
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
                Flushed::Blocked => state.wire.tcp().writable().await?,
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
        if state.wire.tcp().readable().await.is_err() {
            return;
        }
        match reader.read(&state.wire) {
            Ok(Some(Drained::Yes)) => {}
            Ok(Some(Drained::No)) => tokio::task::yield_now().await,
            Ok(None) | Err(_) => return,
        }
    }
}

/// Hands a whole message to the service, unless the socket is already closing. A panic in
/// the service closes this socket (1011) and nothing else.
pub(crate) fn deliver<S: Service>(
    service: &S,
    session: &S::Session,
    state: &SocketState,
    hand_over: impl FnOnce(&S, &S::Session),
) {
    if state.closing.load(Ordering::Acquire) {
        return;
    }
    let delivered =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| hand_over(service, session)));
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
pub(crate) fn read_end(end: ReadEnd) -> (Option<Farewell>, CloseReason) {
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
