//! Operability of the binary: help texts, what `serve` prints, the admin listener over real
//! HTTP, JSON logs, `${VAR}` expansion, and the client helper the demo serves.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use super::{bin, get, start_demo};

fn help(args: &[&str]) -> String {
    let out = bin().args(args).output().unwrap();
    assert!(out.status.success(), "{args:?}");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn help_covers_every_command_flag_and_variable() {
    let top = help(&["--help"]);
    for word in [
        "serve",
        "check-config",
        "RUST_LOG",
        "SWITCHBOARD_JWT_SECRET",
        "${NAME}",
        "docs/CONFIG.md",
        "Examples:",
    ] {
        assert!(
            top.contains(word),
            "`switchboard --help` lacks {word}:\n{top}"
        );
    }
    let serve = help(&["serve", "--help"]);
    for word in [
        "--config",
        "--listen",
        "--admin-listen",
        "--log-format",
        "--demo",
        "--drain",
        "/metrics",
        "Exit status",
        "[default: conf/socket.yaml]",
    ] {
        assert!(
            serve.contains(word),
            "`serve --help` lacks {word}:\n{serve}"
        );
    }
    let check = help(&["check-config", "--help"]);
    for word in ["<FILE>", "exit 2", "line L column C"] {
        assert!(
            check.contains(word),
            "`check-config --help` lacks {word}:\n{check}"
        );
    }
}

#[test]
fn check_config_expands_variables_and_names_an_unset_one() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("socket.yaml");
    std::fs::write(
        &file,
        "gateway:\n  listen: \"127.0.0.1:${SB_IT_PORT}\"\n  socket:\n    path: /connect\n  admin:\n    listen: 127.0.0.1:9091\n",
    )
    .unwrap();
    let out = bin()
        .arg("check-config")
        .arg(&file)
        .env("SB_IT_PORT", "4321")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("ok (listen 127.0.0.1:4321, path /connect"),
        "{stdout}"
    );
    assert!(stdout.contains("admin 127.0.0.1:9091"), "{stdout}");

    let out = bin()
        .arg("check-config")
        .arg(&file)
        .env_remove("SB_IT_PORT")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("environment variable `SB_IT_PORT` is not set at line 2"),
        "{stderr}"
    );
}

/// A plain HTTP GET on a blocking socket: (status, body).
fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    (head[9..12].parse().unwrap(), body.to_string())
}

#[test]
fn serve_prints_what_it_loaded_serves_admin_endpoints_and_logs_json() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("socket.yaml");
    std::fs::write(
        &file,
        "gateway:\n  listen: 127.0.0.1:0\n  socket:\n    path: \"/${SB_IT_PATH}\"\n  auth:\n    secret_env: SB_IT_SECRET\n  admin:\n    listen: 127.0.0.1:0\n  log:\n    format: json\n",
    )
    .unwrap();
    let mut child = bin()
        .args(["serve", "--config"])
        .arg(&file)
        .env("SB_IT_PATH", "ws")
        .env("SB_IT_SECRET", "a-secret-of-at-least-16-bytes")
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut printed = Vec::new();
    let (mut public, mut admin) = (None, None);
    while admin.is_none() {
        let line = stdout.next().expect("serve printed its addresses").unwrap();
        if let Some(rest) = line.strip_prefix("switchboard: listening on ws://") {
            public = Some(rest.to_string());
        }
        if let Some(rest) = line.strip_prefix("switchboard: admin on http://") {
            admin = Some(
                rest.split(' ')
                    .next()
                    .unwrap()
                    .parse::<SocketAddr>()
                    .unwrap(),
            );
        }
        printed.push(line);
    }
    let admin = admin.unwrap();
    assert_eq!(
        printed[0],
        format!("switchboard: config {}", file.display()),
        "{printed:?}"
    );
    let public = public.expect("the public address before the admin one");
    assert!(public.ends_with("/ws"), "{public}");

    assert_eq!(http_get(admin, "/healthz"), (200, "ok\n".into()));
    assert_eq!(http_get(admin, "/readyz"), (200, "ready\n".into()));
    let (status, metrics) = http_get(admin, "/metrics");
    assert_eq!(status, 200);
    assert!(
        metrics.contains("\nswitchboard_sockets_open 0\n"),
        "{metrics}"
    );
    assert!(metrics.contains("\nswitchboard_ready 1\n"), "{metrics}");

    // stderr: one JSON object per line
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    let first = stderr.next().expect("a log line").unwrap();
    let event: serde_json::Value = serde_json::from_str(&first)
        .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {first}"));
    assert_eq!(event["level"], "INFO", "{first}");
    assert_eq!(event["fields"]["message"], "gateway listening", "{first}");
    assert!(event["timestamp"].is_string(), "{first}");

    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    for line in stderr.map_while(Result::ok) {
        assert!(
            serde_json::from_str::<serde_json::Value>(&line).is_ok(),
            "not JSON: {line}"
        );
    }
}

#[tokio::test]
async fn demo_serves_the_client_helper_that_its_page_imports() {
    let demo = start_demo();
    let (status, head, js) = get(demo.addr, "/switchboard-client.js").await;
    assert_eq!(status, 200);
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/javascript"),
        "{head}"
    );
    assert!(js.contains("export class SwitchboardClient"));
    let (_, _, page) = get(demo.addr, "/").await;
    assert!(page.contains("from '/switchboard-client.js'"));
}
