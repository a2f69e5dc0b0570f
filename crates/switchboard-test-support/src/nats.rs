//! A nats-server of the test's own: one process on free loopback ports, or a cluster of
//! them, each killed by its PID when dropped. `nats-server` must be installed
//! (`cargo xtask deps` installs it); `/usr/sbin/nats-server` is preferred when present.

use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A nats-server process we started; killed (by its PID) when dropped.
pub struct NatsServer {
    port: u16,
    cluster_port: Option<u16>,
    monitor_port: Option<u16>,
    args: Vec<String>,
    child: Option<Child>,
}

impl NatsServer {
    /// A server on a free loopback port, accepting connections when this returns.
    pub fn start() -> NatsServer {
        Self::start_with(&[])
    }

    /// A server with `args` besides its address (`-c FILE`, `--cluster ...`, `-m -1`).
    pub fn start_with(args: &[&str]) -> NatsServer {
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

    /// Its client URL, `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Its client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Starts it (again) on the same port and waits until it accepts connections.
    pub fn restart(&mut self) {
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
    pub fn stop(&mut self) {
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
pub struct NatsCluster {
    /// The members, the seed first.
    pub servers: Vec<NatsServer>,
}

impl NatsCluster {
    /// `size` servers, fully meshed when this returns.
    pub fn start(size: usize) -> NatsCluster {
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

    /// Every member's client URL.
    pub fn urls(&self) -> Vec<String> {
        self.servers.iter().map(NatsServer::url).collect()
    }

    /// The member listening on `port`.
    pub fn member(&mut self, port: u16) -> &mut NatsServer {
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
