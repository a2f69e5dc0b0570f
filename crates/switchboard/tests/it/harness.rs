//! Test harness: a gateway on 127.0.0.1:0 and real WebSocket clients with signed tokens.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{EncodingKey, Header};
use serde_json::{json, Value};
use switchboard::{Config, Container, InProcessBus, Message, Running, VerificationKey};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub(crate) const SECRET_ENV: &str = "SWITCHBOARD_IT_SECRET";
pub(crate) const SECRET: &str = "integration-test-secret-0123456789";

pub(crate) type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A container on the in-process bus that verifies tokens with the test secret (given
/// directly: the config's `secret_env` is not read).
pub(crate) fn container(config: Config) -> Container {
    let key = VerificationKey::Secret(SECRET.as_bytes().to_vec());
    Container::with_key(config, Arc::new(InProcessBus::new()), key).unwrap()
}

/// The spec's example config (its `secret_env` names a variable the tests never set).
pub(crate) fn spec_config(extra_socket: &str) -> Config {
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

pub(crate) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

pub(crate) fn token_with(claims: Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

pub(crate) fn token(username: &str) -> String {
    token_with(
        json!({"preferred_username": username, "exp": now() + 600, "email": format!("{username}@example.com")}),
        SECRET,
    )
}

/// Every message any recording handler saw: (topic, data, context as JSON).
pub(crate) type Seen = mpsc::UnboundedReceiver<(String, Value, Value)>;

pub(crate) fn recorder(container: &mut Container, topics: &[&str]) -> Seen {
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

pub(crate) async fn start(container: Container) -> Running {
    container
        .start_on("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
}

pub(crate) async fn connect(running: &Running, user: &str, namespace: Option<&str>) -> Ws {
    let query = namespace
        .map(|n| format!("?namespace={n}"))
        .unwrap_or_default();
    let url = format!("ws://{}/connect{query}", running.local_addr().unwrap());
    let mut req = url.into_client_request().unwrap();
    req.headers_mut().insert(
        "cookie",
        format!("theme=dark; ID_TOKEN={}", token(user))
            .parse()
            .unwrap(),
    );
    let (ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    ws
}

/// The next text frame as JSON (pings and pongs skipped).
pub(crate) async fn recv(ws: &mut Ws) -> Value {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("a frame within 5 s")
            .expect("socket open")
            .expect("no error");
        match msg {
            WsMessage::Text(t) => return serde_json::from_str(&t).unwrap(),
            WsMessage::Close(f) => panic!("unexpected close: {f:?}"),
            _ => continue,
        }
    }
}

/// Asserts that no text frame arrives within `ms`.
pub(crate) async fn assert_silent(ws: &mut Ws, ms: u64) {
    let deadline = tokio::time::sleep(Duration::from_millis(ms));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = &mut deadline => return,
            m = ws.next() => match m {
                Some(Ok(WsMessage::Text(t))) => panic!("expected silence, got {t}"),
                Some(Ok(_)) => continue,
                other => panic!("socket ended: {other:?}"),
            }
        }
    }
}

pub(crate) async fn send(ws: &mut Ws, v: Value) {
    ws.send(WsMessage::text(v.to_string())).await.unwrap();
}

pub(crate) async fn next_published(rx: &mut Seen) -> (String, Value, Value) {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("a published message within 5 s")
        .unwrap()
}

/// Connects with `token` as the `ID_TOKEN` cookie.
pub(crate) async fn connect_with_token(running: &Running, token: &str) -> Ws {
    let url = format!("ws://{}/connect", running.local_addr().unwrap());
    let mut req = url.into_client_request().unwrap();
    req.headers_mut()
        .insert("cookie", format!("ID_TOKEN={token}").parse().unwrap());
    let (ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    ws
}

/// Reads until a close frame; returns its code (pings, pongs and text skipped).
pub(crate) async fn close_code_of(ws: &mut Ws) -> u16 {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("a close within 10 s")
        {
            Some(Ok(WsMessage::Close(Some(f)))) => return f.code.into(),
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}
