//! `limits.max_sockets_per_user`, counted with the upgrades still in flight.
//!
//! A socket is registered only once it opens, after its `101` has gone out; a user's next
//! upgrade, checked against the registry alone, could pass before the one before it was
//! registered (one client opening its sockets strictly one after another went one over the
//! limit in 1-3% of tries). So admission reserves a place, and the place is given back once the
//! socket is registered (or its upgrade fails).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::gateway::lock;

/// The limit, and each user's admitted sockets that are not registered yet.
pub(crate) struct UserLimit {
    max: usize,
    pending: Mutex<HashMap<Arc<str>, usize>>,
}

/// One admitted socket's place, until it is registered: given back when dropped.
pub(crate) struct Reservation {
    limit: Arc<UserLimit>,
    user: Arc<str>,
}

impl UserLimit {
    pub(crate) fn new(max: usize) -> Arc<Self> {
        Arc::new(UserLimit {
            max,
            pending: Mutex::default(),
        })
    }

    /// A place for one more socket of `user`, who has `registered()` sockets open; `None` at
    /// the limit. The count is taken under the lock, so two upgrades of one user cannot both
    /// take the last place.
    pub(crate) fn reserve(
        self: &Arc<Self>,
        user: &Arc<str>,
        registered: impl FnOnce() -> usize,
    ) -> Option<Reservation> {
        let mut pending = lock(&self.pending);
        let waiting = pending.get(user).copied().unwrap_or(0);
        if registered() + waiting >= self.max {
            return None;
        }
        *pending.entry(user.clone()).or_insert(0) += 1;
        Some(Reservation {
            limit: self.clone(),
            user: user.clone(),
        })
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut pending = lock(&self.limit.pending);
        if let Some(n) = pending.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                pending.remove(&self.user);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_in_flight_count_until_given_back() {
        let limit = UserLimit::new(2);
        let (ann, bob): (Arc<str>, Arc<str>) = ("ann".into(), "bob".into());
        let first = limit.reserve(&ann, || 0).expect("a place");
        let second = limit.reserve(&ann, || 0).expect("a place");
        // Neither is registered yet: no third place, though the registry counts none.
        assert!(limit.reserve(&ann, || 0).is_none());
        assert!(
            limit.reserve(&bob, || 0).is_some(),
            "another user is not counted"
        );
        // The first is registered and gives its place back: it counts in the registry now.
        drop(first);
        assert!(limit.reserve(&ann, || 1).is_none());
        drop(second);
        assert!(limit.reserve(&ann, || 1).is_some());
        assert!(
            lock(&limit.pending).is_empty(),
            "nothing kept for users with none in flight"
        );
    }
}
