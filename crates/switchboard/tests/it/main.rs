//! End to end: the spec's behaviour over real sockets on 127.0.0.1, with real WebSocket
//! clients and signed tokens.

mod admin;
mod bounds;
mod gate;
mod harness;
mod hostile;
mod identity;
mod lifetime;
mod raw;
mod sse;
mod sse_client;
mod tenancy;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use harness::*;
use serde_json::json;
use switchboard::{Container, Message};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message as WsMessage;

#[tokio::test]
async fn connect_reply_reaches_the_client_with_full_context() {
    let mut c = container(spec_config(""));
    let mut seen = recorder(&mut c, &["socket:connection"]);
    c.add_handler("socket:connection", |m: Message| async move {
        m.reply(json!({"data": [1, 2, 3]}));
    })
    .unwrap();
    let gw = start(c).await;
    let mut ws = connect(&gw, "alex", Some("acme")).await;
    assert_eq!(
        recv(&mut ws).await,
        json!({"type": "onconnect", "payload": {"data": [1, 2, 3]}})
    );
    let (topic, data, ctx) = next_published(&mut seen).await;
    assert_eq!(topic, "socket:connection");
    assert_eq!(data["username"], "alex");
    assert_eq!(data["namespace"], "acme");
    assert_eq!(ctx["username"], "alex");
    assert_eq!(ctx["namespace"], "acme");
    assert!(ctx["connection_id"].is_u64());
    assert_eq!(ctx["params"]["namespace"], "acme");
    assert_eq!(ctx["headers"]["jwt"]["preferred_username"], "alex");
    assert_eq!(ctx["headers"]["jwt"]["email"], "alex@example.com");
    assert!(
        ctx["headers"].get("host").is_none(),
        "only the configured headers"
    );
    assert!(
        ctx["headers"].get("cookie").is_none(),
        "credentials stay out of messages"
    );
}

#[tokio::test]
async fn connect_fail_sends_error_then_closes_and_still_publishes_onclose() {
    let mut c = container(spec_config(""));
    let mut closes = recorder(&mut c, &["socket:close"]);
    c.add_handler("socket:connection", |m: Message| async move {
        m.fail(json!({"message": "not today"}));
    })
    .unwrap();
    let gw = start(c).await;
    let mut ws = connect(&gw, "alex", Some("acme")).await;
    assert_eq!(
        recv(&mut ws).await,
        json!({"type": "error", "payload": {"message": "not today"}})
    );
    match ws.next().await {
        Some(Ok(WsMessage::Close(Some(f)))) => assert_eq!(f.code, CloseCode::Policy),
        other => panic!("expected close 1008, got {other:?}"),
    }
    let (_, data, _) = next_published(&mut closes).await;
    assert_eq!(data["username"], "alex");
    assert_eq!(data["reason"]["code"], 1008);
}

/// Replies to every message with what it saw, on every message topic.
fn echo_handlers(c: &mut Container) {
    for topic in [
        "socket:generalMessage",
        "socket:type_one",
        "socket:type_two",
    ] {
        c.add_handler(topic, |m: Message| async move {
            m.reply(json!({"got": m.data().clone()}));
        })
        .unwrap();
    }
}

#[tokio::test]
async fn messages_publish_general_and_typed_and_replies_carry_the_topic() {
    let mut c = container(spec_config(""));
    echo_handlers(&mut c);
    let mut seen = recorder(
        &mut c,
        &[
            "socket:generalMessage",
            "socket:type_one",
            "socket:type_two",
        ],
    );
    let gw = start(c).await;
    let mut ws = connect(&gw, "alex", Some("acme")).await;

    let m1 = json!({"type": "message_type_one", "payload": {"n": 1}});
    send(&mut ws, m1.clone()).await;
    let mut replies = vec![recv(&mut ws).await, recv(&mut ws).await];
    replies.sort_by_key(|v| v["type"].as_str().unwrap().to_string());
    assert_eq!(
        replies,
        [
            json!({"type": "socket:generalMessage", "payload": {"got": m1}}),
            json!({"type": "socket:type_one", "payload": {"got": m1}}),
        ]
    );
    let mut topics = vec![
        next_published(&mut seen).await.0,
        next_published(&mut seen).await.0,
    ];
    topics.sort();
    assert_eq!(topics, ["socket:generalMessage", "socket:type_one"]);

    // an unlisted type goes to the general topic only
    let m2 = json!({"type": "something_else", "payload": null});
    send(&mut ws, m2.clone()).await;
    assert_eq!(
        recv(&mut ws).await,
        json!({"type": "socket:generalMessage", "payload": {"got": m2}})
    );
    let (topic, data, ctx) = next_published(&mut seen).await;
    assert_eq!((topic.as_str(), &data), ("socket:generalMessage", &m2));
    assert_eq!(ctx["username"], "alex");
    assert_silent(&mut ws, 200).await;
}

#[tokio::test]
async fn message_fail_sends_error_frame_and_keeps_the_socket() {
    let mut c = container(spec_config(""));
    c.add_handler("socket:generalMessage", |m: Message| async move {
        if m.data()["payload"]["ok"] == json!(true) {
            m.reply("fine");
        } else {
            m.fail(json!({"code": "E_NOPE"}));
        }
    })
    .unwrap();
    let gw = start(c).await;
    let mut ws = connect(&gw, "alex", None).await;
    send(&mut ws, json!({"type": "x", "payload": {"ok": false}})).await;
    assert_eq!(
        recv(&mut ws).await,
        json!({"type": "error", "payload": {"code": "E_NOPE"}})
    );
    send(&mut ws, json!({"type": "x", "payload": {"ok": true}})).await;
    assert_eq!(
        recv(&mut ws).await,
        json!({"type": "socket:generalMessage", "payload": "fine"})
    );
}

#[tokio::test]
async fn bad_messages_get_error_frames_publish_nothing_and_keep_the_socket() {
    let mut c = container(spec_config(""));
    echo_handlers(&mut c);
    let mut seen = recorder(&mut c, &["socket:generalMessage", "socket:type_one"]);
    let gw = start(c).await;
    let mut ws = connect(&gw, "alex", Some("acme")).await;
    for bad in [
        "not json",
        "[1,2,3]",
        "{\"payload\": 1}",
        "{\"type\": 7}",
        "\"message_type_one\"",
        "{\"type\": \"message_type_one\"",
    ] {
        ws.send(WsMessage::text(bad)).await.unwrap();
        let frame = recv(&mut ws).await;
        assert_eq!(frame["type"], "error", "{bad} -> {frame}");
        assert!(frame["payload"]["message"].is_string(), "{frame}");
    }
    ws.send(WsMessage::binary(vec![1u8, 2, 3])).await.unwrap();
    let frame = recv(&mut ws).await;
    assert_eq!(frame["type"], "error");
    assert!(frame["payload"]["message"]
        .as_str()
        .unwrap()
        .contains("binary"));
    assert!(seen.try_recv().is_err(), "nothing was published");
    // still open and working
    send(&mut ws, json!({"type": "message_type_one"})).await;
    assert_eq!(
        recv(&mut ws).await["payload"]["got"]["type"],
        "message_type_one"
    );
}

#[tokio::test]
async fn send_reaches_the_user_in_that_namespace_only() {
    let c = container(spec_config(""));
    let gw = start(c).await;
    let mut alex_a1 = connect(&gw, "alex", Some("a")).await;
    let mut alex_a2 = connect(&gw, "alex", Some("a")).await;
    let mut alex_b = connect(&gw, "alex", Some("b")).await;
    let mut alex_none = connect(&gw, "alex", None).await;
    let mut sam_a = connect(&gw, "sam", Some("a")).await;
    wait_for_sockets(&gw, 5).await;
    gw.producer()
        .send(
            "socket:send",
            json!({"username": "alex", "namespace": "a", "type": "note", "payload": {"n": 1}}),
        )
        .unwrap();
    let expected = json!({"type": "note", "payload": {"n": 1}});
    assert_eq!(recv(&mut alex_a1).await, expected);
    assert_eq!(recv(&mut alex_a2).await, expected);
    // the second tenant, and alex's other namespaces, get nothing
    assert_silent(&mut alex_b, 300).await;
    assert_silent(&mut alex_none, 10).await;
    assert_silent(&mut sam_a, 10).await;
}

#[tokio::test]
async fn send_without_namespace_reaches_every_socket_of_the_user() {
    let c = container(spec_config(""));
    let gw = start(c).await;
    let mut alex = [
        connect(&gw, "alex", Some("a")).await,
        connect(&gw, "alex", Some("b")).await,
        connect(&gw, "alex", None).await,
    ];
    let mut sam = connect(&gw, "sam", Some("a")).await;
    wait_for_sockets(&gw, 4).await;
    gw.producer()
        .send(
            "socket:send",
            json!({"username": "alex", "type": "t", "payload": 5}),
        )
        .unwrap();
    for ws in alex.iter_mut() {
        assert_eq!(recv(ws).await, json!({"type": "t", "payload": 5}));
    }
    assert_silent(&mut sam, 300).await;
}

#[tokio::test]
async fn broadcast_reaches_everyone_or_one_namespace() {
    let c = container(spec_config(""));
    let gw = start(c).await;
    let mut a = [
        connect(&gw, "alex", Some("a")).await,
        connect(&gw, "sam", Some("a")).await,
    ];
    let mut b = connect(&gw, "kim", Some("b")).await;
    let mut none = connect(&gw, "lee", None).await;
    wait_for_sockets(&gw, 4).await;
    let p = gw.producer();
    p.send("socket:broadcast", json!({"type": "all", "payload": 1}))
        .unwrap();
    for ws in a.iter_mut().chain([&mut b, &mut none]) {
        assert_eq!(recv(ws).await, json!({"type": "all", "payload": 1}));
    }
    p.send(
        "socket:broadcast",
        json!({"namespace": "a", "type": "only-a", "payload": 2}),
    )
    .unwrap();
    for ws in a.iter_mut() {
        assert_eq!(recv(ws).await, json!({"type": "only-a", "payload": 2}));
    }
    assert_silent(&mut b, 300).await;
    assert_silent(&mut none, 10).await;
}

#[tokio::test]
async fn handlers_can_send_through_the_producer() {
    // The spec's pattern: a handler publishes to the send topic for another user.
    let mut c = container(spec_config(""));
    let producer = c.producer();
    c.add_handler("socket:type_two", move |m: Message| {
        let p = producer.clone();
        async move {
            let ctx = m.context();
            p.send(
                "socket:send",
                json!({
                    "username": m.data()["payload"]["to"],
                    "namespace": ctx.namespace,
                    "type": "poke",
                    "payload": {"from": ctx.username},
                }),
            )
        }
    })
    .unwrap();
    let gw = start(c).await;
    let mut alex = connect(&gw, "alex", Some("a")).await;
    let mut sam = connect(&gw, "sam", Some("a")).await;
    let mut sam_elsewhere = connect(&gw, "sam", Some("b")).await;
    wait_for_sockets(&gw, 3).await;
    send(
        &mut alex,
        json!({"type": "message_type_two", "payload": {"to": "sam"}}),
    )
    .await;
    assert_eq!(
        recv(&mut sam).await,
        json!({"type": "poke", "payload": {"from": "alex"}})
    );
    assert_silent(&mut sam_elsewhere, 300).await;
}

#[tokio::test]
async fn bad_send_data_is_refused_without_harm() {
    let c = container(spec_config(""));
    let gw = start(c).await;
    let mut alex = connect(&gw, "alex", Some("a")).await;
    wait_for_sockets(&gw, 1).await;
    let p = gw.producer();
    p.send("socket:send", json!({"type": "t"})).unwrap(); // no username
    p.send("socket:send", json!({"username": "alex", "payload": 1}))
        .unwrap(); // no type
    p.send(
        "socket:send",
        json!({"username": "alex", "namespace": 5, "type": "t"}),
    )
    .unwrap();
    assert_silent(&mut alex, 200).await;
    p.send("socket:send", json!({"username": "alex", "type": "t"}))
        .unwrap();
    assert_eq!(recv(&mut alex).await, json!({"type": "t", "payload": null}));
}

#[tokio::test]
async fn onclose_is_published_when_the_client_closes() {
    let mut c = container(spec_config(""));
    let mut closes = recorder(&mut c, &["socket:close"]);
    let gw = start(c).await;
    let mut ws = connect(&gw, "alex", Some("acme")).await;
    wait_for_sockets(&gw, 1).await;
    ws.close(None).await.unwrap();
    let (_, data, ctx) = next_published(&mut closes).await;
    assert_eq!(data["username"], "alex");
    assert_eq!(data["namespace"], "acme");
    assert_eq!(data["reason"]["by"], "client");
    assert_eq!(ctx["headers"]["jwt"]["preferred_username"], "alex");
    wait_for_sockets(&gw, 0).await;
    assert!(closes.try_recv().is_err(), "exactly once");
}

#[tokio::test]
async fn onclose_is_published_when_a_client_misses_its_pong() {
    let mut c = container(spec_config("    heartbeat: 150ms"));
    let mut closes = recorder(&mut c, &["socket:close"]);
    let gw = start(c).await;
    let _silent = raw::connect(gw.local_addr().unwrap(), &token("ghost")).await;
    let (_, data, _) = next_published(&mut closes).await;
    assert_eq!(data["username"], "ghost");
    assert_eq!(data["reason"]["kind"], "heartbeat_timeout");
    wait_for_sockets(&gw, 0).await;
}

#[tokio::test]
async fn panicking_and_failing_handlers_leave_the_socket_open() {
    let mut c = container(spec_config(""));
    c.add_handler("socket:type_one", |_m: Message| -> std::future::Ready<()> {
        panic!("handler bug")
    })
    .unwrap();
    c.add_handler("socket:type_two", |_m: Message| async {
        Err::<(), _>(std::io::Error::other("db down"))
    })
    .unwrap();
    c.add_handler("socket:generalMessage", |m: Message| async move {
        if m.data()["type"] == "ping" {
            m.reply("pong");
        }
    })
    .unwrap();
    let gw = start(c).await;
    let mut ws = connect(&gw, "alex", None).await;
    for t in ["message_type_one", "message_type_two"] {
        send(&mut ws, json!({"type": t})).await;
        let frame = recv(&mut ws).await;
        assert_eq!(frame["type"], "error", "{frame}");
        assert!(!frame["payload"]["message"]
            .as_str()
            .unwrap()
            .contains("db down"));
    }
    send(&mut ws, json!({"type": "ping"})).await;
    assert_eq!(recv(&mut ws).await["payload"], "pong");
}

#[tokio::test]
async fn shutdown_closes_sockets_with_1001_and_publishes_onclose_for_each() {
    let mut c = container(spec_config(""));
    let mut closes = recorder(&mut c, &["socket:close"]);
    let gw = start(c).await;
    let mut clients = Vec::new();
    for user in ["a", "b", "c"] {
        clients.push(connect(&gw, user, Some("n")).await);
    }
    wait_for_sockets(&gw, 3).await;
    assert!(gw.shutdown(Duration::from_secs(5)).await.drained);
    let mut users = Vec::new();
    for _ in 0..3 {
        let (_, data, _) = next_published(&mut closes).await;
        assert_eq!(data["reason"]["kind"], "shutdown");
        users.push(data["username"].as_str().unwrap().to_string());
    }
    users.sort();
    assert_eq!(users, ["a", "b", "c"]);
    for mut ws in clients {
        match ws.next().await {
            Some(Ok(WsMessage::Close(Some(f)))) => assert_eq!(f.code, CloseCode::Away),
            other => panic!("expected 1001, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn config_without_hooks_still_serves_sockets() {
    let config = switchboard::Config::from_yaml_str(
        "gateway:\n  socket:\n    path: /connect\n  auth:\n    secret_env: SWITCHBOARD_IT_SECRET_2\n",
    )
    .unwrap();
    let gw = start(container(config)).await;
    let mut ws = connect(&gw, "alex", None).await;
    send(&mut ws, json!({"type": "x"})).await;
    assert_silent(&mut ws, 200).await;
    assert_eq!(gw.sockets().count(), 1);
}

async fn wait_for_sockets(gw: &switchboard::Running, n: usize) {
    for _ in 0..500 {
        if gw.sockets().count() == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("expected {n} sockets, have {}", gw.sockets().count());
}

/// `shutdown_signal` catches SIGTERM from the moment it is called: one that comes before the
/// wait (while a gateway starts, say) ends the wait instead of killing the process.
#[cfg(unix)]
#[tokio::test]
async fn a_sigterm_before_the_wait_ends_it_instead_of_killing_the_process() {
    let stop = switchboard::shutdown_signal();
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &std::process::id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    tokio::time::timeout(Duration::from_secs(5), stop)
        .await
        .expect("the SIGTERM sent before the wait ends it");
}
