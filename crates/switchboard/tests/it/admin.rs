//! The admin listener over real HTTP: `/metrics` after real socket traffic, `/healthz`,
//! `/readyz` (and its 503 during shutdown), and the namespace cardinality cap.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::json;
use switchboard::{Config, Message};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{
    connect, container, next_published, recorder, recv, send, spec_config, start, SECRET_ENV,
};

/// One HTTP/1.1 request on a fresh connection: (status, headers, body).
async fn http(addr: SocketAddr, method: &str, path: &str, accept: &str) -> (u16, String, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .expect("a response within 5 s")
        .unwrap();
    let text = String::from_utf8(buf).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    (
        head[9..12].parse().unwrap(),
        head.to_lowercase(),
        body.to_string(),
    )
}

async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let (status, _, body) = http(addr, "GET", path, "*/*").await;
    (status, body)
}

/// The value of the sample `series` (name and labels exactly as rendered).
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == series).then(|| value.parse().unwrap())
    })
}

/// Polls `/metrics` until `series` has `want` (counters read at scrape time may trail the
/// frames a client has already seen by a moment).
async fn wait_for(addr: SocketAddr, series: &str, want: f64) -> String {
    let mut last = String::new();
    for _ in 0..100 {
        last = get(addr, "/metrics").await.1;
        if sample(&last, series) == Some(want) {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{series} never became {want}:\n{last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_health_and_readiness_over_http() {
    let mut container = container(spec_config(""));
    container.admin_listen("127.0.0.1:0".parse().unwrap());
    let mut seen = recorder(&mut container, &["socket:close"]);
    container
        .add_handler("socket:type_one", |msg: Message| async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            msg.reply(json!({"ok": true}));
        })
        .unwrap();
    // a message re-published on a topic the config does not name: its reply is "(other)"
    let producer = container.producer();
    container
        .add_handler("socket:type_two", move |msg: Message| {
            let p = producer.clone();
            async move { p.publish(msg.with_topic("custom:elsewhere")) }
        })
        .unwrap();
    container
        .add_handler("custom:elsewhere", |msg: Message| async move {
            msg.reply("from elsewhere");
        })
        .unwrap();
    let running = start(container).await;
    let admin = running.admin_addr().expect("an admin listener");
    assert_ne!(admin, running.local_addr().unwrap());

    assert_eq!(get(admin, "/healthz").await, (200, "ok\n".into()));
    assert_eq!(get(admin, "/readyz").await, (200, "ready\n".into()));
    assert_eq!(get(admin, "/").await.0, 404);
    assert_eq!(http(admin, "POST", "/metrics", "*/*").await.0, 405);
    // the admin endpoints are not on the public port
    assert_eq!(get(running.local_addr().unwrap(), "/metrics").await.0, 404);

    let mut alex = connect(&running, "alex", Some("acme")).await;
    let mut sam = connect(&running, "sam", Some("acme")).await;
    let mut kim = connect(&running, "kim", None).await;
    send(&mut alex, json!({"type": "message_type_one", "payload": 1})).await;
    assert_eq!(
        recv(&mut alex).await,
        json!({"type": "socket:type_one", "payload": {"ok": true}})
    );
    send(&mut sam, json!({"type": "message_type_two"})).await;
    assert_eq!(
        recv(&mut sam).await,
        json!({"type": "custom:elsewhere", "payload": "from elsewhere"})
    );
    send(&mut kim, json!({"no": "type"})).await;
    assert_eq!(recv(&mut kim).await["type"], "error");
    running
        .producer()
        .send("socket:broadcast", json!({"type": "news", "payload": 1}))
        .unwrap();
    for ws in [&mut alex, &mut sam, &mut kim] {
        assert_eq!(recv(ws).await["type"], "news");
    }
    // refused: no token
    let (status, _, _) = http(running.local_addr().unwrap(), "GET", "/connect", "*/*").await;
    assert_eq!(status, 426);
    let refused =
        tokio_tungstenite::connect_async(format!("ws://{}/connect", running.local_addr().unwrap()))
            .await
            .unwrap_err();
    assert!(refused.to_string().contains("401"), "{refused}");

    let m = wait_for(
        admin,
        "switchboard_messages_out_total{topic=\"socket:broadcast\"}",
        3.0,
    )
    .await;
    let has = |series: &str, want: f64| {
        assert_eq!(sample(&m, series), Some(want), "{series} in\n{m}");
    };
    has("switchboard_sockets_open", 3.0);
    has("switchboard_sockets_opened_total", 3.0);
    has(
        "switchboard_sockets_open_by_namespace{namespace=\"acme\"}",
        2.0,
    );
    has(
        "switchboard_sockets_open_by_namespace{namespace=\"(none)\"}",
        1.0,
    );
    has("switchboard_messages_received_total", 2.0);
    has(
        "switchboard_messages_in_total{topic=\"socket:generalMessage\"}",
        2.0,
    );
    has(
        "switchboard_messages_in_total{topic=\"socket:type_one\"}",
        1.0,
    );
    has(
        "switchboard_messages_in_total{topic=\"socket:type_two\"}",
        1.0,
    );
    has(
        "switchboard_messages_out_total{topic=\"socket:type_one\"}",
        1.0,
    );
    has("switchboard_messages_out_total{topic=\"(other)\"}", 1.0);
    has("switchboard_error_frames_total{kind=\"bad_message\"}", 1.0);
    has("switchboard_bad_messages_total", 1.0);
    has(
        "switchboard_handshakes_refused_total{reason=\"unauthorized\",status=\"401\"}",
        1.0,
    );
    has(
        "switchboard_handshakes_refused_total{reason=\"capacity\",status=\"503\"}",
        0.0,
    );
    has(
        "switchboard_reply_latency_seconds_count{topic=\"socket:type_one\"}",
        1.0,
    );
    has(
        "switchboard_reply_latency_seconds_bucket{topic=\"socket:type_one\",le=\"0.01\"}",
        0.0,
    );
    has(
        "switchboard_reply_latency_seconds_bucket{topic=\"socket:type_one\",le=\"+Inf\"}",
        1.0,
    );
    has("switchboard_bus_publish_failures_total", 0.0);
    has("switchboard_ready", 1.0);
    assert!(
        m.contains("# TYPE switchboard_sockets_closed_total counter"),
        "{m}"
    );
    assert!(running
        .metrics_text()
        .contains("\nswitchboard_sockets_open 3\n"));

    // OpenMetrics when asked for it
    let (status, head, body) = http(admin, "GET", "/metrics", "application/openmetrics-text").await;
    assert_eq!(status, 200);
    assert!(
        head.contains("content-type: application/openmetrics-text"),
        "{head}"
    );
    assert!(body.ends_with("# EOF\n"), "{body}");

    // a client close is counted by reason
    alex.close(None).await.unwrap();
    assert_eq!(next_published(&mut seen).await.0, "socket:close");
    wait_for(
        admin,
        "switchboard_sockets_closed_total{reason=\"client\"}",
        1.0,
    )
    .await;

    // shutdown: /readyz turns 503 at once, while sockets drain; then the listener goes away.
    // kim's client is not read from, so its close handshake waits for the close timeout.
    let shutdown = tokio::spawn(running.shutdown(Duration::from_secs(5)));
    let mut refused = false;
    for _ in 0..100 {
        if get(admin, "/readyz").await == (503, "not ready: shutting down\n".into()) {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(refused, "/readyz never answered 503 during the drain");
    assert_eq!(get(admin, "/healthz").await.0, 200);
    drop((sam, kim));
    shutdown.await.unwrap();
    // The admin listener stops at the end of the shutdown.
    let mut stopped = false;
    for _ in 0..500 {
        if tokio::net::TcpStream::connect(admin).await.is_err() {
            stopped = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(stopped, "the admin listener still accepts after shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_series_are_capped_at_top_namespaces() {
    let config = Config::from_yaml_str(&format!(
        "gateway:\n  socket: {{}}\n  auth:\n    secret_env: {SECRET_ENV}\n  admin:\n    listen: 127.0.0.1:0\n    top_namespaces: 2\n"
    ))
    .unwrap();
    let running = start(container(config)).await;
    let admin = running.admin_addr().unwrap();
    let mut sockets = Vec::new();
    for (user, ns) in [
        ("a", "n3"),
        ("b", "n1"),
        ("c", "n1"),
        ("d", "n2"),
        ("e", "n4"),
    ] {
        sockets.push(connect(&running, user, Some(ns)).await);
    }
    let m = wait_for(admin, "switchboard_sockets_open", 5.0).await;
    let series: Vec<&str> = m
        .lines()
        .filter(|l| l.starts_with("switchboard_sockets_open_by_namespace{"))
        .collect();
    assert_eq!(
        series,
        [
            "switchboard_sockets_open_by_namespace{namespace=\"n1\"} 2",
            "switchboard_sockets_open_by_namespace{namespace=\"n2\"} 1",
            "switchboard_sockets_open_by_namespace{namespace=\"(other)\"} 2",
        ]
    );
    running.shutdown(Duration::from_secs(2)).await;
}

/// With `gateway.tls`, the admin listener serves HTTPS unless its `tls` is false; the
/// refused TLS handshakes on the public port are counted in `/metrics`.
#[tokio::test]
async fn the_admin_listener_follows_gateway_tls_unless_it_opts_out() {
    use switchboard_test_support::tls::{tls_stream, TestCa};
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let files = ca.write_server_files(dir.path(), "server");
    let yaml = |admin_tls: &str| {
        format!(
            "  tls:\n    cert_file: {:?}\n    key_file: {:?}\n  admin:\n    listen: 127.0.0.1:0\n{admin_tls}",
            files.cert, files.key
        )
    };
    let config = |extra: String| {
        let text = format!(
            "gateway:\n  socket:\n    onclose: {{publish: \"socket:close\"}}\n  auth:\n    secret_env: {SECRET_ENV}\n{extra}"
        );
        Config::from_yaml_str(&text).unwrap()
    };

    let gw = start(container(config(yaml("")))).await;
    let admin = gw.admin_addr().unwrap();
    let (stream, _) = tls_stream(admin, ca.client_config()).await.expect("HTTPS");
    let request = "GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    let mut stream = stream;
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    // A plain client on the public port fails its TLS handshake, and that is counted.
    let _ = tokio::net::TcpStream::connect(gw.local_addr().unwrap())
        .await
        .unwrap()
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let metrics = tls_get_metrics(admin, &ca).await;
    assert!(
        metrics.contains("switchboard_connections_refused_total{reason=\"tls\"}"),
        "{metrics}"
    );
    gw.shutdown(Duration::from_secs(1)).await;

    let gw = start(container(config(yaml("    tls: false\n")))).await;
    assert_eq!(
        get(gw.admin_addr().unwrap(), "/healthz").await.0,
        200,
        "plain HTTP"
    );
    gw.shutdown(Duration::from_secs(1)).await;
}

/// `/metrics` over HTTPS, once the TLS refusal shows in it (within 5 s).
async fn tls_get_metrics(admin: SocketAddr, ca: &switchboard_test_support::tls::TestCa) -> String {
    let mut last = String::new();
    for _ in 0..100 {
        let (mut stream, _) = switchboard_test_support::tls::tls_stream(admin, ca.client_config())
            .await
            .unwrap();
        let request = "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
        last = String::from_utf8_lossy(&answer).into_owned();
        if sample_tls_refusals(&last) >= 1.0 {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no TLS refusal counted:\n{last}");
}

fn sample_tls_refusals(metrics: &str) -> f64 {
    sample(
        metrics,
        "switchboard_connections_refused_total{reason=\"tls\"}",
    )
    .unwrap_or(0.0)
}

#[tokio::test]
async fn a_request_head_over_64_kib_is_431() {
    // Was hyper's default buffer (about 400 KiB a connection, before the API key is
    // checked), times the 128 connections a listener serves.
    let config = Config::from_yaml_str(&format!(
        "gateway:\n  socket: {{}}\n  auth:\n    secret_env: {SECRET_ENV}\n  admin:\n    listen: 127.0.0.1:0\n"
    ))
    .unwrap();
    let running = start(container(config)).await;
    let admin = running.admin_addr().unwrap();
    let status_with_pad = |kib: usize| async move {
        let mut s = tokio::net::TcpStream::connect(admin).await.unwrap();
        let req = format!(
            "GET /healthz HTTP/1.1\r\nHost: {admin}\r\nX-Pad: {}\r\nConnection: close\r\n\r\n",
            "a".repeat(kib << 10)
        );
        // The server may answer and close before it has read everything: what it sent
        // before its reset is still read.
        let _ = s.write_all(req.as_bytes()).await;
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
        String::from_utf8_lossy(&buf)
            .chars()
            .skip(9)
            .take(3)
            .collect::<String>()
    };
    assert_eq!(status_with_pad(100).await, "431");
    assert_eq!(status_with_pad(40).await, "200");
}
