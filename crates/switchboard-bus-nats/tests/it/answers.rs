//! The way back from handlers: answered events leave the pending map at once, replicas that
//! share a node name never get each other's answers, hostile answers do nothing, a panicking
//! handler keeps its subscription, and the queues are bounded.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{json, Value};
use switchboard::Message;
use switchboard_bus::{Bus, Handler, PublishFailure, Reply, ReplyTo};
use switchboard_bus_nats::{NatsBus, NatsOptions, PendingAnswers};

use crate::support::*;
use crate::{gateway, gateway_on};

/// A socket stand-in that counts its answers.
struct Counting(Arc<AtomicUsize>);

impl ReplyTo for Counting {
    fn deliver(&self, _topic: &str, reply: Reply) {
        assert!(matches!(reply, Reply::Ok(_)), "{reply:?}");
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// A handler process: answers every event on `topic` with `{"reply": "ok"}`.
async fn echo_handler(nats: &NatsServer, topic: &str) -> NatsBus {
    handler_process(
        nats,
        topic,
        Arc::new(|m: Message| async move { m.reply("ok") }),
    )
    .await
}

/// A handler process: `handler` handles `topic`, subscribed when this returns.
async fn handler_process(nats: &NatsServer, topic: &str, handler: Arc<dyn Handler>) -> NatsBus {
    let bus = NatsBus::connect(NatsOptions::new(nats.url()))
        .await
        .unwrap();
    bus.subscribe(topic, handler).unwrap();
    bus.subscriptions_ready().await.unwrap();
    bus
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answered_events_leave_the_pending_map_at_once() {
    let nats = NatsServer::start();
    let _handler = echo_handler(&nats, "big").await;
    let mut options = NatsOptions::new(nats.url());
    options.reply_timeout = Duration::from_secs(600); // only answers can empty the map
    let node = NatsBus::connect(options).await.unwrap();
    let answered = Arc::new(AtomicUsize::new(0));
    let payload = json!({"blob": "x".repeat(32 * 1024)});
    let mut sockets: Vec<Weak<dyn ReplyTo>> = Vec::new();
    let (batches, batch) = (12, 250);
    for b in 0..batches {
        for _ in 0..batch {
            let socket: Arc<dyn ReplyTo> = Arc::new(Counting(answered.clone()));
            sockets.push(Arc::downgrade(&socket));
            node.publish(Message::new("big", payload.clone()).with_reply_to(socket))
                .unwrap();
        }
        // in flight at most one batch (8 MB), under the outbox's byte bound
        let want = (b + 1) * batch;
        wait_until(|| answered.load(Ordering::SeqCst) == want, "answers").await;
    }
    assert_eq!(node.pending_answers(), PendingAnswers::default());
    assert!(
        sockets.iter().all(|s| s.upgrade().is_none()),
        "nothing keeps an answered event's socket"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_with_one_node_name_never_get_each_others_answers() {
    let nats = NatsServer::start();
    // A handler process that answers with who asked and what they sent.
    let handler = NatsBus::connect(NatsOptions::new(nats.url()))
        .await
        .unwrap();
    handler
        .subscribe(
            "socket:generalMessage",
            Arc::new(|m: Message| async move {
                m.reply(json!({"user": m.context().username, "n": m.data()["payload"]}));
            }),
        )
        .unwrap();
    handler.subscriptions_ready().await.unwrap();
    let replica = || async {
        let mut options = NatsOptions::new(nats.url());
        options.node_name = Some("gw".into());
        gateway_on(options, |_| {}).await
    };
    let (a, b) = (replica().await, replica().await);
    assert_eq!(a.bus.node_name(), b.bus.node_name());
    assert_ne!(a.bus.reply_prefix(), b.bus.reply_prefix());
    assert!(a.bus.reply_prefix().starts_with("_SB_REPLY.gw."));

    let per_socket = 100;
    let mut clients = Vec::new();
    for (i, gw) in [&a, &b, &a, &b].into_iter().enumerate() {
        let user = format!("user{i}");
        let mut ws = connect(gw.running.local_addr().unwrap(), &user, None).await;
        clients.push(tokio::spawn(async move {
            for n in 0..per_socket {
                send(&mut ws, json!({"type": "x", "payload": n})).await;
            }
            let mut seen = BTreeSet::new();
            for _ in 0..per_socket {
                let frame = recv(&mut ws).await;
                assert_eq!(frame["payload"]["user"], user.as_str(), "{frame}");
                seen.insert(frame["payload"]["n"].as_u64().unwrap());
            }
            assert_eq!(seen.len(), per_socket as usize, "each answer once");
            assert_silent(&mut ws, 300).await;
        }));
    }
    for client in clients {
        client.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_answers_do_nothing_harmful() {
    let nats = NatsServer::start();
    let outside = async_nats::connect(nats.url()).await.unwrap();
    let mut events = outside
        .queue_subscribe("socket:generalMessage", "switchboard-handlers".into())
        .await
        .unwrap();
    outside.flush().await.unwrap();
    let gw = gateway(&nats, Duration::from_secs(60), |_| {}).await;
    let mut ws = connect(gw.running.local_addr().unwrap(), "alex", None).await;
    let publish = |subject: String, body: &'static str| {
        let outside = outside.clone();
        async move {
            outside.publish(subject, body.into()).await.unwrap();
            outside.flush().await.unwrap();
        }
    };

    send(&mut ws, json!({"type": "x"})).await;
    let event = events.next().await.unwrap();
    let reply = event.reply.unwrap().to_string();
    let prefix = reply.rsplit_once('.').unwrap().0.to_string();
    // answers to ids that were never asked, on subjects that are not ids, elsewhere
    publish(format!("{prefix}.999999"), r#"{"reply": "forged"}"#).await;
    publish(format!("{prefix}.not-an-id"), r#"{"reply": "forged"}"#).await;
    publish(format!("{prefix}.0"), r#"{"reply": "forged"}"#).await;
    publish("_SB_REPLY.gw.other.1".into(), r#"{"reply": "forged"}"#).await;
    // the real answer, then the same id again
    publish(reply.clone(), r#"{"reply": "first"}"#).await;
    publish(reply.clone(), r#"{"reply": "second"}"#).await;
    publish(reply, r#"{"fail": "third"}"#).await;
    assert_eq!(
        recv(&mut ws).await,
        json!({"type": "socket:generalMessage", "payload": "first"})
    );
    assert_silent(&mut ws, 300).await;

    // a malformed answer is an error frame, once
    send(&mut ws, json!({"type": "x"})).await;
    let reply = events.next().await.unwrap().reply.unwrap().to_string();
    publish(reply.clone(), "not json").await;
    publish(reply, r#"{"reply": "late"}"#).await;
    let frame = recv(&mut ws).await;
    assert_eq!(frame["type"], "error");
    assert_eq!(
        frame["payload"]["message"],
        "malformed answer from a handler"
    );
    assert_silent(&mut ws, 300).await;
    assert_eq!(gw.bus.pending_answers(), PendingAnswers::default());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_before_a_handlers_first_await_keeps_the_subscription() {
    let nats = NatsServer::start();
    let handler = NatsBus::connect(NatsOptions::new(nats.url()))
        .await
        .unwrap();
    handler
        .subscribe(
            "socket:generalMessage",
            Arc::new(|m: Message| {
                // synchronous part: runs inside `Handler::call`, before any future exists
                assert_ne!(m.data()["type"], "boom", "a bad message");
                async move { m.reply("ok") }
            }),
        )
        .unwrap();
    handler.subscriptions_ready().await.unwrap();
    let gw = gateway(&nats, Duration::from_secs(60), |_| {}).await;
    let mut ws = connect(gw.running.local_addr().unwrap(), "alex", None).await;
    for _ in 0..3 {
        send(&mut ws, json!({"type": "boom"})).await;
        assert_eq!(recv(&mut ws).await["type"], "error");
        send(&mut ws, json!({"type": "fine"})).await;
        assert_eq!(
            recv(&mut ws).await,
            json!({"type": "socket:generalMessage", "payload": "ok"})
        );
    }
}

/// Publishes from a single-threaded runtime without yielding, so the publisher task cannot
/// drain the outbox in between: the bounds decide alone.
#[tokio::test(flavor = "current_thread")]
async fn the_outbox_is_bounded_in_bytes_and_pending_answers_in_count() {
    let nats = NatsServer::start();
    let mut options = NatsOptions::new(nats.url());
    options.outbox_bytes = 256 * 1024;
    options.max_pending_answers = 5;
    let node = NatsBus::connect(options).await.unwrap();
    let blob = json!({"blob": "x".repeat(32 * 1024)});
    let mut accepted = 0;
    let refused = loop {
        match node.publish(Message::new("nobody", blob.clone())) {
            Ok(()) => accepted += 1,
            Err(e) => break e.reason,
        }
        assert!(accepted < 100, "the outbox takes anything");
    };
    assert_eq!(
        refused,
        PublishFailure::Unavailable("too many bytes waiting for NATS".into())
    );
    assert!((7..=8).contains(&accepted), "{accepted} messages of 32 KB");
    let (_, bytes) = node.outbox();
    assert!(bytes <= 256 * 1024, "{bytes}");
    // once written, there is room again
    wait_until(|| node.outbox() == (0, 0), "the outbox to drain").await;
    node.publish(Message::new("nobody", blob)).unwrap();

    let answers = Arc::new(AtomicUsize::new(0));
    let answerable = || {
        Message::new("nobody.answers", Value::Null)
            .with_reply_to(Arc::new(Counting(answers.clone())))
    };
    for _ in 0..5 {
        node.publish(answerable()).unwrap();
    }
    let err = node.publish(answerable()).unwrap_err();
    assert_eq!(
        err.reason,
        PublishFailure::Unavailable("too many events waiting for an answer".into())
    );
    assert_eq!(node.pending_answers().events, 5);
    // nobody subscribes: NATS says so, and each entry leaves
    wait_until(|| node.pending_answers().events == 0, "no-responders").await;
}

/// A socket stand-in that hands on what it is told.
struct Told(tokio::sync::mpsc::UnboundedSender<Reply>);

impl ReplyTo for Told {
    fn deliver(&self, _topic: &str, reply: Reply) {
        let _ = self.0.send(reply);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_no_answer_relayed_by_another_node_arrives_as_a_no_answer() {
    let nats = NatsServer::start();
    // Someone subscribes to `inner` and never answers.
    let silent = async_nats::connect(nats.url()).await.unwrap();
    let _never = silent
        .queue_subscribe("inner", switchboard_bus_nats::DEFAULT_GROUP.into())
        .await
        .unwrap();
    silent.flush().await.unwrap();
    // Its own reply timeout runs out there and it tells the sender so, through its node.
    let _relay = relay(&nats, Duration::from_millis(200)).await;
    // The sender's node waits far longer itself: what it hears is the relay's no-answer.
    let node = patient_node(&nats).await;
    let heard = heard(&node, Message::new("outer", json!({"n": 1}))).await;
    let Reply::NoAnswer(error) = heard else {
        panic!("a no-answer, not {heard:?}");
    };
    assert_eq!(error["topic"], "inner", "{error}");

    // On the wire: a `fail`, marked, so a node that reads no header still hears a failure.
    let (mark, body) = answered_on_the_wire(&nats, "outer", r#"{"n": 2}"#).await;
    assert_eq!(mark, switchboard_bus_nats::NO_ANSWER);
    assert_eq!(body["fail"]["topic"], "inner", "{body}");
}

/// Whoever may publish `send` and has seen one event's reply subject (a handler of another
/// topic, a second handler group) cannot have the nodes answer that event for it: a refused
/// `send` naming a connecting socket's way back as its reply closed the socket (1008), and an
/// accepted one swallowed the real answer (`{}` came first). Asking on an inbox still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_cannot_answer_a_sockets_event_through_the_nodes() {
    let nats = NatsServer::start();
    let outside = async_nats::connect(nats.url()).await.unwrap();
    let mut events = outside
        .queue_subscribe("socket:connection", "switchboard-handlers".into())
        .await
        .unwrap();
    outside.flush().await.unwrap();
    let gw = gateway(&nats, Duration::from_secs(60), |_| {}).await;
    let mut ws = connect(gw.running.local_addr().unwrap(), "alex", None).await;
    let way_back = events.next().await.unwrap().reply.unwrap().to_string();

    // a refused `send` (no username), then an accepted one (to nobody), each with the way back
    for body in [
        json!({"type": "x"}),
        json!({"username": "nobody", "type": "x", "payload": 1}),
    ] {
        outside
            .publish_with_reply("socket:send", way_back.clone(), body.to_string().into())
            .await
            .unwrap();
    }
    outside.flush().await.unwrap();
    assert_silent(&mut ws, 500).await;
    assert_eq!(gw.bus.pending_answers().events, 1, "still waiting");
    let metrics = gw.running.metrics_text();
    assert!(
        metrics.contains("switchboard_bus_answers_pending 1\n")
            && metrics.contains("switchboard_bus_incoming_dropped_total 0\n"),
        "{metrics}"
    );

    // the handler's own answer is the one the socket gets
    outside
        .publish(way_back, r#"{"reply": "welcome"}"#.into())
        .await
        .unwrap();
    assert_eq!(
        recv(&mut ws).await,
        json!({"type": "onconnect", "payload": "welcome"})
    );

    // a publisher asking on an inbox still hears why its `send` was refused
    let answer = outside
        .request("socket:send", json!({"type": "x"}).to_string().into())
        .await
        .unwrap();
    let answer: Value = serde_json::from_slice(&answer.payload).unwrap();
    assert_eq!(
        answer["fail"]["message"], "send needs a string `username`",
        "{answer}"
    );
    assert_silent(&mut ws, 300).await;
}

/// A socket's event published on a topic the nodes take on every node (a config that routes
/// a message type straight to the `broadcast` topic): the nodes do not answer it (they answer
/// gather inboxes only), so it goes out without a way back and the socket is not told
/// "no handler answered" when the reply timeout runs out; every node's handler gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_on_an_every_node_topic_waits_for_no_answer() {
    let nats = NatsServer::start();
    let mut options = NatsOptions::new(nats.url());
    options.reply_timeout = Duration::from_millis(200);
    let node = NatsBus::connect(options).await.unwrap();
    let handled = Arc::new(AtomicUsize::new(0));
    let counting = handled.clone();
    node.subscribe_every_node(
        "everyone",
        Arc::new(move |_m: Message| {
            counting.fetch_add(1, Ordering::SeqCst);
            std::future::ready(())
        }),
    )
    .unwrap();
    node.subscriptions_ready().await.unwrap();
    let (tx, mut told) = tokio::sync::mpsc::unbounded_channel();
    node.publish(Message::new("everyone", json!({"n": 1})).with_reply_to(Arc::new(Told(tx))))
        .unwrap();
    wait_until(|| handled.load(Ordering::SeqCst) == 1, "handled").await;
    assert_eq!(
        node.pending_answers().events,
        0,
        "nothing waits for an answer"
    );
    // Past the reply timeout: nothing was said to the socket.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(told.try_recv().is_err(), "the socket was told something");
}

/// A publisher of large `broadcast`s faster than a node handles them: the node holds at most
/// `every_node_bytes` of them and drops the rest (it held every one, 65,536 per subscription
/// of up to `max_payload` each, in the client's channel); the subscription goes on after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_on_an_every_node_topic_is_held_within_its_bytes() {
    let big = bytes::Bytes::from(format!("{{\"blob\":\"{}\"}}", "x".repeat(512 << 10)));
    flood_a_busy_node(big, 100, 92).await;
}

/// A flood of tiny messages is held within the bytes too: each counts its overhead besides
/// its length (4 MiB hold about 15,000 of them, not 400,000).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_tiny_messages_is_held_within_the_bytes_too() {
    flood_a_busy_node("{}".into(), 30_000, 10_000).await;
}

/// Floods a node with every_node_bytes of 4 MiB, whose handler is busy, with `flood` copies
/// of `payload`: it holds at most 4 MiB of them, drops at least `dropped`, and goes on after.
async fn flood_a_busy_node(payload: bytes::Bytes, flood: u64, dropped: u64) {
    let nats = NatsServer::start();
    let mut options = NatsOptions::new(nats.url());
    options.every_node_bytes = 4 << 20;
    let node = NatsBus::connect(options).await.unwrap();
    let handled = Arc::new(AtomicUsize::new(0));
    // The handler's first call blocks (a fan-out that takes long) until the test lets it go
    // (off the runtime's workers, so the client and the bus go on meanwhile).
    let (release, gate) = std::sync::mpsc::channel::<()>();
    let gate = std::sync::Mutex::new(gate);
    let counting = handled.clone();
    node.subscribe_every_node(
        "flood",
        Arc::new(move |_m: Message| {
            if counting.fetch_add(1, Ordering::SeqCst) == 0 {
                tokio::task::block_in_place(|| {
                    let _ = gate.lock().unwrap().recv_timeout(Duration::from_secs(30));
                });
            }
            std::future::ready(())
        }),
    )
    .unwrap();
    node.subscriptions_ready().await.unwrap();

    let outside = async_nats::connect(nats.url()).await.unwrap();
    outside.publish("flood", "{}".into()).await.unwrap();
    outside.flush().await.unwrap();
    wait_until(
        || handled.load(Ordering::SeqCst) == 1,
        "the handler is busy",
    )
    .await;
    for _ in 0..flood {
        outside.publish("flood", payload.clone()).await.unwrap();
    }
    outside.flush().await.unwrap();
    wait_until(
        || node.every_node_held().0 as u64 + node.every_node_dropped() == flood + 1,
        "every message held or dropped",
    )
    .await;
    let (messages, bytes) = node.every_node_held();
    assert!(bytes <= 4 << 20, "{messages} messages, {bytes} bytes held");
    assert!(
        node.every_node_dropped() >= dropped,
        "{}",
        node.every_node_dropped()
    );
    let counters = node.counters();
    assert_eq!(
        (counters.incoming_dropped, counters.incoming_held_bytes),
        (node.every_node_dropped(), bytes as u64)
    );

    release.send(()).unwrap();
    wait_until(|| node.every_node_held() == (0, 0), "the held ones handled").await;
    assert_eq!(handled.load(Ordering::SeqCst), messages);
    outside.publish("flood", "{}".into()).await.unwrap();
    outside.flush().await.unwrap();
    wait_until(
        || handled.load(Ordering::SeqCst) == messages + 1,
        "a later message is handled",
    )
    .await;
}

/// A publisher faster than a node's handlers that wait (on an HTTP call, say): each handler
/// runs on a task of its own, and the node holds at most `handler_bytes` of their messages and
/// drops the rest (it ran a handler for every one, as many as came, each holding its
/// message), answering each dropped one that asks at once; the subscription goes on after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_on_a_handler_topic_is_held_within_its_bytes() {
    let nats = NatsServer::start();
    let mut options = NatsOptions::new(nats.url());
    options.handler_bytes = 4 << 20;
    let node = NatsBus::connect(options).await.unwrap();
    let started = Arc::new(AtomicUsize::new(0));
    let (release, gate) = tokio::sync::watch::channel(false);
    let counting = started.clone();
    node.subscribe(
        "work",
        Arc::new(move |_m: Message| {
            counting.fetch_add(1, Ordering::SeqCst);
            let mut gate = gate.clone();
            async move {
                let _ = gate.wait_for(|open| *open).await;
            }
        }),
    )
    .unwrap();
    node.subscriptions_ready().await.unwrap();

    let outside = async_nats::connect(nats.url()).await.unwrap();
    let mut answers = outside.subscribe("_INBOX.flood").await.unwrap();
    let big = bytes::Bytes::from(format!("{{\"blob\":\"{}\"}}", "x".repeat(512 << 10)));
    let flood = 100;
    for _ in 0..flood {
        outside
            .publish_with_reply("work", "_INBOX.flood", big.clone())
            .await
            .unwrap();
    }
    outside.flush().await.unwrap();
    wait_until(
        || node.handlers_held().0 as u64 + node.handlers_dropped() == flood,
        "every message held or dropped",
    )
    .await;
    let (messages, bytes) = node.handlers_held();
    assert!(bytes <= 4 << 20, "{messages} messages, {bytes} bytes held");
    assert!(node.handlers_dropped() >= 92, "{}", node.handlers_dropped());
    assert_eq!(
        started.load(Ordering::SeqCst),
        messages,
        "a handler per held message"
    );
    assert_eq!(
        node.every_node_held(),
        (0, 0),
        "counted apart from every-node topics"
    );
    let counters = node.counters();
    assert_eq!(
        (counters.incoming_dropped, counters.incoming_held_bytes),
        (node.handlers_dropped(), bytes as u64)
    );
    // Every dropped one is answered, while the held ones still wait.
    for _ in 0..node.handlers_dropped() {
        let answer = tokio::time::timeout(NATS_WAIT, answers.next())
            .await
            .expect("an answer to each dropped message")
            .unwrap();
        let body: Value = serde_json::from_slice(&answer.payload).unwrap();
        assert_eq!(
            body["fail"]["message"], "the handlers are busy; try again later",
            "{body}"
        );
    }

    release.send(true).unwrap();
    wait_until(|| node.handlers_held() == (0, 0), "the handlers done").await;
    outside.publish("work", "{}".into()).await.unwrap();
    outside.flush().await.unwrap();
    wait_until(
        || started.load(Ordering::SeqCst) == messages + 1,
        "a later message is handled",
    )
    .await;
    wait_until(|| node.handlers_held() == (0, 0), "and let go").await;
}

/// A handler process that relays each `outer` event to `inner`, with the event's way back,
/// and waits up to `reply_timeout` for an answer from there: what it hears (or its own
/// timeout) is what it tells the sender, through its node.
async fn relay(nats: &NatsServer, reply_timeout: Duration) -> Arc<NatsBus> {
    let mut options = NatsOptions::new(nats.url());
    options.reply_timeout = reply_timeout;
    let relay = Arc::new(NatsBus::connect(options).await.unwrap());
    let relaying = Arc::downgrade(&relay);
    relay
        .subscribe(
            "outer",
            Arc::new(move |m: Message| {
                let relaying = relaying.upgrade();
                async move {
                    if let Some(relaying) = relaying {
                        relaying.publish(m.with_topic("inner")).unwrap();
                    }
                    std::future::pending::<()>().await // the way back answers, not this
                }
            }),
        )
        .unwrap();
    relay.subscriptions_ready().await.unwrap();
    relay
}

/// A sender's node that waits far longer than any test: only an answer can come back.
async fn patient_node(nats: &NatsServer) -> NatsBus {
    let mut options = NatsOptions::new(nats.url());
    options.reply_timeout = Duration::from_secs(600);
    NatsBus::connect(options).await.unwrap()
}

/// What the socket of `message`, published on `node`, is told (within [`NATS_WAIT`]).
async fn heard(node: &NatsBus, message: Message) -> Reply {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    node.publish(message.with_reply_to(Arc::new(Told(tx))))
        .unwrap();
    tokio::time::timeout(NATS_WAIT, rx.recv())
        .await
        .unwrap()
        .unwrap()
}

/// A plain client's request on `topic`: the answer's [`switchboard_bus_nats::ANSWER_HEADER`]
/// (which it must have) and its body.
async fn answered_on_the_wire(nats: &NatsServer, topic: &str, body: &str) -> (String, Value) {
    let outside = async_nats::connect(nats.url()).await.unwrap();
    let answer = outside
        .request(topic.to_string(), body.to_string().into())
        .await
        .unwrap();
    let mark = answer
        .headers
        .unwrap()
        .get(switchboard_bus_nats::ANSWER_HEADER)
        .unwrap()
        .to_string();
    (mark, serde_json::from_slice(&answer.payload).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_marked_answer_that_is_not_a_no_answer_is_malformed() {
    let malformed = Reply::Fail(json!({"message": "malformed answer from a handler"}));
    assert_eq!(
        heard_for_marked_answers(&[
            ("no-answer", r#"{"reply": 1}"#),
            ("no-answer", r#"{}"#),
            ("refused", r#"{"fail": {"message": "x"}}"#),
            ("no-answer", r#"{"fail": {"message": "late"}}"#),
        ])
        .await,
        [
            malformed.clone(),
            malformed.clone(),
            malformed,
            Reply::NoAnswer(json!({"message": "late"})),
        ]
    );
}

/// What a node hears for each of `answers` (header value, body), sent by a plain client on
/// the reply subject of one event each, in turn.
async fn heard_for_marked_answers(answers: &'static [(&'static str, &'static str)]) -> Vec<Reply> {
    let nats = NatsServer::start();
    let outside = async_nats::connect(nats.url()).await.unwrap();
    let mut events = outside.subscribe("marked").await.unwrap();
    outside.flush().await.unwrap();
    let answering = outside.clone();
    tokio::spawn(async move {
        for (mark, body) in answers {
            let Some(event) = events.next().await else {
                return;
            };
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(switchboard_bus_nats::ANSWER_HEADER, *mark);
            answering
                .publish_with_headers(event.reply.unwrap(), headers, body.as_bytes().into())
                .await
                .unwrap();
        }
    });
    let node = NatsBus::connect(NatsOptions::new(nats.url()))
        .await
        .unwrap();
    let mut told = Vec::new();
    for _ in answers {
        told.push(heard(&node, Message::new("marked", json!({}))).await);
    }
    told
}

/// A handler process whose handler of `topic` fails as each event's `how` says: `"panic"`
/// panics at once (in `Handler::call`, before any future exists), `"panic-later"` after an
/// await, anything else returns an error.
async fn failing_handler(nats: &NatsServer, topic: &str) -> NatsBus {
    let failing = Arc::new(|m: Message| {
        let how = m.data()["how"].as_str().unwrap_or_default().to_string();
        assert_ne!(how, "panic", "a panic at once");
        async move {
            tokio::task::yield_now().await;
            assert_ne!(how, "panic-later", "a panic after an await");
            Err::<(), &str>("an error")
        }
    });
    handler_process(nats, topic, failing).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_failure_relayed_by_another_node_arrives_as_a_handler_failure() {
    let nats = NatsServer::start();
    let _failing = failing_handler(&nats, "inner").await;
    // It hears the failure from there and tells the sender so, through its node.
    let _relay = relay(&nats, Duration::from_secs(600)).await;
    let node = patient_node(&nats).await;
    // Straight from the failing handler's node, and relayed on by another, each way it fails.
    for topic in ["inner", "outer"] {
        for how in ["error", "panic", "panic-later"] {
            let told = heard(&node, Message::new(topic, json!({"how": how}))).await;
            assert_eq!(told, Reply::HandlerFailed, "{topic}, {how}");
        }
    }

    // On the wire: a `fail`, marked, so a node that reads no header still hears a failure.
    for topic in ["inner", "outer"] {
        let (mark, body) = answered_on_the_wire(&nats, topic, r#"{"how": "error"}"#).await;
        assert_eq!(mark, switchboard_bus_nats::HANDLER_FAILED, "{topic}");
        assert_eq!(
            body,
            json!({"fail": {"message": "internal error in a handler"}})
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_handler_failing_on_another_node_closes_its_socket_with_1011() {
    let nats = NatsServer::start();
    let _failing = failing_handler(&nats, "socket:connection").await;
    let gw = gateway(&nats, Duration::from_secs(60), |_| {}).await;
    let mut ws = connect(gw.running.local_addr().unwrap(), "alex", None).await;
    assert_eq!(recv(&mut ws).await["type"], "error");
    assert_eq!(
        switchboard_test_support::websocket::close_code(&mut ws).await,
        1011,
        "a handler error, not a refusal (1008)"
    );
    let stats = gw.running.stats();
    assert_eq!(
        (stats.handler_failures, stats.connect_failures),
        (1, 1),
        "{stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_marked_answer_that_is_not_a_handler_failure_is_malformed() {
    let malformed = Reply::Fail(json!({"message": "malformed answer from a handler"}));
    assert_eq!(
        heard_for_marked_answers(&[
            ("handler-failed", r#"{"reply": 1}"#),
            ("handler-failed", r#"{}"#),
            ("handler-error", r#"{"fail": {"message": "x"}}"#),
            ("Handler-Failed", r#"{"fail": {"message": "x"}}"#),
            ("handler-failed", r#"{"fail": {"message": "anything"}}"#),
        ])
        .await,
        [
            malformed.clone(),
            malformed.clone(),
            malformed.clone(),
            malformed,
            Reply::HandlerFailed,
        ]
    );
}
