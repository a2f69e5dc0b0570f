//! Counters the transport keeps: plain atomics, ready for any metrics exporter.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::budget::Budget;
use crate::CloseReason;

/// Live counters of one [`crate::Server`]. Read them with [`TransportStats::snapshot`].
#[derive(Debug, Default)]
pub struct TransportStats {
    pub(crate) sockets_open: AtomicU64,
    pub(crate) sockets_opened: AtomicU64,
    pub(crate) refused_origin: AtomicU64,
    pub(crate) refused_capacity: AtomicU64,
    pub(crate) refused_by_service: AtomicU64,
    pub(crate) refused_head_size: AtomicU64,
    pub(crate) refused_handshakes: AtomicU64,
    pub(crate) refused_handshakes_per_address: AtomicU64,
    pub(crate) handshakes_in_progress: AtomicU64,
    /// Buffered bytes across all sockets, against `buffer_budget`.
    pub(crate) budget: Budget,
    closed: [AtomicU64; CLOSE_KINDS],
}

const CLOSE_KINDS: usize = 9;

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TransportCounters {
    /// Sockets open now (including upgrades in progress).
    pub sockets_open: u64,
    /// Sockets opened since start.
    pub sockets_opened: u64,
    /// Upgrades refused with 403 for their `Origin`.
    pub refused_origin: u64,
    /// Upgrades refused with 503 because `max_connections` were open.
    pub refused_capacity: u64,
    /// Upgrades refused by [`crate::Service::admit`].
    pub refused_by_service: u64,
    /// Upgrade requests refused with 431: head larger than `max_request_head`.
    pub refused_head_size: u64,
    /// Connections closed on accept: `max_handshakes` were in progress.
    pub refused_handshakes: u64,
    /// Connections closed on accept: `max_handshakes_per_address` were in progress from that
    /// address.
    pub refused_handshakes_per_address: u64,
    /// Connections accepted that have not completed their upgrade or ended yet.
    pub handshakes_in_progress: u64,
    /// Bytes buffered now across all sockets (incomplete inbound messages, queued frames).
    pub buffered_bytes: u64,
    /// The most bytes ever buffered at once; never above the budget.
    pub buffered_bytes_peak: u64,
    /// The buffer budget (`buffer_budget`).
    pub buffer_budget: u64,
    /// Sockets closed by the client (close frame).
    pub closed_by_client: u64,
    /// Sockets whose TCP connection dropped without a close frame.
    pub dropped: u64,
    /// Sockets closed for a missed heartbeat.
    pub heartbeat_timeouts: u64,
    /// Sockets closed for a protocol error (1002, 1007, 1009).
    pub protocol_errors: u64,
    /// Sockets closed by the server side ([`crate::SocketHandle::close`]).
    pub closed_by_server: u64,
    /// Sockets closed by shutdown (1001).
    pub closed_by_shutdown: u64,
    /// Sockets closed as slow consumers (queue full or writes stalled).
    pub slow_consumers: u64,
    /// Sockets ended by an I/O error.
    pub io_errors: u64,
    /// Sockets closed to keep the buffered bytes within the budget.
    pub over_budget: u64,
}

impl TransportStats {
    pub(crate) fn closed(&self, reason: &CloseReason) {
        let i = match reason {
            CloseReason::Client { .. } => 0,
            CloseReason::Dropped => 1,
            CloseReason::HeartbeatTimeout => 2,
            CloseReason::Protocol { .. } => 3,
            CloseReason::Server { .. } => 4,
            CloseReason::Shutdown => 5,
            CloseReason::SlowConsumer => 6,
            CloseReason::Io(_) => 7,
            CloseReason::OverBudget => 8,
        };
        self.closed[i].fetch_add(1, Relaxed);
    }

    /// The counters now.
    pub fn snapshot(&self) -> TransportCounters {
        let c = |i: usize| self.closed[i].load(Relaxed);
        TransportCounters {
            sockets_open: self.sockets_open.load(Relaxed),
            sockets_opened: self.sockets_opened.load(Relaxed),
            refused_origin: self.refused_origin.load(Relaxed),
            refused_capacity: self.refused_capacity.load(Relaxed),
            refused_by_service: self.refused_by_service.load(Relaxed),
            refused_head_size: self.refused_head_size.load(Relaxed),
            refused_handshakes: self.refused_handshakes.load(Relaxed),
            refused_handshakes_per_address: self.refused_handshakes_per_address.load(Relaxed),
            handshakes_in_progress: self.handshakes_in_progress.load(Relaxed),
            buffered_bytes: self.budget.used() as u64,
            buffered_bytes_peak: self.budget.peak() as u64,
            buffer_budget: self.budget.limit() as u64,
            closed_by_client: c(0),
            dropped: c(1),
            heartbeat_timeouts: c(2),
            protocol_errors: c(3),
            closed_by_server: c(4),
            closed_by_shutdown: c(5),
            slow_consumers: c(6),
            io_errors: c(7),
            over_budget: c(8),
        }
    }
}
