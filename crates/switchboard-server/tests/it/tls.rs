//! `wss://` and HTTPS from the real binary: a client that trusts the CA connects, one that
//! does not is refused; the API over HTTPS; a reload (SIGHUP, or the files changing) serves
//! the new certificate to new connections while open sockets stay; and the same across two
//! nodes on NATS.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use switchboard_test_support::nats::NatsServer;
use switchboard_test_support::tls::{connect_wss, https_json, TestCa, Wss};
use switchboard_test_support::websocket::recv_within;
use switchboard_test_support::{hooks_yaml, http_json};

const API_KEY: &str = "tls-api-key-0123456789";

/// A `switchboard serve` with TLS; killed by PID when dropped.
struct Node {
    child: Child,
    addr: SocketAddr,
    api: SocketAddr,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A node serving `dir/server.{crt,key}`, with the API (HTTPS), `tls` lines (indented by
/// four spaces) and `extra` lines (indented by two, under `gateway`).
fn node(dir: &Path, name: &str, tls: &str, extra: &str) -> Node {
    let config = dir.join(format!("{name}.yaml"));
    let yaml = format!(
        "{}  tls:\n    cert_file: {:?}\n    key_file: {:?}\n{tls}  api:\n    listen: 127.0.0.1:0\n{extra}",
        hooks_yaml(),
        dir.join("server.crt"),
        dir.join("server.key"),
    );
    std::fs::write(&config, yaml).unwrap();
    let serve = crate::serve_config(&config, API_KEY);
    let (child, addr, api) =
        crate::spawn_serve_printing(serve, Some("switchboard: api on https://"));
    Node {
        child,
        addr,
        api: api.unwrap(),
    }
}

async fn wss(node: &Node, user: &str, ca: &TestCa) -> Result<(Wss, Vec<u8>), String> {
    connect_wss(node.addr, "/connect", user, None, ca.client_config()).await
}

async fn api_send(node: &Node, ca: &TestCa, user: &str, payload: Value) -> Value {
    let body = json!({"username": user, "type": "note", "payload": payload});
    let (status, answer) = https_json(
        node.api,
        ca.client_config(),
        "POST",
        "/api/send",
        Some(API_KEY),
        Some(&body),
    )
    .await
    .expect("the API over HTTPS");
    assert_eq!(status, 200, "{answer}");
    answer
}

/// Waits until the API (across nodes) lists a connection of `user`: a socket is reachable
/// once its node has registered it, a moment after its upgrade.
async fn wait_registered(node: &Node, ca: &TestCa, user: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let target = format!("/api/connections?username={user}");
    loop {
        let (_, body) = https_json(
            node.api,
            ca.client_config(),
            "GET",
            &target,
            Some(API_KEY),
            None,
        )
        .await
        .expect("the API over HTTPS");
        if body["connections"]
            .as_array()
            .is_some_and(|c| !c.is_empty())
        {
            return;
        }
        assert!(Instant::now() < deadline, "{user} never registered: {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn recv(ws: &mut Wss) -> Value {
    recv_within(ws, Duration::from_secs(10)).await
}

/// Connects until the node shows a certificate other than `old` (a reload is seen by new
/// connections once it has happened), within 10 s; returns the new one's socket.
async fn until_new_certificate(node: &Node, ca: &TestCa, user: &str, old: &[u8]) -> Wss {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok((ws, leaf)) = wss(node, user, ca).await {
            assert_ne!(
                leaf, old,
                "trusted by the new CA, so not the old certificate"
            );
            return ws;
        }
        assert!(
            Instant::now() < deadline,
            "the new certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_and_the_api_over_https_then_a_sighup_reload_keeps_open_sockets() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    ca.write_server_files(dir.path(), "server");
    // The files are looked at only on SIGHUP.
    let node = node(dir.path(), "one", "    reload_interval: 0s\n", "");

    let (mut alex, old_leaf) = wss(&node, "alex", &ca).await.expect("a trusting client");
    wait_registered(&node, &ca, "alex").await;
    let answer = api_send(&node, &ca, "alex", json!(1)).await;
    assert_eq!(answer["sockets_on_this_node"], 1, "{answer}");
    assert_eq!(recv(&mut alex).await, json!({"type": "note", "payload": 1}));

    // Refused: a client that trusts another CA, plain WebSocket, plain HTTP to the API.
    let stranger = TestCa::new();
    let refused = wss(&node, "eve", &stranger).await.unwrap_err();
    assert!(refused.to_lowercase().contains("certificate"), "{refused}");
    let plain = tokio_tungstenite::connect_async(format!("ws://{}/connect", node.addr)).await;
    assert!(plain.is_err(), "plain WebSocket on the TLS port");
    let (status, _) = http_json(node.api, "GET", "/api/presence", Some(API_KEY), None).await;
    assert_eq!(
        status, 0,
        "plain HTTP gets no HTTP answer from the HTTPS API"
    );

    // A new certificate from a new CA, and SIGHUP.
    let new_ca = TestCa::new();
    new_ca.write_server_files(dir.path(), "server");
    let hup = Command::new("kill")
        .args(["-HUP", &node.child.id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    let mut sam = until_new_certificate(&node, &new_ca, "sam", &old_leaf).await;
    assert!(
        wss(&node, "eve", &ca).await.is_err(),
        "the old certificate is gone"
    );

    // The socket opened before the reload is still open and still served.
    api_send(&node, &new_ca, "alex", json!(2)).await;
    assert_eq!(recv(&mut alex).await, json!({"type": "note", "payload": 2}));
    api_send(&node, &new_ca, "sam", json!(3)).await;
    assert_eq!(recv(&mut sam).await, json!({"type": "note", "payload": 3}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_on_nats_serve_wss_and_each_reloads_when_its_files_change() {
    let nats = NatsServer::start();
    let ca = TestCa::new();
    let bus = |name: &str| {
        format!(
            "  bus:\n    nats:\n      url: \"{}\"\n      node_name: \"{name}\"\n",
            nats.url()
        )
    };
    let watch = "    reload_interval: 200ms\n";
    // Each node has its own files, so that one changes and the other does not.
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    ca.write_server_files(dir_a.path(), "server");
    ca.write_server_files(dir_b.path(), "server");
    let a = node(dir_a.path(), "a", watch, &bus("a"));
    let b = node(dir_b.path(), "b", watch, &bus("b"));

    let (mut alex, old_leaf) = wss(&b, "alex", &ca).await.unwrap();
    // A call on node A reaches the socket on node B, once A sees it registered there.
    wait_registered(&a, &ca, "alex").await;
    let answer = api_send(&a, &ca, "alex", json!("hi")).await;
    assert_eq!(answer["published_to_every_node"], true, "{answer}");
    let payload = recv(&mut alex).await;
    assert_eq!(payload, json!({"type": "note", "payload": "hi"}));

    // Node B's files change: it serves the new certificate; node A keeps the old one.
    let new_ca = TestCa::new();
    new_ca.write_server_files(dir_b.path(), "server");
    let mut sam = until_new_certificate(&b, &new_ca, "sam", &old_leaf).await;
    wss(&a, "kim", &ca)
        .await
        .expect("node A still serves the old certificate");
    api_send(&a, &ca, "alex", json!("after")).await;
    assert_eq!(
        recv(&mut alex).await["payload"],
        "after",
        "open sockets stay"
    );
    api_send(&a, &ca, "sam", json!("new")).await;
    assert_eq!(recv(&mut sam).await["payload"], "new");
}
