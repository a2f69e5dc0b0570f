//! Every open socket of a server, the buffer budget they share, and the one task that
//! heartbeats them all and closes them at shutdown.
//!
//! One sweep per heartbeat interval for the whole server, instead of a timer in every
//! socket's task: an idle socket then costs no timer and no wake-up of its own between
//! pings, which is what lets a server hold many of them. The sweep pings a share of the
//! sockets at a time, so that no tick holds the thread for long.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::{interval_at, Instant, MissedTickBehavior};

use crate::socket::SocketState;
use crate::stats::TransportStats;

/// The open sockets, by a number of their own, in [`MAX_SHARES`] lists that the heartbeat
/// pings one (or a few) per tick.
#[derive(Default)]
pub(crate) struct SocketList {
    inner: Mutex<Lists<Arc<SocketState>>>,
}

impl SocketList {
    /// Adds a socket; the number removes it again.
    pub(crate) fn insert(&self, socket: Arc<SocketState>) -> u64 {
        self.lock().insert(socket)
    }

    pub(crate) fn remove(&self, number: u64) {
        self.lock().remove(number);
    }

    fn len(&self) -> usize {
        self.lock().len
    }

    /// The sockets open now; the lock is not held while the caller works through them.
    fn snapshot(&self) -> Vec<Arc<SocketState>> {
        self.lock().all()
    }

    /// The sockets due at heartbeat tick `tick` of an interval swept in `shares` ticks.
    fn due(&self, tick: u64, shares: u32) -> Vec<Arc<SocketState>> {
        self.lock().due(tick, shares)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Lists<Arc<SocketState>>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Bits of a socket's number that name its list.
const SHARE_BITS: u32 = 5;

/// A heartbeat interval is swept in up to this many ticks, each pinging one share of the
/// sockets. A sweep of every socket at once is one `send` per socket in a row: 60-120 ms
/// for 10,000 sockets on the benchmark machine, in which nothing else on that thread runs
/// (a broadcast then took twice as long). Spread out, each socket is still pinged once per
/// interval.
const MAX_SHARES: u32 = 1 << SHARE_BITS;

/// The lists of [`SocketList`]. A new item joins the shortest list, so the lists stay within
/// about one item of each other however sockets come and go: closing all but one list's
/// sockets cannot make that list grow, since new ones go elsewhere.
struct Lists<T> {
    next: u64,
    lists: [HashMap<u64, T>; MAX_SHARES as usize],
    len: usize,
}

impl<T> Default for Lists<T> {
    fn default() -> Self {
        Lists {
            next: 0,
            lists: std::array::from_fn(|_| HashMap::new()),
            len: 0,
        }
    }
}

impl<T: Clone> Lists<T> {
    fn insert(&mut self, item: T) -> u64 {
        let (shortest, _) = self
            .lists
            .iter()
            .enumerate()
            .min_by_key(|(_, list)| list.len())
            .expect("MAX_SHARES lists");
        self.next += 1;
        let number = (self.next << SHARE_BITS) | shortest as u64;
        self.lists[shortest].insert(number, item);
        self.len += 1;
        number
    }

    fn remove(&mut self, number: u64) {
        let list = &mut self.lists[(number & u64::from(MAX_SHARES - 1)) as usize];
        if list.remove(&number).is_some() {
            self.len -= 1;
        }
        if list.is_empty() {
            list.shrink_to_fit();
        }
    }

    fn all(&self) -> Vec<T> {
        self.lists
            .iter()
            .flat_map(|l| l.values().cloned())
            .collect()
    }

    /// The items due at `tick` when an interval is swept in `shares` ticks: list `i` at the
    /// ticks where `i` and the tick agree modulo `shares`, so every list comes up once per
    /// interval.
    fn due(&self, tick: u64, shares: u32) -> Vec<T> {
        let shares = u64::from(shares.clamp(1, MAX_SHARES));
        self.lists
            .iter()
            .enumerate()
            .filter(|(i, _)| *i as u64 % shares == tick % shares)
            .flat_map(|(_, l)| l.values().cloned())
            .collect()
    }
}

/// Ticks are at least this far apart (or the interval apart, when it is shorter): a short
/// interval is swept in fewer, larger shares.
const MIN_TICK: Duration = Duration::from_millis(250);

/// How many shares an interval of `every` is swept in.
fn shares(every: Duration) -> u32 {
    let ticks = every.as_nanos() / MIN_TICK.as_nanos();
    ticks.clamp(1, u128::from(MAX_SHARES)) as u32
}

/// What the sockets of one server share: the list of them, and the counters with the buffer
/// budget (see [`crate::budget`]).
#[derive(Default)]
pub(crate) struct Hub {
    pub(crate) sockets: SocketList,
    pub(crate) stats: Arc<TransportStats>,
}

impl Hub {
    pub(crate) fn new(stats: Arc<TransportStats>) -> Hub {
        Hub {
            sockets: SocketList::default(),
            stats,
        }
    }

    /// Counts `n` more buffered bytes for `who`. When that would take the server past its
    /// budget, `who` is refused if it already holds more than a fair share (the budget divided
    /// by the open sockets); otherwise the sockets that hold the most, above a fair share, are
    /// shed (closed, their bytes taken off the budget at once) until `n` fits. So a socket
    /// that stays within its fair share is never refused, and the budget is never exceeded.
    pub(crate) fn reserve(&self, who: &SocketState, n: usize) -> bool {
        let budget = &self.stats.budget;
        // A few rounds at most: other sockets may take the room made between two steps.
        for _ in 0..3 {
            if who.holding.is_shed() {
                return false;
            }
            if budget.try_add(n) {
                if who.holding.add(n) {
                    return true;
                }
                budget.sub(n); // shed in the meantime
                return false;
            }
            let share = budget.limit() / self.sockets.len().max(1);
            if who.holding.get().saturating_add(n) > share || !self.shed_largest(share, n, who) {
                return false;
            }
        }
        false
    }

    /// Gives back `n` bytes `who` no longer holds.
    pub(crate) fn release(&self, who: &SocketState, n: usize) {
        if n > 0 && who.holding.sub(n) {
            self.stats.budget.sub(n);
        }
    }

    /// Sheds the sockets holding more than `share`, largest first, until `need` bytes fit with
    /// a sixteenth of the budget to spare (so that the next reservations do not each scan the
    /// list again). False if there was nobody to shed.
    fn shed_largest(&self, share: usize, need: usize, who: &SocketState) -> bool {
        let mut over: Vec<(usize, Arc<SocketState>)> = self
            .sockets
            .snapshot()
            .into_iter()
            .filter(|s| !std::ptr::eq(&**s, who))
            .map(|s| (s.holding.get(), s))
            .filter(|(held, _)| *held > share)
            .collect();
        if over.is_empty() {
            return false;
        }
        over.sort_unstable_by_key(|(held, _)| std::cmp::Reverse(*held));
        let budget = &self.stats.budget;
        let limit = budget.limit();
        let target = limit.saturating_sub(need).saturating_sub(limit / 16);
        for (_, victim) in over {
            if let Some(held) = victim.shed_for_budget() {
                budget.sub(held);
            }
            if budget.used() <= target {
                break;
            }
        }
        true
    }
}

/// Pings every socket each `every` (closing those that did not answer the last ping or are
/// stalled, see [`SocketState::heartbeat`]) until the server shuts down, then closes them
/// all with 1001. A dropped server counts as a shutdown. The sockets are pinged a share at
/// a time (see [`MAX_SHARES`]).
pub(crate) async fn heartbeat_until_shutdown(
    hub: Arc<Hub>,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let shares = shares(every);
    let period = every / shares;
    let mut tick = interval_at(Instant::now() + period, period);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut ticks = 0u64;
    loop {
        tokio::select! {
            changed = shutdown.changed() => {
                if changed.is_err() || *shutdown.borrow_and_update() {
                    for socket in hub.sockets.snapshot() {
                        socket.shut_down();
                    }
                    return;
                }
            }
            _ = tick.tick() => {
                let due = hub.sockets.due(ticks, shares);
                ticks += 1;
                for (i, socket) in due.into_iter().enumerate() {
                    socket.heartbeat();
                    // A ping is a system call: let other tasks on this thread run now and
                    // then during a sweep of many thousand sockets.
                    if i % 1024 == 1023 {
                        tokio::task::yield_now().await;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lists_stay_level_and_every_item_is_due_once_per_interval() {
        let mut lists = Lists::default();
        let numbers: Vec<u64> = (0..320u32).map(|i| lists.insert(i)).collect();
        assert!(lists.lists.iter().all(|l| l.len() == 10));
        for shares in [1, 4, 5, 32] {
            let mut seen: Vec<u32> = (0..u64::from(shares))
                .flat_map(|tick| lists.due(tick + 7 * u64::from(shares), shares))
                .collect();
            seen.sort_unstable();
            assert_eq!(seen, (0..320).collect::<Vec<_>>(), "{shares} shares");
        }
        // Closing every socket but those of one list, then opening more: the new ones go to
        // the other lists, so that list never grows past its share.
        let keep = numbers[0] & u64::from(MAX_SHARES - 1);
        for &n in &numbers {
            if n & u64::from(MAX_SHARES - 1) != keep {
                lists.remove(n);
            }
        }
        assert_eq!(lists.len, 10);
        for i in 0..310 {
            lists.insert(1000 + i);
        }
        assert!(lists.lists.iter().all(|l| l.len() == 10), "level again");
        lists.remove(numbers[0]);
        lists.remove(numbers[0]);
        assert_eq!(lists.len, 319, "a number removed twice counts once");
    }

    #[test]
    fn an_interval_is_swept_in_shares_at_least_a_quarter_second_apart() {
        assert_eq!(shares(Duration::from_millis(150)), 1, "short: all at once");
        assert_eq!(shares(Duration::from_secs(1)), 4);
        assert_eq!(shares(Duration::from_secs(30)), MAX_SHARES);
        assert_eq!(shares(Duration::from_secs(3600)), MAX_SHARES);
        assert_eq!(shares(Duration::ZERO), 1);
        let every = Duration::from_secs(30);
        assert!(every / shares(every) >= MIN_TICK);
    }
}
