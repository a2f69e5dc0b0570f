//! Who is online, across nodes. Every node answers presence questions about its own sockets
//! on one bus topic ([`PRESENCE_TOPIC`]); asking gathers every node's answer
//! (`Bus::gather`), so the answer is right however many nodes share the bus.

use std::collections::BTreeMap;
use std::future::{ready, Ready};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use switchboard_bus::{Bus, Message, PublishError};
use switchboard_core::SocketRef;
use switchboard_registry::{Registry, Target};

/// The bus topic every node answers presence questions on. On NATS each node subscribes to it
/// and publishes its answers to the asker's inbox (docs/PROTOCOL.md).
pub const PRESENCE_TOPIC: &str = "_SB_PRESENCE";

/// How long a presence question waits for the nodes at most (a broker bus stops as soon as
/// the answers have stopped coming: `switchboard_bus_nats::GATHER_QUIET`).
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
    /// [`PRESENCE_TIMEOUT`] (or, on NATS, within 50 ms of the others) is left out: `nodes`
    /// says how many did.
    pub async fn namespace(&self, namespace: &str) -> Result<NamespacePresence, PublishError> {
        let answers = self.ask(json!({"namespace": namespace})).await?;
        let mut out = NamespacePresence {
            nodes: answers.len(),
            truncated: answers.iter().any(|a| a["truncated"] == true),
            ..Default::default()
        };
        let listed = sum_counts(&answers, "users", &mut out.users);
        // Each node says how many sockets it has, listed or not (a truncated answer lists
        // fewer).
        let counted = answers
            .iter()
            .filter_map(|a| a["sockets"].as_u64())
            .fold(0usize, |sum, n| sum.saturating_add(n as usize));
        out.sockets = counted.max(listed);
        Ok(out)
    }

    /// `username`'s sockets, across nodes (see [`Presence::namespace`] for nodes that do not
    /// answer).
    pub async fn user(&self, username: &str) -> Result<UserPresence, PublishError> {
        let answers = self.ask(json!({"username": username})).await?;
        let mut out = UserPresence {
            nodes: answers.len(),
            ..Default::default()
        };
        out.sockets = sum_counts(&answers, "namespaces", &mut out.namespaces);
        Ok(out)
    }

    /// `username`'s connections, listed, across nodes (see [`Presence::namespace`] for nodes
    /// that do not answer).
    pub async fn connections(&self, username: &str) -> Result<UserConnections, PublishError> {
        let answers = self.ask(json!({"connections": username})).await?;
        let mut out = UserConnections {
            nodes: answers.len(),
            ..Default::default()
        };
        for answer in &answers {
            let node = answer["node"].as_str().unwrap_or("local");
            for c in answer["connections"].as_array().into_iter().flatten() {
                if out.connections.len() >= MAX_MERGED {
                    break;
                }
                out.connections.push(Connection {
                    node: node.to_string(),
                    namespace: c["namespace"].as_str().map(String::from),
                    since_ms: c["since_ms"].as_u64().unwrap_or(0),
                });
            }
        }
        out.connections.sort();
        Ok(out)
    }

    async fn ask(&self, question: Value) -> Result<Vec<Value>, PublishError> {
        self.bus
            .gather(PRESENCE_TOPIC, question, PRESENCE_TIMEOUT)
            .await
    }
}

/// Adds up the `{name: count}` maps at `field` of every answer into `into` (at most
/// [`MAX_MERGED`] names: answers come from anyone on the bus); the total.
fn sum_counts(answers: &[Value], field: &str, into: &mut BTreeMap<String, usize>) -> usize {
    let mut total: usize = 0;
    for answer in answers {
        for (name, count) in answer[field].as_object().into_iter().flatten() {
            let count = count.as_u64().unwrap_or(0).min(usize::MAX as u64) as usize;
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
