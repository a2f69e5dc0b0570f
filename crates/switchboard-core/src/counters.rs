//! Counters every transport keeps, in one shape, so that a gateway can export and sum them.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::CloseReason;

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
    /// Connections whose TLS handshake failed or timed out (an untrusted certificate, a
    /// protocol version below the minimum, plain HTTP on a TLS port).
    pub refused_tls: u64,
    /// Connections closed on accept: `max_handshakes` were in progress.
    pub refused_handshakes: u64,
    /// Connections closed on accept: `max_handshakes_per_address` were in progress from that
    /// address.
    pub refused_handshakes_per_address: u64,
    /// Connections accepted that have not completed their upgrade or ended yet.
    pub handshakes_in_progress: u64,
    /// Bytes buffered now across all sockets (incomplete inbound messages, queued frames).
    pub buffered_bytes: u64,
    /// The most bytes ever buffered at once; at most the budget (but for a few bytes of close frames or events per socket).
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
    /// Sockets closed by the server side ([`crate::Socket::close`]).
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

impl std::ops::Add for TransportCounters {
    type Output = TransportCounters;

    /// The counters of two transports together (peaks add up: an upper bound of the joint
    /// peak).
    fn add(self, other: TransportCounters) -> TransportCounters {
        TransportCounters {
            sockets_open: self.sockets_open + other.sockets_open,
            sockets_opened: self.sockets_opened + other.sockets_opened,
            refused_origin: self.refused_origin + other.refused_origin,
            refused_capacity: self.refused_capacity + other.refused_capacity,
            refused_by_service: self.refused_by_service + other.refused_by_service,
            refused_head_size: self.refused_head_size + other.refused_head_size,
            refused_tls: self.refused_tls + other.refused_tls,
            refused_handshakes: self.refused_handshakes + other.refused_handshakes,
            refused_handshakes_per_address: self.refused_handshakes_per_address
                + other.refused_handshakes_per_address,
            handshakes_in_progress: self.handshakes_in_progress + other.handshakes_in_progress,
            buffered_bytes: self.buffered_bytes + other.buffered_bytes,
            buffered_bytes_peak: self.buffered_bytes_peak + other.buffered_bytes_peak,
            buffer_budget: self.buffer_budget + other.buffer_budget,
            closed_by_client: self.closed_by_client + other.closed_by_client,
            dropped: self.dropped + other.dropped,
            heartbeat_timeouts: self.heartbeat_timeouts + other.heartbeat_timeouts,
            protocol_errors: self.protocol_errors + other.protocol_errors,
            closed_by_server: self.closed_by_server + other.closed_by_server,
            closed_by_shutdown: self.closed_by_shutdown + other.closed_by_shutdown,
            slow_consumers: self.slow_consumers + other.slow_consumers,
            io_errors: self.io_errors + other.io_errors,
            over_budget: self.over_budget + other.over_budget,
        }
    }
}

/// Sockets ended, one counter per kind of [`CloseReason`]: what every transport counts the same
/// way, and reports in its [`TransportCounters`].
#[derive(Debug, Default)]
pub struct CloseCounts([AtomicU64; 9]);

impl CloseCounts {
    /// One more socket ended for `reason`.
    pub fn record(&self, reason: &CloseReason) {
        let slot = match reason {
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
        self.0[slot].fetch_add(1, Relaxed);
    }

    /// Writes the counts into their fields of `counters`.
    pub fn fill(&self, counters: &mut TransportCounters) {
        let c = |slot: usize| self.0[slot].load(Relaxed);
        counters.closed_by_client = c(0);
        counters.dropped = c(1);
        counters.heartbeat_timeouts = c(2);
        counters.protocol_errors = c(3);
        counters.closed_by_server = c(4);
        counters.closed_by_shutdown = c(5);
        counters.slow_consumers = c(6);
        counters.io_errors = c(7);
        counters.over_budget = c(8);
    }
}
