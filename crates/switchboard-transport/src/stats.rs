//! Counters the transport keeps: plain atomics, ready for any metrics exporter.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::budget::Budget;
use switchboard_core::{CloseCounts, CloseReason, TransportCounters};

/// Live counters of one [`crate::Server`]. Read them with [`TransportStats::snapshot`].
#[derive(Debug, Default)]
pub struct TransportStats {
    pub(crate) sockets_open: AtomicU64,
    pub(crate) sockets_opened: AtomicU64,
    pub(crate) refused_origin: AtomicU64,
    pub(crate) refused_capacity: AtomicU64,
    pub(crate) refused_by_service: AtomicU64,
    pub(crate) refused_head_size: AtomicU64,
    pub(crate) refused_tls: AtomicU64,
    pub(crate) refused_handshakes: AtomicU64,
    pub(crate) refused_handshakes_per_address: AtomicU64,
    pub(crate) handshakes_in_progress: AtomicU64,
    /// Buffered bytes across all sockets, against `buffer_budget`.
    pub(crate) budget: Budget,
    closed: CloseCounts,
}

impl TransportStats {
    pub(crate) fn closed(&self, reason: &CloseReason) {
        self.closed.record(reason);
    }

    /// The counters now.
    pub fn snapshot(&self) -> TransportCounters {
        let mut counters = TransportCounters::default();
        counters.sockets_open = self.sockets_open.load(Relaxed);
        counters.sockets_opened = self.sockets_opened.load(Relaxed);
        counters.refused_origin = self.refused_origin.load(Relaxed);
        counters.refused_capacity = self.refused_capacity.load(Relaxed);
        counters.refused_by_service = self.refused_by_service.load(Relaxed);
        counters.refused_head_size = self.refused_head_size.load(Relaxed);
        counters.refused_tls = self.refused_tls.load(Relaxed);
        counters.refused_handshakes = self.refused_handshakes.load(Relaxed);
        counters.refused_handshakes_per_address = self.refused_handshakes_per_address.load(Relaxed);
        counters.handshakes_in_progress = self.handshakes_in_progress.load(Relaxed);
        counters.buffered_bytes = self.budget.used() as u64;
        counters.buffered_bytes_peak = self.budget.peak() as u64;
        counters.buffer_budget = self.budget.limit() as u64;
        self.closed.fill(&mut counters);
        counters
    }
}
