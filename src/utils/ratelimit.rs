//! One rate-limited warning: a condition that may repeat thousands of times
//! a second (accept failures, refused clients) is logged at most once per
//! interval, with the count of occurrences since the last line.

use std::time::{Duration, Instant};

/// A warning logged at most once per interval.
#[derive(Debug)]
pub struct RateLimited {
    /// At most one line per this long.
    interval: Duration,
    /// When the last line was logged.
    last: Option<Instant>,
    /// Occurrences since then, this one included.
    count: u64,
}

impl RateLimited {
    /// A warning logged at most once per `interval`.
    pub fn new(interval: Duration) -> RateLimited {
        RateLimited {
            interval,
            last: None,
            count: 0,
        }
    }

    /// Counts one occurrence at `now`. Returns `Some(n)` when a line may be
    /// logged now, `n` being the occurrences it covers (this one included);
    /// `None` while the interval since the last line has not passed.
    pub fn hit(&mut self, now: Instant) -> Option<u64> {
        self.count += 1;
        if self
            .last
            .is_some_and(|t| now.saturating_duration_since(t) < self.interval)
        {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.count))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_the_count_since() {
        let t0 = Instant::now();
        let mut w = RateLimited::new(Duration::from_secs(5));
        assert_eq!(w.hit(t0), Some(1));
        assert_eq!(w.hit(t0 + Duration::from_secs(1)), None);
        assert_eq!(w.hit(t0 + Duration::from_secs(2)), None);
        assert_eq!(w.hit(t0 + Duration::from_secs(5)), Some(3));
        assert_eq!(w.hit(t0 + Duration::from_secs(6)), None);
    }
}
