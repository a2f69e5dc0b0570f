//! The NATS bus against a real nats-server on a loopback port of its own: handlers over
//! NATS, reply timeouts, queue groups, and NATS dying and coming back under open sockets.

mod answers;
mod production;
mod security;
mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{json, Value};
use support::*;
use switchboard::{Container, Message};
use switchboard_bus::Bus;
use switchboard_bus_nats::{NatsBus, NatsOptions};

pub(crate) async fn gateway(
    nats: &NatsServer,
    reply_timeout: Duration,
    setup: impl FnOnce(&mut Container),
) -> Gateway {
    let mut options = NatsOptions::new(nats.url());
    options.reply_timeout = reply_timeout;
    // Presence waits this long for the other node once one has answered: the default 50 ms
    // is shorter than the stalls a busy test machine gives one process.
    options.gather_quiet = Duration::from_millis(500);
    gateway_on(options, setup).await
}

/// A gateway on a NATS bus with `options`, listening on a free loopback port.
pub(crate) async fn gateway_on(
    options: NatsOptions,
    setup: impl FnOnce(&mut Container),
) -> Gateway {
    let bus = Arc::new(NatsBus::connect(options).await.unwrap());
    let key = switchboard_test_support::key();
    let mut container = Container::with_key(config(), bus.clone(), key).unwrap();
    setup(&mut container);
    bus.subscriptions_ready().await.unwrap();
    let running = container
        .start_on("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    Gateway { running, bus }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_handlers_answer_over_nats() {
    let nats = NatsServer::start();
    let gw = gateway(&nats, Duration::from_secs(5), |c| {
        c.add_handler("socket:connection", |m: Message| async move {
            m.reply(json!({"hello": m.context().username}));
        })
        .unwrap();
        c.add_handler("socket:generalMessage", |m: Message| async move {
            if m.data()["type"] == "bad" {
                m.fail(json!({"message": "no"}));
            } else {
                m.reply(m.data()["payload"].clone());
            }
        })
        .unwrap();
    })
    .await;
    let mut ws = connect(gw.running.local_addr().unwrap(), "alex", Some("a")).await;
    assert_eq!(
        recv(&mut ws).await,
        json!({"type": "onconnect", "payload": {"hello": "alex"}})
    );
    send(&mut ws, json!({"type": "x", "payload": [1, 2]})).await;
    assert_eq!(
        recv(&mut ws).await,
        json!({"type": "socket:generalMessage", "payload": [1, 2]})
    );
    send(&mut ws, json!({"type": "bad"})).await;
    assert_eq!(
        recv(&mut ws).await,
        json!({"type": "error", "payload": {"message": "no"}})
    );
    // a send published through the bus comes back over NATS to this node's socket
    gw.running
        .producer()
        .send(
            "socket:send",
            json!({"username": "alex", "namespace": "a", "type": "t", "payload": 1}),
        )
        .unwrap();
    assert_eq!(recv(&mut ws).await, json!({"type": "t", "payload": 1}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_never_answers_gets_an_error_frame_after_the_timeout() {
    let nats = NatsServer::start();
    // An outside handler that takes the message and never answers.
    let outside = async_nats::connect(nats.url()).await.unwrap();
    let mut silent = outside
        .queue_subscribe("socket:generalMessage", "switchboard-handlers".into())
        .await
        .unwrap();
    outside.flush().await.unwrap();
    let gw = gateway(&nats, Duration::from_millis(500), |_| {}).await;
    let mut ws = connect(gw.running.local_addr().unwrap(), "alex", None).await;
    send(&mut ws, json!({"type": "x"})).await;
    let taken = tokio::time::timeout(Duration::from_secs(5), silent.next())
        .await
        .unwrap();
    assert!(
        taken.unwrap().reply.is_some(),
        "the event asks for an answer"
    );
    let frame = recv(&mut ws).await;
    assert_eq!(frame["type"], "error");
    assert!(
        frame["payload"]["message"]
            .as_str()
            .unwrap()
            .contains("no handler answered"),
        "{frame}"
    );
    assert_eq!(frame["payload"]["topic"], "socket:generalMessage");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_event_is_handled_once_per_queue_group() {
    let nats = NatsServer::start();
    let handled = Arc::new(AtomicUsize::new(0));
    // Three handler processes in one group (three NATS connections), plus the gateway.
    let mut members = Vec::new();
    for _ in 0..3 {
        let bus = NatsBus::connect(NatsOptions::new(nats.url()))
            .await
            .unwrap();
        let h = handled.clone();
        bus.subscribe(
            "socket:generalMessage",
            Arc::new(move |m: Message| {
                h.fetch_add(1, Ordering::SeqCst);
                async move { m.reply("ok") }
            }),
        )
        .unwrap();
        bus.subscriptions_ready().await.unwrap();
        members.push(bus);
    }
    let gw = gateway(&nats, Duration::from_secs(5), |_| {}).await;
    let mut ws = connect(gw.running.local_addr().unwrap(), "alex", None).await;
    for i in 0..20 {
        send(&mut ws, json!({"type": "n", "payload": i})).await;
        assert_eq!(recv(&mut ws).await["payload"], "ok");
    }
    assert_eq!(
        handled.load(Ordering::SeqCst),
        20,
        "once each, not three times"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restart_keeps_sockets_open_and_traffic_resumes() {
    let mut nats = NatsServer::start();
    let gw = gateway(&nats, Duration::from_secs(5), |c| {
        c.add_handler("socket:generalMessage", |m: Message| async move {
            m.reply(m.data()["payload"].clone());
        })
        .unwrap();
    })
    .await;
    let mut ws = connect(gw.running.local_addr().unwrap(), "alex", Some("a")).await;
    send(&mut ws, json!({"type": "x", "payload": "before"})).await;
    assert_eq!(recv(&mut ws).await["payload"], "before");
    assert!(gw.running.is_ready());

    nats.stop();
    wait_until(|| !gw.bus.is_ready(), "the bus to notice NATS is gone").await;
    assert!(!gw.running.is_ready());
    // An event that cannot be published: an error frame, never silence; the socket stays.
    send(&mut ws, json!({"type": "x", "payload": "during"})).await;
    let frame = recv(&mut ws).await;
    assert_eq!(frame["type"], "error", "{frame}");
    assert_eq!(frame["payload"]["message"], "could not publish");

    nats.restart();
    wait_until(|| gw.bus.is_ready(), "the bus to reconnect").await;
    // Subscriptions come back with the connection: replies and deliveries flow again.
    let mut resumed: Option<Value> = None;
    for _ in 0..50 {
        send(&mut ws, json!({"type": "x", "payload": "after"})).await;
        let frame = recv(&mut ws).await;
        if frame["type"] == "socket:generalMessage" {
            resumed = Some(frame);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(resumed.expect("traffic resumed")["payload"], "after");
    gw.running
        .producer()
        .send(
            "socket:send",
            json!({"username": "alex", "namespace": "a", "type": "t", "payload": 2}),
        )
        .unwrap();
    loop {
        let frame = recv(&mut ws).await;
        if frame["type"] == "t" {
            assert_eq!(frame["payload"], 2);
            break;
        }
    }
    assert_eq!(gw.running.sockets().count(), 1, "the socket never dropped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_asked_on_one_node_counts_the_sockets_of_every_node() {
    let nats = NatsServer::start();
    let a = gateway(&nats, Duration::from_secs(5), |_| {}).await;
    let b = gateway(&nats, Duration::from_secs(5), |_| {}).await;
    let _alex = connect(a.running.local_addr().unwrap(), "alex", Some("acme")).await;
    let _sam = connect(b.running.local_addr().unwrap(), "sam", Some("acme")).await;
    let _sam2 = connect(b.running.local_addr().unwrap(), "sam", Some("globex")).await;
    wait_until(
        || a.running.sockets().count() == 1 && b.running.sockets().count() == 2,
        "the sockets registered",
    )
    .await;
    for node in [&a, &b] {
        let acme = node.running.presence().namespace("acme").await.unwrap();
        assert_eq!(acme.nodes, 2, "both nodes answered");
        assert_eq!(acme.sockets, 2);
        assert_eq!(
            acme.users.keys().map(String::as_str).collect::<Vec<_>>(),
            ["alex", "sam"]
        );
        let sam = node.running.presence().user("sam").await.unwrap();
        assert_eq!((sam.sockets, sam.nodes), (2, 2));
    }
    // A plain NATS client can ask too: every node answers on the asker's inbox.
    let outside = async_nats::connect(nats.url()).await.unwrap();
    let inbox = outside.new_inbox();
    let mut answers = outside.subscribe(inbox.clone()).await.unwrap();
    outside
        .publish_with_reply("_SB_PRESENCE", inbox, r#"{"namespace":"acme"}"#.into())
        .await
        .unwrap();
    let mut users = Vec::new();
    for _ in 0..2 {
        let answer = tokio::time::timeout(NATS_WAIT, answers.next())
            .await
            .unwrap()
            .unwrap();
        let answer: Value = serde_json::from_slice(&answer.payload).unwrap();
        users.extend(
            answer["reply"]["users"]
                .as_object()
                .unwrap()
                .keys()
                .cloned(),
        );
    }
    users.sort();
    assert_eq!(users, ["alex", "sam"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gather_keeps_at_most_its_bytes_of_answers_whoever_answers() {
    use switchboard_bus_nats::MAX_GATHERED_BYTES;
    let nats = NatsServer::start();
    // Someone on the broker answers every question forty times, 512 KiB each (20 MiB).
    let hostile = async_nats::connect(nats.url()).await.unwrap();
    let mut questions = hostile.subscribe("_SB_PRESENCE").await.unwrap();
    hostile.flush().await.unwrap();
    let answering = hostile.clone();
    tokio::spawn(async move {
        let big = json!({"reply": {"users": {}, "fill": "x".repeat(512 * 1024)}}).to_string();
        while let Some(question) = questions.next().await {
            let reply = question.reply.unwrap();
            for _ in 0..40 {
                answering
                    .publish(reply.clone(), big.clone().into())
                    .await
                    .unwrap();
            }
            answering.flush().await.unwrap();
        }
    });
    let bus = NatsBus::connect(NatsOptions::new(nats.url()))
        .await
        .unwrap();
    let answers = bus
        .gather(
            "_SB_PRESENCE",
            json!({"namespace": "x"}),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    let kept: usize = answers.iter().map(|a| a.to_string().len()).sum();
    assert!(
        !answers.is_empty() && answers.len() < 40,
        "{}",
        answers.len()
    );
    assert!(kept <= MAX_GATHERED_BYTES, "{kept}");
}

/// Someone on the broker who answers every question on `subject` with `bodies`, in order,
/// then `last` (each on the question's reply subject); `answers(question)` picks the bodies.
async fn answer_every_question(
    nats: &NatsServer,
    subject: &str,
    answers: impl Fn(&Value) -> Vec<String> + Send + 'static,
) -> async_nats::Client {
    let client = async_nats::connect(nats.url()).await.unwrap();
    let mut questions = client.subscribe(subject.to_string()).await.unwrap();
    client.flush().await.unwrap();
    let answering = client.clone();
    tokio::spawn(async move {
        while let Some(question) = questions.next().await {
            let asked: Value = serde_json::from_slice(&question.payload).unwrap_or_default();
            let reply = question.reply.unwrap();
            for body in answers(&asked) {
                answering.publish(reply.clone(), body.into()).await.unwrap();
            }
            answering.flush().await.unwrap();
        }
    });
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gather_ignores_and_counts_malformed_answers_and_never_misreads_one() {
    let nats = NatsServer::start();
    // The malformed ones first, the one good reply last: the gather waits for a first reply,
    // so by the time it ends every malformed one has arrived.
    let _outside = answer_every_question(&nats, "ask", |_| {
        [
            r#"["reply", 2]"#,                // not an object
            r#"{"reply": 3, "junk": 1}"#,     // another key
            r#"{"reply": 4"#,                 // not JSON
            r#""reply""#,                     // a string
            r#"{"fail": {"message": "no"}}"#, // an answer, with nothing to keep
            r#"{"reply": 5, "fail": 6}"#,     // a failure (it wins), not a reply of 5
            r#"{}"#,                          // an answer, with nothing to say
            r#"{"reply": 1}"#,
        ]
        .map(String::from)
        .to_vec()
    })
    .await;
    let bus = NatsBus::connect(NatsOptions::new(nats.url()))
        .await
        .unwrap();
    let answers = bus
        .gather("ask", json!({"q": 1}), Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(answers, [json!(1)]);
    assert_eq!(bus.malformed_gathered(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_ignores_answers_that_are_not_exactly_a_nodes() {
    let nats = NatsServer::start();
    let a = gateway(&nats, Duration::from_secs(5), |_| {}).await;
    let _alex = connect(a.running.local_addr().unwrap(), "alex", Some("acme")).await;
    wait_until(|| a.running.sockets().count() == 1, "the socket registered").await;
    // Someone on the broker answers every presence question with near misses of a node's
    // answer, each of which the loose reading took in (as 0, "local", or counts).
    let _outside = answer_every_question(&nats, "_SB_PRESENCE", |asked| {
        let near_misses = if asked.get("namespace").is_some() {
            vec![
                json!({"users": {"mallory": 5}, "sockets": "5", "truncated": false}),
                json!({"users": {"mallory": 5}, "sockets": 5, "truncated": false, "x": 1}),
                json!({"users": {"mallory": -1}, "sockets": 1, "truncated": true}),
                json!({"users": ["mallory"], "sockets": 1, "truncated": false}),
                json!({"users": {"mallory": 5}, "sockets": 5}),
                json!({"namespaces": {"acme": 5}}),
                json!(5),
            ]
        } else if asked.get("username").is_some() {
            vec![
                json!({"namespaces": {"acme": "5"}}),
                json!({"namespaces": {"acme": 5}, "node": "evil"}),
                json!({"namespaces": {"acme": 1.5}}),
                json!({"users": {"alex": 5}, "sockets": 5, "truncated": false}),
            ]
        } else {
            vec![
                json!({"connections": [{"namespace": "acme", "since_ms": 1}]}),
                json!({"node": "evil", "connections": [{"namespace": "acme", "since_ms": "now"}]}),
                json!({"node": "evil", "connections": [{"namespace": 7, "since_ms": 1}]}),
                json!({"node": "evil", "connections": [{"since_ms": 1}]}),
                json!({"node": 7, "connections": []}),
            ]
        };
        near_misses
            .into_iter()
            .map(|reply| json!({ "reply": reply }).to_string())
            .collect()
    })
    .await;
    let presence = a.running.presence();
    let acme = presence.namespace("acme").await.unwrap();
    assert_eq!(acme.nodes, 1, "only the node's answer counts");
    assert_eq!(
        (
            acme.users.into_iter().collect::<Vec<_>>(),
            acme.sockets,
            acme.truncated
        ),
        (vec![("alex".to_string(), 1)], 1, false)
    );
    let alex = presence.user("alex").await.unwrap();
    assert_eq!((alex.nodes, alex.sockets), (1, 1));
    assert_eq!(
        alex.namespaces.into_iter().collect::<Vec<_>>(),
        [("acme".to_string(), 1)]
    );
    let listed = presence.connections("alex").await.unwrap();
    assert_eq!(listed.nodes, 1);
    assert_eq!(listed.connections.len(), 1);
    assert_eq!(listed.connections[0].node, a.bus.node_name());
    assert_eq!(listed.connections[0].namespace.as_deref(), Some("acme"));
}
