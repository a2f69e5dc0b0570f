//! Who is connected: a concurrent index of sockets by connection id, by username, by
//! (username, namespace) and by namespace.
//!
//! Depend on this crate when you hold many live connections and must find "every socket of
//! user U in namespace N" or "every socket of namespace N" without scanning. It is generic over
//! the handle you store (a sender, an `Arc` to your connection state) and does no I/O, so it
//! fits any transport.
//!
//! Every index is sharded ([`dashmap`]); readers of one shard never wait for writers of another.
//! The one lock they all take is held only for a moment: the list of everyone that a broadcast
//! keeps is dropped at each change (see [`Registry::collect_in_order`]). The handle is stored
//! by id, and once more in each index that
//! holds the connection (by user, and by namespace when it has one), so a lookup touches one
//! map only; an index entry for a single connection holds it inline, with no table of its
//! own. Visitors run while a shard is read-locked: keep them short (push into a queue, do not
//! await or block).
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
use std::hash::{BuildHasherDefault, Hasher};
use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use dashmap::mapref::entry::Entry as MapEntry;
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
    /// When it was registered, in milliseconds since the Unix epoch.
    pub since_ms: u64,
}

/// Hashes connection ids: they are handed out in sequence by the registry, never chosen by a
/// client, so one multiplication spreads them well enough and costs far less than SipHash.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type ById = BuildHasherDefault<IdHasher>;

/// The connections under one key of an index: one inline (the common case: a user with one
/// socket), or a table once there are more.
#[derive(Debug)]
enum Members<V> {
    One(ConnId, V),
    Many(HashMap<ConnId, V, ById>),
}

impl<V> Members<V> {
    fn insert(&mut self, id: ConnId, value: V) {
        match self {
            Members::Many(map) => {
                map.insert(id, value);
            }
            Members::One(..) => {
                let mut map = HashMap::with_capacity_and_hasher(2, ById::default());
                map.insert(id, value);
                if let Members::One(first, v) = std::mem::replace(self, Members::Many(map)) {
                    if let Members::Many(map) = self {
                        map.insert(first, v);
                    }
                }
            }
        }
    }

    /// Removes `id`; true when nothing is left.
    fn remove(&mut self, id: ConnId) -> bool {
        match self {
            Members::One(only, _) => *only == id,
            Members::Many(map) => {
                map.remove(&id);
                if map.len() == 1 {
                    // Back to one inline: give the table's memory back.
                    let (only, v) = map.drain().next().expect("one left");
                    *self = Members::One(only, v);
                }
                map_is_empty(self)
            }
        }
    }

    fn len(&self) -> usize {
        match self {
            Members::One(..) => 1,
            Members::Many(map) => map.len(),
        }
    }

    fn for_each(&self, mut visit: impl FnMut(ConnId, &V)) {
        match self {
            Members::One(id, v) => visit(*id, v),
            Members::Many(map) => map.iter().for_each(|(id, v)| visit(*id, v)),
        }
    }
}

fn map_is_empty<V>(members: &Members<V>) -> bool {
    matches!(members, Members::Many(map) if map.is_empty())
}

/// A user's connections, each with its namespace.
type UserMembers<H> = Members<(Option<Arc<str>>, H)>;

/// The index of connected sockets. Cheap to share behind an `Arc`; all methods take `&self`.
#[derive(Debug)]
pub struct Registry<H> {
    next_id: AtomicU64,
    conns: DashMap<ConnId, Entry<H>, ById>,
    by_user: DashMap<Arc<str>, UserMembers<H>>,
    by_namespace: DashMap<Arc<str>, Members<H>>,
    /// Bumped after every change of the connections (an insert, a remove).
    generation: AtomicU64,
    /// Every connection in id order, as gathered in `generation`'s value: what a broadcast to
    /// everyone reuses while nobody connects or leaves. Dropped at every change, so it never
    /// holds the handle of a connection that has left.
    everyone: Mutex<Option<(u64, Everyone<H>)>>,
}

/// Every connection, id and handle, in id order, shared.
type Everyone<H> = Arc<[(ConnId, H)]>;

/// Connections in the order of their ids, from [`Registry::collect_in_order`]: a list shared
/// with other callers (every connection, unchanged since it was gathered) or one gathered for
/// this call. Reads as a slice.
#[derive(Debug, Clone)]
pub enum InOrder<H> {
    /// Every connection, shared.
    Shared(Everyone<H>),
    /// Gathered for this call.
    Gathered(Vec<(ConnId, H)>),
}

impl<H> Deref for InOrder<H> {
    type Target = [(ConnId, H)];
    fn deref(&self) -> &[(ConnId, H)] {
        match self {
            InOrder::Shared(list) => list,
            InOrder::Gathered(list) => list,
        }
    }
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
            conns: DashMap::with_hasher(ById::default()),
            by_user: DashMap::new(),
            by_namespace: DashMap::new(),
            generation: AtomicU64::new(0),
            everyone: Mutex::new(None),
        }
    }

    /// After a change: a kept list of everyone is out of date. The generation moves first, so
    /// that a gathering that began before the change cannot keep its list (see
    /// `collect_in_order`).
    fn changed(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        let kept = self
            .everyone
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        // Outside the lock: the last reference to every handle may go here.
        drop(kept);
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
        self.insert_shared(id, Arc::from(username), namespace.map(Arc::from), handle);
    }

    /// Like [`Registry::insert_with_id`], with the username and namespace the caller already
    /// holds shared (they are kept, not copied).
    pub fn insert_shared(
        &self,
        id: ConnId,
        username: Arc<str>,
        namespace: Option<Arc<str>>,
        handle: H,
    ) {
        self.remove(id);
        add(
            &self.by_user,
            username.clone(),
            id,
            (namespace.clone(), handle.clone()),
        );
        if let Some(ns) = &namespace {
            add(&self.by_namespace, ns.clone(), id, handle.clone());
        }
        let since_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        self.conns.insert(
            id,
            Entry {
                username,
                namespace,
                handle,
                since_ms,
            },
        );
        self.changed();
    }

    /// Unregisters a connection and returns its entry, if it was there. A removal and an
    /// insertion of one id must not race (ids from [`Registry::next_id`], each inserted and
    /// removed by its connection's owner, never do): the indexes could keep the one inserted.
    pub fn remove(&self, id: ConnId) -> Option<Entry<H>> {
        // The id map changes last, as on insert: once `len` shows a connection come or go,
        // the per-user and per-namespace counts already agree with it.
        let (username, namespace) = {
            let entry = self.conns.get(&id)?;
            (entry.username.clone(), entry.namespace.clone())
        };
        self.by_user
            .remove_if_mut(&username, |_, members| members.remove(id));
        if let Some(ns) = &namespace {
            self.by_namespace
                .remove_if_mut(ns, |_, members| members.remove(id));
        }
        let (_, entry) = self.conns.remove(&id)?;
        self.changed();
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
        match target {
            Target::All => self.conns.iter().for_each(|e| visit(*e.key(), &e.handle)),
            Target::User(user) => {
                if let Some(members) = self.by_user.get(user) {
                    members.for_each(|id, (_, h)| visit(id, h));
                }
            }
            Target::UserInNamespace(user, ns) => {
                if let Some(members) = self.by_user.get(user) {
                    members.for_each(|id, (in_ns, h)| {
                        if in_ns.as_deref() == Some(ns) {
                            visit(id, h);
                        }
                    });
                }
            }
            Target::Namespace(ns) => {
                if let Some(members) = self.by_namespace.get(ns) {
                    members.for_each(visit);
                }
            }
        }
    }

    /// Every connection `target` selects, id and handle, in the order of their ids (from
    /// [`Registry::next_id`], so the order connections were given one, which is about when
    /// they were accepted).
    ///
    /// For a caller that writes to each (a broadcast): connections given ids one after
    /// another had their sockets accepted one after another, so the kernel's and the
    /// allocator's structures for them lie in that order too, and a walk in that order keeps
    /// the caches warm where a walk in hash order misses on every socket (measured: a
    /// broadcast to 10k sockets costs a quarter less CPU per delivery in this order). The
    /// shard locks are held only while the handles are gathered, never while the caller uses
    /// them.
    ///
    /// The list of every connection is kept until the next insert or remove, and shared: one
    /// broadcast after another to the same sockets neither gathers, sorts nor clones 10k
    /// handles again. (Gathering and sorting were 1.9% of a broadcast's samples at 10k
    /// sockets; much of that was the first touch of each socket's memory, which the writes
    /// now pay instead, so the gain is below what a run can resolve.)
    pub fn collect_in_order(&self, target: Target<'_>) -> InOrder<H> {
        if target != Target::All {
            return InOrder::Gathered(self.gather_in_order(target));
        }
        let kept = || self.everyone.lock().unwrap_or_else(|e| e.into_inner());
        let generation = self.generation.load(Ordering::Acquire);
        if let Some((at, list)) = kept().as_ref() {
            if *at == generation {
                return InOrder::Shared(list.clone());
            }
        }
        let list: Everyone<H> = self.gather_in_order(target).into();
        let mut keep = kept();
        // Kept only if nothing changed while it was gathered: a change after this check
        // drops it (`changed` takes the same lock after moving the generation).
        if self.generation.load(Ordering::Acquire) == generation {
            *keep = Some((generation, list.clone()));
        }
        InOrder::Shared(list)
    }

    fn gather_in_order(&self, target: Target<'_>) -> Vec<(ConnId, H)> {
        // A user has a few sockets: counting them first would cost a second lookup.
        let mut found = match target {
            Target::All | Target::Namespace(_) => Vec::with_capacity(self.count(target)),
            _ => Vec::new(),
        };
        self.for_each(target, |id, h| found.push((id, h.clone())));
        // Ids are handed out in sequence, so their order is the order of registration.
        found.sort_unstable_by_key(|(id, _)| *id);
        found
    }

    /// Number of connections `target` selects, without visiting them (for one user in one
    /// namespace, that user's sockets are looked through).
    pub fn count(&self, target: Target<'_>) -> usize {
        match target {
            Target::All => self.len(),
            Target::User(user) => self.by_user.get(user).map_or(0, |m| m.len()),
            Target::UserInNamespace(user, ns) => {
                let mut n = 0;
                if let Some(members) = self.by_user.get(user) {
                    members
                        .for_each(|_, (in_ns, _)| n += usize::from(in_ns.as_deref() == Some(ns)));
                }
                n
            }
            Target::Namespace(ns) => self.by_namespace.get(ns).map_or(0, |m| m.len()),
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
        let mut ids = Vec::new();
        if let Some(members) = self.by_namespace.get(namespace) {
            members.for_each(|id, _| ids.push(id));
        }
        let mut users: Vec<Arc<str>> = ids
            .into_iter()
            .filter_map(|id| self.conns.get(&id).map(|e| e.username.clone()))
            .collect();
        users.sort();
        users.dedup();
        users
    }
}

/// Adds `id` under `key` of `index`: inline for the first, in a table from the second on.
fn add<V>(index: &DashMap<Arc<str>, Members<V>>, key: Arc<str>, id: ConnId, value: V) {
    match index.entry(key) {
        MapEntry::Occupied(mut members) => members.get_mut().insert(id, value),
        MapEntry::Vacant(slot) => {
            slot.insert(Members::One(id, value));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collected_handles_come_in_registration_order() {
        let reg: Registry<usize> = Registry::new();
        // Enough connections for every shard and several buckets of each to hold some.
        let ids: Vec<ConnId> = (0..3000)
            .map(|i| {
                let ns = if i % 3 == 0 { Some("n") } else { None };
                reg.insert(if i % 2 == 0 { "a" } else { "b" }, ns, i)
            })
            .collect();
        // Churn: a gap, then a newer connection that must come last.
        reg.remove(ids[10]);
        let late = reg.insert("a", Some("n"), 3000);
        let ascending = |v: &[usize]| v.windows(2).all(|w| w[0] < w[1]);
        let handles = |t| -> Vec<usize> {
            let found = reg.collect_in_order(t);
            assert!(found
                .iter()
                .all(|(id, h)| reg.get(*id).unwrap().handle == *h));
            found.iter().map(|(_, h)| *h).collect()
        };

        let all = handles(Target::All);
        assert_eq!(all.len(), 3000);
        assert!(ascending(&all), "all in order");
        assert_eq!(all.last(), Some(&3000));
        let ns = handles(Target::Namespace("n"));
        assert_eq!(ns.len(), 1001);
        assert!(ascending(&ns), "a namespace in order");
        let user = handles(Target::UserInNamespace("a", "n"));
        assert!(ascending(&user) && user.iter().all(|i| i % 6 == 0 || *i == 3000));
        assert_eq!(user.len(), 501);
        assert_eq!(reg.get(late).map(|e| e.handle), Some(3000));
    }

    #[test]
    fn the_list_of_everyone_is_shared_until_a_change_and_never_holds_one_who_left() {
        let reg: Registry<Arc<u32>> = Registry::new();
        let handles: Vec<Arc<u32>> = (0..3).map(Arc::new).collect();
        let ids: Vec<ConnId> = handles
            .iter()
            .map(|h| reg.insert("u", None, h.clone()))
            .collect();
        let held = Arc::strong_count(&handles[0]); // ours and the registry's copies
        let (InOrder::Shared(first), InOrder::Shared(again)) = (
            reg.collect_in_order(Target::All),
            reg.collect_in_order(Target::All),
        ) else {
            panic!("everyone is a shared list");
        };
        assert!(
            Arc::ptr_eq(&first, &again),
            "nothing changed: the same list"
        );
        drop((first, again));
        assert_eq!(Arc::strong_count(&handles[0]), held + 1, "kept once");
        reg.remove(ids[0]);
        assert_eq!(
            Arc::strong_count(&handles[0]),
            1,
            "gone from the kept list too"
        );
        let after = reg.collect_in_order(Target::All);
        assert_eq!(
            after.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
            ids[1..]
        );
        let late = reg.insert("u", None, Arc::new(9));
        assert_eq!(
            reg.collect_in_order(Target::All).last().map(|(id, _)| *id),
            Some(late)
        );
        assert!(matches!(
            reg.collect_in_order(Target::User("u")),
            InOrder::Gathered(_)
        ));
    }

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

    /// A caller that waits for `len` to change (a test, an operator polling the API) must
    /// find the user and namespace counts already changed with it.
    #[test]
    fn the_counts_agree_with_len_as_soon_as_it_changes() {
        let reg = Arc::new(Registry::new());
        for _ in 0..2_000 {
            let id = reg.insert("u", Some("n"), 1u8);
            let remover = {
                let reg = reg.clone();
                std::thread::spawn(move || reg.remove(id))
            };
            while !reg.is_empty() {
                std::hint::spin_loop();
            }
            assert_eq!(reg.count(Target::User("u")), 0, "user count lags len");
            assert_eq!(
                reg.count(Target::Namespace("n")),
                0,
                "namespace count lags len"
            );
            assert!(remover.join().unwrap().is_some());

            let adder = {
                let reg = reg.clone();
                std::thread::spawn(move || reg.insert("u", Some("n"), 2u8))
            };
            while reg.is_empty() {
                std::hint::spin_loop();
            }
            assert_eq!(reg.count(Target::User("u")), 1, "user count lags len");
            assert_eq!(
                reg.count(Target::Namespace("n")),
                1,
                "namespace count lags len"
            );
            reg.remove(adder.join().unwrap());
        }
    }

    #[test]
    fn members_go_from_one_to_many_and_back() {
        let reg = Registry::new();
        let a = reg.insert("u", Some("n"), 1u8);
        assert!(matches!(*reg.by_user.get("u").unwrap(), Members::One(..)));
        let b = reg.insert("u", Some("n"), 2u8);
        let c = reg.insert("u", Some("m"), 3u8);
        assert!(matches!(*reg.by_user.get("u").unwrap(), Members::Many(_)));
        assert_eq!(reg.count(Target::UserInNamespace("u", "n")), 2);
        reg.remove(a);
        reg.remove(c);
        assert!(matches!(*reg.by_user.get("u").unwrap(), Members::One(id, _) if id == b));
        assert!(matches!(*reg.by_namespace.get("n").unwrap(), Members::One(id, _) if id == b));
        reg.remove(b);
        assert!(reg.by_user.is_empty() && reg.by_namespace.is_empty());
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
