//! The suite's own support: a gateway on a NATS bus and its config. The nats-server fixture,
//! the tokens and the WebSocket client are `switchboard-test-support`'s.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use switchboard::{Config, Running};
use switchboard_bus_nats::NatsBus;
pub(crate) use switchboard_test_support::nats::{NatsCluster, NatsServer};
pub(crate) use switchboard_test_support::websocket::{assert_silent, connect, send, Ws};

/// How long a frame or a condition may take over NATS (reconnects included).
pub(crate) const NATS_WAIT: Duration = Duration::from_secs(10);

pub(crate) struct Gateway {
    pub(crate) running: Running,
    pub(crate) bus: Arc<NatsBus>,
}

/// The spec's hooks and nothing else (the test secret is given to the container directly).
pub(crate) fn config() -> Config {
    Config::from_yaml_str(&switchboard_test_support::hooks_yaml()).unwrap()
}

/// The next text frame as JSON, within [`NATS_WAIT`].
pub(crate) async fn recv(ws: &mut Ws) -> Value {
    switchboard_test_support::websocket::recv_within(ws, NATS_WAIT).await
}

/// Waits (up to 15 s) until `condition` holds.
pub(crate) async fn wait_until(condition: impl FnMut() -> bool, what: &str) {
    switchboard_test_support::wait_until(what, Duration::from_secs(15), condition).await
}
