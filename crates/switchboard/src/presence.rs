//! Who is online, across nodes. Every node answers presence questions about its own sockets
//! on one bus topic ([`PRESENCE_TOPIC`]); asking gathers every node's answer
//! (`Bus::gather`), so the answer is right however many nodes share the bus.

use std::collections::BTreeMap;
use std::future::{ready, Ready};
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use switchboard_bus::{Bus, Message, PublishError};
use switchboard_core::SocketRef;
use switchboard_registry::{Registry, Target};

/// The bus topic every node answers presence questions on. On NATS each node subscribes to it
/// and publishes its answers to the asker's inbox (docs/PROTOCOL.md).
pub const PRESENCE_TOPIC: &str = "_SB_PRESENCE";

/// How long a presence question waits for the nodes at most (a broker bus stops as soon as
/// the answers have stopped coming: `switchboard_bus_nats::NatsOptions::gather_quiet`).
pub const PRESENCE_TIMEOUT: Duration = Duration::from_secs(1);

/// A node lists at most this many users of a namespace in one answer (and says so).
const MAX_USERS_PER_ANSWER: usize = 10_000;
/// A node lists at most this many connections of one user in one answer.
const MAX_CONNECTIONS_PER_ANSWER: usize = 1_000;

/// Asks every node who is online. Cheap to clone; from [`crate::Container::presence`] or
/// [`crate::Running::presence`], usable in handlers.
#[derive(Clone)]
pub struct Presence {
    bus: Arc<dyn Bus>,
}

impl std::fmt::Debug for Presence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Presence").finish_non_exhaustive()
    }
}

/// Who is online in one namespace, on every node that answered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct NamespacePresence {
    /// Sockets open, by username (sorted).
    pub users: BTreeMap<String, usize>,
    /// Sockets open in the namespace.
    pub sockets: usize,
    /// How many nodes answered (on one process: 1).
    pub nodes: usize,
    /// True if a node had more users than it lists in one answer (10,000).
    pub truncated: bool,
}

/// One user's connections, listed, on every node that answered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct UserConnections {
    /// Each connection (at most 1,000 per node), sorted by node, namespace, then time.
    pub connections: Vec<Connection>,
    /// How many nodes answered.
    pub nodes: usize,
}

/// One connection of a user.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
#[non_exhaustive]
pub struct Connection {
    /// The node it is on (`"local"` on the in-process bus).
    pub node: String,
    /// Its namespace, if any.
    pub namespace: Option<String>,
    /// When it was registered (opened; with the connect gate, let in), in milliseconds since
    /// the Unix epoch.
    pub since_ms: u64,
}

/// One user's sockets, on every node that answered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct UserPresence {
    /// Sockets open, by namespace (`""` for sockets without one).
    pub namespaces: BTreeMap<String, usize>,
    /// Sockets open.
    pub sockets: usize,
    /// How many nodes answered.
    pub nodes: usize,
}

impl Presence {
    pub(crate) fn new(bus: Arc<dyn Bus>) -> Self {
        Presence { bus }
    }

    /// Who is online in `namespace`, across nodes. A node that does not answer within
    /// [`PRESENCE_TIMEOUT`] (or, on NATS, within `gather_quiet` of the others, 50 ms by
    /// default) is left out: `nodes`
    /// says how many did.
    pub async fn namespace(&self, namespace: &str) -> Result<NamespacePresence, PublishError> {
        let answers: Vec<NamespaceAnswer> = self.ask(json!({"namespace": namespace})).await?;
        let mut out = NamespacePresence {
            nodes: answers.len(),
            truncated: answers.iter().any(|a| a.truncated),
            ..Default::default()
        };
        let listed = sum_counts(answers.iter().map(|a| &a.users), &mut out.users);
        // Each node says how many sockets it has, listed or not (a truncated answer lists
        // fewer).
        let counted = answers
            .iter()
            .fold(0usize, |sum, a| sum.saturating_add(saturate(a.sockets)));
        out.sockets = counted.max(listed);
        Ok(out)
    }

    /// `username`'s sockets, across nodes (see [`Presence::namespace`] for nodes that do not
    /// answer).
    pub async fn user(&self, username: &str) -> Result<UserPresence, PublishError> {
        let answers: Vec<UserAnswer> = self.ask(json!({"username": username})).await?;
        let mut out = UserPresence {
            nodes: answers.len(),
            ..Default::default()
        };
        out.sockets = sum_counts(answers.iter().map(|a| &a.namespaces), &mut out.namespaces);
        Ok(out)
    }

    /// `username`'s connections, listed, across nodes (see [`Presence::namespace`] for nodes
    /// that do not answer).
    pub async fn connections(&self, username: &str) -> Result<UserConnections, PublishError> {
        let answers: Vec<ConnectionsAnswer> = self.ask(json!({"connections": username})).await?;
        let mut out = UserConnections {
            nodes: answers.len(),
            ..Default::default()
        };
        for answer in answers {
            for c in answer.connections {
                if out.connections.len() >= MAX_MERGED {
                    break;
                }
                out.connections.push(Connection {
                    node: answer.node.clone(),
                    namespace: c.namespace,
                    since_ms: c.since_ms,
                });
            }
        }
        out.connections.sort();
        Ok(out)
    }

    /// Asks every node; keeps the answers of exactly the shape `A` (see [`responder`]). Any
    /// other answer (a missing, extra or mistyped field: anyone on the bus may answer) is
    /// malformed: logged at most once a second and ignored, not counted as a node's.
    async fn ask<A: DeserializeOwned>(&self, question: Value) -> Result<Vec<A>, PublishError> {
        let answers = self
            .bus
            .gather(PRESENCE_TOPIC, question, PRESENCE_TIMEOUT)
            .await?;
        Ok(answers
            .into_iter()
            .filter_map(|answer| match serde_json::from_value(answer) {
                Ok(answer) => Some(answer),
                Err(e) => {
                    if let Some(dropped) = MALFORMED.note() {
                        tracing::warn!(error = %e, dropped, "malformed presence answer ignored");
                    }
                    None
                }
            })
            .collect())
    }
}

/// Presence answers ignored as malformed: anyone on the bus chooses how many, so one line a
/// second.
static MALFORMED: switchboard_bus::LogLimit = switchboard_bus::LogLimit::new();

/// A node's answer to `{"namespace": N}`, exactly.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NamespaceAnswer {
    users: BTreeMap<String, u64>,
    sockets: u64,
    truncated: bool,
}

/// A node's answer to `{"username": U}`, exactly.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UserAnswer {
    namespaces: BTreeMap<String, u64>,
}

/// A node's answer to `{"connections": U}`, exactly.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConnectionsAnswer {
    node: String,
    connections: Vec<ConnectionAnswer>,
}

/// One connection in a [`ConnectionsAnswer`]; `namespace` is `null` for none (and there:
/// a missing field is malformed too).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConnectionAnswer {
    #[serde(deserialize_with = "Option::deserialize")]
    namespace: Option<String>,
    since_ms: u64,
}

fn saturate(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// Adds up the `{name: count}` maps of every answer into `into` (at most [`MAX_MERGED`]
/// names: answers come from anyone on the bus); the total.
fn sum_counts<'a>(
    answers: impl Iterator<Item = &'a BTreeMap<String, u64>>,
    into: &mut BTreeMap<String, usize>,
) -> usize {
    let mut total: usize = 0;
    for counts in answers {
        for (name, &count) in counts {
            let count = saturate(count);
            if into.len() < MAX_MERGED || into.contains_key(name) {
                let entry = into.entry(name.clone()).or_default();
                *entry = entry.saturating_add(count);
            }
            total = total.saturating_add(count);
        }
    }
    total
}

/// The most names (users, namespaces) or connections a merged answer keeps.
const MAX_MERGED: usize = 100_000;

/// Sockets of `target` that are not closing (a closed socket stays registered until its end
/// is handled).
pub(crate) fn live(registry: &Registry<SocketRef>, target: Target<'_>) -> usize {
    let mut n = 0;
    registry.for_each(target, |_, socket| n += usize::from(!socket.is_closing()));
    n
}

/// The node's answer to a presence question about its own sockets: `{"namespace": N}` →
/// `{"users": {user: sockets}, "sockets": n, "truncated": bool}` (sockets that are closing left
/// out); `{"username": U}` → `{"namespaces": {ns:
/// sockets}}`; `{"connections": U}` → `{"node": name, "connections": [{namespace, since_ms}]}`.
/// Anything else is answered with a failure (which `gather` leaves out).
pub(crate) fn responder(
    registry: Arc<Registry<SocketRef>>,
    node: Option<String>,
) -> impl Fn(Message) -> Ready<()> + Send + Sync {
    move |msg: Message| {
        let data = msg.data();
        if let Some(user) = data.get("connections").and_then(Value::as_str) {
            let mut ids = Vec::new();
            registry.for_each(Target::User(user), |id, socket| {
                if !socket.is_closing() {
                    ids.push(id);
                }
            });
            let connections: Vec<Value> = ids
                .into_iter()
                .take(MAX_CONNECTIONS_PER_ANSWER)
                .filter_map(|id| registry.get(id))
                .map(|e| json!({"namespace": e.namespace.as_deref(), "since_ms": e.since_ms}))
                .collect();
            let node = node.as_deref().unwrap_or("local");
            msg.reply(json!({"node": node, "connections": connections}));
            return ready(());
        }
        if let Some(ns) = data.get("namespace").and_then(Value::as_str) {
            let users = registry.users_in_namespace(ns);
            let truncated = users.len() > MAX_USERS_PER_ANSWER;
            let counts: serde_json::Map<String, Value> = users
                .iter()
                .take(MAX_USERS_PER_ANSWER)
                .map(|u| {
                    (
                        u.to_string(),
                        live(&registry, Target::UserInNamespace(u, ns)),
                    )
                })
                .filter(|(_, n)| *n > 0)
                .map(|(u, n)| (u, json!(n)))
                .collect();
            let sockets = live(&registry, Target::Namespace(ns));
            msg.reply(json!({"users": counts, "sockets": sockets, "truncated": truncated}));
        } else if let Some(user) = data.get("username").and_then(Value::as_str) {
            let mut ids = Vec::new();
            registry.for_each(Target::User(user), |id, socket| {
                if !socket.is_closing() {
                    ids.push(id);
                }
            });
            let mut namespaces: BTreeMap<String, usize> = BTreeMap::new();
            for id in ids {
                if let Some(entry) = registry.get(id) {
                    let ns = entry.namespace.as_deref().unwrap_or_default().to_string();
                    *namespaces.entry(ns).or_default() += 1;
                }
            }
            msg.reply(json!({"namespaces": namespaces}));
        } else {
            msg.fail(json!({"message": "ask with {\"namespace\": …} or {\"username\": …}"}));
        }
        ready(())
    }
}
