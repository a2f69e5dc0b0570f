//! Handlers over plain HTTP with the real binary: the demo chat with its handlers in the
//! Python backend (`examples/http-handlers/backend.py`), and two nodes on one nats-server
//! calling a bound endpoint once per event.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use switchboard_test_support::http_backend::{
    Answer, HttpBackend, Request, HANDLER_SECRET, HANDLER_SECRET_ENV,
};
use switchboard_test_support::nats::NatsServer;
use switchboard_test_support::wait_until;
use switchboard_test_support::websocket::{connect, recv_within, send, Ws};

use super::nats::{node_with_env, Node};
use super::{connect as connect_with_cookie, login, recv_type, repo, say, spawn_serve};

/// A child process, killed by PID when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A port nothing listens on now (the API's: the backend must know it before the gateway
/// starts). Below Linux's ephemeral range (32768 up): a port probed there and released could
/// be handed to a parallel test's outgoing connection before the gateway binds it.
fn free_port() -> u16 {
    let start = 20_000 + (std::process::id() % 10_000) as u16;
    (start..32_000)
        .chain(20_000..start)
        .find(|&port| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok())
        .expect("a free port under 32000")
}

const API_KEY: &str = "http-handlers-test-api-key-0123456789";

/// The Python backend, listening on a port of its choosing, reaching the API at `api`.
fn python_backend(api: SocketAddr) -> (Killed, u16) {
    let mut child = Command::new("python3")
        .arg(repo("examples/http-handlers/backend.py"))
        .args(["--listen", "127.0.0.1:0", "--api", &format!("http://{api}")])
        .env("SWITCHBOARD_HANDLER_SECRET", HANDLER_SECRET)
        .env("SWITCHBOARD_API_KEY", API_KEY)
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let port = match lines.next() {
        Some(Ok(line)) => line
            .strip_prefix("ready ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("backend said {line:?}")),
        other => panic!("the python backend did not start: {other:?}"),
    };
    (Killed(child), port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_chat_runs_with_its_handlers_in_the_python_backend() {
    let api: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let (_python, port) = python_backend(api);
    // The shipped example config, on the API address chosen here.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("http-handlers.yaml");
    let text = std::fs::read_to_string(repo("conf/examples/http-handlers.yaml")).unwrap();
    assert!(text.contains("127.0.0.1:4002"));
    std::fs::write(&config, text.replace("127.0.0.1:4002", &api.to_string())).unwrap();
    let mut serve = super::bin();
    serve
        .args(["serve", "--demo", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .env_remove("SWITCHBOARD_JWT_SECRET")
        .env(
            "SWITCHBOARD_HANDLERS_URL",
            format!("http://127.0.0.1:{port}/events"),
        )
        .env("SWITCHBOARD_HANDLER_SECRET", HANDLER_SECRET)
        .env("SWITCHBOARD_API_KEY", API_KEY);
    let (child, addr) = spawn_serve(serve);
    let _gateway = Killed(child);

    let (alex_cookie, sam_cookie) = (login(addr, "alex").await, login(addr, "sam").await);
    let mut alex = connect_with_cookie(addr, &alex_cookie, Some("acme")).await;
    let hello = recv_type(&mut alex, "onconnect").await;
    assert_eq!(hello["handled_by"], "python");
    assert_eq!(hello["username"], "alex");
    assert_eq!(hello["online"], 1);
    let mut sam = connect_with_cookie(addr, &sam_cookie, Some("acme")).await;
    let hello = recv_type(&mut sam, "onconnect").await;
    assert_eq!(hello["online"], 2);
    assert_eq!(hello["users"], json!(["alex", "sam"]));

    say(
        &mut alex,
        json!({"type": "chat.say", "payload": {"text": "hi sam"}}),
    )
    .await;
    for ws in [&mut alex, &mut sam] {
        assert_eq!(
            recv_type(ws, "chat.said").await,
            json!({"from": "alex", "text": "hi sam"})
        );
    }
    say(
        &mut sam,
        json!({"type": "chat.whisper", "payload": {"to": "alex", "text": "psst"}}),
    )
    .await;
    assert_eq!(recv_type(&mut alex, "chat.whispered").await["text"], "psst");
    assert_eq!(recv_type(&mut sam, "chat.whispered").await["from"], "sam");
    // A fail from Python is an error frame, as from a Rust handler.
    say(&mut alex, json!({"type": "chat.say", "payload": {}})).await;
    let error = recv_type(&mut alex, "error").await;
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("needs payload.text"),
        "{error}"
    );
    // sam leaves: the backend hears onclose and tells alex who is left.
    drop(sam);
    wait_until_presence(&mut alex, 1).await;
}

/// Reads `chat.presence` frames until one says `online` sockets.
async fn wait_until_presence(ws: &mut Ws, online: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let p = tokio::time::timeout(left, recv_type(ws, "chat.presence"))
            .await
            .expect("a presence update");
        if p["online"] == online {
            return;
        }
    }
}

/// A gateway node on NATS whose hooks' topics are bound to `backend`.
fn node(nats: &NatsServer, name: &str, backend: &HttpBackend) -> Node {
    let binding = format!(
        "  http_handlers:\n    - url: \"{}\"\n      \
         topics: [\"socket:connection\", \"socket:generalMessage\", \"socket:close\"]\n      \
         secret_env: {HANDLER_SECRET_ENV}\n",
        backend.url()
    );
    node_with_env(
        nats,
        name,
        &binding,
        &[(HANDLER_SECRET_ENV, HANDLER_SECRET)],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_two_nats_nodes_each_event_calls_the_endpoint_once() {
    let nats = NatsServer::start();
    let backend = HttpBackend::start(|r: &Request| match r.topic() {
        "socket:generalMessage" => {
            Answer::json(json!({"reply": {"n": r.envelope["data"]["n"], "signed": r.signed}}))
        }
        "socket:connection" => Answer::json(json!({"reply": "welcome"})),
        _ => Answer::raw(200, "{}"),
    })
    .await;
    let a = node(&nats, "node-a", &backend);
    let b = node(&nats, "node-b", &backend);
    let mut on_a = connect(a.addr, "alex", Some("acme")).await;
    let mut on_b = connect(b.addr, "sam", Some("acme")).await;
    for ws in [&mut on_a, &mut on_b] {
        assert_eq!(
            recv(ws).await,
            json!({"type": "onconnect", "payload": "welcome"})
        );
    }
    for n in 0..10 {
        send(&mut on_a, json!({"type": "t", "n": n})).await;
        send(&mut on_b, json!({"type": "t", "n": n + 100})).await;
    }
    for (ws, base) in [(&mut on_a, 0), (&mut on_b, 100)] {
        let mut got = Vec::new();
        for _ in 0..10 {
            let frame = recv(ws).await;
            assert_eq!(frame["payload"]["signed"], true);
            got.push(frame["payload"]["n"].as_u64().unwrap());
        }
        got.sort_unstable();
        assert_eq!(got, (base..base + 10).collect::<Vec<_>>());
    }
    drop((on_a, on_b));
    wait_until("both onclose events", Duration::from_secs(10), || {
        backend.on_topic("socket:close").len() >= 2
    })
    .await;
    // Nothing more comes: each event reached the endpoint exactly once, from its own node.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(backend.on_topic("socket:connection").len(), 2);
    assert_eq!(backend.on_topic("socket:generalMessage").len(), 20);
    assert_eq!(backend.on_topic("socket:close").len(), 2);
    let mut n: Vec<u64> = backend
        .on_topic("socket:generalMessage")
        .iter()
        .map(|r| r.envelope["data"]["n"].as_u64().unwrap())
        .collect();
    n.sort_unstable();
    n.dedup();
    assert_eq!(n.len(), 20, "no event was sent twice");
}

async fn recv(ws: &mut Ws) -> Value {
    recv_within(ws, Duration::from_secs(10)).await
}
