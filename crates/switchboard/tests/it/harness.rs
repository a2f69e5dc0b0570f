//! The WebSocket side of the suite's harness: a gateway on 127.0.0.1:0 and real WebSocket
//! clients, for the tests that are about WebSocket itself. What every suite shares (tokens,
//! configs, recorders) is `switchboard-test-support`'s, re-exported here.

use switchboard::{Container, Running};
pub(crate) use switchboard_test_support::websocket::{close_code as close_code_of, recv, send, Ws};
pub(crate) use switchboard_test_support::{
    container, next_published, now, recorder, spec_config, token, token_with, SECRET, SECRET_ENV,
};
use switchboard_test_support::{request, Kind};

/// Starts `container` on 127.0.0.1:0.
pub(crate) async fn start(container: Container) -> Running {
    switchboard_test_support::start(Kind::WebSocket, container)
        .await
        .running
}

/// A WebSocket client of `running` as `user`, in `namespace`.
pub(crate) async fn connect(running: &Running, user: &str, namespace: Option<&str>) -> Ws {
    let addr = running.local_addr().unwrap();
    switchboard_test_support::websocket::connect(addr, user, namespace).await
}

/// Connects with `token` as the `ID_TOKEN` cookie.
pub(crate) async fn connect_with_token(running: &Running, token: &str) -> Ws {
    let addr = running.local_addr().unwrap();
    switchboard_test_support::websocket::connect_request(addr, request(token, None))
        .await
        .unwrap()
}
