//! Latency percentiles from raw samples (a sorted vector: exact, and small enough for the
//! bounded runs of the load benchmark).

/// Nanosecond samples, sorted once, read many times.
#[derive(Debug, Clone, Default)]
pub struct Samples(Vec<u64>);

impl Samples {
    /// Sorts `samples`.
    pub fn new(mut samples: Vec<u64>) -> Samples {
        samples.sort_unstable();
        Samples(samples)
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The samples, in ascending order.
    pub fn values(&self) -> &[u64] {
        &self.0
    }

    /// True without samples.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The `p`-th percentile (0-100) in nanoseconds, nearest rank; 0 without samples.
    pub fn percentile(&self, p: f64) -> u64 {
        if self.0.is_empty() {
            return 0;
        }
        // The epsilon keeps 99.9% of 1000 at rank 999 despite floating-point error.
        let rank = ((p / 100.0) * self.0.len() as f64 - 1e-9).ceil() as usize;
        self.0[rank.clamp(1, self.0.len()) - 1]
    }

    /// The `p`-th percentile in microseconds, for reports.
    pub fn percentile_us(&self, p: f64) -> f64 {
        self.percentile(p) as f64 / 1000.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let s = Samples::new((1..=1000).rev().collect());
        assert_eq!(s.percentile(50.0), 500);
        assert_eq!(s.percentile(99.0), 990);
        assert_eq!(s.percentile(99.9), 999);
        assert_eq!(s.percentile(100.0), 1000);
        assert_eq!(s.percentile(0.0), 1);
        assert_eq!(Samples::default().percentile(50.0), 0);
        assert_eq!(Samples::new(vec![2500]).percentile_us(99.0), 2.5);
    }
}
