//! What waits to be written to one socket: frames in order, and what they count for.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};

use crate::frame;
use switchboard_core::{CloseReason, OVER_BUDGET_CODE};

pub(crate) enum Outbound {
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
    pub(crate) fn is_control(&self) -> bool {
        matches!(self, Outbound::Ping | Outbound::Pong(_))
    }

    /// Bytes on the wire: header and payload (0 for the `Close` marker, which is no frame).
    pub(crate) fn wire_len(&self) -> usize {
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
    pub(crate) fn counted_len(&self) -> usize {
        match self {
            Outbound::Farewell(_) => 0,
            other => other.wire_len(),
        }
    }

    /// The frame to write; `Close` is a marker, not a frame.
    pub(crate) fn frame(&self) -> (u8, &[u8]) {
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
pub(crate) enum Farewell {
    Code(u16, String),
    Echo(Bytes),
}

impl Farewell {
    /// The close frame of a socket shed (or refused) for the buffer budget.
    pub(crate) fn over_budget() -> Farewell {
        Farewell::Code(OVER_BUDGET_CODE, "buffer budget exceeded".into())
    }

    pub(crate) fn payload(self) -> Bytes {
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

pub(crate) struct CloseRequest {
    pub(crate) farewell: Option<Farewell>,
    pub(crate) reason: CloseReason,
}

/// What happens to a frame that finds the queue full.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum WhenFull {
    /// The socket is closed as a slow consumer (data frames).
    CloseSocket,
    /// The frame is dropped (pongs and pings: the heartbeat deals with such a client).
    Drop,
}

/// The write side's state, behind one lock: whoever holds it may write to the socket.
#[derive(Default)]
pub(crate) struct Outbox {
    /// Frames not written yet, in order.
    pub(crate) queue: VecDeque<Outbound>,
    /// Encoded bytes the kernel has not taken yet; they go out before `queue`.
    pub(crate) unsent: BytesMut,
    /// What `unsent` counts for in the budget: the whole batch until the last of it is
    /// written (the allocation stays as long), the close frame not at all.
    pub(crate) unsent_counted: usize,
    /// True while the socket's task does the writing: senders queue instead of writing.
    pub(crate) backlogged: bool,
    /// Some bytes were written since the heartbeat last looked (stall detection).
    pub(crate) progressed: bool,
    /// This socket's outbound share of the buffer budget: the counted bytes of `queue` plus
    /// `unsent_counted`.
    pub(crate) bytes: usize,
    /// The rest of a frame the kernel took in part was dropped: the stream ends inside a
    /// frame, so no close frame may follow.
    pub(crate) torn: bool,
}

/// What [`SocketState::flush`] got to.
pub(crate) enum Flushed {
    /// Everything is written; senders write directly again.
    Done,
    /// The kernel's buffer is full: wait until the socket is writable.
    Blocked,
    /// A [`Socket::close`] marker came next (everything before it is written).
    CloseReached(u16, String),
}

/// How much one socket's send queue may hold.
#[derive(Debug, Clone, Copy)]
pub(crate) struct QueueLimits {
    pub(crate) frames: usize,
    pub(crate) bytes: usize,
}
