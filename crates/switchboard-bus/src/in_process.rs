//! The embedded bus: topics map to handlers in this process.

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, RwLock};
use std::task::{Context as TaskContext, Poll, Waker};

use futures_util::FutureExt;

use crate::{
    Bus, Handler, HandlerError, HandlerFuture, Message, PublishError, PublishFailure, Reply,
    ReplyTo, SubscribeError,
};

type Handlers = Arc<[Arc<dyn Handler>]>;

/// The in-process bus: every handler subscribed to a topic runs in this process.
///
/// Dispatch runs each handler's future *inline* until it first waits, and only then spawns
/// it on the tokio runtime. Handlers that finish without waiting (most: compute, reply,
/// send) therefore run in publish order and cost no task spawn; handlers that wait run
/// concurrently. A handler that returns an error or panics is logged, its sender gets
/// [`Reply::HandlerFailed`], and nothing else is affected.
#[derive(Default)]
pub struct InProcessBus {
    // foldhash: topics are looked up per publish, and the table is the subscribers', not input.
    topics: RwLock<foldhash::HashMap<Arc<str>, Handlers>>,
}

impl std::fmt::Debug for InProcessBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let topics = self.topics.read().map(|t| t.len()).unwrap_or(0);
        f.debug_struct("InProcessBus")
            .field("topics", &topics)
            .finish()
    }
}

impl InProcessBus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of handlers subscribed to `topic`.
    pub fn handler_count(&self, topic: &str) -> usize {
        self.handlers(topic).map_or(0, |h| h.len())
    }

    fn handlers(&self, topic: &str) -> Option<Handlers> {
        let topics = self.topics.read().unwrap_or_else(|e| e.into_inner());
        topics.get(topic).cloned()
    }
}

impl Bus for InProcessBus {
    fn publish(&self, msg: Message) -> Result<(), PublishError> {
        let Some(handlers) = self.handlers(msg.topic()) else {
            return Ok(());
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return Err(PublishError {
                message: msg,
                reason: PublishFailure::NotRunning,
            });
        };
        // The last handler (usually the only one) takes the message itself: a clone is four
        // reference counts up and down, per message.
        if let Some((last, others)) = handlers.split_last() {
            for handler in others {
                dispatch(&runtime, handler.as_ref(), msg.clone());
            }
            dispatch(&runtime, last.as_ref(), msg);
        }
        Ok(())
    }

    fn subscribe(&self, topic: &str, handler: Arc<dyn Handler>) -> Result<(), SubscribeError> {
        if topic.is_empty() {
            return Err(SubscribeError::EmptyTopic);
        }
        let mut topics = self.topics.write().unwrap_or_else(|e| e.into_inner());
        let entry = topics
            .entry(Arc::from(topic))
            .or_insert_with(|| Arc::new([]));
        let mut list: Vec<_> = entry.iter().cloned().collect();
        list.push(handler);
        *entry = list.into();
        Ok(())
    }
}

/// Runs one handler on one message: inline until it first waits, then on the runtime.
fn dispatch(runtime: &tokio::runtime::Handle, handler: &dyn Handler, msg: Message) {
    // What a failure report needs, and no more: the data and context go with the handler.
    let origin = WayBack {
        topic: msg.topic.clone(),
        reply_to: msg.reply_to.clone(),
    };
    let started = std::panic::catch_unwind(AssertUnwindSafe(|| {
        let mut fut: HandlerFuture = handler.call(msg);
        let mut cx = TaskContext::from_waker(Waker::noop());
        match fut.as_mut().poll(&mut cx) {
            Poll::Ready(result) => Ok(result),
            Poll::Pending => Err(fut),
        }
    }));
    match started {
        Ok(Ok(result)) => report(&origin, result),
        Ok(Err(pending)) => {
            // The spawned task polls again at once with a real waker, which the future
            // registers in place of the no-op one.
            runtime.spawn(async move {
                match AssertUnwindSafe(pending).catch_unwind().await {
                    Ok(result) => report(&origin, result),
                    Err(panic) => report_panic(&origin, panic),
                }
            });
        }
        Err(panic) => report_panic(&origin, panic),
    }
}

/// The topic of a dispatched message and the way back to its sender, for a failure report.
/// Not [`Message::way_back`]: that one is a whole message, whose `null` data and empty context
/// are shared statics, and cloning them would cost two more reference counts per dispatch.
struct WayBack {
    topic: Arc<str>,
    reply_to: Option<Arc<dyn ReplyTo>>,
}

impl WayBack {
    fn handler_failed(&self) {
        if let Some(to) = &self.reply_to {
            to.deliver(&self.topic, Reply::HandlerFailed);
        }
    }
}

fn report(origin: &WayBack, result: Result<(), HandlerError>) {
    if let Err(error) = result {
        tracing::error!(topic = &*origin.topic, %error, "handler failed");
        origin.handler_failed();
    }
}

fn report_panic(origin: &WayBack, panic: Box<dyn std::any::Any + Send>) {
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    tracing::error!(topic = &*origin.topic, panic = %what, "handler panicked");
    origin.handler_failed();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::Heard;
    use serde_json::json;
    use std::sync::Mutex;

    /// A bus whose handler on `t` records each message's number, then returns `done()`.
    fn recording<Fut>(done: fn() -> Fut) -> (InProcessBus, Arc<Mutex<Vec<i64>>>)
    where
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let bus = InProcessBus::new();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        bus.subscribe(
            "t",
            Arc::new(move |m: Message| {
                s.lock().unwrap().push(m.data().as_i64().unwrap());
                done()
            }),
        )
        .unwrap();
        (bus, seen)
    }

    #[tokio::test]
    async fn sync_handlers_run_in_publish_order_without_spawning() {
        let (bus, seen) = recording(|| async {});
        for i in 0..100 {
            bus.publish(Message::new("t", json!(i))).unwrap();
        }
        // No await happened, so the handlers ran inline.
        assert_eq!(*seen.lock().unwrap(), (0..100).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_handler_done_at_once_runs_inline_and_reports_nothing() {
        // A handler returning `std::future::ready(())` (the bus skips boxing its future).
        let (bus, seen) = recording(|| std::future::ready(()));
        let rec = Arc::new(Heard::default());
        for i in 0..3 {
            let msg = Message::new("t", json!(i)).with_reply_to(rec.clone());
            bus.publish(msg).unwrap();
        }
        assert_eq!(*seen.lock().unwrap(), [0, 1, 2]);
        assert!(rec.0.lock().unwrap().is_empty(), "no error reported");
        // A `Ready` of anything else is an ordinary future: its error still reports.
        bus.subscribe(
            "u",
            Arc::new(|_m: Message| std::future::ready(Err::<(), _>("full"))),
        )
        .unwrap();
        bus.publish(Message::new("u", json!(null)).with_reply_to(rec.clone()))
            .unwrap();
        assert_eq!(rec.0.lock().unwrap().len(), 1, "the failure reported");
    }

    #[tokio::test]
    async fn publish_without_subscribers_is_ok() {
        let bus = InProcessBus::new();
        bus.publish(Message::new("nobody", json!(1))).unwrap();
        assert_eq!(bus.handler_count("nobody"), 0);
    }

    #[test]
    fn publish_outside_a_runtime_hands_the_message_back() {
        let bus = InProcessBus::new();
        bus.subscribe("t", Arc::new(|_m: Message| async {}))
            .unwrap();
        let err = bus.publish(Message::new("t", json!("x"))).unwrap_err();
        assert_eq!(err.reason, PublishFailure::NotRunning);
        assert_eq!(err.message.data(), &json!("x"));
    }

    #[tokio::test]
    async fn every_handler_of_a_topic_gets_the_message_and_the_way_back() {
        // The last handler takes the message itself, the others clones: each must see the
        // data and context and reach the sender, and a failure (at once, after waiting, or a
        // panic) reports under the topic whichever handler it was. The failing handlers come
        // first, so that the last one, which gets the message moved, is a recording one.
        let bus = InProcessBus::new();
        bus.subscribe(
            "t",
            Arc::new(|_m: Message| async {
                tokio::task::yield_now().await;
                Err::<(), _>("after a wait")
            }),
        )
        .unwrap();
        bus.subscribe(
            "t",
            Arc::new(|m: Message| async move { assert!(m.data().is_null(), "it panics") }),
        )
        .unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        for i in 0..3 {
            let s = seen.clone();
            bus.subscribe(
                "t",
                Arc::new(move |m: Message| {
                    let s = s.clone();
                    async move {
                        let user = m.context().username.as_deref().unwrap_or("").to_string();
                        s.lock().unwrap().push((i, m.data()["n"].clone(), user));
                        m.reply(i);
                    }
                }),
            )
            .unwrap();
        }
        let rec = Arc::new(Heard::default());
        let context = Arc::new(crate::Context::for_connection(
            9,
            "alex",
            None,
            serde_json::Map::new(),
            serde_json::Map::new(),
        ));
        bus.publish(
            Message::shared(Arc::from("t"), Arc::new(json!({"n": 5})), context)
                .with_reply_to(rec.clone()),
        )
        .unwrap();
        let want: Vec<_> = (0..3).map(|i| (i, json!(5), "alex".to_string())).collect();
        assert_eq!(*seen.lock().unwrap(), want);
        for _ in 0..100 {
            if rec.0.lock().unwrap().len() == 5 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let heard = rec.0.lock().unwrap().clone();
        let t = |r: Reply| ("t".to_string(), r);
        assert_eq!(
            heard,
            [
                t(Reply::HandlerFailed), // the panic, at once
                t(Reply::Ok(json!(0))),
                t(Reply::Ok(json!(1))),
                t(Reply::Ok(json!(2))), // the last handler, with the message itself
                t(Reply::HandlerFailed), // the wait, then the error
            ]
        );
    }

    #[tokio::test]
    async fn failing_handler_reports_without_details() {
        let bus = InProcessBus::new();
        bus.subscribe(
            "t",
            Arc::new(|_m: Message| async { Err::<(), _>("database on fire") }),
        )
        .unwrap();
        let rec = Arc::new(Heard::default());
        bus.publish(Message::new("t", json!(null)).with_reply_to(rec.clone()))
            .unwrap();
        assert_eq!(
            *rec.0.lock().unwrap(),
            [("t".to_string(), Reply::HandlerFailed)]
        );
    }
}
