//! What the gateway counts: refusals, bad input, rate limiting, failures. Plain atomics,
//! ready for a metrics exporter.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use switchboard_core::TransportCounters;

#[derive(Debug, Default)]
pub(crate) struct GatewayStats {
    pub(crate) refused_unauthorized: AtomicU64,
    pub(crate) refused_no_keys: AtomicU64,
    pub(crate) refused_namespace: AtomicU64,
    pub(crate) refused_namespace_repeated: AtomicU64,
    pub(crate) refused_namespace_not_utf8: AtomicU64,
    pub(crate) refused_namespace_too_long: AtomicU64,
    pub(crate) refused_user_limit: AtomicU64,
    pub(crate) messages_in: AtomicU64,
    pub(crate) bad_messages: AtomicU64,
    pub(crate) rate_limited: AtomicU64,
    pub(crate) rate_limit_closes: AtomicU64,
    pub(crate) publish_failures: AtomicU64,
    pub(crate) handler_failures: AtomicU64,
    pub(crate) connect_failures: AtomicU64,
    pub(crate) gate_timeouts: AtomicU64,
    pub(crate) token_expiry_closes: AtomicU64,
    pub(crate) refreshes: AtomicU64,
    pub(crate) refreshes_refused: AtomicU64,
    pub(crate) refresh_mismatches: AtomicU64,
}

impl GatewayStats {
    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }
}

/// A copy of every counter at one moment: [`crate::Running::stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// The transport's counters: sockets open, refusals by origin and capacity, closes by
    /// reason (slow consumers, heartbeat timeouts, protocol errors, ...).
    pub transport: TransportCounters,
    /// Upgrades refused with 401 (no token, bad token, missing claim).
    pub refused_unauthorized: u64,
    /// Upgrades refused with 503 because no signing keys have been fetched yet
    /// (`auth.jwks_url`).
    pub refused_no_keys: u64,
    /// Upgrades refused with 403 for a namespace the token does not list.
    pub refused_namespace: u64,
    /// Upgrades refused with 400 for giving `namespace` more than once in the query.
    pub refused_namespace_repeated: u64,
    /// Upgrades refused with 400 for a `namespace` that is not UTF-8 once percent-decoded
    /// (`?namespace=%ff`).
    pub refused_namespace_not_utf8: u64,
    /// Upgrades refused with 400 for a `namespace` longer than
    /// [`MAX_NAMESPACE_BYTES`](crate::MAX_NAMESPACE_BYTES) once decoded.
    pub refused_namespace_too_long: u64,
    /// Upgrades refused with 429 for `max_sockets_per_user`.
    pub refused_user_limit: u64,
    /// Well-formed messages received and published.
    pub messages_in: u64,
    /// Messages refused with an error frame (not JSON, no string `type`, binary).
    pub bad_messages: u64,
    /// Messages refused by the rate limit.
    pub rate_limited: u64,
    /// Sockets closed for going on over the rate limit.
    pub rate_limit_closes: u64,
    /// Publishes the bus refused (the sender got an error frame).
    pub publish_failures: u64,
    /// Handlers that returned an error or panicked.
    pub handler_failures: u64,
    /// Sockets closed by their connect handler (`fail`, error or panic).
    pub connect_failures: u64,
    /// Sockets closed because, with the connect gate on, no connect handler answered in time.
    pub gate_timeouts: u64,
    /// Sockets closed because their token expired (4001).
    pub token_expiry_closes: u64,
    /// In-band token refreshes accepted.
    pub refreshes: u64,
    /// In-band token refreshes refused (invalid token, no token); the socket stays open.
    pub refreshes_refused: u64,
    /// Sockets closed because a refresh brought a token for another user or namespace.
    pub refresh_mismatches: u64,
}

impl GatewayStats {
    pub(crate) fn snapshot(&self, transport: TransportCounters) -> Stats {
        let l = |c: &AtomicU64| c.load(Relaxed);
        Stats {
            transport,
            refused_unauthorized: l(&self.refused_unauthorized),
            refused_no_keys: l(&self.refused_no_keys),
            refused_namespace: l(&self.refused_namespace),
            refused_namespace_repeated: l(&self.refused_namespace_repeated),
            refused_namespace_not_utf8: l(&self.refused_namespace_not_utf8),
            refused_namespace_too_long: l(&self.refused_namespace_too_long),
            refused_user_limit: l(&self.refused_user_limit),
            messages_in: l(&self.messages_in),
            bad_messages: l(&self.bad_messages),
            rate_limited: l(&self.rate_limited),
            rate_limit_closes: l(&self.rate_limit_closes),
            publish_failures: l(&self.publish_failures),
            handler_failures: l(&self.handler_failures),
            connect_failures: l(&self.connect_failures),
            gate_timeouts: l(&self.gate_timeouts),
            token_expiry_closes: l(&self.token_expiry_closes),
            refreshes: l(&self.refreshes),
            refreshes_refused: l(&self.refreshes_refused),
            refresh_mismatches: l(&self.refresh_mismatches),
        }
    }
}
