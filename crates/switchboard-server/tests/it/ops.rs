//! Operability of the binary: help texts, what `serve` prints, the admin listener over real
//! HTTP, JSON logs, `${VAR}` expansion, and the client helper the demo serves.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use super::{bin, config_file, get, start_demo};

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
        "--workers",
        "TOKIO_WORKER_THREADS",
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
    let (_dir, file) = config_file(
        "gateway:\n  listen: \"127.0.0.1:${SB_IT_PORT}\"\n  socket:\n    path: /connect\n  admin:\n    listen: 127.0.0.1:9091\n",
    );
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

#[test]
fn serve_refuses_a_worker_count_it_cannot_use_and_names_it() {
    let (_dir, file) =
        config_file("gateway:\n  listen: \"127.0.0.1:0\"\n  socket:\n    path: /connect\n");
    // A typo or an absurd count is an error before anything listens, not a silent default.
    for bad in ["four", "0", "100000"] {
        let mut child = bin()
            .args(["serve", "--config"])
            .arg(&file)
            .env("TOKIO_WORKER_THREADS", bad)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Bounded: a server that started anyway is ended here, and the test fails.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("serve started with TOKIO_WORKER_THREADS={bad}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(status.code(), Some(1), "{bad}");
        let mut stderr = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        assert!(
            stderr.contains(&format!("TOKIO_WORKER_THREADS is `{bad}`"))
                && stderr.contains("from 1 to 1024"),
            "{bad}: {stderr}"
        );
    }
    let out = bin()
        .args(["serve", "--workers", "1025", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "clap refuses --workers 1025");
}

/// Ends a `switchboard serve` with SIGTERM and checks that it exited cleanly.
fn stop_cleanly(child: &mut std::process::Child) {
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

/// What a `switchboard serve` with an admin listener printed up to the admin address: the
/// public address (after `ws://`, with its path), the admin address, and every line so far.
/// Its stdout is drained from then on.
fn printed_addresses(child: &mut std::process::Child) -> (String, SocketAddr, Vec<String>) {
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let (mut printed, mut public) = (Vec::new(), None);
    let admin = loop {
        let line = stdout.next().expect("serve printed its addresses").unwrap();
        if let Some(rest) = line.strip_prefix("switchboard: listening on ws://") {
            public = Some(rest.to_string());
        }
        let admin = line
            .strip_prefix("switchboard: admin on http://")
            .and_then(|rest| rest.split(' ').next()?.parse().ok());
        printed.push(line);
        if let Some(admin) = admin {
            break admin;
        }
    };
    std::thread::spawn(move || for _ in stdout {});
    let public = public.expect("the public address before the admin one");
    (public, admin, printed)
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
    let (_dir, file) = config_file(
        "gateway:\n  listen: 127.0.0.1:0\n  socket:\n    path: \"/${SB_IT_PATH}\"\n  auth:\n    secret_env: SB_IT_SECRET\n  admin:\n    listen: 127.0.0.1:0\n  log:\n    format: json\n",
    );
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
    let (public, admin, printed) = printed_addresses(&mut child);
    assert_eq!(
        printed[0],
        format!("switchboard: config {}", file.display()),
        "{printed:?}"
    );
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

    stop_cleanly(&mut child);
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

/// `switchboard serve` under an open-file limit of 300, with no `limits.max_sockets`: the
/// default cap leaves a reserve, so the sockets past it get `503` (not an unanswered
/// connection, as when `accept` failed with `EMFILE`), and the admin listener still answers.
#[test]
fn at_the_open_file_limit_upgrades_get_503_and_the_admin_still_answers() {
    use std::io::Write;
    let (_dir, file) = config_file(
        format!(
            "gateway:\n  listen: 127.0.0.1:0\n  socket:\n    path: /ws\n  auth:\n    secret_env: {}\n  admin:\n    listen: 127.0.0.1:0\n",
            switchboard_test_support::SECRET_ENV
        ),
    );
    let mut child = Command::new("sh")
        .args(["-c", "ulimit -n 300 && exec \"$0\" \"$@\""])
        .arg(env!("CARGO_BIN_EXE_switchboard"))
        .args(["serve", "--config"])
        .arg(&file)
        .env(
            switchboard_test_support::SECRET_ENV,
            switchboard_test_support::SECRET,
        )
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (public, admin, _) = printed_addresses(&mut child);
    let public: SocketAddr = public.trim_end_matches("/ws").parse().unwrap();
    let token = switchboard_test_support::token("alex");
    let mut open = Vec::new();
    let (mut upgraded, mut refused) = (0, 0);
    for _ in 0..300 {
        let mut s = std::net::TcpStream::connect(public).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(
            s,
            "GET /ws HTTP/1.1\r\nHost: {public}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Cookie: ID_TOKEN={token}\r\n\r\n"
        )
        .unwrap();
        let mut head = [0u8; 12];
        s.read_exact(&mut head)
            .expect("every upgrade is answered, none waits unanswered");
        match &head[9..12] {
            b"101" => upgraded += 1,
            b"503" => refused += 1,
            other => panic!("unexpected status {}", String::from_utf8_lossy(other)),
        }
        open.push(s);
    }
    // 300 less the reserve of 128 leaves 172: half for upgrades in progress, 86 sockets.
    assert_eq!((upgraded, refused), (86, 214));
    assert_eq!(http_get(admin, "/healthz"), (200, "ok\n".into()));
    drop(open);
    stop_cleanly(&mut child);
}
