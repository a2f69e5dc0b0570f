//! Counters the transport keeps: plain atomics, ready for any metrics exporter.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::budget::Budget;
use switchboard_core::{CloseReason, TransportCounters};

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
            // A kind this transport does not produce.
            _ => 4,
        };
        self.closed[i].fetch_add(1, Relaxed);
    }

    /// The counters now.
    pub fn snapshot(&self) -> TransportCounters {
        let c = |i: usize| self.closed[i].load(Relaxed);
        let mut counters = TransportCounters::default();
        counters.sockets_open = self.sockets_open.load(Relaxed);
        counters.sockets_opened = self.sockets_opened.load(Relaxed);
        counters.refused_origin = self.refused_origin.load(Relaxed);
        counters.refused_capacity = self.refused_capacity.load(Relaxed);
        counters.refused_by_service = self.refused_by_service.load(Relaxed);
        counters.refused_head_size = self.refused_head_size.load(Relaxed);
        counters.refused_handshakes = self.refused_handshakes.load(Relaxed);
        counters.refused_handshakes_per_address = self.refused_handshakes_per_address.load(Relaxed);
        counters.handshakes_in_progress = self.handshakes_in_progress.load(Relaxed);
        counters.buffered_bytes = self.budget.used() as u64;
        counters.buffered_bytes_peak = self.budget.peak() as u64;
        counters.buffer_budget = self.budget.limit() as u64;
        counters.closed_by_client = c(0);
        counters.dropped = c(1);
        counters.heartbeat_timeouts = c(2);
        counters.protocol_errors = c(3);
        counters.closed_by_server = c(4);
        counters.closed_by_shutdown = c(5);
        counters.slow_consumers = c(6);
        counters.io_errors = c(7);
        counters.over_budget = c(8);
        counters
    }
}
