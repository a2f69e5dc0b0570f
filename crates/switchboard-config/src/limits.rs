//! The `gateway.limits` section: admission limits and abuse controls.

use std::time::Duration;

use serde::Deserialize;

use crate::de::{de_byte_size, de_duration, de_opt_positive, de_positive};

/// The `gateway.limits` section (extension): what one client or one user may take.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Limits {
    /// Most sockets open at once; more get HTTP 503 before the upgrade. Default (`None`): the
    /// gateway derives one from the process's open-file limit, less a reserve (no limit where
    /// that cannot be read, or is unlimited).
    #[serde(default, deserialize_with = "de_opt_positive")]
    pub max_sockets: Option<usize>,
    /// Most sockets one username may hold at once; more get HTTP 429. Default: no limit.
    #[serde(default, deserialize_with = "de_opt_positive")]
    pub max_sockets_per_user: Option<usize>,
    /// How long a connection may take from being accepted to completing its upgrade.
    /// Default 10 s; at least 100 ms.
    #[serde(
        default = "default_handshake_timeout",
        deserialize_with = "de_handshake_timeout"
    )]
    pub handshake_timeout: Duration,
    /// Connections that have not completed their upgrade, at most; more are closed as soon
    /// as they are accepted. Default 1,024.
    #[serde(default = "default_max_handshakes", deserialize_with = "de_positive")]
    pub max_handshakes: usize,
    /// The same, per client (an IPv4 address, an IPv6 /64). Default 64.
    #[serde(
        default = "default_max_handshakes_per_address",
        deserialize_with = "de_positive"
    )]
    pub max_handshakes_per_address: usize,
    /// Largest upgrade request head (request line and headers); larger gets `431`.
    /// Default 32 KiB.
    #[serde(
        default = "default_max_request_head",
        deserialize_with = "de_byte_size"
    )]
    pub max_request_head: usize,
    /// Bytes buffered across all sockets, at most: incomplete inbound messages and queued
    /// outbound frames. At the budget the sockets holding the most are closed (1013).
    /// Default 256 MiB.
    #[serde(default = "default_buffer_budget", deserialize_with = "de_byte_size")]
    pub buffer_budget: usize,
    /// Sustained inbound messages per second per socket; over it, messages are refused with
    /// an error frame, and a socket that keeps going is closed (1008). Default: off.
    #[serde(default, deserialize_with = "de_opt_positive")]
    pub messages_per_second: Option<u32>,
    /// Messages a socket may send in a burst above the rate. Default: twice the rate.
    #[serde(default, deserialize_with = "de_opt_positive")]
    pub message_burst: Option<u32>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_sockets: None,
            max_sockets_per_user: None,
            handshake_timeout: default_handshake_timeout(),
            max_handshakes: default_max_handshakes(),
            max_handshakes_per_address: default_max_handshakes_per_address(),
            max_request_head: default_max_request_head(),
            buffer_budget: default_buffer_budget(),
            messages_per_second: None,
            message_burst: None,
        }
    }
}

/// Under 100 ms, a client whose request comes in more than one segment, or over a link with
/// any delay, could never be upgraded (`0s` closed every such connection at once).
fn de_handshake_timeout<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let timeout = de_duration(d)?;
    if timeout < Duration::from_millis(100) {
        return Err(serde::de::Error::custom(
            "handshake_timeout must be at least 100ms",
        ));
    }
    Ok(timeout)
}

fn default_handshake_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_max_handshakes() -> usize {
    1024
}
fn default_max_handshakes_per_address() -> usize {
    64
}
fn default_max_request_head() -> usize {
    32 << 10
}
fn default_buffer_budget() -> usize {
    256 << 20
}
