//! What the SSE transport counts, in the shape every transport reports.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

use switchboard_core::{CloseReason, TransportCounters};

#[derive(Debug, Default)]
pub(crate) struct SseStats {
    pub(crate) sessions_open: AtomicU64,
    pub(crate) sessions_opened: AtomicU64,
    pub(crate) refused_origin: AtomicU64,
    pub(crate) refused_capacity: AtomicU64,
    pub(crate) refused_by_service: AtomicU64,
    buffered: AtomicI64,
    buffered_peak: AtomicI64,
    closed: [AtomicU64; 6],
}

impl SseStats {
    pub(crate) fn buffered(&self, delta: isize) {
        let now = self.buffered.fetch_add(delta as i64, Relaxed) + delta as i64;
        self.buffered_peak.fetch_max(now, Relaxed);
    }

    pub(crate) fn closed(&self, reason: &CloseReason) {
        let i = match reason {
            CloseReason::Client { .. } | CloseReason::Dropped => 0,
            CloseReason::Protocol { .. } => 1,
            CloseReason::Server { .. } => 2,
            CloseReason::Shutdown => 3,
            CloseReason::SlowConsumer => 4,
            _ => 5,
        };
        self.closed[i].fetch_add(1, Relaxed);
    }

    pub(crate) fn snapshot(&self) -> TransportCounters {
        let c = |i: usize| self.closed[i].load(Relaxed);
        let mut counters = TransportCounters::default();
        counters.sockets_open = self.sessions_open.load(Relaxed);
        counters.sockets_opened = self.sessions_opened.load(Relaxed);
        counters.refused_origin = self.refused_origin.load(Relaxed);
        counters.refused_capacity = self.refused_capacity.load(Relaxed);
        counters.refused_by_service = self.refused_by_service.load(Relaxed);
        counters.buffered_bytes = self.buffered.load(Relaxed).max(0) as u64;
        counters.buffered_bytes_peak = self.buffered_peak.load(Relaxed).max(0) as u64;
        counters.dropped = c(0);
        counters.protocol_errors = c(1);
        counters.closed_by_server = c(2);
        counters.closed_by_shutdown = c(3);
        counters.slow_consumers = c(4);
        counters.io_errors = c(5);
        counters
    }
}
