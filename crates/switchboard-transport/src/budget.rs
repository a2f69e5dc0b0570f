//! The process-wide budget for buffered bytes, and each socket's share of it.
//!
//! What a client can make the server hold beyond its own socket's fixed state is two kinds of
//! buffer: an incomplete inbound message (its frames so far, up to `max_message_size`) and
//! outbound frames the kernel has not taken yet (up to `send_queue` frames and
//! `send_queue_bytes`). Each socket counts what it holds in its [`Holding`], and the server
//! adds every socket's count up in one [`Budget`]. A reservation that would take the sum past
//! the limit is refused, or makes room by shedding the sockets that hold the most
//! (see [`crate::sockets::Hub::reserve`]), so the sum never exceeds the limit.
//!
//! Bytes are counted per socket as if each socket's copy were its own, even where a broadcast
//! frame is one shared allocation: the count errs on the side of holding less.

use std::sync::atomic::{AtomicUsize, Ordering};

/// The top bit of a [`Holding`]: set once the socket has been shed; from then on its bytes no
/// longer count (they were written off the budget in one step) and it may not reserve more.
const SHED: usize = 1 << (usize::BITS - 1);

/// Buffered bytes across all sockets of a server, against a limit.
#[derive(Debug)]
pub(crate) struct Budget {
    limit: AtomicUsize,
    used: AtomicUsize,
    peak: AtomicUsize,
}

impl Default for Budget {
    fn default() -> Self {
        Budget {
            limit: AtomicUsize::new(usize::MAX),
            used: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
        }
    }
}

impl Budget {
    pub(crate) fn set_limit(&self, limit: usize) {
        self.limit.store(limit, Ordering::Relaxed);
    }

    pub(crate) fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    /// Bytes buffered now.
    pub(crate) fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// The most bytes ever buffered at once.
    pub(crate) fn peak(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }

    /// Adds `n` if the sum stays within the limit.
    pub(crate) fn try_add(&self, n: usize) -> bool {
        let limit = self.limit();
        let added = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|sum| *sum <= limit)
            });
        match added {
            Ok(before) => {
                self.peak.fetch_max(before + n, Ordering::Relaxed);
                true
            }
            Err(_) => false,
        }
    }

    pub(crate) fn sub(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }
}

/// One socket's buffered bytes, as counted in the [`Budget`].
#[derive(Debug, Default)]
pub(crate) struct Holding(AtomicUsize);

impl Holding {
    /// Bytes held now (0 once shed).
    pub(crate) fn get(&self) -> usize {
        let v = self.0.load(Ordering::Acquire);
        if v & SHED != 0 {
            0
        } else {
            v
        }
    }

    pub(crate) fn is_shed(&self) -> bool {
        self.0.load(Ordering::Acquire) & SHED != 0
    }

    /// Counts `n` more; false (and nothing counted) once shed.
    pub(crate) fn add(&self, n: usize) -> bool {
        self.0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                (v & SHED == 0).then_some(v + n)
            })
            .is_ok()
    }

    /// Counts `n` fewer; true if the budget must be given them back (false once shed: the
    /// whole holding was written off then).
    pub(crate) fn sub(&self, n: usize) -> bool {
        self.0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                (v & SHED == 0).then(|| v.saturating_sub(n))
            })
            .is_ok()
    }

    /// Marks the socket shed and returns what it held, for the caller to take off the budget
    /// (`None` if it was shed already). Every byte is taken off exactly once: either here or
    /// by a [`Holding::sub`] that came first.
    pub(crate) fn write_off(&self) -> Option<usize> {
        let before = self.0.fetch_or(SHED, Ordering::AcqRel);
        (before & SHED == 0).then_some(before)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_never_exceeds_its_limit_and_remembers_its_peak() {
        let b = Budget::default();
        b.set_limit(100);
        assert!(b.try_add(60));
        assert!(!b.try_add(41));
        assert!(b.try_add(40));
        b.sub(70);
        assert_eq!((b.used(), b.peak()), (30, 100));
    }

    #[test]
    fn a_written_off_holding_neither_grows_nor_gives_back_twice() {
        let h = Holding::default();
        assert!(h.add(10));
        assert!(h.sub(4));
        assert_eq!(h.write_off(), Some(6));
        assert_eq!(h.write_off(), None);
        assert!(!h.add(1));
        assert!(!h.sub(6), "already taken off the budget by write_off");
        assert_eq!(h.get(), 0);
        assert!(h.is_shed());
    }
}
