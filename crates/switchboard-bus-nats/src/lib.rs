//! Switchboard's event bus on NATS: several gateway nodes share one broker, and the handlers
//! of their topics may run in any process, in any language.
//!
//! Depend on this crate to run the gateway as one of several nodes, or to use the
//! [`switchboard_bus::Bus`] seam over NATS yourself. The core crates never link a broker
//! client; the `switchboard` binary picks this bus when the config has a `gateway.bus.nats`
//! section.
//!
//! How the spec's bus maps onto NATS (the wire format is in `docs/PROTOCOL.md`):
//! - a topic is a NATS subject of the same name; a message is a JSON envelope
//!   `{"topic", "data", "context"}` marked with the header `Switchboard-Envelope: 1`;
//! - [`Bus::subscribe`] joins a queue group (default `switchboard-handlers`), so each event
//!   is handled once per group however many handler processes run;
//! - [`Bus::subscribe_every_node`] subscribes plainly: every node gets every `send` and
//!   `broadcast` message and delivers to its own sockets only;
//! - a message that can be answered carries a reply subject of this process,
//!   `_SB_REPLY.<node name>.<random token>.<id>`: the name is a label, the token keeps
//!   replicas that share a name apart. A handler answers `{"reply": ...}`, `{"fail": ...}`
//!   or `{}` (handled, nothing to say). No answer within the reply timeout: the socket gets
//!   an error frame; a node relaying that no-answer marks its `{"fail": ...}` with
//!   [`ANSWER_HEADER`], so the sender's node hears a no-answer, not a refusal; a node whose
//!   handler returned an error or panicked (or that relays such a failure) marks its
//!   `{"fail": ...}` too, so the sender's node hears a handler failure;
//! - while NATS is unreachable, publishing fails at once (the sender gets an error frame),
//!   [`Bus::is_ready`] is false, and the client reconnects by itself, to any member of a
//!   cluster ([`NatsOptions::cluster`]).
//!
//! What anyone on the broker can make a node hold is bounded: the events waiting to be
//! written ([`NatsOptions::outbox_messages`], [`NatsOptions::outbox_bytes`]) and those
//! waiting for an answer ([`NatsOptions::max_pending_answers`]; each keeps only the way back
//! to its socket, and leaves at its first answer: [`NatsBus::pending_answers`]). An answer
//! to an unknown or answered id is ignored, a malformed one becomes an error frame, and a
//! handler that panics, even before its first await, is answered as failed while its
//! subscription goes on. [`Bus::flush`] (awaited at shutdown) waits until the server has
//! every event published so far. Credentials ([`NatsAuth`]) and TLS ([`NatsTls`]) come
//! from the options; which subjects each NATS user needs is in `docs/PROTOCOL.md`,
//! "Securing NATS".
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use switchboard_bus::Bus;
//! use switchboard_bus_nats::{NatsBus, NatsOptions};
//!
//! let bus = Arc::new(NatsBus::connect(NatsOptions::new("nats://127.0.0.1:4222")).await?);
//! // hand it to `switchboard::Container::with_bus(config, bus.clone())`, add handlers, then:
//! bus.subscriptions_ready().await?;
//! assert!(bus.is_ready());
//! # Ok(()) }
//! ```

use std::fmt;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, Weak};

use async_nats::connection::State;
use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use switchboard_bus::{
    Bus, BusCounters, Context, Gathering, Handler, Message, PublishError, PublishFailure, Reply,
    ReplyTo, SubscribeError,
};
use tokio::sync::oneshot;

mod answers;
mod options;
mod outbox;

pub use answers::PendingAnswers;
pub use options::{check_node_name, redacted_url, NatsAuth, NatsOptions, NatsTls, DEFAULT_GROUP};

use answers::{lock, Answers};
use outbox::{Outbox, Outgoing};

/// Header that marks a Switchboard envelope. A body without it is taken as bare `data`
/// (what a plain NATS client publishing to the `send` topic would send).
pub const ENVELOPE_HEADER: &str = "Switchboard-Envelope";
/// Header on an answer that is not a handler's own: `no-answer` marks a `{"fail": E}` that
/// says no handler answered in time ([`Reply::NoAnswer`], relayed by a node that waited in
/// its turn), and `handler-failed` one that says a handler returned an error or panicked
/// ([`Reply::HandlerFailed`], on the node that ran it or relayed from further on), so the
/// sender's node tells them from a refusal. Any other value is malformed.
pub const ANSWER_HEADER: &str = "Switchboard-Answer";
/// The [`ANSWER_HEADER`] value of a relayed [`Reply::NoAnswer`].
pub const NO_ANSWER: &str = "no-answer";
/// The [`ANSWER_HEADER`] value of a relayed [`Reply::HandlerFailed`].
pub const HANDLER_FAILED: &str = "handler-failed";
/// First token of the reply subjects: `_SB_REPLY.<node name>.<process token>.<id>`.
pub const REPLY_PREFIX: &str = "_SB_REPLY";
/// The node name when none is configured.
pub const DEFAULT_NODE_NAME: &str = "switchboard";

/// Why the NATS bus could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NatsError {
    /// The first connection failed.
    #[error("cannot connect to NATS at {url}: {reason}")]
    Connect {
        /// The URL(s) tried.
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// A subscription failed.
    #[error("cannot subscribe to `{topic}`: {reason}")]
    Subscribe {
        /// The topic.
        topic: String,
        /// What went wrong.
        reason: String,
    },
    /// An option is unusable (a node name with wildcards, an unreadable file, a bad seed).
    #[error("invalid NATS option `{option}`: {reason}")]
    Option {
        /// The option, as the config names it.
        option: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

/// The envelope of a message on NATS.
#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    topic: String,
    data: Value,
    #[serde(default)]
    context: Context,
}

/// A handler's answer on a reply subject.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Answer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reply: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fail: Option<Value>,
}

/// The NATS bus. See the crate docs.
pub struct NatsBus {
    client: async_nats::Client,
    node: String,
    /// `_SB_REPLY.<node>.<process token>`: this process's reply subjects, whatever the name.
    reply_prefix: String,
    options: NatsOptions,
    outbox: Outbox,
    answers: Arc<Answers>,
    subscribing: Mutex<Vec<oneshot::Receiver<Result<(), NatsError>>>>,
    /// The every-node subscriptions' one dispatcher ([`in_order`]), and how many were made.
    every_node: tokio::sync::mpsc::UnboundedSender<Lane>,
    every_node_made: std::sync::atomic::AtomicUsize,
    /// What the every-node subscriptions hold, received and not yet handled.
    holding: Arc<Holding>,
    /// What the handler subscriptions (queue groups) hold: received, their handler not done.
    handlers_holding: Arc<Holding>,
    /// The topics of the every-node subscriptions: an event published on one goes out
    /// without a way back, since the nodes answer gather inboxes only there.
    every_node_topics: Mutex<Vec<Arc<str>>>,
    /// Answers to this node's gathers ignored as malformed.
    malformed_gathered: std::sync::atomic::AtomicU64,
}

impl fmt::Debug for NatsBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsBus")
            .field("node", &self.node)
            .field("reply_prefix", &self.reply_prefix)
            .field(
                "servers",
                &options::servers_for_humans(&self.options.servers),
            )
            .field("ready", &self.is_ready())
            .finish()
    }
}

impl NatsBus {
    /// Connects (retrying until the first connection succeeds is *not* done: a gateway
    /// should fail fast at start) and starts the answer listener and the publisher.
    pub async fn connect(options: NatsOptions) -> Result<Self, NatsError> {
        let node = options
            .node_name
            .clone()
            .unwrap_or_else(|| DEFAULT_NODE_NAME.into());
        check_node_name(&node).map_err(|reason| NatsError::Option {
            option: "node_name",
            reason,
        })?;
        let client = connect_client(&options, &node).await?;
        // The name is a label; this token makes the reply subjects this process's alone.
        let token = process_token(&client);
        let reply_prefix = format!("{REPLY_PREFIX}.{node}.{token}");
        let answers = Arc::new(Answers::new(
            options.reply_timeout,
            options.max_pending_answers,
        ));
        let replies = client
            .subscribe(format!("{reply_prefix}.*"))
            .await
            .map_err(|e| NatsError::Subscribe {
                topic: format!("{reply_prefix}.*"),
                reason: e.to_string(),
            })?;
        tokio::spawn(listen_for_answers(replies, answers.clone()));
        tokio::spawn(expire_unanswered(Arc::downgrade(&answers)));
        let outbox = Outbox::start(
            client.clone(),
            options.outbox_messages,
            options.outbox_bytes,
        );
        let (every_node, lanes) = tokio::sync::mpsc::unbounded_channel();
        let holding = Arc::new(Holding::default());
        let (handling, held) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(in_order(lanes, holding.clone(), handling));
        tokio::spawn(handle_held(client.clone(), held));
        Ok(NatsBus {
            client,
            node,
            reply_prefix,
            options,
            outbox,
            answers,
            subscribing: Mutex::new(Vec::new()),
            every_node,
            every_node_made: std::sync::atomic::AtomicUsize::new(0),
            holding,
            handlers_holding: Arc::new(Holding::default()),
            every_node_topics: Mutex::new(Vec::new()),
            malformed_gathered: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// This node's name (a label: the connection name and a token of its reply subjects).
    pub fn node_name(&self) -> &str {
        &self.node
    }

    /// This process's reply subjects are `<reply_prefix>.<id>`.
    pub fn reply_prefix(&self) -> &str {
        &self.reply_prefix
    }

    /// Answers to this node's gathers (presence questions) ignored as malformed so far: not
    /// JSON, not an object, a key other than `reply` and `fail`, or an [`ANSWER_HEADER`]
    /// that does not go with it.
    pub fn malformed_gathered(&self) -> u64 {
        self.malformed_gathered
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Messages and bytes (their `length` on the wire, plus 256 each for what else a held
    /// message takes) of the every-node subscriptions
    /// (`send`, `broadcast`, `disconnect`, presence) received and not yet handled: each
    /// subscription holds at most [`NatsOptions::every_node_bytes`].
    pub fn every_node_held(&self) -> (usize, usize) {
        self.holding.held()
    }

    /// Messages of the every-node subscriptions dropped so far because their subscription
    /// held [`NatsOptions::every_node_bytes`] (or 65,536 messages) already: this node could
    /// not keep up. Logged as `nats: messages dropped`, at most once a second.
    pub fn every_node_dropped(&self) -> u64 {
        self.holding.dropped()
    }

    /// Messages and bytes (counted as [`NatsBus::every_node_held`] counts them) of the handler
    /// subscriptions (queue groups) received and whose handler has not finished: each
    /// subscription holds at most [`NatsOptions::handler_bytes`].
    pub fn handlers_held(&self) -> (usize, usize) {
        self.handlers_holding.held()
    }

    /// Messages of the handler subscriptions dropped so far because their subscription held
    /// [`NatsOptions::handler_bytes`] (or 65,536 messages) already: their handlers could not
    /// keep up. Logged as `nats: messages dropped`, at most once a second.
    pub fn handlers_dropped(&self) -> u64 {
        self.handlers_holding.dropped()
    }

    /// Events published here that still wait for an answer. An answered event leaves at once.
    pub fn pending_answers(&self) -> PendingAnswers {
        self.answers.counts()
    }

    /// Messages and bytes waiting to be handed to the NATS client.
    pub fn outbox(&self) -> (usize, usize) {
        self.outbox.queued()
    }

    /// `host:port` of the server this node is connected to, as that server announces it.
    pub fn connected_server(&self) -> Option<String> {
        if !self.is_ready() {
            return None;
        }
        let info = self.client.server_info();
        Some(format!("{}:{}", info.host, info.port))
    }

    /// Waits until every subscription made so far is active on the server. Call it after
    /// adding handlers and before serving, so no early event is missed.
    pub async fn subscriptions_ready(&self) -> Result<(), NatsError> {
        let pending: Vec<_> = std::mem::take(&mut *lock(&self.subscribing));
        for rx in pending {
            if let Ok(result) = rx.await {
                result?;
            }
        }
        self.client.flush().await.map_err(|e| NatsError::Subscribe {
            topic: "(flush)".into(),
            reason: e.to_string(),
        })
    }

    /// Waits until every message published before the call has reached the NATS server: a
    /// probe queued behind them comes back to this node. Unbounded while NATS is away; bound
    /// it with a timeout.
    pub async fn flush_published(&self) {
        let probe = format!(
            "{}.flush.{}",
            self.reply_prefix,
            process_token(&self.client)
        );
        let Ok(mut echo) = self.client.subscribe(probe.clone()).await else {
            return;
        };
        let queued = self.outbox.send(Outgoing {
            subject: probe,
            reply: None,
            payload: Bytes::new(),
        });
        if queued.await.is_ok() {
            echo.next().await;
        }
    }

    fn start_subscription(&self, topic: &str, group: Option<String>, handler: Arc<dyn Handler>) {
        let (done, rx) = oneshot::channel();
        lock(&self.subscribing).push(rx);
        let client = self.client.clone();
        let topic = topic.to_string();
        let handlers_holding = self.handlers_holding.clone();
        let (every_node_bytes, handler_bytes) =
            (self.options.every_node_bytes, self.options.handler_bytes);
        // Every-node subscriptions go to the one dispatcher, in the order they were made.
        let lanes = group.is_none().then(|| {
            let order = self
                .every_node_made
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            (order, self.every_node.clone())
        });
        tokio::spawn(async move {
            let subscribed = match &group {
                Some(g) => client.queue_subscribe(topic.clone(), g.clone()).await,
                None => client.subscribe(topic.clone()).await,
            };
            let mut subscriber = match subscribed {
                Ok(s) => {
                    let _ = done.send(Ok(()));
                    s
                }
                Err(e) => {
                    tracing::error!(%topic, error = %e, "nats subscribe failed");
                    let _ = done.send(Err(NatsError::Subscribe {
                        topic,
                        reason: e.to_string(),
                    }));
                    return;
                }
            };
            if let Some((order, lanes)) = lanes {
                let held = Arc::new(LaneHeld {
                    topic,
                    handler,
                    max_bytes: every_node_bytes,
                    messages: 0.into(),
                    bytes: 0.into(),
                });
                let _ = lanes.send(Lane {
                    order,
                    subscriber,
                    held,
                });
                return;
            }
            // Each message's handler runs on a task of its own; what the tasks hold is counted
            // until they end, and what would pass the bound is dropped: whoever may publish
            // here could otherwise make this node hold any number of handlers that wait.
            let lane = Arc::new(LaneHeld {
                topic,
                handler,
                max_bytes: handler_bytes,
                messages: 0.into(),
                bytes: 0.into(),
            });
            while let Some(incoming) = subscriber.next().await {
                let mut taken = match handlers_holding.take(&lane, incoming) {
                    Ok(taken) => taken,
                    Err(dropped) => {
                        tell_busy(&client, &lane.topic, dropped.reply, answerable);
                        continue;
                    }
                };
                let Some(message) = taken.message.take() else {
                    continue;
                };
                handle_incoming(
                    &client,
                    &lane.topic,
                    lane.handler.as_ref(),
                    message,
                    answerable,
                    taken,
                );
            }
        });
    }

    fn envelope(msg: &Message) -> Result<Bytes, PublishFailure> {
        let envelope = Envelope {
            topic: msg.topic().to_string(),
            data: msg.data().clone(),
            context: msg.context().clone(),
        };
        serde_json::to_vec(&envelope)
            .map(Bytes::from)
            .map_err(|e| PublishFailure::Serialize(e.to_string()))
    }
}

async fn connect_client(
    options: &NatsOptions,
    node: &str,
) -> Result<async_nats::Client, NatsError> {
    // The client gets no URL with credentials (they go as `auth`), so neither its logs nor
    // the errors below can show one.
    let (servers, auth) = options::servers_and_auth(options)?;
    let shown = servers.join(", ");
    let addrs = servers
        .iter()
        .map(|s| s.parse::<async_nats::ServerAddr>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| NatsError::Option {
            option: "url",
            reason: format!("{shown}: {e}"),
        })?;
    if addrs.is_empty() {
        return Err(NatsError::Option {
            option: "url",
            reason: "no server URL".into(),
        });
    }
    options::connect_options(options, &auth, node)
        .await?
        .connect(addrs)
        .await
        .map_err(|e| NatsError::Connect {
            url: shown,
            reason: e.to_string(),
        })
}

/// A random token (a NUID: 22 characters of `[0-9A-Za-z]`), fresh on every call.
fn process_token(client: &async_nats::Client) -> String {
    let inbox = client.new_inbox();
    inbox.rsplit('.').next().unwrap_or(&inbox).to_string()
}

/// A NATS subject must be non-empty, without whitespace, and without empty tokens; topics
/// with wildcards cannot be published to.
fn check_subject(topic: &str) -> Result<(), String> {
    if topic.is_empty()
        || topic.contains(char::is_whitespace)
        || topic
            .split('.')
            .any(|t| t.is_empty() || t == "*" || t == ">")
    {
        return Err(format!("`{topic}` is not a valid NATS subject"));
    }
    Ok(())
}

impl Bus for NatsBus {
    fn publish(&self, msg: Message) -> Result<(), PublishError> {
        let fail = |msg: Message, reason: PublishFailure| {
            Err(PublishError {
                message: msg,
                reason,
            })
        };
        if let Err(e) = check_subject(msg.topic()) {
            return fail(msg, PublishFailure::Unavailable(e));
        }
        if self.client.connection_state() != State::Connected {
            return fail(
                msg,
                PublishFailure::Unavailable("not connected to NATS".into()),
            );
        }
        let payload = match Self::envelope(&msg) {
            Ok(p) => p,
            Err(e) => return fail(msg, e),
        };
        // A socket's event on an every-node topic (a message type routed straight to the
        // `broadcast` topic, say) has nobody to answer it: the nodes answer gather inboxes
        // only (see `answerable_by_every_node`). Waiting would tell the socket "no handler
        // answered" after the reply timeout.
        let answered_here = msg.can_reply()
            && !lock(&self.every_node_topics)
                .iter()
                .any(|t| **t == *msg.topic());
        let id = if answered_here {
            match self.answers.register(&msg, payload.len()) {
                Some(id) => Some(id),
                None => {
                    let reason = "too many events waiting for an answer".into();
                    return fail(msg, PublishFailure::Unavailable(reason));
                }
            }
        } else {
            None
        };
        let outgoing = Outgoing {
            subject: msg.topic().to_string(),
            reply: id.map(|id| format!("{}.{id}", self.reply_prefix)),
            payload,
        };
        if let Err(refused) = self.outbox.try_send(outgoing) {
            if let Some(id) = id {
                self.answers.take(id);
            }
            return fail(msg, PublishFailure::Unavailable(refused.reason().into()));
        }
        Ok(())
    }

    fn subscribe(&self, topic: &str, handler: Arc<dyn Handler>) -> Result<(), SubscribeError> {
        check_subject(topic).map_err(|reason| SubscribeError::Broker {
            topic: topic.into(),
            reason,
        })?;
        self.start_subscription(topic, Some(self.options.group.clone()), handler);
        Ok(())
    }

    fn subscribe_every_node(
        &self,
        topic: &str,
        handler: Arc<dyn Handler>,
    ) -> Result<(), SubscribeError> {
        check_subject(topic).map_err(|reason| SubscribeError::Broker {
            topic: topic.into(),
            reason,
        })?;
        lock(&self.every_node_topics).push(topic.into());
        self.start_subscription(topic, None, handler);
        Ok(())
    }

    fn is_ready(&self) -> bool {
        self.client.connection_state() == State::Connected
    }

    fn node_name(&self) -> Option<&str> {
        Some(&self.node)
    }

    fn flush(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        Box::pin(self.flush_published())
    }

    fn counters(&self) -> BusCounters {
        let mut counters = BusCounters::default();
        counters.incoming_dropped = self.every_node_dropped() + self.handlers_dropped();
        counters.incoming_held_bytes = (self.every_node_held().1 + self.handlers_held().1) as u64;
        counters.answers_pending = self.pending_answers().events as u64;
        counters
    }

    /// Publishes `data` on `topic` with a fresh reply subject of this process
    /// (`_SB_REPLY.<node>.<token>.gather.<unique>`) and collects the
    /// `{"reply": …}` answers there: until none has come for [`NatsOptions::gather_quiet`]
    /// after the first (nodes on one NATS answer within a few milliseconds of each other),
    /// and for at most `within`. A node slower than that is missing from the answers: callers say how many
    /// nodes answered. A malformed answer is ignored and counted
    /// ([`NatsBus::malformed_gathered`]), never read as a reply.
    fn gather(&self, topic: &str, data: Value, within: std::time::Duration) -> Gathering<'_> {
        let topic = topic.to_string();
        Box::pin(async move {
            let fail = |reason: String| PublishError {
                message: Message::new(topic.as_str(), data.clone()),
                reason: PublishFailure::Unavailable(reason),
            };
            if !self.is_ready() {
                return Err(fail("not connected".into()));
            }
            if let Err(reason) = check_subject(&topic) {
                return Err(fail(reason));
            }
            // Everything, the subscription and the publish included, within `within`: a
            // connection lost after the check above must not hold the asker.
            let deadline = tokio::time::Instant::now() + within;
            // A little later than the answers' deadline, so that answers gathered by then
            // are kept.
            let give_up = deadline + std::time::Duration::from_millis(100);
            let gathered = tokio::time::timeout_at(give_up, async {
                // Under this process's reply prefix (which its NATS user may read anyway), not
                // in `_INBOX.>`, so a locked-down node needs no right to read other clients'
                // inboxes.
                let unique = self.client.new_inbox();
                let unique = unique.rsplit('.').next().unwrap_or_default().to_string();
                let inbox = format!("{}.gather.{unique}", self.reply_prefix);
                let mut answers = self
                    .client
                    .subscribe(inbox.clone())
                    .await
                    .map_err(|e| fail(e.to_string()))?;
                let body = Bytes::from(serde_json::to_vec(&data).unwrap_or_default());
                self.client
                    .publish_with_reply(topic.clone(), inbox, body)
                    .await
                    .map_err(|e| fail(e.to_string()))?;
                let mut gathered = Vec::new();
                let mut bytes = 0usize;
                // Bounded in count and bytes: anyone on the broker may answer.
                while gathered.len() < MAX_GATHERED {
                    // Checked: the options are public, and `Duration::MAX` must not panic.
                    let quiet = tokio::time::Instant::now()
                        .checked_add(self.options.gather_quiet)
                        .unwrap_or(deadline);
                    let until = if gathered.is_empty() {
                        deadline
                    } else {
                        deadline.min(quiet)
                    };
                    match tokio::time::timeout_at(until, answers.next()).await {
                        Ok(Some(answer)) => {
                            bytes = bytes.saturating_add(answer.payload.len());
                            if bytes > MAX_GATHERED_BYTES {
                                break;
                            }
                            if let Some(v) = self.gathered_answer(&topic, &answer) {
                                gathered.push(v);
                            }
                        }
                        _ => break,
                    }
                }
                let _ = answers.unsubscribe().await;
                Ok(gathered)
            })
            .await;
            // Past the deadline: whatever the wait was for, there are no answers.
            gathered.unwrap_or_else(|_| Ok(Vec::new()))
        })
    }
}

impl NatsBus {
    /// What `gather` keeps of one message on its inbox: the `P` of an answer `{"reply": P}`.
    /// An answer is read as every answer is ([`read_answer`]): a `{"fail": E}` (marked
    /// no-answer, handler-failed or not) or `{}` is an answer with nothing to keep; anything
    /// else (not JSON, not an object, another key, an [`ANSWER_HEADER`] that does not go with
    /// it) is malformed: counted ([`NatsBus::malformed_gathered`]), logged at most once a
    /// second, and ignored. A status message of the server (no responders) is no answer.
    fn gathered_answer(&self, topic: &str, answer: &async_nats::Message) -> Option<Value> {
        if answer.status.is_some() {
            return None;
        }
        match read_answer(answer) {
            Ok(Some(Reply::Ok(v))) => Some(v),
            Ok(_) => None,
            Err(e) => {
                self.malformed_gathered
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if let Some(dropped) = MALFORMED_GATHERED.note() {
                    tracing::warn!(%topic, error = %e, dropped, "malformed answer to a gather ignored");
                }
                None
            }
        }
    }
}

/// Answers to gathers ignored as malformed: anyone who may publish on the inbox chooses how
/// many, so one line a second.
static MALFORMED_GATHERED: switchboard_bus::LogLimit = switchboard_bus::LogLimit::new();

/// [`NatsBus::gather`] keeps at most this many answers (one per node; anyone on the broker
/// may answer).
pub const MAX_GATHERED: usize = 256;

/// [`NatsBus::gather`] reads at most this many bytes of answers (a node's presence answer is a
/// few hundred KiB at most).
pub const MAX_GATHERED_BYTES: usize = 16 << 20;

/// [`NatsBus::gather`] stops this long after the last answer, unless
/// [`NatsOptions::gather_quiet`] says otherwise.
pub const DEFAULT_GATHER_QUIET: std::time::Duration = std::time::Duration::from_millis(50);

/// Answers arriving on this process's reply subjects. Whoever may publish there (any
/// handler) can send anything: an unknown or already answered id is ignored, a body that is
/// not an answer becomes an error frame, and each event is answered at most once.
async fn listen_for_answers(mut replies: async_nats::Subscriber, answers: Arc<Answers>) {
    while let Some(answer) = replies.next().await {
        let Some(id) = answer
            .subject
            .rsplit('.')
            .next()
            .and_then(|id| id.parse::<u64>().ok())
        else {
            continue;
        };
        let Some(way_back) = answers.take(id) else {
            continue; // unknown, answered already, or too late: the timeout answered
        };
        if answer.status == Some(async_nats::StatusCode::NO_RESPONDERS) {
            // Nobody subscribes to the topic: as on the in-process bus, nothing happens.
            continue;
        }
        deliver_answer(&way_back, &answer);
    }
}

/// An answer as it is on NATS: its body ([`Reply::from_answer`]), and a `{"fail": E}` marked
/// [`ANSWER_HEADER`]` = `[`NO_ANSWER`] is [`Reply::NoAnswer`], one marked
/// [`ANSWER_HEADER`]` = `[`HANDLER_FAILED`] is [`Reply::HandlerFailed`] (`E` is dropped: the
/// sender is told an internal error, as for a handler of its own node).
fn read_answer(answer: &async_nats::Message) -> Result<Option<Reply>, String> {
    let reply = Reply::from_answer(&answer.payload)?;
    let Some(marked) = answer.headers.as_ref().and_then(|h| h.get(ANSWER_HEADER)) else {
        return Ok(reply);
    };
    match (reply, marked.as_str()) {
        (Some(Reply::Fail(error)), NO_ANSWER) => Ok(Some(Reply::NoAnswer(error))),
        (Some(Reply::Fail(_)), HANDLER_FAILED) => Ok(Some(Reply::HandlerFailed)),
        _ => Err(format!(
            "`{ANSWER_HEADER}: {marked}` goes only with `{NO_ANSWER}` or `{HANDLER_FAILED}` \
             and a `fail`"
        )),
    }
}

fn deliver_answer(way_back: &Message, answer: &async_nats::Message) {
    let subject = &answer.subject;
    match read_answer(answer) {
        Ok(Some(reply)) => way_back.deliver(reply),
        Ok(None) => {}
        Err(e) => {
            tracing::warn!(error = %e, "malformed answer on {subject}");
            way_back.deliver(Reply::Fail(
                json!({"message": "malformed answer from a handler"}),
            ));
        }
    }
}

/// Fails the events nobody answered in time; stops when the bus is gone.
async fn expire_unanswered(answers: Weak<Answers>) {
    let Some(timeout) = answers.upgrade().map(|a| a.timeout()) else {
        return;
    };
    let tick = (timeout / 10).clamp(
        std::time::Duration::from_millis(10),
        std::time::Duration::from_millis(250),
    );
    let mut interval = tokio::time::interval(tick);
    loop {
        interval.tick().await;
        let Some(answers) = answers.upgrade() else {
            return;
        };
        for way_back in answers.expire(tokio::time::Instant::now()) {
            let topic = way_back.topic().to_string();
            way_back.deliver(Reply::NoAnswer(json!({
                "message": format!("no handler answered within {timeout:?}"),
                "topic": topic,
            })));
        }
    }
}

/// Answers one NATS message for a local handler on its reply subject.
struct NatsAnswer {
    client: async_nats::Client,
    subject: String,
    answered: std::sync::atomic::AtomicBool,
}

impl NatsAnswer {
    fn send(&self, answer: &Answer) {
        self.send_marked(answer, None);
    }

    /// `answer`, with [`ANSWER_HEADER`] set to `mark` if there is one.
    fn send_marked(&self, answer: &Answer, mark: Option<&'static str>) {
        use std::sync::atomic::Ordering;
        if self.answered.swap(true, Ordering::AcqRel) {
            return; // one answer per event, as the other side expects
        }
        let client = self.client.clone();
        let subject = self.subject.clone();
        let body = Bytes::from(serde_json::to_vec(answer).unwrap_or_default());
        tokio::spawn(async move {
            let sent = match mark {
                Some(mark) => {
                    let mut headers = async_nats::HeaderMap::new();
                    headers.insert(ANSWER_HEADER, mark);
                    client.publish_with_headers(subject, headers, body).await
                }
                None => client.publish(subject, body).await,
            };
            if let Err(e) = sent {
                tracing::warn!(error = %e, "cannot send an answer");
            }
        });
    }

    fn answered(&self) -> bool {
        self.answered.load(std::sync::atomic::Ordering::Acquire)
    }
}

impl ReplyTo for NatsAnswer {
    fn deliver(&self, _topic: &str, reply: Reply) {
        let (reply, fail, mark) = match reply {
            Reply::Ok(v) => (Some(v), None, None),
            Reply::Fail(v) => (None, Some(v), None),
            // A `fail` to a node that reads no header (an older one), marked for one that does.
            Reply::NoAnswer(v) => (None, Some(v), Some(NO_ANSWER)),
            Reply::HandlerFailed => (None, Some(internal_error()), Some(HANDLER_FAILED)),
            _ => (None, Some(internal_error()), None),
        };
        self.send_marked(&Answer { reply, fail }, mark);
    }
}

/// The `fail` of an answer that says a handler failed, without its details.
fn internal_error() -> Value {
    json!({"message": "internal error in a handler"})
}

/// Messages dropped as malformed: anyone on the broker chooses how many, so one line a second.
static MALFORMED: switchboard_bus::LogLimit = switchboard_bus::LogLimit::new();

/// The `data` and `context` of a NATS message: an envelope, or a bare JSON body.
fn decode(topic: &str, incoming: &async_nats::Message) -> Option<(Value, Context)> {
    let is_envelope = incoming
        .headers
        .as_ref()
        .and_then(|h| h.get(ENVELOPE_HEADER))
        .is_some();
    if is_envelope {
        match serde_json::from_slice::<Envelope>(&incoming.payload) {
            Ok(e) => Some((e.data, e.context)),
            Err(e) => {
                if let Some(dropped) = MALFORMED.note() {
                    tracing::warn!(%topic, error = %e, dropped, "malformed envelope dropped");
                }
                None
            }
        }
    } else {
        match serde_json::from_slice::<Value>(&incoming.payload) {
            Ok(v) => Some((v, Context::default())),
            Err(e) => {
                if let Some(dropped) = MALFORMED.note() {
                    tracing::warn!(%topic, error = %e, dropped, "message is not JSON; dropped");
                }
                None
            }
        }
    }
}

/// Whether a node answers on `reply`: a node's or an asker's inbox, not any subject.
fn answerable(reply: &str) -> bool {
    reply.starts_with("_SB_REPLY.") || reply.starts_with("_INBOX.")
}

/// Whether a node answers an every-node message (`send`, `broadcast`, `disconnect`,
/// presence) on `reply`: only a gather's inbox, a node's `_SB_REPLY.<node>.<token>.gather.<id>`
/// or an asker's `_INBOX.…`. Never an event's way back, `_SB_REPLY.<node>.<token>.<id>`:
/// whoever may publish `send` and has seen one event's reply subject (a handler, say) could
/// otherwise name it as the reply of a `send` and have every node answer that socket's event
/// for it (`{}` swallowing the real answer, a refusal closing a connecting socket with 1008),
/// events of topics it may not even read among them (ids are consecutive).
fn answerable_by_every_node(reply: &str) -> bool {
    if reply.starts_with("_INBOX.") {
        return true;
    }
    let Some(rest) = reply.strip_prefix("_SB_REPLY.") else {
        return false;
    };
    // An event's way back ends `<22-character token>.<id>`, never `gather.<id>`.
    let mut tokens = rest.rsplit('.');
    let _unique = tokens.next();
    tokens.next() == Some("gather") && tokens.next().is_some()
}

/// An every-node subscription, handed to [`in_order`].
struct Lane {
    /// When it was made among the every-node subscriptions: earlier ones go first.
    order: usize,
    subscriber: async_nats::Subscriber,
    held: Arc<LaneHeld>,
}

/// A subscription's handler, and what it holds: received from the client, not yet handled
/// (every-node), or whose handler has not finished (queue groups).
struct LaneHeld {
    topic: String,
    handler: Arc<dyn Handler>,
    /// Most bytes it holds ([`NatsOptions::every_node_bytes`] or
    /// [`NatsOptions::handler_bytes`]).
    max_bytes: usize,
    messages: std::sync::atomic::AtomicUsize,
    bytes: std::sync::atomic::AtomicUsize,
}

/// What a kind of subscription (every-node, or queue groups) holds between the client and
/// its handlers, all together, and how many messages they dropped.
#[derive(Default)]
struct Holding {
    messages: std::sync::atomic::AtomicUsize,
    bytes: std::sync::atomic::AtomicUsize,
    dropped: std::sync::atomic::AtomicU64,
}

/// Messages dropped for want of room: anyone who may publish there chooses how many, so
/// one line a second.
static DROPPED_HELD: switchboard_bus::LogLimit = switchboard_bus::LogLimit::new();

/// What one held message counts besides its `length` (subject, reply and payload): its
/// headers, the `Message` and the queue's node, roughly. A flood of empty messages is held
/// within the bound too.
const HELD_OVERHEAD: usize = 256;

/// A message taken to be handled: what it counts is given back when it is dropped, handled
/// or not (a queue dropped with the task, a panic).
struct HeldMessage {
    /// Taken out when it is handled.
    message: Option<async_nats::Message>,
    lane: Arc<LaneHeld>,
    holding: Arc<Holding>,
    counted: usize,
}

impl Drop for HeldMessage {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering::AcqRel;
        let (lane, holding, n) = (&self.lane, &self.holding, self.counted);
        lane.messages.fetch_sub(1, AcqRel);
        lane.bytes.fetch_sub(n, AcqRel);
        holding.messages.fetch_sub(1, AcqRel);
        holding.bytes.fetch_sub(n, AcqRel);
    }
}

impl Holding {
    /// Messages and bytes held now.
    fn held(&self) -> (usize, usize) {
        use std::sync::atomic::Ordering::Acquire;
        (self.messages.load(Acquire), self.bytes.load(Acquire))
    }

    /// Messages dropped so far.
    fn dropped(&self) -> u64 {
        self.dropped.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Takes `message` of `lane` into the queue [`handle_held`] handles in order, or drops it
    /// as [`Holding::take`] does.
    fn hold(
        self: &Arc<Self>,
        lane: &Arc<LaneHeld>,
        message: async_nats::Message,
        handling: &tokio::sync::mpsc::UnboundedSender<HeldMessage>,
    ) {
        let Ok(mut held) = self.take(lane, message) else {
            return;
        };
        // The client cuts a payload out of its read buffer without copying it: held, even a
        // small one would keep that whole buffer alive (a megabyte, after a large message),
        // so a flood of small messages after large ones would pin far more than is counted.
        // (A handler subscription's message is parsed at once, and its buffer let go.)
        if let Some(message) = &mut held.message {
            message.payload = bytes::Bytes::copy_from_slice(&message.payload);
        }
        // Sent back (and dropped, given back) only once the handling task is gone.
        let _ = handling.send(held);
    }

    /// Counts `message` of `lane` as held until the returned guard is dropped, or gives it
    /// back as dropped (counted, logged at most once a second) when the lane holds
    /// [`MOST_BEFORE`] messages or would pass its bytes (a message is always taken into an
    /// empty lane).
    fn take(
        self: &Arc<Self>,
        lane: &Arc<LaneHeld>,
        message: async_nats::Message,
    ) -> Result<HeldMessage, Box<async_nats::Message>> {
        use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed};
        let counted = message.length.saturating_add(HELD_OVERHEAD);
        let (messages, bytes) = (lane.messages.load(Acquire), lane.bytes.load(Acquire));
        if messages > 0
            && (messages >= MOST_BEFORE || bytes.saturating_add(counted) > lane.max_bytes)
        {
            let dropped = self.dropped.fetch_add(1, Relaxed) + 1;
            if let Some(since) = DROPPED_HELD.note() {
                tracing::warn!(
                    topic = %lane.topic, dropped = since, total = dropped,
                    held_bytes = bytes, "nats: messages dropped (this node cannot keep up)"
                );
            }
            return Err(Box::new(message));
        }
        lane.messages.fetch_add(1, AcqRel);
        lane.bytes.fetch_add(counted, AcqRel);
        self.messages.fetch_add(1, AcqRel);
        self.bytes.fetch_add(counted, AcqRel);
        Ok(HeldMessage {
            message: Some(message),
            lane: lane.clone(),
            holding: self.clone(),
            counted,
        })
    }
}

/// At most this many messages of earlier lanes are taken before one of a later lane: the
/// capacity of a subscription's channel in the client, so every one that arrived before it
/// (and was still waiting) goes first. Also the most messages one lane holds.
const MOST_BEFORE: usize = 65_536;

/// Takes the every-node subscriptions' messages (`send`, `broadcast`, `disconnect`,
/// presence) from the client, in one task, as fast as they come, into one queue that
/// [`handle_held`] handles in order. The lanes take turns, one message each, so none is
/// starved; but before a message of a later lane (a `disconnect`), the messages already
/// waiting in the earlier lanes (`send`, `broadcast`) are taken. The client puts each message
/// into its subscription's channel in the order the server sent them, so a `send` that a
/// publisher sent before a `disconnect` is waiting by the time the `disconnect` is, and goes
/// first: with a task per subscription, the `disconnect` often overtook it and the user never
/// got the message. (Within one subscription, order was and is kept.)
///
/// Taking is cheap and handling is not (a body is parsed, a broadcast fans out), so what a
/// node cannot handle yet waits here, bounded per lane in bytes
/// ([`NatsOptions::every_node_bytes`]) and in messages ([`MOST_BEFORE`]); beyond that it is
/// dropped and counted ([`NatsBus::every_node_dropped`]). Left in the client's channels, it
/// was bounded only in messages (65,536 per subscription, each up to the server's
/// `max_payload`): a publisher of large broadcasts made a node hold gigabytes.
async fn in_order(
    mut new: tokio::sync::mpsc::UnboundedReceiver<Lane>,
    holding: Arc<Holding>,
    handling: tokio::sync::mpsc::UnboundedSender<HeldMessage>,
) {
    use std::task::Poll;
    let mut lanes: Vec<Lane> = Vec::new();
    let mut turn = 0usize;
    let mut adding = true;
    loop {
        let next = std::future::poll_fn(|cx| {
            while adding {
                match new.poll_recv(cx) {
                    Poll::Ready(Some(lane)) => {
                        let at = lanes.partition_point(|l| l.order < lane.order);
                        lanes.insert(at, lane);
                    }
                    Poll::Ready(None) => adding = false,
                    Poll::Pending => break,
                }
            }
            let n = lanes.len();
            let mut ended = None;
            for k in 0..n {
                let i = (turn + k) % n;
                match lanes[i].subscriber.poll_next_unpin(cx) {
                    Poll::Ready(Some(message)) => return Poll::Ready(Some((i, Some(message)))),
                    Poll::Ready(None) => ended = Some(i),
                    Poll::Pending => {}
                }
            }
            match ended {
                Some(i) => Poll::Ready(Some((i, None))),
                None if !adding && lanes.is_empty() => Poll::Ready(None),
                None => Poll::Pending,
            }
        })
        .await;
        match next {
            None => return,
            Some((i, None)) => {
                lanes.remove(i);
            }
            Some((i, Some(message))) => {
                turn = i + 1;
                // What waits in the earlier lanes arrived first, or at about the same time.
                let mut before = 0;
                for earlier in &mut lanes[..i] {
                    while before < MOST_BEFORE {
                        let Some(Some(waiting)) = earlier.subscriber.next().now_or_never() else {
                            break;
                        };
                        before += 1;
                        holding.hold(&earlier.held, waiting, &handling);
                    }
                }
                holding.hold(&lanes[i].held, message, &handling);
            }
        }
    }
}

/// Handles the every-node messages [`in_order`] took, in the order it took them.
async fn handle_held(
    client: async_nats::Client,
    mut held: tokio::sync::mpsc::UnboundedReceiver<HeldMessage>,
) {
    while let Some(mut held) = held.recv().await {
        let Some(message) = held.message.take() else {
            continue;
        };
        let lane = held.lane.clone();
        // A handler's panic is caught inside; anything else must not end this task, which
        // every `send`, `broadcast`, `disconnect` and presence question of the node goes
        // through. What `held` counts is given back when the handler is done.
        let handled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            handle_incoming(
                &client,
                &lane.topic,
                lane.handler.as_ref(),
                message,
                answerable_by_every_node,
                held,
            )
        }));
        if handled.is_err() {
            tracing::error!(topic = %lane.topic, "nats: handling a message panicked");
        }
    }
}

/// Answers a handler subscription's message dropped for want of room, when it asks for an
/// answer (`reply`, on a subject `answerable` accepts): in a queue group no other node gets
/// it, so the socket hears at once that nothing will answer rather than after its reply
/// timeout.
fn tell_busy(
    client: &async_nats::Client,
    topic: &str,
    reply: Option<async_nats::Subject>,
    answerable: fn(&str) -> bool,
) {
    let Some(subject) = reply.filter(|s| answerable(s)) else {
        return;
    };
    let answer = NatsAnswer {
        client: client.clone(),
        subject: subject.to_string(),
        answered: false.into(),
    };
    answer.deliver(
        topic,
        Reply::NoAnswer(json!({"message": "the handlers are busy; try again later"})),
    );
}

/// Turns a NATS message into a bus [`Message`] and runs the local handler on it. If the
/// handler finishes without answering, an empty answer tells the sender it was handled. A
/// panic, even in the handler's synchronous part, is answered as a failure and leaves the
/// subscription running. It is answered only on a reply subject `answerable` accepts.
/// `counted` (what the message counts as held) is given back once the handler is done.
fn handle_incoming(
    client: &async_nats::Client,
    topic: &str,
    handler: &dyn Handler,
    incoming: async_nats::Message,
    answerable: fn(&str) -> bool,
    counted: HeldMessage,
) {
    let Some((data, context)) = decode(topic, &incoming) else {
        return;
    };
    let mut message = Message::new(topic, data).with_context(Arc::new(context));
    // Answers go to reply subjects of the shapes the protocol uses (a node's `_SB_REPLY.`, an
    // asker's `_INBOX.`), never to an application subject: a publisher allowed only `send`
    // could otherwise name `chat:say` as the reply and make every node publish there.
    let answer = incoming.reply.filter(|s| answerable(s)).map(|subject| {
        Arc::new(NatsAnswer {
            client: client.clone(),
            subject: subject.to_string(),
            answered: false.into(),
        })
    });
    if let Some(a) = &answer {
        message = message.with_reply_to(a.clone());
    }
    let Ok(fut) = std::panic::catch_unwind(AssertUnwindSafe(|| handler.call(message))) else {
        tracing::error!(%topic, "handler panicked");
        if let Some(a) = answer {
            a.deliver("", Reply::HandlerFailed);
        }
        return;
    };
    tokio::spawn(async move {
        let outcome = AssertUnwindSafe(fut).catch_unwind().await;
        drop(counted); // the handler and what it held are gone
        let failed = !matches!(outcome, Ok(Ok(())));
        if failed {
            tracing::error!("handler failed");
        }
        if let Some(a) = answer {
            if failed {
                a.deliver("", Reply::HandlerFailed);
            } else if !a.answered() {
                a.send(&Answer::default());
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_inboxes_are_answered() {
        assert!(answerable("_SB_REPLY.gw-1.tok.7"));
        assert!(answerable("_INBOX.abc.def"));
        for subject in [
            "chat:say",
            "socket:connection",
            "_SB_REPLYx",
            "_INBOX",
            "x._INBOX.y",
        ] {
            assert!(!answerable(subject), "{subject}");
        }
    }

    #[test]
    fn every_node_messages_are_answered_on_gather_inboxes_only() {
        for inbox in [
            "_SB_REPLY.gw-1.tok.gather.u",
            "_SB_REPLY.eu.gw-1.tok.gather.u",
            "_INBOX.abc.def",
        ] {
            assert!(answerable_by_every_node(inbox), "{inbox}");
        }
        for subject in [
            "_SB_REPLY.gw-1.tok.7",
            "_SB_REPLY.gather.tok.7",
            "_SB_REPLY.gw.gather.tok.7",
            "_SB_REPLY.gather.7",
            "_SB_REPLY.gw-1.tok.flush.x",
            "chat:say",
            "_SB_REPLYx.a.gather.b",
        ] {
            assert!(!answerable_by_every_node(subject), "{subject}");
        }
    }

    #[test]
    fn subjects_are_checked() {
        assert!(check_subject("socket:send").is_ok());
        assert!(check_subject("a.b.c").is_ok());
        for bad in ["", "a b", "a..b", "a.*", ">", ".a"] {
            assert!(check_subject(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn answers_serialize_compactly() {
        assert_eq!(serde_json::to_string(&Answer::default()).unwrap(), "{}");
        let a: Answer = serde_json::from_str(r#"{"reply": {"x": 1}}"#).unwrap();
        assert_eq!(a.reply, Some(json!({"x": 1})));
    }
}
