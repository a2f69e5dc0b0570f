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
    cluster_port: Option<u16>,
    monitor_port: Option<u16>,
    args: Vec<String>,
    child: Option<Child>,
}

impl NatsServer {
    pub(crate) fn start() -> NatsServer {
        Self::start_with(&[])
    }

    /// A server with `args` besides its address (`-c FILE`, `--cluster ...`, `-m -1`).
    pub(crate) fn start_with(args: &[&str]) -> NatsServer {
        // nats-server picks free ports itself (`-p -1`) and names them in a ports file: a
        // port probed here and released could be taken by a parallel test's server in
        // between, and the two tests would then share (and stop) one server.
        let dir = tempfile::tempdir().unwrap();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let child = spawn_nats(
            &[
                "-p",
                "-1",
                "--ports_file_dir",
                &dir.path().to_string_lossy(),
            ],
            &args,
        );
        let ports_file = dir.path().join(format!("nats-server_{}.ports", child.id()));
        let mut server = NatsServer {
            port: 0,
            cluster_port: None,
            monitor_port: None,
            args,
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        let ports = loop {
            let ports = std::fs::read_to_string(&ports_file)
                .ok()
                .and_then(|text| serde_json::from_str::<Value>(&text).ok());
            if let Some(ports) = ports {
                break ports;
            }
            assert!(Instant::now() < deadline, "nats-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        };
        let port_of = |kind: &str| -> Option<u16> {
            let url = ports[kind][0].as_str()?;
            url.rsplit(':').next()?.parse::<u16>().ok()
        };
        server.port = port_of("nats").expect("a client port");
        server.cluster_port = port_of("cluster");
        server.monitor_port = port_of("monitoring");
        server.wait_until_accepting();
        server
    }

    pub(crate) fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    /// Starts it (again) on the same port and waits until it accepts connections.
    pub(crate) fn restart(&mut self) {
        let port = self.port.to_string();
        self.child = Some(spawn_nats(&["-p", &port], &self.args));
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

    /// GET on its monitoring port (`-m -1`), as JSON.
    fn monitor(&self, path: &str) -> Option<Value> {
        use std::io::{Read, Write};
        let port = self.monitor_port?;
        let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        serde_json::from_str(text.split_once("\r\n\r\n")?.1).ok()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn spawn_nats(ports: &[&str], args: &[String]) -> Child {
    Command::new(nats_server_binary())
        .args(["-a", "127.0.0.1"])
        .args(ports)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nats-server must be installed (cargo xtask deps installs it)")
}

/// A NATS cluster on loopback: servers routed to each other (a seed, the others routed to
/// it, then a full mesh by gossip), each killed by PID when dropped.
pub(crate) struct NatsCluster {
    pub(crate) servers: Vec<NatsServer>,
}

impl NatsCluster {
    pub(crate) fn start(size: usize) -> NatsCluster {
        let member = [
            "--cluster_name",
            "sb",
            "--cluster",
            "nats://127.0.0.1:-1",
            "-m",
            "-1",
        ];
        let seed = NatsServer::start_with(&member);
        let route = format!("nats://127.0.0.1:{}", seed.cluster_port.unwrap());
        let mut servers = vec![seed];
        for _ in 1..size {
            let mut args = member.to_vec();
            args.extend(["--routes", &route]);
            servers.push(NatsServer::start_with(&args));
        }
        let cluster = NatsCluster { servers };
        cluster.wait_until_meshed();
        cluster
    }

    fn wait_until_meshed(&self) {
        let want = self.servers.len() as u64 - 1;
        let deadline = Instant::now() + Duration::from_secs(15);
        while !self.servers.iter().all(|s| {
            s.monitor("/routez")
                .is_some_and(|r| r["num_routes"].as_u64() == Some(want))
        }) {
            assert!(Instant::now() < deadline, "the cluster did not form");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub(crate) fn urls(&self) -> Vec<String> {
        self.servers.iter().map(NatsServer::url).collect()
    }

    /// The member listening on `port`.
    pub(crate) fn member(&mut self, port: u16) -> &mut NatsServer {
        self.servers
            .iter_mut()
            .find(|s| s.port == port)
            .expect("a member")
    }
}

fn nats_server_binary() -> &'static str {
    if std::path::Path::new("/usr/sbin/nats-server").exists() {
        "/usr/sbin/nats-server"
    } else {
        "nats-server"
    }
}

/// The spec's hooks and nothing else (the test secret is given to the container directly).
pub(crate) fn config() -> Config {
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

/// Asserts nothing more arrives on `ws` within `ms` (pings aside).
pub(crate) async fn silent(ws: &mut Ws, ms: u64) {
    if let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_millis(ms), ws.next()).await {
        assert!(!m.is_text(), "unexpected frame: {m:?}");
    }
}
