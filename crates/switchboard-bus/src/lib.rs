//! Topics, messages, handlers and the in-process event bus: the pub/sub half of Switchboard.
//!
//! Depend on this crate to write handlers that run inside a gateway, to publish with a
//! [`Producer`], or to implement another bus (NATS, say) behind the [`Bus`] trait without
//! touching the rest of Switchboard. It knows nothing of sockets or HTTP.
//!
//! The model is the spec's `EventBus`: a [`Message`] has a topic, `data` (JSON), a `context`
//! (who sent it) and, when it came from a socket, a way back: [`Message::reply`] and
//! [`Message::fail`]. Several handlers may subscribe to one topic; each gets the message.
//!
//! ```
//! use std::sync::Arc;
//! use switchboard_bus::{Bus, InProcessBus, Message, Producer};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let bus = Arc::new(InProcessBus::new());
//! let (tx, rx) = std::sync::mpsc::channel();
//! bus.subscribe("greetings", Arc::new(move |msg: Message| {
//!     let tx = tx.clone();
//!     async move { tx.send(msg.data()["name"].clone()).unwrap(); }
//! })).unwrap();
//!
//! let producer = Producer::new(bus);
//! producer.send("greetings", serde_json::json!({"name": "alex"})).unwrap();
//! assert_eq!(rx.recv().unwrap(), "alex");
//! # }
//! ```

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

mod in_process;
mod json_object;
pub use in_process::InProcessBus;
pub use json_object::JsonObject;

/// Who and where a message came from. Handlers read it as the spec's `msg.context`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Context {
    /// The connection that caused the message, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_id: Option<u64>,
    /// The verified username of that connection. Shared text: a gateway hands every message
    /// of a socket the same string instead of a copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<Arc<str>>,
    /// The namespace the connection asked for (also at `params.namespace`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<Arc<str>>,
    /// The upgrade request's headers that the gateway is configured to pass on
    /// (`socket.context_headers`), lower-case names; the verified JWT claims at `jwt`.
    #[serde(default)]
    pub headers: JsonObject,
    /// The upgrade request's query parameters (`namespace` among them).
    #[serde(default)]
    pub params: JsonObject,
}

impl Context {
    /// A context for a connection. `headers` and `params` may be maps or [`JsonObject`]s
    /// (which a gateway shares between the messages of one socket).
    pub fn for_connection(
        connection_id: u64,
        username: impl Into<Arc<str>>,
        namespace: Option<Arc<str>>,
        headers: impl Into<JsonObject>,
        params: impl Into<JsonObject>,
    ) -> Self {
        Context {
            connection_id: Some(connection_id),
            username: Some(username.into()),
            namespace,
            headers: headers.into(),
            params: params.into(),
        }
    }
}

/// The empty context, one shared allocation for every message that has no sender.
fn empty_context() -> Arc<Context> {
    static EMPTY: std::sync::OnceLock<Arc<Context>> = std::sync::OnceLock::new();
    EMPTY.get_or_init(Arc::default).clone()
}

/// `null`, one shared allocation for every message that carries no data.
fn no_data() -> Arc<Value> {
    static NULL: std::sync::OnceLock<Arc<Value>> = std::sync::OnceLock::new();
    NULL.get_or_init(|| Arc::new(Value::Null)).clone()
}

/// What a handler answers to the sender of a message.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Reply {
    /// `msg.reply(payload)`.
    Ok(Value),
    /// `msg.fail(error)`.
    Fail(Value),
    /// The handler returned an error or panicked; the bus reports it without details.
    HandlerFailed,
    /// No handler answered in time (a bus or endpoint that waits for answers); the value is
    /// the error to tell the sender. Not a refusal: a connect event that gets it does not
    /// close its socket unless the connect gate waits for a verdict.
    NoAnswer(Value),
}

/// At most one log line a second for one kind of event, with how many happened since the
/// last line: for what anyone who may publish on the bus can make happen at any rate (a
/// malformed message, a refused `send`), so that a flood of them cannot fill a disk with logs.
///
/// ```
/// static BAD: switchboard_bus::LogLimit = switchboard_bus::LogLimit::new();
/// if let Some(dropped) = BAD.note() {
///     eprintln!("{dropped} bad messages dropped");
/// }
/// ```
#[derive(Debug)]
pub struct LogLimit {
    /// Seconds since the process's first note (from 1) when a line was last let through.
    logged_at: std::sync::atomic::AtomicU64,
    since: std::sync::atomic::AtomicU64,
}

impl LogLimit {
    /// A limiter that has let nothing through yet.
    pub const fn new() -> Self {
        LogLimit {
            logged_at: std::sync::atomic::AtomicU64::new(0),
            since: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Counts one event; `Some(events since the last line, this one included)` when this one
    /// should be logged.
    pub fn note(&self) -> Option<u64> {
        use std::sync::atomic::Ordering::Relaxed;
        self.since.fetch_add(1, Relaxed);
        let now = seconds_since_start();
        let last = self.logged_at.load(Relaxed);
        if last != 0 && now <= last {
            return None;
        }
        if self
            .logged_at
            .compare_exchange(last, now, Relaxed, Relaxed)
            .is_err()
        {
            return None; // another thread logs this second
        }
        Some(self.since.swap(0, Relaxed).max(1))
    }
}

impl Default for LogLimit {
    fn default() -> Self {
        Self::new()
    }
}

/// Seconds since this was first called, from 1.
fn seconds_since_start() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_secs()
        + 1
}

impl Reply {
    /// A handler's answer as NATS and HTTP handlers send it: the JSON object `{"reply": P}`,
    /// `{"fail": E}` (which wins if both are there) or `{}` (`None`: nothing to say); a field
    /// that is `null` counts as absent. Anything
    /// else (an array, another key, not JSON) is an error, with what was wrong: a body that
    /// is not an answer must not pass as one (`["hi"]` read as a reply of `"hi"` before).
    pub fn from_answer(body: &[u8]) -> Result<Option<Reply>, String> {
        let Value::Object(mut answer) =
            serde_json::from_slice::<Value>(body).map_err(|e| e.to_string())?
        else {
            return Err("an answer is a JSON object".into());
        };
        if let Some(other) = answer.keys().find(|k| *k != "reply" && *k != "fail") {
            return Err(format!(
                "unknown key `{other}` (an answer has `reply` or `fail`)"
            ));
        }
        // `null` is absent, as handlers that write both fields send what they leave empty.
        let mut field = |key| answer.remove(key).filter(|v: &Value| !v.is_null());
        Ok(match (field("fail"), field("reply")) {
            (Some(fail), _) => Some(Reply::Fail(fail)),
            (None, Some(reply)) => Some(Reply::Ok(reply)),
            (None, None) => None,
        })
    }
}

/// The way back to whoever published a message (a socket, for the gateway). Implemented by
/// the gateway; a reply to a target that has gone must be dropped quietly.
pub trait ReplyTo: Send + Sync + 'static {
    /// Delivers `reply` for a message that was published on `topic`.
    fn deliver(&self, topic: &str, reply: Reply);
}

/// One event on the bus. Cloning is cheap: topic, data and context are shared.
#[derive(Clone)]
pub struct Message {
    topic: Arc<str>,
    data: Arc<Value>,
    context: Arc<Context>,
    reply_to: Option<Arc<dyn ReplyTo>>,
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("topic", &self.topic)
            .field("data", &self.data)
            .field("context", &self.context)
            .field("can_reply", &self.reply_to.is_some())
            .finish()
    }
}

impl Message {
    /// A message with empty context and nobody to reply to (what [`Producer::send`] makes).
    pub fn new(topic: impl Into<Arc<str>>, data: Value) -> Self {
        Self::shared(topic.into(), Arc::new(data), empty_context())
    }

    /// A message made of already-shared parts, with nobody to reply to: what a gateway
    /// publishes for every socket message, without allocating anything it then replaces.
    pub fn shared(topic: Arc<str>, data: Arc<Value>, context: Arc<Context>) -> Self {
        Message {
            topic,
            data,
            context,
            reply_to: None,
        }
    }

    /// The same data and context published on another topic (shares, does not copy).
    pub fn with_topic(&self, topic: impl Into<Arc<str>>) -> Self {
        Message {
            topic: topic.into(),
            ..self.clone()
        }
    }

    /// Sets the context.
    pub fn with_context(mut self, context: Arc<Context>) -> Self {
        self.context = context;
        self
    }

    /// Sets where replies go.
    pub fn with_reply_to(mut self, reply_to: Arc<dyn ReplyTo>) -> Self {
        self.reply_to = Some(reply_to);
        self
    }

    /// Shares already-allocated data (avoids a copy when one payload goes to several topics).
    pub fn with_shared_data(mut self, data: Arc<Value>) -> Self {
        self.data = data;
        self
    }

    /// The topic this message was published on.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The message's data: for socket messages, the whole JSON object the client sent.
    pub fn data(&self) -> &Value {
        &self.data
    }

    /// The shared data, to pass on without copying.
    pub fn shared_data(&self) -> &Arc<Value> {
        &self.data
    }

    /// Who sent it.
    pub fn context(&self) -> &Context {
        &self.context
    }

    /// The shared context.
    pub fn shared_context(&self) -> &Arc<Context> {
        &self.context
    }

    /// The topic and the way back only (data `null`, the empty context): what a bus keeps
    /// while an answer is awaited, so that a pending answer does not hold the event's payload
    /// and context.
    pub fn way_back(&self) -> Message {
        Message {
            topic: self.topic.clone(),
            data: no_data(),
            context: empty_context(),
            reply_to: self.reply_to.clone(),
        }
    }

    /// True when [`Message::reply`] reaches someone.
    pub fn can_reply(&self) -> bool {
        self.reply_to.is_some()
    }

    /// Answers the sender. From an `onconnect` handler the client gets
    /// `{"type":"onconnect","payload":...}`; from a message handler
    /// `{"type":<topic>,"payload":...}`. Without a sender, or if it has gone, nothing happens.
    pub fn reply(&self, payload: impl Serialize) {
        self.answer(Reply::Ok, payload);
    }

    /// Answers the sender with an error frame `{"type":"error","payload":...}`. From an
    /// `onconnect` handler the socket is then closed.
    pub fn fail(&self, error: impl Serialize) {
        self.answer(Reply::Fail, error);
    }

    /// Delivers a [`Reply`] as is (used by bus implementations).
    pub fn deliver(&self, reply: Reply) {
        if let Some(to) = &self.reply_to {
            to.deliver(&self.topic, reply);
        }
    }

    fn answer(&self, kind: fn(Value) -> Reply, payload: impl Serialize) {
        if self.reply_to.is_none() {
            return;
        }
        match serde_json::to_value(payload) {
            Ok(v) => self.deliver(kind(v)),
            Err(e) => {
                tracing::error!(topic = %self.topic, error = %e, "reply payload is not serializable");
                self.deliver(Reply::HandlerFailed);
            }
        }
    }
}

/// The error type handlers may return.
pub type HandlerError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A boxed handler future.
pub type HandlerFuture = Pin<Box<dyn Future<Output = Result<(), HandlerError>> + Send + 'static>>;

/// Something that handles messages of a topic. Implemented for every
/// `Fn(Message) -> impl Future<Output = ()>` and `... Output = Result<(), E>` closure.
pub trait Handler: Send + Sync + 'static {
    /// Handles one message.
    fn call(&self, msg: Message) -> HandlerFuture;
}

/// What a handler closure's future may return: `()` or `Result<(), E>`.
pub trait IntoHandlerResult {
    /// Converts into the bus's result type.
    fn into_handler_result(self) -> Result<(), HandlerError>;
}

impl IntoHandlerResult for () {
    fn into_handler_result(self) -> Result<(), HandlerError> {
        Ok(())
    }
}

impl<E: Into<HandlerError>> IntoHandlerResult for Result<(), E> {
    fn into_handler_result(self) -> Result<(), HandlerError> {
        self.map_err(Into::into)
    }
}

impl<F, Fut> Handler for F
where
    F: Fn(Message) -> Fut + Send + Sync + 'static,
    Fut: Future + Send + 'static,
    Fut::Output: IntoHandlerResult,
{
    fn call(&self, msg: Message) -> HandlerFuture {
        let fut = self(msg);
        // A handler that has done its work already (`std::future::Ready<()>`, as the
        // gateway's own deliveries return) needs no allocation: its result is known, and a
        // box of a zero-sized future allocates nothing. Every other future is boxed.
        // (The comparison is of two constants once compiled.)
        if std::any::TypeId::of::<Fut>() == std::any::TypeId::of::<std::future::Ready<()>>() {
            drop(fut); // its output is `()`: done, with nothing to report
            return Box::pin(Done);
        }
        Box::pin(async move { fut.await.into_handler_result() })
    }
}

/// The future of a handler that has finished: `Ok(())` at once.
struct Done;

impl Future for Done {
    type Output = Result<(), HandlerError>;

    fn poll(
        self: Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// Why a publish failed. Hands the message back, so nothing is lost silently.
#[derive(Debug, thiserror::Error)]
#[error("cannot publish to `{}`: {reason}", message.topic())]
pub struct PublishError {
    /// The message that was not published.
    pub message: Message,
    /// Why.
    pub reason: PublishFailure,
}

/// The reasons a publish can fail.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PublishFailure {
    /// The bus is not running (no async runtime, or it was shut down).
    #[error("the bus is not running")]
    NotRunning,
    /// The broker could not be reached.
    #[error("the broker is unavailable: {0}")]
    Unavailable(String),
    /// The data could not be serialized to JSON.
    #[error("data is not serializable: {0}")]
    Serialize(String),
}

/// Why a subscribe failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SubscribeError {
    /// The topic name is empty.
    #[error("topic must not be empty")]
    EmptyTopic,
    /// The broker refused or could not be reached.
    #[error("cannot subscribe to `{topic}`: {reason}")]
    Broker {
        /// The topic.
        topic: String,
        /// What went wrong.
        reason: String,
    },
}

/// The seam between Switchboard and a message bus. The in-process [`InProcessBus`] is the
/// default; a broker-backed bus implements the same trait in its own crate.
///
/// `publish` must not block: a bus that does I/O queues the message and reports failures
/// later through [`Message::fail`] on the message itself.
pub trait Bus: Send + Sync + 'static {
    /// Publishes `msg` to every handler subscribed to its topic. No subscriber is not an error.
    fn publish(&self, msg: Message) -> Result<(), PublishError>;

    /// Adds `handler` to `topic`. Every handler of a topic gets every message. On a
    /// distributed bus, handlers of one topic form a group across processes: each message is
    /// handled once per group, by one of its members.
    fn subscribe(&self, topic: &str, handler: Arc<dyn Handler>) -> Result<(), SubscribeError>;

    /// Adds `handler` to `topic` on *every* node: each process that subscribes this way gets
    /// every message (the gateway's `send` and `broadcast` subscribers, which deliver to the
    /// node's own sockets). In one process it is the same as [`Bus::subscribe`].
    fn subscribe_every_node(
        &self,
        topic: &str,
        handler: Arc<dyn Handler>,
    ) -> Result<(), SubscribeError> {
        self.subscribe(topic, handler)
    }

    /// This node's name on a bus shared by several nodes (a broker bus); `None` in one
    /// process, where there is only this node.
    fn node_name(&self) -> Option<&str> {
        None
    }

    /// True while the bus can publish (a broker bus: while connected). Readiness checks use
    /// it. The in-process bus is always ready.
    fn is_ready(&self) -> bool {
        true
    }

    /// Resolves once every message published before the call has left this process (a
    /// broker bus: reached the broker). Shutdown awaits it, bounded by the drain time, so the
    /// last events (`onclose`) are not lost with the process. The in-process bus has nothing
    /// to flush.
    fn flush(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(std::future::ready(()))
    }

    /// What the bus counts of its own work (see [`BusCounters`]), read at each metrics
    /// scrape.
    fn counters(&self) -> BusCounters {
        BusCounters::default()
    }

    /// Asks every node: publishes `data` on `topic` with a way back, and gathers what the
    /// handlers each node subscribed there with [`Bus::subscribe_every_node`] answer
    /// ([`Message::reply`]; failures are left out). A broker bus waits at most `within`, and
    /// less once the answers have stopped coming (see its documentation); in one process the
    /// answers are those its handlers give without waiting, at once.
    fn gather(&self, topic: &str, data: Value, within: Duration) -> Gathering<'_> {
        let _ = within;
        let answers = Arc::new(Gathered::default());
        let published = self.publish(Message::new(topic, data).with_reply_to(answers.clone()));
        Box::pin(async move {
            published?;
            Ok(answers.take())
        })
    }
}

/// What a bus counts of its own work, for metrics ([`Bus::counters`]). A bus that keeps
/// nothing between publishing and handling (the in-process one) reports zeros.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BusCounters {
    /// Messages for this node's subscriptions (every-node ones, and its handlers') dropped
    /// because it could not keep up (it held as many as it may).
    pub incoming_dropped: u64,
    /// Bytes of such messages received and not yet handled (for a handler: until it ends).
    pub incoming_held_bytes: u64,
    /// Events published here that wait for a handler's answer.
    pub answers_pending: u64,
}

/// The answers of [`Bus::gather`], to come.
pub type Gathering<'a> =
    Pin<Box<dyn Future<Output = Result<Vec<Value>, PublishError>> + Send + 'a>>;

/// Collects the answers to a gathered message.
#[derive(Default)]
struct Gathered(std::sync::Mutex<Vec<Value>>);

impl Gathered {
    fn take(&self) -> Vec<Value> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl ReplyTo for Gathered {
    fn deliver(&self, _topic: &str, reply: Reply) {
        if let Reply::Ok(v) = reply {
            self.0.lock().unwrap_or_else(|e| e.into_inner()).push(v);
        }
    }
}

/// Publishes messages from anywhere: the spec's `producer.send(topic, data)`.
#[derive(Clone)]
pub struct Producer {
    bus: Arc<dyn Bus>,
}

impl fmt::Debug for Producer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Producer").finish_non_exhaustive()
    }
}

impl Producer {
    /// A producer on `bus`.
    pub fn new(bus: Arc<dyn Bus>) -> Self {
        Producer { bus }
    }

    /// Publishes `data` on `topic`, with an empty context and nobody to reply to.
    ///
    /// `data` is serialized into a new JSON value, even when it is one already. On a hot path,
    /// publish a [`Value`] you own without that copy, and with a topic you keep as an
    /// `Arc<str>`: `producer.publish(Message::new(topic.clone(), value))`.
    pub fn send(&self, topic: &str, data: impl Serialize) -> Result<(), PublishError> {
        match serde_json::to_value(data) {
            Ok(v) => self.bus.publish(Message::new(topic, v)),
            Err(e) => Err(PublishError {
                message: Message::new(topic, Value::Null),
                reason: PublishFailure::Serialize(e.to_string()),
            }),
        }
    }

    /// Publishes a prepared message.
    pub fn publish(&self, msg: Message) -> Result<(), PublishError> {
        self.bus.publish(msg)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Records every reply it is handed, with its topic (the bus's tests share it).
    #[derive(Default)]
    pub(crate) struct Heard(pub(crate) Mutex<Vec<(String, Reply)>>);
    impl ReplyTo for Heard {
        fn deliver(&self, topic: &str, reply: Reply) {
            self.0.lock().unwrap().push((topic.to_string(), reply));
        }
    }

    #[test]
    fn log_limit_lets_one_line_a_second_through_with_the_count() {
        let limit = LogLimit::new();
        assert_eq!(limit.note(), Some(1), "the first is logged");
        let through = (0..1000).filter_map(|_| limit.note()).count();
        // The rest of this second is quiet (one more line if the clock ticks meanwhile).
        assert!(through <= 1, "{through}");
    }

    #[test]
    fn only_an_answer_object_is_an_answer() {
        use serde_json::json;
        let parse = |s: &str| Reply::from_answer(s.as_bytes());
        assert_eq!(
            parse(r#"{"reply":{"n":1}}"#),
            Ok(Some(Reply::Ok(json!({"n": 1}))))
        );
        // `null` is absent: `{"reply":1,"fail":null}` is a reply, both null nothing to say.
        assert_eq!(parse(r#"{"reply":null}"#), Ok(None));
        assert_eq!(
            parse(r#"{"reply":1,"fail":null}"#),
            Ok(Some(Reply::Ok(json!(1))))
        );
        assert_eq!(parse(r#"{"reply":null,"fail":null}"#), Ok(None));
        assert_eq!(
            parse(r#"{"fail":"no","reply":1}"#),
            Ok(Some(Reply::Fail(json!("no"))))
        );
        assert_eq!(parse("{}"), Ok(None));
        for bad in [
            r#"["hi"]"#,
            r#"[null,{"message":"forged"}]"#,
            "[]",
            r#"{"other":1}"#,
            r#"{"Reply":1}"#,
            "1",
            "nope",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_way_back_keeps_the_topic_and_the_route_but_not_the_payload() {
        let heard = Arc::new(Heard::default());
        let data = Arc::new(serde_json::json!({"big": "x".repeat(1000)}));
        let context = Arc::new(Context::for_connection(
            7,
            "alex",
            None,
            serde_json::Map::new(),
            serde_json::Map::new(),
        ));
        let msg =
            Message::shared("t".into(), data.clone(), context.clone()).with_reply_to(heard.clone());
        let way_back = msg.way_back();
        drop(msg);
        assert_eq!(Arc::strong_count(&data), 1, "the payload is not held");
        assert_eq!(Arc::strong_count(&context), 1, "nor the context");
        assert_eq!(way_back.data(), &Value::Null);
        assert_eq!(way_back.context(), &Context::default());
        way_back.reply("yes");
        assert_eq!(
            *heard.0.lock().unwrap(),
            [("t".to_string(), Reply::Ok(Value::from("yes")))]
        );
    }
}
