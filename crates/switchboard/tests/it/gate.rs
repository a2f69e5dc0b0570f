//! The connect gate (`onconnect.gate`): a socket waits for its connect handler's verdict
//! before anything it sends is read or anything is delivered to it. What frames sent with the
//! upgrade itself become is WebSocket's alone; the rest runs on each transport.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use switchboard::{Config, Container, Message};
use tokio::sync::{mpsc, Mutex};

use switchboard_test_support::{each_transport, start as start_on, Event, Kind, WAIT};

use crate::harness::*;
use crate::raw;

fn gate_config(timeout: &str) -> Config {
    let _ = spec_config("");
    let yaml = format!(
        "gateway:\n  socket:\n    onconnect: {{publish: \"socket:connection\", gate: true, gate_timeout: {timeout}}}\n    onmessage: {{publish: \"socket:generalMessage\"}}\n    onclose: {{publish: \"socket:close\"}}\n    broadcast: {{subscribe: \"socket:broadcast\"}}\n  auth:\n    secret_env: {SECRET_ENV}\n"
    );
    Config::from_yaml_str(&yaml).unwrap()
}

/// A connect handler that reports each call on `called` and then waits for a verdict
/// ("ok", "fail", or nothing at all) from the returned sender.
fn judge(
    c: &mut Container,
) -> (
    mpsc::UnboundedSender<&'static str>,
    mpsc::UnboundedReceiver<()>,
) {
    let (verdict_tx, verdict_rx) = mpsc::unbounded_channel::<&'static str>();
    let (called_tx, called_rx) = mpsc::unbounded_channel();
    let verdicts = Arc::new(Mutex::new(verdict_rx));
    c.add_handler("socket:connection", move |m: Message| {
        let verdicts = verdicts.clone();
        let called = called_tx.clone();
        async move {
            let _ = called.send(());
            match verdicts.lock().await.recv().await {
                Some("ok") => m.reply(json!({"welcome": m.context().username})),
                Some("fail") => m.fail(json!({"message": "not you"})),
                _ => std::future::pending().await,
            }
        }
    })
    .unwrap();
    (verdict_tx, called_rx)
}

/// Two messages, sent in the same TCP write as the upgrade request.
fn early_frames() -> Vec<u8> {
    let mut early = raw::frame(true, raw::TEXT, br#"{"type":"early","payload":1}"#);
    early.extend(raw::frame(
        true,
        raw::TEXT,
        br#"{"type":"early","payload":2}"#,
    ));
    early
}

async fn text(stream: &mut tokio::net::TcpStream) -> serde_json::Value {
    loop {
        let (op, payload) = raw::read_frame(stream).await;
        assert_ne!(op, raw::CLOSE, "closed: {payload:?}");
        if op == raw::TEXT {
            return serde_json::from_slice(&payload).unwrap();
        }
    }
}

#[tokio::test]
async fn frames_sent_with_the_upgrade_wait_for_the_verdict_and_nothing_reaches_the_socket_before() {
    let mut c = container(gate_config("10s"));
    let (verdict, mut called) = judge(&mut c);
    let mut seen = recorder(&mut c, &["socket:generalMessage"]);
    let gw = start(c).await;
    let addr = gw.local_addr().unwrap();
    let request = raw::upgrade_request(addr, "", &token("alex"), "");
    let (mut stream, head) = raw::open(addr, &request, &early_frames()).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    tokio::time::timeout(Duration::from_secs(5), called.recv())
        .await
        .unwrap();
    // While the handler thinks: a broadcast does not reach the socket, and what it sent is
    // neither read nor published.
    gw.producer()
        .send(
            "socket:broadcast",
            json!({"type": "news", "payload": "early"}),
        )
        .unwrap();
    assert_eq!(gw.sockets().count(), 0, "not registered before the verdict");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        seen.try_recv().is_err(),
        "nothing published before the verdict"
    );
    verdict.send("ok").unwrap();
    assert_eq!(
        text(&mut stream).await,
        json!({"type": "onconnect", "payload": {"welcome": "alex"}}),
        "the verdict's reply comes first; the broadcast before it never came"
    );
    for n in [1, 2] {
        let (_, data, _) = next_published(&mut seen).await;
        assert_eq!(data, json!({"type": "early", "payload": n}), "in order");
    }
    gw.producer()
        .send(
            "socket:broadcast",
            json!({"type": "news", "payload": "late"}),
        )
        .unwrap();
    assert_eq!(
        text(&mut stream).await,
        json!({"type": "news", "payload": "late"})
    );
    assert_eq!(gw.sockets().count(), 1);
}

#[tokio::test]
async fn a_failed_verdict_closes_the_socket_and_drops_what_it_sent() {
    let mut c = container(gate_config("10s"));
    let (verdict, mut called) = judge(&mut c);
    let mut seen = recorder(&mut c, &["socket:generalMessage", "socket:close"]);
    let gw = start(c).await;
    let addr = gw.local_addr().unwrap();
    let request = raw::upgrade_request(addr, "", &token("mallory"), "");
    let (mut stream, _) = raw::open(addr, &request, &early_frames()).await;
    tokio::time::timeout(Duration::from_secs(5), called.recv())
        .await
        .unwrap();
    verdict.send("fail").unwrap();
    assert_eq!(
        text(&mut stream).await,
        json!({"type": "error", "payload": {"message": "not you"}})
    );
    assert_eq!(raw::read_close_code(&mut stream).await, 1008);
    let (topic, data, _) = next_published(&mut seen).await;
    assert_eq!(
        topic, "socket:close",
        "the early frames were never published"
    );
    assert_eq!(data["username"], "mallory");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(seen.try_recv().is_err(), "nothing else, ever");
    assert_eq!(gw.sockets().count(), 0);
    assert_eq!(gw.stats().connect_failures, 1);
}

async fn no_verdict_in_time_closes_the_socket(kind: Kind) {
    let mut c = container(gate_config("300ms"));
    let (_verdict, _called) = judge(&mut c);
    let mut seen = recorder(&mut c, &["socket:generalMessage", "socket:close"]);
    let gw = start_on(kind, c).await;
    let mut alex = gw.connect("alex", None).await;
    // Over SSE the post waits for the verdict and is refused (410) when none comes; over a
    // WebSocket the frame waits in the kernel. Either way it is never published.
    let _ = alex
        .try_send_text(&json!({"type": "early", "payload": 1}).to_string())
        .await;
    assert_eq!(alex.close_code().await, 1011);
    let (topic, _, _) = next_published(&mut seen).await;
    assert_eq!(topic, "socket:close", "what it sent was never published");
    assert_eq!(gw.stats().gate_timeouts, 1);
}

async fn a_socket_let_in_stays_registered_after_the_gate_timeout(kind: Kind) {
    // Long enough for the handler's immediate verdict, however busy the machine.
    let mut c = container(gate_config("2s"));
    c.add_handler("socket:connection", |m: Message| async move {
        m.reply(json!({"welcome": true}));
    })
    .unwrap();
    let gw = start_on(kind, c).await;
    let mut alex = gw.connect("alex", None).await;
    assert_eq!(alex.recv().await["type"], "onconnect");
    // Well past the gate's timeout, the socket is still registered and reached.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(gw.sockets().count(), 1);
    gw.producer()
        .send("socket:broadcast", json!({"type": "news", "payload": 1}))
        .unwrap();
    assert_eq!(alex.recv().await, json!({"type": "news", "payload": 1}));
    assert_eq!(gw.stats().gate_timeouts, 0);
}

async fn the_per_user_limit_counts_sockets_that_waited_at_the_gate(kind: Kind) {
    let _ = spec_config("");
    let yaml = format!(
        "gateway:\n  socket:\n    onconnect: {{publish: \"socket:connection\", gate: true}}\n  limits:\n    max_sockets_per_user: 1\n  auth:\n    secret_env: {SECRET_ENV}\n"
    );
    let mut c = container(Config::from_yaml_str(&yaml).unwrap());
    let (verdict, mut called) = judge(&mut c);
    let gw = start_on(kind, c).await;
    // Two sockets of one user pass admission together: neither is registered yet.
    let mut first = gw.connect("alex", None).await;
    let mut second = gw.connect("alex", None).await;
    for _ in 0..2 {
        tokio::time::timeout(WAIT, called.recv()).await.unwrap();
    }
    verdict.send("ok").unwrap();
    verdict.send("ok").unwrap();
    // One is let in; the other finds the limit reached at its verdict and is closed.
    let mut codes = Vec::new();
    for client in [&mut first, &mut second] {
        match client.next(WAIT).await {
            Some(Event::Close(code)) => {
                codes.push(code);
                continue;
            }
            Some(Event::Json(frame)) => assert_eq!(frame["type"], "onconnect"),
            other => panic!("expected onconnect or a close, got {other:?}"),
        }
        if let Some(Event::Close(code)) = client.next(Duration::from_millis(300)).await {
            codes.push(code);
        }
    }
    assert_eq!(codes, [1008], "exactly one closed");
    assert_eq!(gw.sockets().count(), 1);
}

each_transport!(
    no_verdict_in_time_closes_the_socket,
    a_socket_let_in_stays_registered_after_the_gate_timeout,
    the_per_user_limit_counts_sockets_that_waited_at_the_gate,
);
