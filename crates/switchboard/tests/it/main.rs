//! End to end: the spec's behaviour through the gateway's transports. The semantic tests are
//! written once, over `switchboard_test_support::Client`, and run on each transport
//! (`each_transport!`: `NAME::websocket` with real WebSocket clients on 127.0.0.1,
//! `NAME::memory` on the in-memory transport, `NAME::sse` with a raw Server-Sent Events client
//! on 127.0.0.1); what is about WebSocket itself (frames,
//! hostile input, bounds, heartbeats, the admin listener) runs on WebSocket only.

mod admin;
mod api;
mod bounds;
mod gate;
mod harness;
mod hostile;
mod http_handlers;
mod identity;
mod jwks;
mod lifetime;
mod raw;
mod sse;
mod tenancy;
mod tls;

use std::time::Duration;

use serde_json::json;
use switchboard::{Container, Message};
use switchboard_test_support::{
    container, each_transport, next_published, recorder, spec_config, start, token, wait_until,
    Client, Event, Gateway, Kind, WAIT,
};

async fn connect_reply_reaches_the_client_with_full_context(kind: Kind) {
    let mut c = container(spec_config(""));
    let mut seen = recorder(&mut c, &["socket:connection"]);
    c.add_handler("socket:connection", |m: Message| async move {
        m.reply(json!({"data": [1, 2, 3]}));
    })
    .unwrap();
    let gw = start(kind, c).await;
    let mut alex = gw.connect("alex", Some("acme")).await;
    assert_eq!(
        alex.recv().await,
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

async fn connect_fail_sends_error_then_closes_and_still_publishes_onclose(kind: Kind) {
    let mut c = container(spec_config(""));
    let mut closes = recorder(&mut c, &["socket:close"]);
    c.add_handler("socket:connection", |m: Message| async move {
        m.fail(json!({"message": "not today"}));
    })
    .unwrap();
    let gw = start(kind, c).await;
    let mut alex = gw.connect("alex", Some("acme")).await;
    assert_eq!(
        alex.recv().await,
        json!({"type": "error", "payload": {"message": "not today"}})
    );
    assert_eq!(alex.next(WAIT).await, Some(Event::Close(1008)));
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

async fn messages_publish_general_and_typed_and_replies_carry_the_topic(kind: Kind) {
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
    let gw = start(kind, c).await;
    let mut alex = gw.connect("alex", Some("acme")).await;

    let m1 = json!({"type": "message_type_one", "payload": {"n": 1}});
    alex.send(m1.clone()).await;
    let mut replies = vec![alex.recv().await, alex.recv().await];
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
    alex.send(m2.clone()).await;
    assert_eq!(
        alex.recv().await,
        json!({"type": "socket:generalMessage", "payload": {"got": m2}})
    );
    let (topic, data, ctx) = next_published(&mut seen).await;
    assert_eq!((topic.as_str(), &data), ("socket:generalMessage", &m2));
    assert_eq!(ctx["username"], "alex");
    alex.assert_silent(200).await;
}

async fn message_fail_sends_error_frame_and_keeps_the_socket(kind: Kind) {
    let mut c = container(spec_config(""));
    c.add_handler("socket:generalMessage", |m: Message| async move {
        if m.data()["payload"]["ok"] == json!(true) {
            m.reply("fine");
        } else {
            m.fail(json!({"code": "E_NOPE"}));
        }
    })
    .unwrap();
    let gw = start(kind, c).await;
    let mut alex = gw.connect("alex", None).await;
    alex.send(json!({"type": "x", "payload": {"ok": false}}))
        .await;
    assert_eq!(
        alex.recv().await,
        json!({"type": "error", "payload": {"code": "E_NOPE"}})
    );
    alex.send(json!({"type": "x", "payload": {"ok": true}}))
        .await;
    assert_eq!(
        alex.recv().await,
        json!({"type": "socket:generalMessage", "payload": "fine"})
    );
}

async fn bad_messages_get_error_frames_publish_nothing_and_keep_the_socket(kind: Kind) {
    let mut c = container(spec_config(""));
    echo_handlers(&mut c);
    let mut seen = recorder(&mut c, &["socket:generalMessage", "socket:type_one"]);
    let gw = start(kind, c).await;
    let mut alex = gw.connect("alex", Some("acme")).await;
    for bad in [
        "not json",
        "[1,2,3]",
        "{\"payload\": 1}",
        "{\"type\": 7}",
        "\"message_type_one\"",
        "{\"type\": \"message_type_one\"",
    ] {
        alex.send_text(bad).await;
        let frame = alex.recv().await;
        assert_eq!(frame["type"], "error", "{bad} -> {frame}");
        assert!(frame["payload"]["message"].is_string(), "{frame}");
    }
    if kind != Kind::Sse {
        // (SSE carries text only.)
        alex.send_binary(vec![1u8, 2, 3]).await;
        let frame = alex.recv().await;
        assert_eq!(frame["type"], "error");
        assert!(frame["payload"]["message"]
            .as_str()
            .unwrap()
            .contains("binary"));
    }
    assert!(seen.try_recv().is_err(), "nothing was published");
    // still open and working
    alex.send(json!({"type": "message_type_one"})).await;
    assert_eq!(
        alex.recv().await["payload"]["got"]["type"],
        "message_type_one"
    );
}

/// Nothing was delivered to `clients` but what they have read: a marker broadcast now is the
/// next frame each gets (deliveries to one socket keep their order, and `send` and
/// `broadcast` queue at once).
async fn assert_nothing_else_delivered(gw: &Gateway, clients: &mut [&mut Client]) {
    let marker = json!({"type": "marker", "payload": null});
    gw.producer()
        .send("socket:broadcast", marker.clone())
        .unwrap();
    for client in clients {
        assert_eq!(client.recv().await, marker, "nothing before the marker");
    }
}

async fn send_reaches_the_user_in_that_namespace_only(kind: Kind) {
    let gw = start(kind, container(spec_config(""))).await;
    let mut alex_a1 = gw.connect("alex", Some("a")).await;
    let mut alex_a2 = gw.connect("alex", Some("a")).await;
    let mut alex_b = gw.connect("alex", Some("b")).await;
    let mut alex_none = gw.connect("alex", None).await;
    let mut sam_a = gw.connect("sam", Some("a")).await;
    gw.wait_for_sockets(5).await;
    gw.producer()
        .send(
            "socket:send",
            json!({"username": "alex", "namespace": "a", "type": "note", "payload": {"n": 1}}),
        )
        .unwrap();
    let expected = json!({"type": "note", "payload": {"n": 1}});
    assert_eq!(alex_a1.recv().await, expected);
    assert_eq!(alex_a2.recv().await, expected);
    // the second tenant, and alex's other namespaces, get nothing
    let others = &mut [&mut alex_b, &mut alex_none, &mut sam_a];
    assert_nothing_else_delivered(&gw, others).await;
}

async fn send_without_namespace_reaches_every_socket_of_the_user(kind: Kind) {
    let gw = start(kind, container(spec_config(""))).await;
    let mut alex = [
        gw.connect("alex", Some("a")).await,
        gw.connect("alex", Some("b")).await,
        gw.connect("alex", None).await,
    ];
    let mut sam = gw.connect("sam", Some("a")).await;
    gw.wait_for_sockets(4).await;
    gw.producer()
        .send(
            "socket:send",
            json!({"username": "alex", "type": "t", "payload": 5}),
        )
        .unwrap();
    for client in alex.iter_mut() {
        assert_eq!(client.recv().await, json!({"type": "t", "payload": 5}));
    }
    assert_nothing_else_delivered(&gw, &mut [&mut sam]).await;
}

async fn broadcast_reaches_everyone_or_one_namespace(kind: Kind) {
    let gw = start(kind, container(spec_config(""))).await;
    let mut a = [
        gw.connect("alex", Some("a")).await,
        gw.connect("sam", Some("a")).await,
    ];
    let mut b = gw.connect("kim", Some("b")).await;
    let mut none = gw.connect("lee", None).await;
    gw.wait_for_sockets(4).await;
    let p = gw.producer();
    p.send("socket:broadcast", json!({"type": "all", "payload": 1}))
        .unwrap();
    for client in a.iter_mut().chain([&mut b, &mut none]) {
        assert_eq!(client.recv().await, json!({"type": "all", "payload": 1}));
    }
    p.send(
        "socket:broadcast",
        json!({"namespace": "a", "type": "only-a", "payload": 2}),
    )
    .unwrap();
    for client in a.iter_mut() {
        assert_eq!(client.recv().await, json!({"type": "only-a", "payload": 2}));
    }
    assert_nothing_else_delivered(&gw, &mut [&mut b, &mut none]).await;
}

async fn handlers_can_send_through_the_producer(kind: Kind) {
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
    let gw = start(kind, c).await;
    let mut alex = gw.connect("alex", Some("a")).await;
    let mut sam = gw.connect("sam", Some("a")).await;
    let mut sam_elsewhere = gw.connect("sam", Some("b")).await;
    gw.wait_for_sockets(3).await;
    alex.send(json!({"type": "message_type_two", "payload": {"to": "sam"}}))
        .await;
    assert_eq!(
        sam.recv().await,
        json!({"type": "poke", "payload": {"from": "alex"}})
    );
    assert_nothing_else_delivered(&gw, &mut [&mut sam_elsewhere]).await;
}

async fn bad_send_data_is_refused_without_harm(kind: Kind) {
    let gw = start(kind, container(spec_config(""))).await;
    let mut alex = gw.connect("alex", Some("a")).await;
    gw.wait_for_sockets(1).await;
    let p = gw.producer();
    p.send("socket:send", json!({"type": "t"})).unwrap(); // no username
    p.send("socket:send", json!({"username": "alex", "payload": 1}))
        .unwrap(); // no type
    p.send(
        "socket:send",
        json!({"username": "alex", "namespace": 5, "type": "t"}),
    )
    .unwrap();
    // The next frame is the good one: the bad ones delivered nothing.
    p.send("socket:send", json!({"username": "alex", "type": "t"}))
        .unwrap();
    assert_eq!(alex.recv().await, json!({"type": "t", "payload": null}));
}

async fn onclose_is_published_when_the_client_closes(kind: Kind) {
    let mut c = container(spec_config(""));
    let mut closes = recorder(&mut c, &["socket:close"]);
    let gw = start(kind, c).await;
    let mut alex = gw.connect("alex", Some("acme")).await;
    gw.wait_for_sockets(1).await;
    alex.close(1000).await;
    let (_, data, ctx) = next_published(&mut closes).await;
    assert_eq!(data["username"], "alex");
    assert_eq!(data["namespace"], "acme");
    assert_eq!(data["reason"]["by"], "client");
    assert_eq!(data["reason"]["code"], 1000);
    assert_eq!(ctx["headers"]["jwt"]["preferred_username"], "alex");
    assert_eq!(alex.next(WAIT).await, Some(Event::Close(1000)));
    gw.wait_for_sockets(0).await;
    assert!(closes.try_recv().is_err(), "exactly once");
}

async fn panicking_and_failing_handlers_leave_the_socket_open(kind: Kind) {
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
    let gw = start(kind, c).await;
    let mut alex = gw.connect("alex", None).await;
    for t in ["message_type_one", "message_type_two"] {
        alex.send(json!({"type": t})).await;
        let frame = alex.recv().await;
        assert_eq!(frame["type"], "error", "{frame}");
        assert!(!frame["payload"]["message"]
            .as_str()
            .unwrap()
            .contains("db down"));
    }
    alex.send(json!({"type": "ping"})).await;
    assert_eq!(alex.recv().await["payload"], "pong");
}

async fn shutdown_closes_sockets_with_1001_and_publishes_onclose_for_each(kind: Kind) {
    let mut c = container(spec_config(""));
    let mut closes = recorder(&mut c, &["socket:close"]);
    let gw = start(kind, c).await;
    let mut clients = Vec::new();
    for user in ["a", "b", "c"] {
        clients.push(gw.connect(user, Some("n")).await);
    }
    gw.wait_for_sockets(3).await;
    assert!(gw.shutdown(Duration::from_secs(5)).await.drained);
    let mut users = Vec::new();
    for _ in 0..3 {
        let (_, data, _) = next_published(&mut closes).await;
        assert_eq!(data["reason"]["kind"], "shutdown");
        users.push(data["username"].as_str().unwrap().to_string());
    }
    users.sort();
    assert_eq!(users, ["a", "b", "c"]);
    for mut client in clients {
        assert_eq!(client.next(WAIT).await, Some(Event::Close(1001)));
    }
}

async fn config_without_hooks_still_serves_sockets(kind: Kind) {
    let config = switchboard::Config::from_yaml_str(
        "gateway:\n  socket:\n    path: /connect\n  auth:\n    secret_env: SWITCHBOARD_IT_SECRET_2\n",
    )
    .unwrap();
    let gw = start(kind, container(config)).await;
    let mut alex = gw.connect("alex", None).await;
    alex.send(json!({"type": "x"})).await;
    alex.assert_silent(200).await;
    assert_eq!(gw.sockets().count(), 1);
}

async fn disconnect_closes_the_users_matching_sockets_with_its_code_and_onclose_once(kind: Kind) {
    let extra = "    disconnect:\n      subscribe: \"socket:disconnect\"";
    let mut c = container(spec_config(extra));
    let mut closes = recorder(&mut c, &["socket:close"]);
    let gw = start(kind, c).await;
    let mut alex_acme = gw.connect("alex", Some("acme")).await;
    let mut alex_globex = gw.connect("alex", Some("globex")).await;
    let mut sam = gw.connect("sam", Some("acme")).await;
    gw.wait_for_sockets(3).await;
    let p = gw.producer();
    // Bad data closes nothing.
    for bad in [
        json!({"namespace": "acme"}),
        json!({"username": "alex", "code": 1005}),
        json!({"username": "alex", "code": 70000}),
        json!({"username": "alex", "namespace": 7}),
    ] {
        p.send("socket:disconnect", bad).unwrap();
    }
    p.send(
        "socket:disconnect",
        json!({"username": "alex", "namespace": "acme", "code": 4003, "reason": "banned"}),
    )
    .unwrap();
    assert_eq!(alex_acme.close_code().await, 4003);
    let (_, data, _) = next_published(&mut closes).await;
    assert_eq!(data["username"], "alex");
    assert_eq!(data["namespace"], "acme");
    assert_eq!(data["reason"]["code"], 4003);
    assert_eq!(data["reason"]["reason"], "banned");
    gw.wait_for_sockets(2).await;
    // Without a namespace: every socket of the user, with the default code.
    p.send("socket:disconnect", json!({"username": "alex"}))
        .unwrap();
    assert_eq!(alex_globex.close_code().await, switchboard::DISCONNECT_CODE);
    let (_, data, _) = next_published(&mut closes).await;
    assert_eq!(data["namespace"], "globex");
    gw.wait_for_sockets(1).await;
    assert!(closes.try_recv().is_err(), "one onclose per socket");
    // sam is untouched.
    p.send(
        "socket:send",
        json!({"username": "sam", "type": "still here"}),
    )
    .unwrap();
    assert_eq!(sam.recv().await["type"], "still here");
}

async fn presence_counts_the_users_and_sockets_of_a_namespace_and_of_a_user(kind: Kind) {
    let gw = start(kind, container(spec_config(""))).await;
    let _a1 = gw.connect("alex", Some("acme")).await;
    let _a2 = gw.connect("alex", Some("acme")).await;
    let _a3 = gw.connect("alex", Some("globex")).await;
    let _a4 = gw.connect("alex", None).await;
    let mut sam = gw.connect("sam", Some("acme")).await;
    gw.wait_for_sockets(5).await;
    let presence = gw.presence();
    let acme = presence.namespace("acme").await.unwrap();
    assert_eq!(acme.nodes, 1);
    assert_eq!(acme.sockets, 3);
    assert_eq!(
        acme.users.into_iter().collect::<Vec<_>>(),
        [("alex".to_string(), 2), ("sam".to_string(), 1)]
    );
    let alex = presence.user("alex").await.unwrap();
    assert_eq!(alex.sockets, 4);
    assert_eq!(alex.namespaces["acme"], 2);
    assert_eq!(alex.namespaces["globex"], 1);
    assert_eq!(alex.namespaces[""], 1);
    assert_eq!(presence.namespace("nobody").await.unwrap().sockets, 0);
    sam.close(1000).await;
    gw.wait_for_sockets(4).await;
    let acme = presence.namespace("acme").await.unwrap();
    assert_eq!(acme.users.keys().collect::<Vec<_>>(), ["alex"]);
}

each_transport!(
    presence_counts_the_users_and_sockets_of_a_namespace_and_of_a_user,
    disconnect_closes_the_users_matching_sockets_with_its_code_and_onclose_once,
    connect_reply_reaches_the_client_with_full_context,
    connect_fail_sends_error_then_closes_and_still_publishes_onclose,
    messages_publish_general_and_typed_and_replies_carry_the_topic,
    message_fail_sends_error_frame_and_keeps_the_socket,
    bad_messages_get_error_frames_publish_nothing_and_keep_the_socket,
    send_reaches_the_user_in_that_namespace_only,
    send_without_namespace_reaches_every_socket_of_the_user,
    broadcast_reaches_everyone_or_one_namespace,
    handlers_can_send_through_the_producer,
    bad_send_data_is_refused_without_harm,
    onclose_is_published_when_the_client_closes,
    panicking_and_failing_handlers_leave_the_socket_open,
    shutdown_closes_sockets_with_1001_and_publishes_onclose_for_each,
    config_without_hooks_still_serves_sockets,
);

/// WebSocket only: the server's heartbeat pings, which a raw client does not answer.
#[tokio::test]
async fn onclose_is_published_when_a_client_misses_its_pong() {
    let mut c = container(spec_config("    heartbeat: 150ms"));
    let mut closes = recorder(&mut c, &["socket:close"]);
    let gw = harness::start(c).await;
    let _silent = raw::connect(gw.local_addr().unwrap(), &token("ghost")).await;
    let (_, data, _) = next_published(&mut closes).await;
    assert_eq!(data["username"], "ghost");
    assert_eq!(data["reason"]["kind"], "heartbeat_timeout");
    wait_until("no sockets", WAIT, || gw.sockets().count() == 0).await;
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
