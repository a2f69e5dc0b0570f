//! The in-process bus under real handlers: fan-out, replies, isolation of failures.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use serde_json::json;
use switchboard_bus::{Bus, InProcessBus, Message, Producer, Reply, ReplyTo};
use tokio::sync::mpsc;

/// A reply target that forwards to a channel, like a socket's send queue.
struct ChannelReply(mpsc::UnboundedSender<(String, Reply)>);
impl ReplyTo for ChannelReply {
    fn deliver(&self, topic: &str, reply: Reply) {
        let _ = self.0.send((topic.to_string(), reply));
    }
}

fn reply_channel() -> (Arc<ChannelReply>, mpsc::UnboundedReceiver<(String, Reply)>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (Arc::new(ChannelReply(tx)), rx)
}

async fn next(rx: &mut mpsc::UnboundedReceiver<(String, Reply)>) -> (String, Reply) {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("reply within 5 s")
        .expect("channel open")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_handler_of_a_topic_gets_the_message() {
    let bus = Arc::new(InProcessBus::new());
    let count = Arc::new(AtomicUsize::new(0));
    for _ in 0..3 {
        let c = count.clone();
        bus.subscribe(
            "t",
            Arc::new(move |_m: Message| {
                c.fetch_add(1, Ordering::SeqCst);
                async {}
            }),
        )
        .unwrap();
    }
    Producer::new(bus.clone()).send("t", json!({})).unwrap();
    assert_eq!(count.load(Ordering::SeqCst), 3);
    assert_eq!(bus.handler_count("t"), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_handler_replies_after_waiting() {
    let bus = InProcessBus::new();
    bus.subscribe(
        "slow",
        Arc::new(|m: Message| async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            m.reply(json!({"echo": m.data().clone()}));
        }),
    )
    .unwrap();
    let (to, mut rx) = reply_channel();
    bus.publish(Message::new("slow", json!(7)).with_reply_to(to))
        .unwrap();
    assert_eq!(
        next(&mut rx).await,
        ("slow".into(), Reply::Ok(json!({"echo": 7})))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panics_and_errors_are_isolated() {
    let bus = InProcessBus::new();
    bus.subscribe(
        "t",
        Arc::new(|_m: Message| -> std::future::Ready<()> { panic!("boom") }),
    )
    .unwrap();
    bus.subscribe(
        "t",
        Arc::new(|_m: Message| async {
            tokio::task::yield_now().await;
            if true {
                panic!("late boom");
            }
        }),
    )
    .unwrap();
    bus.subscribe(
        "t",
        Arc::new(|m: Message| async move {
            m.reply("fine");
        }),
    )
    .unwrap();
    let (to, mut rx) = reply_channel();
    for _ in 0..2 {
        bus.publish(Message::new("t", json!(null)).with_reply_to(to.clone()))
            .unwrap();
    }
    let mut got = Vec::new();
    for _ in 0..6 {
        got.push(next(&mut rx).await.1);
    }
    let failed = got.iter().filter(|r| **r == Reply::HandlerFailed).count();
    let ok = got
        .iter()
        .filter(|r| **r == Reply::Ok(json!("fine")))
        .count();
    assert_eq!((failed, ok), (4, 2), "{got:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_carries_the_error_payload() {
    let bus = InProcessBus::new();
    bus.subscribe(
        "t",
        Arc::new(|m: Message| async move { m.fail(json!({"code": "nope"})) }),
    )
    .unwrap();
    let (to, mut rx) = reply_channel();
    bus.publish(Message::new("t", json!(null)).with_reply_to(to))
        .unwrap();
    assert_eq!(next(&mut rx).await.1, Reply::Fail(json!({"code": "nope"})));
}

/// A reply target that holds only a weak reference, like the gateway's socket handle.
struct WeakReply(Weak<Mutex<Vec<Reply>>>);
impl ReplyTo for WeakReply {
    fn deliver(&self, _topic: &str, reply: Reply) {
        if let Some(v) = self.0.upgrade() {
            v.lock().unwrap().push(reply);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_that_never_come_or_go_nowhere_leak_nothing() {
    let bus = InProcessBus::new();
    // A handler that never replies and never finishes until released.
    let (release_tx, release_rx) = tokio::sync::watch::channel(false);
    bus.subscribe(
        "hang",
        Arc::new(move |m: Message| {
            let mut rx = release_rx.clone();
            async move {
                let _ = rx.wait_for(|v| *v).await;
                m.reply("late");
            }
        }),
    )
    .unwrap();
    let sink = Arc::new(Mutex::new(Vec::new()));
    let target = Arc::new(WeakReply(Arc::downgrade(&sink)));
    let msg = Message::new("hang", json!(null)).with_reply_to(target.clone());
    bus.publish(msg).unwrap();
    // the socket goes away
    drop(sink);
    release_tx.send(true).unwrap();
    // the handler finishes, its reply is dropped quietly, and its clone of the target goes
    for _ in 0..100 {
        if Arc::strong_count(&target) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        Arc::strong_count(&target),
        1,
        "handler task kept the message alive"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_from_inside_a_handler() {
    let bus = Arc::new(InProcessBus::new());
    let producer = Producer::new(bus.clone());
    let (tx, mut rx) = mpsc::unbounded_channel();
    bus.subscribe(
        "first",
        Arc::new(move |m: Message| {
            let p = producer.clone();
            async move {
                p.send("second", json!({"from": m.data().clone()})).unwrap();
            }
        }),
    )
    .unwrap();
    bus.subscribe(
        "second",
        Arc::new(move |m: Message| {
            tx.send(m.data().clone()).unwrap();
            async {}
        }),
    )
    .unwrap();
    Producer::new(bus).send("first", 1).unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap();
    assert_eq!(got, Some(json!({"from": 1})));
}
