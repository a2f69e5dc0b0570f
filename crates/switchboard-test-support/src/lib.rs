//! What Switchboard's test suites share, written once: the test secret and signed tokens, a
//! container on the in-process bus and the spec's example config, a recorder of what handlers
//! see, waiting for a condition, the nats-server fixture, an HTTP handler backend, and a client that speaks to a
//! gateway over any transport ([`Kind`]), so that one test of the spec's semantics runs on
//! each ([`each_transport!`]).
//!
//! Use it as a dev-dependency only (it is not published): tests of the facade, of a bus, of
//! the server binary.
//!
//! ```no_run
//! use switchboard_test_support::{container, each_transport, spec_config, start, Kind};
//!
//! async fn a_broadcast_reaches_everyone(kind: Kind) {
//!     let gw = start(kind, container(spec_config(""))).await;
//!     let mut alex = gw.connect("alex", None).await;
//!     gw.wait_for_sockets(1).await;
//!     gw.producer().send("socket:broadcast", serde_json::json!({"type": "t"})).unwrap();
//!     assert_eq!(alex.recv().await["type"], "t");
//! }
//!
//! each_transport!(a_broadcast_reaches_everyone); // `…::websocket`, `…::memory`, `…::sse`
//! # fn main() {}
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{EncodingKey, Header};
use serde_json::{json, Value};
use switchboard::{Config, Container, InProcessBus, Message, VerificationKey};
use tokio::sync::mpsc;

mod client;
pub mod http_backend;
pub mod nats;
pub mod sse;
pub mod tls;
pub mod websocket;

pub use client::{start, Client, Event, Gateway, Kind};

/// The variable the test configs name in `auth.secret_env`; never set (the key is given to
/// the container directly, see [`key`]).
pub const SECRET_ENV: &str = "SWITCHBOARD_IT_SECRET";
/// The HS256 secret test tokens are signed with.
pub const SECRET: &str = "integration-test-secret-0123456789";

/// How long [`Client::recv`] and [`next_published`] wait.
pub const WAIT: Duration = Duration::from_secs(5);

/// Seconds since the epoch.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A token with `claims`, signed (HS256) with `secret`.
pub fn token_with(claims: Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// A valid token for `username` (and `username@example.com`), for ten minutes.
pub fn token(username: &str) -> String {
    token_with(
        json!({"preferred_username": username, "exp": now() + 600, "email": format!("{username}@example.com")}),
        SECRET,
    )
}

/// A request to open a socket at `/connect` with `token` as the `ID_TOKEN` cookie (after
/// another cookie), in `namespace` (`?namespace=`). Add headers to it as a test needs.
pub fn request(token: &str, namespace: Option<&str>) -> http::Request<()> {
    let query = namespace
        .map(|ns| format!("?namespace={ns}"))
        .unwrap_or_default();
    http::Request::get(format!("/connect{query}"))
        .header("cookie", format!("theme=dark; ID_TOKEN={token}"))
        .body(())
        .unwrap()
}

/// The key that verifies test tokens.
pub fn key() -> VerificationKey {
    VerificationKey::Secret(SECRET.as_bytes().to_vec())
}

/// A container on the in-process bus that verifies tokens with the test secret (given
/// directly: the config's `secret_env` is not read).
pub fn container(config: Config) -> Container {
    Container::with_key(config, Arc::new(InProcessBus::new()), key()).unwrap()
}

/// The spec's example config, with `extra_socket` lines (indented by four spaces) under
/// `socket:`.
pub fn spec_config(extra_socket: &str) -> Config {
    let yaml = format!(
        r#"
gateway:
  socket:
    path: "/connect"
{extra_socket}
    onconnect:
      publish: "socket:connection"
    onmessage:
      publish: "socket:generalMessage"
      types:
          - type: "message_type_one"
            publish: "socket:type_one"
          - type: "message_type_two"
            publish: "socket:type_two"
    onclose:
      publish: "socket:close"
    send:
      subscribe: "socket:send"
    broadcast:
      subscribe: "socket:broadcast"
  auth:
    secret_env: {SECRET_ENV}
"#
    );
    Config::from_yaml_str(&yaml).unwrap()
}

/// The `gateway:` section of a config with the spec's hooks, one topic each (no typed
/// messages), `disconnect`, and the test `auth` section; more sections (`bus:`, indented by two spaces) may
/// follow it.
pub fn hooks_yaml() -> String {
    format!(
        r#"gateway:
  socket:
    onconnect: {{publish: "socket:connection"}}
    onmessage: {{publish: "socket:generalMessage"}}
    onclose: {{publish: "socket:close"}}
    send: {{subscribe: "socket:send"}}
    broadcast: {{subscribe: "socket:broadcast"}}
    disconnect: {{subscribe: "socket:disconnect"}}
  auth:
    secret_env: {SECRET_ENV}
"#
    )
}

/// Every message a [`recorder`]'s handlers saw: (topic, data, context as JSON).
pub type Seen = mpsc::UnboundedReceiver<(String, Value, Value)>;

/// Subscribes a recording handler to each of `topics`.
pub fn recorder(container: &mut Container, topics: &[&str]) -> Seen {
    let (tx, rx) = mpsc::unbounded_channel();
    for topic in topics {
        let tx = tx.clone();
        container
            .add_handler(topic, move |m: Message| {
                let _ = tx.send((
                    m.topic().to_string(),
                    m.data().clone(),
                    serde_json::to_value(m.context()).unwrap(),
                ));
                async {}
            })
            .unwrap();
    }
    rx
}

/// The next message a recorder saw, within [`WAIT`].
pub async fn next_published(rx: &mut Seen) -> (String, Value, Value) {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("a published message within 5 s")
        .unwrap()
}

/// One HTTP/1.1 request to `addr` (`Connection: close`), with `Authorization: Bearer <key>`
/// when a key is given and `body` as JSON when given; the status and the body as JSON (`Null`
/// when it is not JSON).
pub async fn http_json(
    addr: std::net::SocketAddr,
    method: &str,
    target: &str,
    key: Option<&str>,
    body: Option<&Value>,
) -> (u16, Value) {
    let request = json_request(&addr.to_string(), method, target, key, body);
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    json_exchange(stream, &request).await
}

/// An HTTP/1.1 request with a JSON body, as one string.
pub(crate) fn json_request(
    host: &str,
    method: &str,
    target: &str,
    key: Option<&str>,
    body: Option<&Value>,
) -> String {
    let body = body.map(Value::to_string).unwrap_or_default();
    let auth = key
        .map(|k| format!("Authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    format!(
        "{method} {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{auth}\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// Writes `request` on `stream` and reads the answer to the end: its status and JSON body.
pub(crate) async fn json_exchange(
    mut stream: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    request: &str,
) -> (u16, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    // A TLS peer may end without close_notify once it has answered: what came is the answer.
    let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut answer))
        .await
        .expect("an answer within 5 s");
    let answer = String::from_utf8_lossy(&answer);
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// Reads a response head from a blocking stream as a quick client reads, a chunk at a time
/// (a `101` comes in one segment or record): the bytes read, up to the blank line at least.
/// Panics if the stream ends first.
pub fn read_head_blocking(stream: &mut impl std::io::Read) -> Vec<u8> {
    let mut head = Vec::new();
    let mut chunk = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).expect("the response head");
        assert!(n > 0, "closed before the response head");
        head.extend_from_slice(&chunk[..n]);
    }
    head
}

/// Waits until `condition` holds, checking it every few milliseconds; panics naming `what`
/// after `timeout`.
pub async fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Runs `async fn NAME(kind: Kind)` once per transport, as the tests `NAME::websocket`,
/// `NAME::memory` and `NAME::sse` (a module per test: `macro_rules!` cannot join names). A new transport is
/// one more `name => Variant` in the list below.
#[macro_export]
macro_rules! each_transport {
    ($($test:ident),+ $(,)?) => {
        $($crate::on_transports!($test: websocket => WebSocket, memory => Memory, sse => Sse);)+
    };
}

/// [`each_transport!`] for one test, on the transports listed: for what some transport cannot
/// do (SSE has no pings and carries no binary messages), e.g.
/// `on_transports!(pings_count: websocket => WebSocket, memory => Memory);`.
#[macro_export]
macro_rules! on_transports {
    ($test:ident: $($name:ident => $kind:ident),+) => {
        mod $test {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$test($crate::Kind::$kind).await
                }
            )+
        }
    };
}
