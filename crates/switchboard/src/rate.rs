//! A per-socket token bucket for inbound messages.

use std::time::Instant;

/// Messages per second and burst, from `gateway.limits`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RateLimit {
    pub(crate) per_second: f64,
    pub(crate) burst: f64,
}

/// What to do with one inbound message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Accept,
    /// Refused; `first` is true for the first refusal of a run (gets the error frame).
    Refuse {
        first: bool,
    },
    /// Refused, and the client went on for a whole burst while limited: close it.
    Close,
}

#[derive(Debug)]
pub(crate) struct Bucket {
    tokens: f64,
    last: Instant,
    refused_in_a_row: u32,
}

impl Bucket {
    pub(crate) fn new(limit: RateLimit) -> Self {
        Bucket {
            tokens: limit.burst,
            last: Instant::now(),
            refused_in_a_row: 0,
        }
    }

    pub(crate) fn take(&mut self, limit: RateLimit, now: Instant) -> Verdict {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * limit.per_second).min(limit.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            self.refused_in_a_row = 0;
            return Verdict::Accept;
        }
        self.refused_in_a_row += 1;
        if f64::from(self.refused_in_a_row) >= limit.burst.max(1.0) {
            Verdict::Close
        } else {
            Verdict::Refuse {
                first: self.refused_in_a_row == 1,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_refuse_then_close_and_refill() {
        let limit = RateLimit {
            per_second: 10.0,
            burst: 3.0,
        };
        let t0 = Instant::now();
        let mut b = Bucket::new(limit);
        for _ in 0..3 {
            assert_eq!(b.take(limit, t0), Verdict::Accept);
        }
        assert_eq!(b.take(limit, t0), Verdict::Refuse { first: true });
        assert_eq!(b.take(limit, t0), Verdict::Refuse { first: false });
        assert_eq!(b.take(limit, t0), Verdict::Close);
        // 100 ms later one token is back, and the run of refusals ends
        let mut b = Bucket::new(limit);
        for _ in 0..4 {
            b.take(limit, t0);
        }
        assert_eq!(
            b.take(limit, t0 + Duration::from_millis(100)),
            Verdict::Accept
        );
        assert_eq!(
            b.take(limit, t0 + Duration::from_millis(100)),
            Verdict::Refuse { first: true }
        );
    }
}
