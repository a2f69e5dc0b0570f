//! What the SSE transport counts, in the shape every transport reports.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};

use switchboard_core::{CloseCounts, CloseReason, TransportCounters};

#[derive(Debug, Default)]
pub(crate) struct SseStats {
    pub(crate) sessions_open: AtomicU64,
    pub(crate) sessions_opened: AtomicU64,
    pub(crate) refused_origin: AtomicU64,
    pub(crate) refused_capacity: AtomicU64,
    pub(crate) refused_by_service: AtomicU64,
    /// Bytes queued across all sessions, never above `budget`.
    buffered: AtomicUsize,
    buffered_peak: AtomicUsize,
    budget: AtomicUsize,
    closed: CloseCounts,
}

impl SseStats {
    pub(crate) fn set_budget(&self, budget: usize) {
        self.budget.store(budget, Relaxed);
    }

    pub(crate) fn budget(&self) -> usize {
        self.budget.load(Relaxed)
    }

    /// Counts `n` more bytes if the budget has room for them.
    pub(crate) fn try_reserve(&self, n: usize) -> bool {
        let budget = self.budget();
        let reserved = self.buffered.fetch_update(Relaxed, Relaxed, |used| {
            used.checked_add(n).filter(|total| *total <= budget)
        });
        match reserved {
            Ok(before) => {
                self.buffered_peak.fetch_max(before + n, Relaxed);
                true
            }
            Err(_) => false,
        }
    }

    /// Counts `n` bytes whatever the budget (a close event, the first event: a few bytes).
    pub(crate) fn reserve_always(&self, n: usize) {
        let before = self.buffered.fetch_add(n, Relaxed);
        self.buffered_peak.fetch_max(before + n, Relaxed);
    }

    pub(crate) fn release(&self, n: usize) {
        self.buffered.fetch_sub(n, Relaxed);
    }

    pub(crate) fn closed(&self, reason: &CloseReason) {
        self.closed.record(reason);
    }

    pub(crate) fn snapshot(&self) -> TransportCounters {
        let mut counters = TransportCounters::default();
        counters.sockets_open = self.sessions_open.load(Relaxed);
        counters.sockets_opened = self.sessions_opened.load(Relaxed);
        counters.refused_origin = self.refused_origin.load(Relaxed);
        counters.refused_capacity = self.refused_capacity.load(Relaxed);
        counters.refused_by_service = self.refused_by_service.load(Relaxed);
        counters.buffered_bytes = self.buffered.load(Relaxed) as u64;
        counters.buffered_bytes_peak = self.buffered_peak.load(Relaxed) as u64;
        counters.buffer_budget = self.budget() as u64;
        self.closed.fill(&mut counters);
        counters
    }
}
