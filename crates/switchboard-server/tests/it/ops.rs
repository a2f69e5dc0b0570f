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
        "SWITCHBOARD_API_KEY",
        "SWITCHBOARD_HANDLER_SECRET",
        "TOKIO_WORKER_THREADS",
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
    assert!(
        !stdout.contains(", api ") && !stdout.contains(", bus "),
        "{stdout}"
    );

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
fn check_config_summarises_every_listener_and_the_bus_without_its_credentials() {
    let (_dir, file) = config_file(
        "gateway:\n  listen: 127.0.0.1:4000\n  socket:\n    path: /connect\n    onclose: { publish: socket:close }\n    sse: {}\n  api:\n    listen: 127.0.0.1:9092\n  bus:\n    nats:\n      url: [\"nats://user:hunter2@127.0.0.1:4222\", \"nats://127.0.0.1:4223\"]\n  http_handlers:\n    - url: http://127.0.0.1:8080/events\n      topics: [socket:close]\n      secret_env: SB_IT_UNSET_SECRET\n",
    );
    let out = bin().arg("check-config").arg(&file).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for part in [
        "sse /connect/sse",
        "api 127.0.0.1:9092",
        "bus nats (2 server URL(s))",
        "1 HTTP handler endpoint(s)",
    ] {
        assert!(stdout.contains(part), "{part} in {stdout}");
    }
    assert!(!stdout.contains("hunter2"), "{stdout}");
}

/// A NATS URL may carry a password: no message shows it, not the failed connection's, not a
/// bad URL's (from the file or a variable).
#[test]
fn no_error_shows_the_password_of_a_nats_url() {
    // A port nothing listens on (probed, released: a connection there is refused).
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (_dir, file) = config_file(format!(
        "gateway:\n  listen: \"127.0.0.1:0\"\n  socket:\n    path: /connect\n  bus:\n    nats:\n      url: \"nats://alice:${{SB_IT_NATS_PW}}@127.0.0.1:{closed}\"\n"
    ));
    let mut serve = bin();
    serve
        .args(["serve", "--config"])
        .arg(&file)
        .env("SB_IT_NATS_PW", "TopSecretPw")
        // The NATS client logs every connection attempt's server at debug.
        .env("RUST_LOG", "debug");
    let (code, stderr) = exit_code_and_stderr(serve);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "cannot connect to NATS at nats://127.0.0.1:{closed}"
        )),
        "{stderr}"
    );
    assert!(!stderr.contains("TopSecretPw"), "{stderr}");
    let (_dir, file) = config_file(
        "gateway:\n  socket: {}\n  bus:\n    nats:\n      url: \"nats://alice:${SB_IT_NATS_PW}@127.0.0.1:99999\"\n",
    );
    let out = bin()
        .arg("check-config")
        .arg(&file)
        .env("SB_IT_NATS_PW", "TopSecretPw")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("url `nats://***@127.0.0.1:99999`"),
        "{stderr}"
    );
    assert!(!stderr.contains("TopSecretPw"), "{stderr}");
}

#[test]
fn serve_refuses_a_worker_count_it_cannot_use_and_names_it() {
    let (_dir, file) =
        config_file("gateway:\n  listen: \"127.0.0.1:0\"\n  socket:\n    path: /connect\n");
    // A typo or an absurd count is an error before anything listens, not a silent default.
    for bad in ["four", "0", "100000"] {
        let mut serve = bin();
        serve
            .args(["serve", "--config"])
            .arg(&file)
            .env("TOKIO_WORKER_THREADS", bad);
        let (code, stderr) = exit_code_and_stderr(serve);
        assert_eq!(code, Some(1), "{bad}: {stderr}");
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
    // --drain reads a duration as the config does: at most ten years, as `gateway.drain`.
    let out = bin()
        .args(["serve", "--drain", "500000000000years", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--drain") && stderr.contains("at most 10 years"),
        "{stderr}"
    );
}

/// The child's stderr, read on a thread of its own (so that a full pipe never stalls the
/// server) to its end: joined once the process has ended.
fn stderr_on_a_thread(child: &mut std::process::Child) -> std::thread::JoinHandle<String> {
    let mut stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    })
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

#[test]
fn logs_to_a_pipe_have_no_colour_and_a_bad_rust_log_is_named() {
    let (_dir, file) = config_file(
        "gateway:\n  listen: 127.0.0.1:0\n  socket: {}\n  auth:\n    secret_env: SB_IT_SECRET\n  admin:\n    listen: 127.0.0.1:0\n",
    );
    let mut child = bin()
        .args(["serve", "--config"])
        .arg(&file)
        .env("SB_IT_SECRET", "a-secret-of-at-least-16-bytes")
        .env("RUST_LOG", "info,switchboard=loud")
        .env_remove("NO_COLOR") // colour must be off for the pipe alone
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read on a thread of its own, so that a full pipe never stalls the server.
    let logged = stderr_on_a_thread(&mut child);
    let _ = printed_addresses(&mut child);
    stop_cleanly(&mut child);
    // The process has ended, so its stderr is at its end.
    let logged = logged.join().unwrap();
    assert!(
        !logged.contains('\u{1b}'),
        "escape codes in a piped log: {logged:?}"
    );
    let warning = logged
        .lines()
        .find(|line| line.contains("RUST_LOG is not a valid filter"))
        .unwrap_or_else(|| panic!("no warning naming RUST_LOG: {logged}"));
    assert!(
        warning.contains("WARN") && warning.contains("info,switchboard=loud"),
        "{warning}"
    );
    // The default filter is in force: info events are written.
    assert!(logged.contains("gateway listening"), "{logged}");
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

#[test]
fn listen_options_that_take_a_port_already_taken_are_refused_naming_both() {
    let (dir, file) = config_file(
        "gateway:\n  listen: 127.0.0.1:0\n  socket: {}\n  auth:\n    secret_env: SB_IT_SECRET\n  admin:\n    listen: 127.0.0.1:47611\n",
    );
    let serve = |extra: &[&str]| {
        let mut args = vec!["serve".as_ref(), "--config".as_ref(), file.as_os_str()];
        args.extend(extra.iter().map(|a| std::ffi::OsStr::new(*a)));
        exit_of(dir.path(), &args)
    };
    let cases = [
        (
            &["--listen", "127.0.0.1:47611"][..],
            "--listen 127.0.0.1:47611 is also the address of gateway.admin.listen",
        ),
        (
            &[
                "--listen",
                "0.0.0.0:47612",
                "--admin-listen",
                "127.0.0.1:47612",
            ][..],
            "--admin-listen 127.0.0.1:47612 is also the address of --listen",
        ),
    ];
    for (args, want) in cases {
        let (code, stderr) = serve(args);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(&format!(
                "error: {want}: each listener needs a port of its own"
            )),
            "{args:?}: {stderr}"
        );
    }
}

/// Runs `switchboard` with `args` in `dir` (see [`exit_code_and_stderr`]).
fn exit_of(dir: &std::path::Path, args: &[&std::ffi::OsStr]) -> (Option<i32>, String) {
    let mut command = bin();
    command
        .args(args)
        .current_dir(dir)
        .env("SB_IT_SECRET", "an it secret of 32 bytes or so..");
    exit_code_and_stderr(command)
}

/// Runs `command`, which must exit by itself, and waits at most 10 s for it (one that started
/// serving anyway is ended, and the test fails): (exit code, stderr).
fn exit_code_and_stderr(mut command: Command) -> (Option<i32>, String) {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{command:?} started instead of exiting");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    (status.code(), stderr)
}

#[test]
fn serve_demo_with_a_config_that_is_not_there_is_an_error_not_the_built_in_config() {
    // Was: `serve --demo -c typo.yaml` served the built-in config in its place, silently.
    let dir = tempfile::tempdir().unwrap();
    let (code, stderr) = exit_of(
        dir.path(),
        &[
            "serve".as_ref(),
            "--demo".as_ref(),
            "--listen".as_ref(),
            "127.0.0.1:0".as_ref(),
            "--config".as_ref(),
            "typo.yaml".as_ref(),
        ],
    );
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("cannot read config file typo.yaml"),
        "{stderr}"
    );
}

#[test]
fn a_config_serve_cannot_use_fails_check_config_and_serve_alike_with_2() {
    // Each was `ok` for check-config, then a start-up failure (exit 1) for serve.
    for (yaml, says) in [
        (
            "gateway:\n  listen: 127.0.0.1:0\n  socket:\n    path: /c\n    sse:\n      path: /c\n  auth:\n    secret_env: SB_IT_SECRET\n",
            "gateway.socket.sse.path: `/c` is gateway.socket.path too",
        ),
        (
            "gateway:\n  listen: 127.0.0.1:4698\n  socket: {}\n  auth:\n    secret_env: SB_IT_SECRET\n  admin:\n    listen: 127.0.0.1:4698\n",
            "gateway.admin.listen: 127.0.0.1:4698 is also the address of gateway.listen",
        ),
        (
            "gateway:\n  listen: 127.0.0.1:0\n  socket: {}\n  auth:\n    secret_env: \"\"\n",
            "auth.secret_env must name an environment variable",
        ),
    ] {
        let (dir, file) = config_file(yaml);
        for args in [
            ["check-config".as_ref(), file.as_os_str()].as_slice(),
            ["serve".as_ref(), "--config".as_ref(), file.as_os_str()].as_slice(),
        ] {
            let (code, stderr) = exit_of(dir.path(), args);
            assert_eq!(code, Some(2), "{args:?}: {stderr}");
            assert!(stderr.contains(says), "{args:?}: {stderr}");
            assert!(stderr.contains(" at line "), "{args:?}: {stderr}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_without_tls_does_not_end_the_process_and_sigterm_still_drains() {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    use tokio_tungstenite::tungstenite::Message as WsMessage;

    // Was: only a TLS config listened for SIGHUP; without one, SIGHUP's default action ended
    // the process at once (sockets dropped without a close frame, no onclose published).
    let (_dir, file) = config_file(format!(
        "gateway:\n  listen: 127.0.0.1:0\n  socket:\n    path: /connect\n  auth:\n    secret_env: {}\n",
        switchboard_test_support::SECRET_ENV
    ));
    let (mut child, addr) =
        super::spawn_serve(super::serve_config(&file, "unused-api-key-0123456789"));
    let mut req = format!("ws://{addr}/connect?namespace=acme")
        .into_client_request()
        .unwrap();
    let token = switchboard_test_support::token("alex");
    req.headers_mut()
        .insert("cookie", format!("ID_TOKEN={token}").parse().unwrap());
    let mut ws = tokio_tungstenite::connect_async(req).await.unwrap().0;

    let pid = child.id().to_string();
    // SIGHUP, then SIGTERM: were SIGHUP fatal, it would end the process first (signals are
    // taken lowest number first), without the close frame below and with a failed status.
    for signal in ["-HUP", "-TERM"] {
        assert!(Command::new("kill")
            .args([signal, &pid])
            .status()
            .unwrap()
            .success());
    }
    let code = loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("a close frame")
        {
            Some(Ok(WsMessage::Close(Some(f)))) => break f.code,
            Some(Ok(_)) => continue,
            other => panic!("expected close 1001, got {other:?}"),
        }
    };
    assert_eq!(code, CloseCode::Away);
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
}

#[test]
fn a_stdout_that_went_away_is_not_a_panic() {
    // Was: `println!` panicked on the closed pipe (`serve | head -1`, a log collector that
    // ended): at the next line printed, by SIGTERM at the latest, instead of draining.
    let (_dir, file) =
        config_file("gateway:\n  listen: 127.0.0.1:0\n  socket:\n    path: /connect\n");
    let mut child = bin()
        .args(["serve", "--config"])
        .arg(&file)
        .env("SWITCHBOARD_JWT_SECRET", "an it secret of 32 bytes or so..")
        .env("RUST_LOG", "warn")
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    loop {
        let line = lines.next().expect("serve printed its address").unwrap();
        if line.starts_with("switchboard: listening on ") {
            break;
        }
    }
    drop(lines); // the reader goes away: every later write to stdout fails
    let stderr = stderr_on_a_thread(&mut child);
    stop_cleanly(&mut child);
    let stderr = stderr.join().unwrap();
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn sigterm_while_start_up_waits_for_the_key_set_ends_it_at_once() {
    // A key-set server that takes the connection and never answers: start-up waits up to
    // `startup_wait` (30 s) for it. Was: the SIGTERM caught meanwhile was acted on only
    // after the wait, and after the gateway had started listening.
    let keys = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/jwks", keys.local_addr().unwrap());
    let (_dir, file) = config_file(format!(
        "gateway:\n  listen: 127.0.0.1:0\n  socket:\n    path: /connect\n  auth:\n    \
         jwks_url: \"{url}\"\n    jwks: {{startup_wait: 30s, timeout: 30s}}\n"
    ));
    let mut child = bin()
        .args(["serve", "--config"])
        .arg(&file)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Its fetch has connected: start-up is waiting, with the signal handler in place.
    let (_fetch, _) = keys.accept().unwrap();
    let asked = std::time::Instant::now();
    assert!(Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success());
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if asked.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            panic!("still starting 10 s after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert!(out.contains("stopped during start-up"), "{out}");
    assert!(!out.contains("listening on"), "{out}");
}

#[tokio::test]
async fn a_username_in_the_logs_cannot_pass_for_another_field() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    // Usernames come from tokens: whoever holds one chooses it. Was: written bare in the
    // text format (`username=a level=ERROR`), and the namespace as `Some("acme")`.
    let name = r#"a level=ERROR x="y""#;
    for json in [false, true] {
        let (_dir, file) = config_file(format!(
            "gateway:\n  listen: 127.0.0.1:0\n  socket:\n    path: /connect\n  auth:\n    secret_env: {}\n",
            switchboard_test_support::SECRET_ENV
        ));
        let mut serve = super::serve_config(&file, "unused-api-key-0123456789");
        if json {
            serve.args(["--log-format", "json"]);
        }
        let mut child = serve
            .env("RUST_LOG", "switchboard=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let logged = stderr_on_a_thread(&mut child);
        let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let addr: SocketAddr = loop {
            let line = stdout.next().expect("the listening line").unwrap();
            if let Some(rest) = line.strip_prefix("switchboard: listening on ws://") {
                break rest.trim_end_matches("/connect").parse().unwrap();
            }
        };
        std::thread::spawn(move || for _ in stdout {});
        let mut req = format!("ws://{addr}/connect?namespace=acme")
            .into_client_request()
            .unwrap();
        let token = switchboard_test_support::token(name);
        req.headers_mut()
            .insert("cookie", format!("ID_TOKEN={token}").parse().unwrap());
        let (ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
        drop(ws);
        tokio::time::sleep(Duration::from_millis(200)).await;
        stop_cleanly(&mut child);
        let logged = logged.join().unwrap();
        let line = logged
            .lines()
            .find(|l| l.contains("socket open"))
            .unwrap_or_else(|| panic!("no `socket open` line: {logged}"));
        if json {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(v["fields"]["username"], name, "{line}");
            assert_eq!(v["fields"]["namespace"], "acme", "{line}");
        } else {
            assert!(
                line.contains(r#"username="a level=ERROR x=\"y\"""#),
                "{line}"
            );
            assert!(line.contains(r#"namespace="acme""#), "{line}");
        }
    }
}
