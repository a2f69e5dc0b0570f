//! Who is connected: a concurrent index of sockets by connection id, by username, by
//! (username, namespace) and by namespace.
//!
//! Depend on this crate when you hold many live connections and must find "every socket of
//! user U in namespace N" or "every socket of namespace N" without scanning. It is generic over
//! the handle you store (a sender, an `Arc` to your connection state) and does no I/O, so it
//! fits any transport.
//!
//! Every index is sharded ([`dashmap`]); readers of one shard never wait for writers of another,
//! and there is no global lock. Each index stores its own clone of the handle, so a lookup
//! touches one map only. Visitors run while a shard is read-locked: keep them short (push into
//! a queue, do not await or block).
//!
//! ```
//! use switchboard_registry::{Registry, Target};
//!
//! let reg: Registry<&'static str> = Registry::new();
//! let a = reg.insert("alex", Some("acme"), "socket-a");
//! let _b = reg.insert("alex", Some("globex"), "socket-b");
//! let _c = reg.insert("sam", Some("acme"), "socket-c");
//!
//! let mut hits = Vec::new();
//! reg.for_each(Target::UserInNamespace("alex", "acme"), |_, h| hits.push(*h));
//! assert_eq!(hits, ["socket-a"]);
//! assert_eq!(reg.count(Target::Namespace("acme")), 2);
//! assert_eq!(reg.count(Target::User("alex")), 2);
//! reg.remove(a);
//! assert_eq!(reg.count(Target::Namespace("acme")), 1);
//! ```

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use dashmap::DashMap;

/// Identifies one connection for as long as the registry lives. Never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Which sockets a lookup selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target<'a> {
    /// Every socket.
    All,
    /// Every socket of one user, whatever its namespace.
    User(&'a str),
    /// Every socket of one user within one namespace.
    UserInNamespace(&'a str, &'a str),
    /// Every socket of one namespace, whatever its user.
    Namespace(&'a str),
}

/// What the registry knows about one connection.
#[derive(Debug, Clone)]
pub struct Entry<H> {
    /// The username the connection was admitted as.
    pub username: Arc<str>,
    /// The namespace it asked for, if any.
    pub namespace: Option<Arc<str>>,
    /// The caller's handle.
    pub handle: H,
}

type Set<H> = HashMap<ConnId, H>;

#[derive(Debug)]
struct UserIndex<H> {
    all: Set<H>,
    by_namespace: HashMap<Arc<str>, Set<H>>,
}

/// The index of connected sockets. Cheap to share behind an `Arc`; all methods take `&self`.
#[derive(Debug)]
pub struct Registry<H> {
    next_id: AtomicU64,
    conns: DashMap<ConnId, Entry<H>>,
    by_user: DashMap<Arc<str>, UserIndex<H>>,
    by_namespace: DashMap<Arc<str>, Set<H>>,
}

impl<H: Clone> Default for Registry<H> {
    fn default() -> Self {
        Self::new()
    }
}

impl<H: Clone> Registry<H> {
    /// An empty registry.
    pub fn new() -> Self {
        Registry {
            next_id: AtomicU64::new(1),
            conns: DashMap::new(),
            by_user: DashMap::new(),
            by_namespace: DashMap::new(),
        }
    }

    /// A fresh connection id, unique within this registry.
    pub fn next_id(&self) -> ConnId {
        ConnId(self.next_id.fetch_add(1, Ordering::Relaxed))
    }

    /// Registers a connection under a fresh id and returns the id.
    pub fn insert(&self, username: &str, namespace: Option<&str>, handle: H) -> ConnId {
        let id = self.next_id();
        self.insert_with_id(id, username, namespace, handle);
        id
    }

    /// Registers a connection under an id from [`Registry::next_id`]. Replaces any entry with
    /// the same id.
    pub fn insert_with_id(&self, id: ConnId, username: &str, namespace: Option<&str>, handle: H) {
        self.remove(id);
        let username: Arc<str> = Arc::from(username);
        let namespace: Option<Arc<str>> = namespace.map(Arc::from);
        {
            let mut user = self
                .by_user
                .entry(username.clone())
                .or_insert_with(|| UserIndex {
                    all: HashMap::new(),
                    by_namespace: HashMap::new(),
                });
            user.all.insert(id, handle.clone());
            if let Some(ns) = &namespace {
                user.by_namespace
                    .entry(ns.clone())
                    .or_default()
                    .insert(id, handle.clone());
            }
        }
        if let Some(ns) = &namespace {
            self.by_namespace
                .entry(ns.clone())
                .or_default()
                .insert(id, handle.clone());
        }
        self.conns.insert(
            id,
            Entry {
                username,
                namespace,
                handle,
            },
        );
    }

    /// Unregisters a connection and returns its entry, if it was there.
    pub fn remove(&self, id: ConnId) -> Option<Entry<H>> {
        let (_, entry) = self.conns.remove(&id)?;
        self.by_user.remove_if_mut(&entry.username, |_, user| {
            user.all.remove(&id);
            if let Some(ns) = &entry.namespace {
                if let Some(set) = user.by_namespace.get_mut(ns) {
                    set.remove(&id);
                    if set.is_empty() {
                        user.by_namespace.remove(ns);
                    }
                }
            }
            user.all.is_empty()
        });
        if let Some(ns) = &entry.namespace {
            self.by_namespace.remove_if_mut(ns, |_, set| {
                set.remove(&id);
                set.is_empty()
            });
        }
        Some(entry)
    }

    /// The entry of one connection.
    pub fn get(&self, id: ConnId) -> Option<Entry<H>> {
        self.conns.get(&id).map(|e| e.value().clone())
    }

    /// Number of connections.
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    /// True when nobody is connected.
    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// Calls `visit` with the id and handle of every connection `target` selects. The visitor
    /// runs under a shard's read lock: keep it short and never call back into the registry's
    /// writers from it.
    pub fn for_each(&self, target: Target<'_>, mut visit: impl FnMut(ConnId, &H)) {
        let mut visit_set = |set: &Set<H>| set.iter().for_each(|(id, h)| visit(*id, h));
        match target {
            Target::All => self.conns.iter().for_each(|e| visit(*e.key(), &e.handle)),
            Target::User(user) => {
                if let Some(u) = self.by_user.get(user) {
                    visit_set(&u.all);
                }
            }
            Target::UserInNamespace(user, ns) => {
                if let Some(u) = self.by_user.get(user) {
                    if let Some(s) = u.by_namespace.get(ns) {
                        visit_set(s);
                    }
                }
            }
            Target::Namespace(ns) => {
                if let Some(s) = self.by_namespace.get(ns) {
                    visit_set(&s);
                }
            }
        }
    }

    /// Number of connections `target` selects, without visiting them.
    pub fn count(&self, target: Target<'_>) -> usize {
        match target {
            Target::All => self.len(),
            Target::User(user) => self.by_user.get(user).map_or(0, |u| u.all.len()),
            Target::UserInNamespace(user, ns) => self
                .by_user
                .get(user)
                .and_then(|u| u.by_namespace.get(ns).map(|s| s.len()))
                .unwrap_or(0),
            Target::Namespace(ns) => self.by_namespace.get(ns).map_or(0, |s| s.len()),
        }
    }

    /// Every namespace with at least one socket, and how many sockets it has (in no
    /// particular order). Sockets without a namespace are not counted.
    pub fn namespace_counts(&self) -> Vec<(Arc<str>, usize)> {
        self.by_namespace
            .iter()
            .map(|e| (e.key().clone(), e.value().len()))
            .collect()
    }

    /// The distinct usernames with at least one socket in `namespace`, sorted.
    pub fn users_in_namespace(&self, namespace: &str) -> Vec<Arc<str>> {
        let ids: Vec<ConnId> = match self.by_namespace.get(namespace) {
            Some(s) => s.keys().copied().collect(),
            None => return Vec::new(),
        };
        let mut users: Vec<Arc<str>> = ids
            .into_iter()
            .filter_map(|id| self.conns.get(&id).map(|e| e.username.clone()))
            .collect();
        users.sort();
        users.dedup();
        users
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remove_cleans_every_index() {
        let reg = Registry::new();
        let id = reg.insert("u", Some("n"), 1u8);
        assert!(reg.remove(id).is_some());
        assert!(reg.remove(id).is_none());
        assert!(reg.is_empty());
        assert!(reg.by_user.is_empty());
        assert!(reg.by_namespace.is_empty());
    }

    #[test]
    fn namespace_counts_list_each_namespace_once() {
        let reg = Registry::new();
        reg.insert("a", Some("n1"), 1u8);
        reg.insert("b", Some("n1"), 2u8);
        let gone = reg.insert("c", Some("n2"), 3u8);
        reg.insert("d", None, 4u8);
        let mut counts = reg.namespace_counts();
        counts.sort();
        assert_eq!(counts, [(Arc::from("n1"), 2), (Arc::from("n2"), 1)]);
        reg.remove(gone);
        assert_eq!(reg.namespace_counts(), [(Arc::from("n1"), 2)]);
    }

    #[test]
    fn socket_without_namespace_is_found_by_user_only() {
        let reg = Registry::new();
        reg.insert("u", None, 1u8);
        assert_eq!(reg.count(Target::User("u")), 1);
        assert_eq!(reg.count(Target::All), 1);
        assert_eq!(reg.count(Target::UserInNamespace("u", "")), 0);
        assert_eq!(reg.count(Target::Namespace("")), 0);
    }
}
