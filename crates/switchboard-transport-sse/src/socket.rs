//! One session's socket: the queue of event-stream chunks the client has yet to read, and
//! the body that streams them.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Waker};

use bytes::{BufMut, Bytes, BytesMut};
use switchboard_core::{
    server_close, AbortSignal, BodyChunks, CloseReason, SendError, Socket, OVER_BUDGET_CODE,
    SLOW_CONSUMER_CODE,
};
use tokio::sync::Notify;

use crate::stats::SseStats;

/// How much one session's queue may hold.
#[derive(Debug, Clone, Copy)]
pub(crate) struct QueueLimits {
    pub(crate) frames: usize,
    pub(crate) bytes: usize,
}

#[derive(Default)]
struct Queue {
    chunks: VecDeque<Bytes>,
    bytes: usize,
    /// The body's task, waiting for a chunk.
    waker: Option<Waker>,
    /// No more chunks after those queued: the stream ends once they are read.
    finished: bool,
    /// A chunk was taken since the last heartbeat sweep.
    taken: bool,
    /// Chunks taken in all: the close timeout's measure of progress.
    taken_total: u64,
}

/// The [`Socket`] of one Server-Sent Events session.
pub(crate) struct SseSocket {
    queue: Mutex<Queue>,
    limits: QueueLimits,
    peer: SocketAddr,
    closing: AtomicBool,
    /// Why it ended: the first reason wins. Set once, read by the session's task.
    reason: Mutex<Option<CloseReason>>,
    /// Wakes the session's task: the session has ended (the stream is done or dropped, or
    /// it was cut off).
    pub(crate) ended: Notify,
    /// Wakes the session's task: a close reason was set (the session's close timeout runs
    /// from then).
    pub(crate) closing_started: Notify,
    ended_flag: AtomicBool,
    paused: AtomicBool,
    /// Wakes posts waiting for [`Socket::resume_reading`] or for the end.
    pub(crate) resumed: Notify,
    /// Drops the connection of a client that stopped reading.
    pub(crate) abort: Arc<AbortSignal>,
    stats: Arc<SseStats>,
    /// Frees room in the budget by closing the largest holders (the session table).
    shedder: Weak<dyn Shedder>,
}

/// Sheds sessions to make room in the transport's buffer budget.
pub(crate) trait Shedder: Send + Sync {
    /// Makes room for `n` more bytes for `asking` and reserves them: closes the sessions
    /// holding the most above their fair share (budget ÷ sessions). False (nothing reserved)
    /// when `asking` is itself above its share, or no room could be made.
    fn make_room(&self, asking: &SseSocket, n: usize) -> bool;
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// `data:` lines for a message (one per line of it), then the blank line that ends an event.
pub(crate) fn data_event(text: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(text.len() + 8);
    // A message of many lines is sent as many `data:` lines; EventSource joins them with
    // `\n`. CR and CRLF end lines too.
    let mut rest = text;
    loop {
        out.put_slice(b"data: ");
        match rest.iter().position(|&b| b == b'\n' || b == b'\r') {
            Some(i) => {
                out.put_slice(&rest[..i]);
                out.put_u8(b'\n');
                let skip = if rest[i] == b'\r' && rest.get(i + 1) == Some(&b'\n') {
                    2
                } else {
                    1
                };
                rest = &rest[i + skip..];
            }
            None => {
                out.put_slice(rest);
                out.put_slice(b"\n\n");
                return out.freeze();
            }
        }
    }
}

/// The `close` event: `{"code":…,"reason":…}`.
pub(crate) fn close_event(code: u16, reason: &str) -> Bytes {
    let data = serde_json::json!({ "code": code, "reason": reason }).to_string();
    Bytes::from(format!("event: close\ndata: {data}\n\n"))
}

impl SseSocket {
    pub(crate) fn new(
        peer: SocketAddr,
        limits: QueueLimits,
        stats: Arc<SseStats>,
        shedder: Weak<dyn Shedder>,
    ) -> Self {
        SseSocket {
            queue: Mutex::default(),
            limits,
            peer,
            closing: AtomicBool::new(false),
            reason: Mutex::new(None),
            ended: Notify::new(),
            closing_started: Notify::new(),
            ended_flag: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            resumed: Notify::new(),
            abort: Arc::default(),
            stats,
            shedder,
        }
    }

    /// Queues a chunk, within the session's limits and the transport's budget unless `always`
    /// (the first event, which the session is opened with).
    fn push(&self, chunk: Bytes, always: bool) -> Result<(), SendError> {
        let len = chunk.len();
        {
            let q = lock(&self.queue);
            if q.finished {
                return Err(SendError::Closed);
            }
            let over = !q.chunks.is_empty()
                && (q.chunks.len() >= self.limits.frames || q.bytes + len > self.limits.bytes);
            if over && !always {
                drop(q);
                self.end_slow_consumer();
                return Err(SendError::Full);
            }
        }
        // Reserved before it is held; at the budget, the largest holders make room (or this
        // session goes, if it is one of them).
        if !always && !self.stats.try_reserve(len) {
            let made = self
                .shedder
                .upgrade()
                .is_some_and(|s| s.make_room(self, len));
            if !made {
                self.end_over_budget();
                return Err(SendError::OverBudget);
            }
        } else if always {
            self.stats.reserve_always(len);
        }
        let mut q = lock(&self.queue);
        if q.finished {
            drop(q);
            self.stats.release(len);
            return Err(SendError::Closed);
        }
        q.bytes += len;
        q.chunks.push_back(chunk);
        let waker = q.waker.take();
        drop(q);
        if let Some(waker) = waker {
            waker.wake();
        }
        Ok(())
    }

    /// Bytes queued now.
    pub(crate) fn held(&self) -> usize {
        lock(&self.queue).bytes
    }

    /// How many chunks the stream has taken so far.
    pub(crate) fn taken_total(&self) -> u64 {
        lock(&self.queue).taken_total
    }

    /// Shed to keep the transport within its budget: see [`SseSocket::end_now`].
    pub(crate) fn end_over_budget(&self) {
        self.end_now(
            CloseReason::OverBudget,
            OVER_BUDGET_CODE,
            "buffer budget exceeded",
        );
    }

    /// A protocol error (a post that is not UTF-8): see [`SseSocket::end_now`].
    pub(crate) fn end_for_protocol(&self, code: u16, detail: &str) {
        let reason = CloseReason::Protocol {
            code,
            detail: detail.to_string(),
        };
        self.end_now(reason, code, detail);
    }

    /// Ends the session at once: what it queued is dropped (its bytes given back), its close
    /// event is the last thing on the stream, and the service hears of the end now. The
    /// connection is given the close timeout to deliver that event, then dropped.
    fn end_now(&self, reason: CloseReason, code: u16, text: &str) {
        if self.set_reason(reason) {
            self.replace_queue(Some(close_event(code, text)));
            self.mark_ended();
        }
    }

    /// Ends the stream after what is queued (and `last`, if any).
    fn finish(&self, last: Option<Bytes>) {
        let mut q = lock(&self.queue);
        if q.finished {
            return;
        }
        if let Some(last) = last {
            // A close event: small, the last a session sends; counted, never refused.
            self.stats.reserve_always(last.len());
            q.bytes += last.len();
            q.chunks.push_back(last);
        }
        q.finished = true;
        let waker = q.waker.take();
        drop(q);
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Records why the session ends, if nothing did before; true if this was first.
    pub(crate) fn set_reason(&self, reason: CloseReason) -> bool {
        let mut slot = lock(&self.reason);
        if slot.is_some() {
            return false;
        }
        *slot = Some(reason);
        self.closing.store(true, Ordering::Release);
        drop(slot);
        self.closing_started.notify_one();
        // Posts waiting for the connect gate learn of the close now.
        self.resumed.notify_waiters();
        true
    }

    pub(crate) fn reason(&self) -> CloseReason {
        lock(&self.reason).clone().unwrap_or(CloseReason::Dropped)
    }

    /// The session is over: wake its task (and any waiting post).
    pub(crate) fn mark_ended(&self) {
        if !self.ended_flag.swap(true, Ordering::AcqRel) {
            self.ended.notify_one();
            self.resumed.notify_waiters();
        }
    }

    pub(crate) fn has_ended(&self) -> bool {
        self.ended_flag.load(Ordering::Acquire)
    }

    /// A queue that is full or stalled: see [`SseSocket::end_now`].
    pub(crate) fn end_slow_consumer(&self) {
        self.end_now(
            CloseReason::SlowConsumer,
            SLOW_CONSUMER_CODE,
            "send queue full",
        );
    }

    /// Drops the connection now (the body will not be polled again).
    pub(crate) fn cut(&self) {
        self.abort.abort();
        self.drop_queue();
        self.mark_ended();
    }

    fn drop_queue(&self) {
        let mut q = lock(&self.queue);
        let held = q.bytes;
        q.chunks.clear();
        q.bytes = 0;
        drop(q);
        self.stats.release(held);
    }

    /// The client's close (`DELETE`): echoed as the last event, then the end.
    pub(crate) fn close_by_client(&self, code: u16, reason: String) {
        let echo = close_event(code, &reason);
        if self.set_reason(CloseReason::Client { code, reason }) {
            self.finish(Some(echo));
        }
    }

    /// Server shutdown: what is queued is dropped (as the WebSocket transport does), a close
    /// event with 1001 is the last, then the end. A session already closing keeps only its
    /// close event: the backlog in front of it is not waited for either.
    pub(crate) fn shut_down(&self) {
        if self.set_reason(CloseReason::Shutdown) {
            self.replace_queue(Some(close_event(1001, "server shutting down")));
        } else {
            self.replace_queue(None);
        }
    }

    /// Drops what is queued and ends the stream with `last` (a close event), under one lock,
    /// so no send slips in between. A finished queue keeps its own last chunk (its close
    /// event) instead.
    fn replace_queue(&self, last: Option<Bytes>) {
        let mut q = lock(&self.queue);
        let kept = if q.finished {
            q.chunks.pop_back()
        } else {
            last
        };
        let held = q.bytes;
        q.chunks.clear();
        q.bytes = 0;
        if let Some(kept) = kept {
            q.bytes = kept.len();
            q.chunks.push_back(kept);
        }
        q.finished = true;
        let waker = q.waker.take();
        let now = q.bytes;
        drop(q);
        // The close event kept or added stays counted, as `finish` counts one.
        if now > held {
            self.stats.reserve_always(now - held);
        } else {
            self.stats.release(held - now);
        }
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// The heartbeat sweep: a comment line keeps proxies from timing the stream out; a
    /// client that took nothing of its backlog since the last sweep is cut off.
    pub(crate) fn heartbeat(&self) {
        let mut q = lock(&self.queue);
        let idle = q.chunks.is_empty();
        let stalled = !idle && !q.taken;
        q.taken = false;
        let finished = q.finished;
        drop(q);
        if stalled {
            if finished {
                // Closing, and not reading its close event: cut it off.
                self.cut();
            } else {
                self.end_slow_consumer();
            }
        } else if idle && !finished {
            // Only on an idle stream: one whose queue is moving needs no comment to look
            // alive, and a queue at its bound must not turn a reader that keeps up into a
            // slow consumer for the sake of a comment.
            let _ = self.push(Bytes::from_static(b":\n\n"), false);
        }
    }

    /// True while reading is paused.
    pub(crate) fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Acquire)
    }

    /// The first event, queued before the service hears of the socket.
    pub(crate) fn open_event(&self, session: &str, post_path: &str) {
        let data = serde_json::json!({ "session": session, "post": post_path }).to_string();
        let _ = self.push(
            Bytes::from(format!("event: session\ndata: {data}\n\n")),
            true,
        );
    }
}

impl Socket for SseSocket {
    fn send_text(&self, text: Bytes) -> Result<(), SendError> {
        if self.is_closing() {
            return Err(SendError::Closed);
        }
        self.push(data_event(&text), false)
    }

    fn send_binary(&self, _data: Bytes) -> Result<(), SendError> {
        Err(SendError::Unsupported)
    }

    fn close(&self, code: u16, reason: &str) {
        let (code, reason) = server_close(code, reason);
        if self.set_reason(CloseReason::Server {
            code,
            reason: reason.to_string(),
        }) {
            self.finish(Some(close_event(code, reason)));
        }
    }

    fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    fn pause_reading(&self) {
        self.paused.store(true, Ordering::Release);
    }

    fn resume_reading(&self) {
        if self.paused.swap(false, Ordering::AcqRel) {
            self.resumed.notify_waiters();
        }
    }

    fn peer_addr(&self) -> Option<SocketAddr> {
        Some(self.peer)
    }

    fn transport(&self) -> &'static str {
        "sse"
    }
}

/// The event stream's body: the session's queue, chunk by chunk. When it ends (every chunk
/// of a finished queue read) or is dropped (the client went), the session ends.
pub(crate) struct EventStream(pub(crate) Arc<SseSocket>);

impl BodyChunks for EventStream {
    fn poll_chunk(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        let socket = &self.0;
        let mut q = lock(&socket.queue);
        if let Some(chunk) = q.chunks.pop_front() {
            q.bytes -= chunk.len();
            q.taken = true;
            q.taken_total += 1;
            drop(q);
            socket.stats.release(chunk.len());
            return Poll::Ready(Some(chunk));
        }
        if q.finished {
            drop(q);
            socket.mark_ended();
            return Poll::Ready(None);
        }
        q.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        // The client went (or the stream ended): whatever was queued is dropped with it.
        self.0.set_reason(CloseReason::Dropped);
        self.0.finish(None);
        self.0.drop_queue();
        self.0.mark_ended();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct NoRoom;
    impl Shedder for NoRoom {
        fn make_room(&self, _: &SseSocket, _: usize) -> bool {
            false
        }
    }

    #[test]
    fn a_reader_that_keeps_up_with_a_full_queue_is_not_ended_by_the_heartbeat() {
        let limits = QueueLimits {
            frames: 3,
            bytes: 1 << 20,
        };
        let stats = Arc::new(SseStats::default());
        stats.set_budget(usize::MAX);
        let shedder: Weak<dyn Shedder> = Weak::<NoRoom>::new();
        let socket = Arc::new(SseSocket::new(
            "127.0.0.1:1".parse().unwrap(),
            limits,
            stats,
            shedder,
        ));
        let mut stream = Box::pin(EventStream(socket.clone()));
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        for _ in 0..3 {
            socket.send_text(Bytes::from_static(b"{}")).unwrap();
        }
        // The client takes one, the queue fills again: at its bound, but moving.
        assert!(stream.as_mut().poll_chunk(&mut cx).is_ready());
        socket.send_text(Bytes::from_static(b"{}")).unwrap();
        socket.heartbeat();
        assert!(!socket.is_closing(), "ended for the sake of a comment");
        // Nothing taken until the next sweep: that one is stalled.
        socket.heartbeat();
        assert!(socket.is_closing());
    }

    #[test]
    fn a_message_of_many_lines_becomes_many_data_lines() {
        assert_eq!(&data_event(b"{\"a\":1}")[..], b"data: {\"a\":1}\n\n");
        assert_eq!(
            &data_event(b"a\nb\r\nc\rd")[..],
            b"data: a\ndata: b\ndata: c\ndata: d\n\n"
        );
        assert_eq!(&data_event(b"")[..], b"data: \n\n");
    }

    #[test]
    fn the_close_event_carries_code_and_reason_as_json() {
        assert_eq!(
            &close_event(1008, "a \"quoted\" reason")[..],
            &b"event: close\ndata: {\"code\":1008,\"reason\":\"a \\\"quoted\\\" reason\"}\n\n"[..]
        );
    }
}
