//! Scale-out end to end: two `switchboard serve` processes on one nats-server, handlers in
//! other processes (a plain NATS client, and the Python example).

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};
use switchboard_test_support::nats::NatsServer;
use switchboard_test_support::websocket::{assert_silent, connect, recv_within, send, Ws};
use switchboard_test_support::{hooks_yaml, wait_until, SECRET, SECRET_ENV};

/// How long the nodes' presence questions wait for the other node once one has answered:
/// the default 50 ms is shorter than the stalls a busy test machine gives one process.
const GATHER_QUIET: &str = "500ms";

/// A gateway node: the real binary with a NATS bus; killed by PID when dropped.
pub(crate) struct Node {
    child: Child,
    pub(crate) addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn node(nats: &NatsServer, name: &str) -> Node {
    node_with(nats, name, "")
}

/// A node whose `gateway.bus.nats` section also has `extra` (lines indented by six spaces).
fn node_with(nats: &NatsServer, name: &str, extra: &str) -> Node {
    node_with_env(nats, name, extra, &[])
}

/// [`node_with`], with `env` set for the process (`extra` may also close the `nats` section
/// and add `gateway` sections, indented by two spaces).
pub(crate) fn node_with_env(
    nats: &NatsServer,
    name: &str,
    extra: &str,
    env: &[(&str, &str)],
) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("socket.yaml");
    std::fs::write(
        &config,
        format!(
            r#"{}  bus:
    nats:
      url: "{}"
      node_name: "{name}"
      reply_timeout: 3s
      gather_quiet: {GATHER_QUIET}
{extra}"#,
            hooks_yaml(),
            nats.url()
        ),
    )
    .unwrap();
    let mut serve = Command::new(env!("CARGO_BIN_EXE_switchboard"));
    serve
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .env(SECRET_ENV, SECRET)
        .envs(env.iter().copied());
    let (child, addr) = crate::spawn_serve(serve);
    Node {
        child,
        addr,
        _dir: dir,
    }
}

/// The next text frame as JSON: a node's round trips over NATS may take a while.
async fn recv(ws: &mut Ws) -> Value {
    recv_within(ws, Duration::from_secs(10)).await
}

/// Waits for `n` sockets' `onconnect` on `connections` (answering each, as a handler would): a
/// socket publishes it once its node has registered it, so from then on it can be reached.
async fn registered(
    client: &async_nats::Client,
    connections: &mut async_nats::Subscriber,
    n: usize,
) {
    for _ in 0..n {
        let event = tokio::time::timeout(Duration::from_secs(10), connections.next())
            .await
            .expect("every socket's onconnect within 10 s")
            .unwrap();
        if let Some(reply) = event.reply {
            client.publish(reply, "{}".into()).await.unwrap();
        }
    }
}

async fn publish(client: &async_nats::Client, subject: &str, body: Value) {
    client
        .publish(subject.to_string(), body.to_string().into())
        .await
        .unwrap();
    client.flush().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_and_broadcast_from_plain_nats_reach_each_socket_once_across_nodes() {
    let nats = NatsServer::start();
    let (a, b) = (node(&nats, "node-a"), node(&nats, "node-b"));
    let client = async_nats::connect(nats.url()).await.unwrap();
    // A socket publishes `onconnect` once it is registered on its node: seeing all five
    // (and answering them, as a handler would) means every one can be reached.
    let mut connections = client.subscribe("socket:connection").await.unwrap();
    client.flush().await.unwrap();
    let mut alex_a = connect(a.addr, "alex", Some("acme")).await;
    let mut alex_b = connect(b.addr, "alex", Some("acme")).await;
    let mut alex_other = connect(b.addr, "alex", Some("globex")).await;
    let mut kim_b = connect(b.addr, "kim", Some("globex")).await;
    let mut sam_a = connect(a.addr, "sam", Some("acme")).await;
    registered(&client, &mut connections, 5).await;

    // a plain NATS client sends to alex in acme: both of alex's acme sockets, once each
    publish(
        &client,
        "socket:send",
        json!({"username": "alex", "namespace": "acme", "type": "note", "payload": 1}),
    )
    .await;
    for ws in [&mut alex_a, &mut alex_b] {
        assert_eq!(recv(ws).await, json!({"type": "note", "payload": 1}));
    }
    // a broadcast to acme: every acme socket on both nodes, once each; globex nothing
    publish(
        &client,
        "socket:broadcast",
        json!({"namespace": "acme", "type": "news", "payload": 2}),
    )
    .await;
    for ws in [&mut alex_a, &mut alex_b, &mut sam_a] {
        assert_eq!(recv(ws).await, json!({"type": "news", "payload": 2}));
    }
    for ws in [
        &mut alex_a,
        &mut alex_b,
        &mut sam_a,
        &mut alex_other,
        &mut kim_b,
    ] {
        assert_silent(ws, 300).await;
    }
    // a broadcast to everyone
    publish(
        &client,
        "socket:broadcast",
        json!({"type": "all", "payload": 3}),
    )
    .await;
    for ws in [
        &mut alex_a,
        &mut alex_b,
        &mut sam_a,
        &mut alex_other,
        &mut kim_b,
    ] {
        assert_eq!(recv(ws).await, json!({"type": "all", "payload": 3}));
        assert_silent(ws, 100).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnect_published_on_nats_closes_the_users_sockets_on_every_node_once() {
    let nats = NatsServer::start();
    let a = node(&nats, "a");
    let b = node(&nats, "b");
    let outside = async_nats::connect(nats.url()).await.unwrap();
    let mut closes = outside.subscribe("socket:close").await.unwrap();
    let mut connections = outside.subscribe("socket:connection").await.unwrap();
    outside.flush().await.unwrap();
    let mut alex_a = connect(a.addr, "alex", Some("acme")).await;
    let mut alex_b = connect(b.addr, "alex", Some("acme")).await;
    let mut sam_b = connect(b.addr, "sam", Some("acme")).await;
    // Every node's registry has its sockets before the disconnect goes out: a socket
    // publishes `onconnect` once it is registered.
    registered(&outside, &mut connections, 3).await;
    publish(
        &outside,
        "socket:disconnect",
        json!({"username": "alex", "code": 4003, "reason": "banned"}),
    )
    .await;
    for ws in [&mut alex_a, &mut alex_b] {
        assert_eq!(close_of(ws).await, (4003, "banned".to_string()));
    }
    for _ in 0..2 {
        let event = tokio::time::timeout(Duration::from_secs(10), closes.next())
            .await
            .expect("an onclose within 10 s")
            .unwrap();
        let event: Value = serde_json::from_slice(&event.payload).unwrap();
        let data = &event["data"];
        assert_eq!(data["username"], "alex", "{event}");
        assert_eq!(data["reason"]["code"], 4003, "{event}");
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(500), closes.next())
            .await
            .is_err(),
        "one onclose per socket"
    );
    // sam, on the same node as one of them, is untouched.
    publish(
        &outside,
        "socket:send",
        json!({"username": "sam", "type": "t"}),
    )
    .await;
    assert_eq!(recv(&mut sam_b).await["type"], "t");
}

/// A `send` published right before a `disconnect` reaches the socket before its close (the
/// node handled each subscription in a task of its own, and the `disconnect` often overtook:
/// 33 sockets of 40 lost the message), and a reply subject that is not an inbox gets nothing
/// (a publisher allowed only `send` could name an event topic and make every node publish
/// there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_before_a_disconnect_arrives_first_and_replies_go_only_to_inboxes() {
    let nats = NatsServer::start();
    let a = node(&nats, "a");
    let outside = async_nats::connect(nats.url()).await.unwrap();
    let mut connections = outside.subscribe("socket:connection").await.unwrap();
    let mut forged = outside.subscribe("chat:say").await.unwrap();
    outside.flush().await.unwrap();
    let mut sockets = Vec::new();
    for i in 0..40 {
        sockets.push(connect(a.addr, &format!("ban{i}"), None).await);
    }
    registered(&outside, &mut connections, 40).await;
    for i in 0..40 {
        let user = format!("ban{i}");
        let send = json!({"username": user, "type": "notice", "payload": i});
        outside
            .publish("socket:send", send.to_string().into())
            .await
            .unwrap();
        let bye = json!({"username": user, "code": 4003, "reason": "banned"});
        outside
            .publish("socket:disconnect", bye.to_string().into())
            .await
            .unwrap();
    }
    outside.flush().await.unwrap();
    for (i, ws) in sockets.iter_mut().enumerate() {
        let first = recv(ws).await;
        assert_eq!(first["type"], "notice", "socket {i}: {first}");
        assert_eq!(close_of(ws).await.0, 4003, "socket {i}");
    }
    // A reply subject that names an event topic: no answer there.
    outside
        .publish_with_reply("socket:send", "chat:say", "{\"x\":1}".into())
        .await
        .unwrap();
    outside.flush().await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(500), forged.next())
            .await
            .is_err(),
        "a node answered on an application subject"
    );
}

/// Reads until the close frame: its code and reason.
async fn close_of(ws: &mut Ws) -> (u16, String) {
    use tokio_tungstenite::tungstenite::Message as WsMessage;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("a close within 10 s")
        {
            Some(Ok(WsMessage::Close(Some(frame)))) => {
                return (frame.code.into(), frame.reason.to_string())
            }
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_on_node_b_is_answered_by_an_outside_handler() {
    let nats = NatsServer::start();
    let handler = async_nats::connect(nats.url()).await.unwrap();
    let mut events = handler
        .queue_subscribe("socket:connection", "switchboard-handlers".into())
        .await
        .unwrap();
    handler.flush().await.unwrap();
    let answering = handler.clone();
    tokio::spawn(async move {
        while let Some(event) = events.next().await {
            let envelope: Value = serde_json::from_slice(&event.payload).unwrap();
            let answer = json!({"reply": {
                "welcome": envelope["context"]["username"],
                "node_saw": envelope["topic"],
            }});
            answering
                .publish(event.reply.unwrap(), answer.to_string().into())
                .await
                .unwrap();
        }
    });
    let (_a, b) = (node(&nats, "node-a"), node(&nats, "node-b"));
    let mut ws = connect(b.addr, "alex", Some("acme")).await;
    assert_eq!(
        recv(&mut ws).await,
        json!({"type": "onconnect", "payload": {"welcome": "alex", "node_saw": "socket:connection"}})
    );
}

/// The Python example handler, started by PID and killed on drop.
struct Python(Child);

impl Drop for Python {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn python_handler(nats: &NatsServer) -> Python {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/python/handler.py"
    );
    let mut child = Command::new("python3")
        .args([script, &nats.url()])
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 with nats-py (cargo xtask deps installs it)");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    match lines.next() {
        Some(Ok(line)) if line == "ready" => {}
        other => panic!("python handler did not start: {other:?} (is nats-py installed?)"),
    }
    Python(child)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_example_handles_events_from_both_nodes() {
    let nats = NatsServer::start();
    let _python = python_handler(&nats);
    let (a, b) = (node(&nats, "node-a"), node(&nats, "node-b"));
    let mut on_b = connect(b.addr, "alex", Some("acme")).await;
    assert_eq!(
        recv(&mut on_b).await,
        json!({"type": "onconnect", "payload": {"handled_by": "python", "username": "alex", "namespace": "acme"}})
    );
    let mut on_a = connect(a.addr, "alex", Some("acme")).await;
    assert_eq!(recv(&mut on_a).await["payload"]["handled_by"], "python");
    // a reply from Python comes back to the socket that asked
    send(&mut on_a, json!({"type": "hello", "payload": 1})).await;
    assert_eq!(
        recv(&mut on_a).await,
        json!({"type": "socket:generalMessage", "payload": {"echo": {"type": "hello", "payload": 1}}})
    );
    // fail becomes an error frame
    send(&mut on_a, json!({"type": "python.fail"})).await;
    assert_eq!(
        recv(&mut on_a).await,
        json!({"type": "error", "payload": {"message": "python says no"}})
    );
    // Python publishes to the send topic: alex's sockets on both nodes get it
    send(&mut on_b, json!({"type": "python.poke", "payload": "hi"})).await;
    for ws in [&mut on_a, &mut on_b] {
        assert_eq!(
            recv(ws).await,
            json!({"type": "python.poked", "payload": "hi"})
        );
    }
}

const NATS_PASSWORD_ENV: &str = "SB_IT_NATS_PASSWORD";

/// A handler process on `nats` (as user `gw`): answers connects with `{}` and reports the
/// usernames of connect and close events.
async fn event_recorder(
    nats: &NatsServer,
    password: &str,
) -> (
    tokio::sync::mpsc::UnboundedReceiver<String>,
    tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    let client = async_nats::ConnectOptions::with_user_and_password("gw".into(), password.into())
        .connect(nats.url())
        .await
        .unwrap();
    let group = "switchboard-handlers".to_string();
    let mut connects = client
        .queue_subscribe("socket:connection", group.clone())
        .await
        .unwrap();
    let mut closes = client.queue_subscribe("socket:close", group).await.unwrap();
    client.flush().await.unwrap();
    let username = |event: &async_nats::Message| {
        let envelope: Value = serde_json::from_slice(&event.payload).unwrap();
        envelope["data"]["username"].as_str().unwrap().to_string()
    };
    let (connected, connected_rx) = tokio::sync::mpsc::unbounded_channel();
    let (closed, closed_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(event) = connects.next().await {
            let _ = connected.send(username(&event));
            if let Some(reply) = event.reply {
                client.publish(reply, "{}".into()).await.unwrap();
            }
        }
    });
    tokio::spawn(async move {
        while let Some(event) = closes.next().await {
            let _ = closed.send(username(&event));
        }
    });
    (connected_rx, closed_rx)
}

/// Takes `n` names from `rx` within `secs`; panics naming how many came.
async fn take(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
    n: usize,
    secs: u64,
) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    let mut names = Vec::new();
    while names.len() < n {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(name)) => names.push(name),
            _ => panic!("{} of {n} events arrived", names.len()),
        }
    }
    names
}

/// SIGTERM to a node we started, then its exit status (within 15 s).
fn terminate(node: &mut Node) -> std::process::ExitStatus {
    let pid = node.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = node.child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "the node did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every `onclose` a node publishes while it shuts down reaches a handler before the process
/// exits, run after run. The node logs in with a password from `${VAR}` and shares its
/// `node_name` with every other run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_onclose_reaches_a_handler_when_a_node_is_stopped() {
    let password = "gw-password-0123";
    std::env::set_var(NATS_PASSWORD_ENV, password);
    let nats = NatsServer::start_with(&["--user", "gw", "--pass", password]);
    let (mut connected, mut closed) = event_recorder(&nats, password).await;
    let auth = format!("      auth: {{user: gw, password: \"${{{NATS_PASSWORD_ENV}}}\"}}\n");
    let sockets = 120;
    for run in 0..5 {
        let mut node = node_with(&nats, "gw", &auth);
        let mut readers = Vec::new();
        for i in 0..sockets {
            let mut ws = connect(node.addr, &format!("run{run}-user{i}"), None).await;
            // a client that reads, so it answers the server's close at once
            readers.push(tokio::spawn(
                async move { while ws.next().await.is_some() {} },
            ));
        }
        let opened = take(&mut connected, sockets, 15).await;
        assert!(opened.iter().all(|u| u.starts_with(&format!("run{run}-"))));

        let status = tokio::task::spawn_blocking(move || terminate(&mut node))
            .await
            .unwrap();
        assert!(status.success(), "{status:?}");
        // the process is gone: what NATS did not get by now is lost
        let names: BTreeSet<String> = take(&mut closed, sockets, 10).await.into_iter().collect();
        assert_eq!(
            names.len(),
            sockets,
            "run {run}: each socket's onclose once"
        );
        assert!(names.iter().all(|u| u.starts_with(&format!("run{run}-"))));
        for reader in readers {
            reader.await.unwrap();
        }
    }
    let no_duplicates = || closed.is_empty();
    wait_until(
        "no duplicate onclose",
        Duration::from_secs(15),
        no_duplicates,
    )
    .await;
}

/// A `serve --demo` node on NATS: the repo's `conf/socket.yaml` with a bus section.
fn demo_node(nats: &NatsServer, name: &str) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("socket.yaml");
    let ours = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../conf/socket.yaml"
    ))
    .unwrap();
    let bus = format!(
        "  bus:\n    nats:\n      url: \"{}\"\n      node_name: \"{name}\"\n      gather_quiet: {GATHER_QUIET}\n",
        nats.url()
    );
    std::fs::write(&config, format!("{ours}{bus}")).unwrap();
    let mut serve = Command::new(env!("CARGO_BIN_EXE_switchboard"));
    serve
        .args(["serve", "--demo", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .env("SWITCHBOARD_JWT_SECRET", SECRET);
    let (child, addr) = crate::spawn_serve(serve);
    Node {
        child,
        addr,
        _dir: dir,
    }
}

/// The next frame of `kind`, skipping others.
async fn next_of(ws: &mut Ws, kind: &str) -> Value {
    loop {
        let frame = recv(ws).await;
        if frame["type"] == kind {
            return frame;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demos_online_list_counts_both_nodes() {
    let nats = NatsServer::start();
    let a = demo_node(&nats, "a");
    let b = demo_node(&nats, "b");
    let mut alex = connect(a.addr, "alex", Some("acme")).await;
    let hello = next_of(&mut alex, "onconnect").await;
    assert_eq!(hello["payload"]["users"], json!(["alex"]));
    let mut sam = connect(b.addr, "sam", Some("acme")).await;
    let hello = next_of(&mut sam, "onconnect").await;
    assert_eq!(hello["payload"]["users"], json!(["alex", "sam"]), "{hello}");
    assert_eq!(hello["payload"]["online"], 2);
    // alex, on the other node, hears of sam through the broadcast, with both listed.
    loop {
        let presence = next_of(&mut alex, "chat.presence").await;
        if presence["payload"]["users"] == json!(["alex", "sam"]) {
            break;
        }
    }
    drop(sam);
    loop {
        let presence = next_of(&mut alex, "chat.presence").await;
        if presence["payload"]["users"] == json!(["alex"]) {
            break;
        }
    }
}

const API_KEY: &str = "node-api-key-0123456789";

/// A node with the server API on a port of its own: (node, its API address).
fn api_node(nats: &NatsServer, name: &str) -> (Node, SocketAddr) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("socket.yaml");
    let yaml = format!(
        "{}  bus:\n    nats:\n      url: \"{}\"\n      node_name: \"{name}\"\n      gather_quiet: {GATHER_QUIET}\n  api:\n    listen: 127.0.0.1:0\n",
        hooks_yaml(),
        nats.url()
    );
    std::fs::write(&config, yaml).unwrap();
    let serve = crate::serve_config(&config, API_KEY);
    let (child, addr, api) =
        crate::spawn_serve_printing(serve, Some("switchboard: api on http://"));
    let node = Node {
        child,
        addr,
        _dir: dir,
    };
    (node, api.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_api_of_one_node_reaches_and_counts_the_sockets_of_both() {
    let nats = NatsServer::start();
    let (a, api_a) = api_node(&nats, "a");
    let (b, _api_b) = api_node(&nats, "b");
    let mut alex = connect(b.addr, "alex", Some("acme")).await;
    let mut sam = connect(a.addr, "sam", Some("acme")).await;
    let call = |method: &'static str, target: &'static str, body: Option<Value>| async move {
        switchboard_test_support::http_json(api_a, method, target, Some(API_KEY), body.as_ref())
            .await
    };
    // Both nodes have their socket once presence counts two.
    wait_for_presence(api_a, 2).await;
    let (status, body) = call(
        "POST",
        "/api/send",
        Some(json!({"username": "alex", "type": "note", "payload": 1})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({"sockets_on_this_node": 0, "published_to_every_node": true})
    );
    assert_eq!(recv(&mut alex).await, json!({"type": "note", "payload": 1}));
    let (status, body) = call("GET", "/api/presence?namespace=acme", None).await;
    assert_eq!(status, 200);
    assert_eq!(body["users"], json!({"alex": 1, "sam": 1}), "{body}");
    assert_eq!(body["nodes"], 2);
    let (_, body) = call("GET", "/api/connections?username=alex", None).await;
    assert_eq!(body["connections"][0]["node"], "b", "{body}");
    let (status, _) = call(
        "POST",
        "/api/disconnect",
        Some(json!({"username": "alex", "code": 4003, "reason": "banned"})),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(close_of(&mut alex).await, (4003, "banned".to_string()));
    publish_via_api_broadcast(api_a).await;
    assert_eq!(recv(&mut sam).await["type"], "news");
}

async fn wait_for_presence(api: SocketAddr, sockets: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, body) = switchboard_test_support::http_json(
            api,
            "GET",
            "/api/presence?namespace=acme",
            Some(API_KEY),
            None,
        )
        .await;
        if body["sockets"] == sockets {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "presence never reached {sockets}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn publish_via_api_broadcast(api: SocketAddr) {
    let body = json!({"namespace": "acme", "type": "news"});
    let (status, _) = switchboard_test_support::http_json(
        api,
        "POST",
        "/api/broadcast",
        Some(API_KEY),
        Some(&body),
    )
    .await;
    assert_eq!(status, 200);
}
