//! Test support: a nats-server of our own on a free loopback port, a gateway config, and a
//! WebSocket client with a signed token.

use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use switchboard::{Config, Running};
use switchboard_bus_nats::NatsBus;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message as WsMessage;

pub(crate) const SECRET_ENV: &str = "SWITCHBOARD_NATS_IT_SECRET";
pub(crate) const SECRET: &str = "nats-integration-test-secret-0123";

pub(crate) type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub(crate) struct Gateway {
    pub(crate) running: Running,
    pub(crate) bus: Arc<NatsBus>,
}

/// A nats-server process we started; killed (by its PID) when dropped.
pub(crate) struct NatsServer {
    port: u16,
    child: Option<Child>,
}

impl NatsServer {
    pub(crate) fn start() -> NatsServer {
        // nats-server picks a free port itself (`-p -1`) and names it in a ports file: a port
        // probed here and released could be taken by a parallel test's server in between,
        // and the two tests would then share (and stop) one server.
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new(nats_server_binary())
            .args(["-a", "127.0.0.1", "-p", "-1", "--ports_file_dir"])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server must be installed (cargo xtask deps installs it)");
        let ports_file = dir.path().join(format!("nats-server_{}.ports", child.id()));
        let mut server = NatsServer {
            port: 0,
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        server.port = loop {
            let port = std::fs::read_to_string(&ports_file).ok().and_then(|text| {
                let ports: Value = serde_json::from_str(&text).ok()?;
                let url = ports["nats"][0].as_str()?;
                url.rsplit(':').next()?.parse::<u16>().ok()
            });
            if let Some(port) = port {
                break port;
            }
            assert!(Instant::now() < deadline, "nats-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        };
        server.wait_until_accepting();
        server
    }

    pub(crate) fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts it (again) on the same port and waits until it accepts connections.
    pub(crate) fn restart(&mut self) {
        let child = Command::new(nats_server_binary())
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server must be installed (cargo xtask deps installs it)");
        self.child = Some(child);
        self.wait_until_accepting();
    }

    fn wait_until_accepting(&self) {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills it and waits for it to exit.
    pub(crate) fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn nats_server_binary() -> &'static str {
    if std::path::Path::new("/usr/sbin/nats-server").exists() {
        "/usr/sbin/nats-server"
    } else {
        "nats-server"
    }
}

/// The spec's hooks, the test secret, and nothing else.
pub(crate) fn config() -> Config {
    std::env::set_var(SECRET_ENV, SECRET);
    Config::from_yaml_str(&format!(
        r#"
gateway:
  socket:
    onconnect: {{publish: "socket:connection"}}
    onmessage: {{publish: "socket:generalMessage"}}
    onclose: {{publish: "socket:close"}}
    send: {{subscribe: "socket:send"}}
    broadcast: {{subscribe: "socket:broadcast"}}
  auth:
    secret_env: {SECRET_ENV}
"#
    ))
    .unwrap()
}

pub(crate) async fn connect(addr: SocketAddr, user: &str, namespace: Option<&str>) -> Ws {
    let q = namespace
        .map(|n| format!("?namespace={n}"))
        .unwrap_or_default();
    let mut req = format!("ws://{addr}/connect{q}")
        .into_client_request()
        .unwrap();
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"preferred_username": user, "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    req.headers_mut()
        .insert("cookie", format!("ID_TOKEN={token}").parse().unwrap());
    tokio_tungstenite::connect_async(req).await.unwrap().0
}

pub(crate) async fn recv(ws: &mut Ws) -> Value {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("a frame within 10 s")
            .expect("socket open")
            .expect("no error");
        match m {
            WsMessage::Text(t) => return serde_json::from_str(&t).unwrap(),
            WsMessage::Close(f) => panic!("socket closed: {f:?}"),
            _ => {}
        }
    }
}

pub(crate) async fn send(ws: &mut Ws, v: Value) {
    ws.send(WsMessage::text(v.to_string())).await.unwrap();
}

pub(crate) async fn wait_until(mut cond: impl FnMut() -> bool, what: &str) {
    for _ in 0..300 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}
