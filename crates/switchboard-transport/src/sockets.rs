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

/// The open sockets, by a number of their own.
#[derive(Default)]
pub(crate) struct SocketList {
    inner: Mutex<(u64, HashMap<u64, Arc<SocketState>>)>,
}

impl SocketList {
    /// Adds a socket; the number removes it again.
    pub(crate) fn insert(&self, socket: Arc<SocketState>) -> u64 {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let (next, sockets) = &mut *inner;
        *next += 1;
        sockets.insert(*next, socket);
        *next
    }

    pub(crate) fn remove(&self, number: u64) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.1.remove(&number);
        if inner.1.is_empty() {
            inner.1.shrink_to_fit();
        }
    }

    fn len(&self) -> usize {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).1.len()
    }

    /// The sockets open now; the lock is not held while the caller works through them.
    fn snapshot(&self) -> Vec<Arc<SocketState>> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.1.values().cloned().collect()
    }

    /// The sockets open now whose number is `share` modulo `shares`: over `shares` calls with
    /// `share` 0, 1, ..., every socket comes up once.
    fn share(&self, share: u64, shares: u64) -> Vec<Arc<SocketState>> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner
            .1
            .iter()
            .filter(|(number, _)| *number % shares == share)
            .map(|(_, socket)| socket.clone())
            .collect()
    }
}

/// A heartbeat interval is swept in up to this many ticks, each pinging one share of the
/// sockets. A sweep of every socket at once is one `send` per socket in a row: 60-120 ms
/// for 10,000 sockets on the benchmark machine, in which nothing else on that thread runs
/// (a broadcast then took twice as long). Spread out, each socket is still pinged once per
/// interval.
const MAX_SHARES: u32 = 32;

/// Ticks are at least this far apart: a short interval is swept in fewer, larger shares.
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
                let share = ticks % u64::from(shares);
                ticks += 1;
                let due = hub.sockets.share(share, u64::from(shares));
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
