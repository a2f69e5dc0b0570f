//! The "Securing NATS" example of docs/PROTOCOL.md, run as printed: each user can do what
//! its part needs and nothing the section says it cannot.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{json, Value};
use switchboard_bus_nats::{NatsAuth, NatsOptions};
use tokio::sync::mpsc;

use crate::gateway_on;
use crate::support::*;

const PASSWORDS: [(&str, &str); 3] = [
    ("SB_NODE_PASSWORD", "node-pw-0123"),
    ("SB_HANDLER_PASSWORD", "handler-pw-4567"),
    ("SB_PUBLISHER_PASSWORD", "publisher-pw-89ab"),
];

/// The ```conf block of the "Securing NATS" section.
fn example_config() -> String {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/PROTOCOL.md"
    ))
    .unwrap();
    let section = doc.split("## Securing NATS").nth(1).expect("the section");
    let block = section.split("```conf\n").nth(1).expect("a conf block");
    block.split("```").next().unwrap().to_string()
}

/// A plain NATS client (as a process in another language would be) whose server errors
/// (permission violations) arrive on the returned channel.
async fn client(
    nats: &NatsServer,
    user: &str,
    password: &str,
) -> (async_nats::Client, mpsc::UnboundedReceiver<String>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let client = async_nats::ConnectOptions::with_user_and_password(user.into(), password.into())
        .event_callback(move |event| {
            let tx = tx.clone();
            async move {
                if let async_nats::Event::ServerError(e) = event {
                    let _ = tx.send(e.to_string());
                }
            }
        })
        .connect(nats.url())
        .await
        .unwrap();
    (client, rx)
}

/// Waits for the server's permission violation naming `what` (`Publish to "x"`).
async fn violation(errors: &mut mpsc::UnboundedReceiver<String>, what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let error = tokio::time::timeout_at(deadline, errors.recv())
            .await
            .unwrap_or_else(|_| panic!("no permissions violation for {what}"))
            .unwrap();
        if error.contains("Permissions Violation") && error.contains(what) {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_securing_nats_example_grants_each_part_what_it_needs_and_no_more() {
    for (name, value) in PASSWORDS {
        std::env::set_var(name, value);
    }
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("nats-server.conf");
    std::fs::write(&conf, example_config()).unwrap();
    let nats = NatsServer::start_with(&["-c", &conf.to_string_lossy()]);

    // a handler process: answers messages, nothing else
    let (handler, mut handler_errors) = client(&nats, "handler", PASSWORDS[1].1).await;
    let mut events = handler
        .queue_subscribe("socket:generalMessage", "switchboard-handlers".into())
        .await
        .unwrap();
    handler.flush().await.unwrap();
    let answering = handler.clone();
    tokio::spawn(async move {
        while let Some(event) = events.next().await {
            let envelope: Value = serde_json::from_slice(&event.payload).unwrap();
            let answer = json!({"reply": envelope["data"]["payload"]});
            let reply = event.reply.unwrap();
            answering
                .publish(reply, answer.to_string().into())
                .await
                .unwrap();
        }
    });

    // the node, as user gw-1
    let mut options = NatsOptions::new(nats.url());
    options.node_name = Some("gw-1".into());
    options.auth = NatsAuth::UserPassword {
        user: "gw-1".into(),
        password: PASSWORDS[0].1.into(),
    };
    let gw = gateway_on(options, |_| {}).await;
    let mut ws = connect(gw.running.local_addr().unwrap(), "alex", Some("acme")).await;
    send(&mut ws, json!({"type": "x", "payload": "answered"})).await;
    assert_eq!(
        recv(&mut ws).await,
        json!({"type": "socket:generalMessage", "payload": "answered"})
    );

    // an outside publisher reaches sockets
    let (publisher, mut publisher_errors) = client(&nats, "publisher", PASSWORDS[2].1).await;
    for (subject, kind) in [("socket:send", "sent"), ("socket:broadcast", "told")] {
        let body = json!({"username": "alex", "namespace": "acme", "type": kind, "payload": 1});
        publisher
            .publish(subject, body.to_string().into())
            .await
            .unwrap();
        publisher.flush().await.unwrap();
        assert_eq!(recv(&mut ws).await["type"], kind);
    }
    // the node publishes to `send` itself (its server API does), and the publisher
    // disconnects a user
    let producer = gw.running.producer();
    producer
        .send(
            "socket:send",
            json!({"username": "alex", "type": "from-node"}),
        )
        .unwrap();
    assert_eq!(recv(&mut ws).await["type"], "from-node");
    let mut bob = connect(gw.running.local_addr().unwrap(), "bob", Some("acme")).await;
    wait_until(|| gw.running.sockets().count() == 2, "bob registered").await;
    publisher
        .publish(
            "socket:disconnect",
            json!({"username": "bob", "code": 4003}).to_string().into(),
        )
        .await
        .unwrap();
    publisher.flush().await.unwrap();
    assert_eq!(
        switchboard_test_support::websocket::close_code(&mut bob).await,
        4003
    );
    wait_until(|| gw.running.sockets().count() == 1, "bob gone").await;
    // the node answers presence questions, and asks them, with its rights
    let acme = gw.running.presence().namespace("acme").await.unwrap();
    assert_eq!((acme.nodes, acme.sockets), (1, 1), "{acme:?}");
    // the node's shutdown flush works with its rights
    tokio::time::timeout(Duration::from_secs(10), gw.bus.flush_published())
        .await
        .expect("the flush probe comes back");

    // the handler cannot reach sockets, nor read what is not its events
    let forged = json!({"username": "alex", "namespace": "acme", "type": "forged", "payload": 0});
    handler
        .publish("socket:send", forged.to_string().into())
        .await
        .unwrap();
    violation(&mut handler_errors, "Publish to \"socket:send\"").await;
    for subject in ["socket:send", "_SB_REPLY.gw-1.>"] {
        let _sub = handler.subscribe(subject).await.unwrap();
        violation(
            &mut handler_errors,
            &format!("Subscription to \"{subject}\""),
        )
        .await;
    }
    // the publisher cannot make the node publish an event by naming it as the reply subject
    // of a `send` (the node may publish events; it answers only on inboxes)
    let mut seen_by_handler = handler.subscribe("socket:generalMessage").await.unwrap();
    handler.flush().await.unwrap();
    let nobody = json!({"username": "nobody", "type": "t"});
    publisher
        .publish_with_reply(
            "socket:send",
            "socket:generalMessage",
            nobody.to_string().into(),
        )
        .await
        .unwrap();
    publisher.flush().await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(500), seen_by_handler.next())
            .await
            .is_err(),
        "the node published on the reply subject a publisher named"
    );
    // the publisher cannot read events
    let _sub = publisher.subscribe("socket:generalMessage").await.unwrap();
    violation(
        &mut publisher_errors,
        "Subscription to \"socket:generalMessage\"",
    )
    .await;
    // the node user cannot read events, nor another node's answers, nor answer for another
    // node (only presence questions' gather subjects are open to every node)
    let (node_user, mut node_errors) = client(&nats, "gw-1", PASSWORDS[0].1).await;
    for subject in ["socket:generalMessage", "_SB_REPLY.gw-2.>"] {
        let _sub = node_user.subscribe(subject).await.unwrap();
        violation(&mut node_errors, &format!("Subscription to \"{subject}\"")).await;
    }
    node_user
        .publish("_SB_REPLY.gw-2.token.1", "{}".into())
        .await
        .unwrap();
    violation(&mut node_errors, "Publish to \"_SB_REPLY.gw-2.token.1\"").await;
    assert_silent(&mut ws, 300).await; // the handler's forged send never arrived
}
