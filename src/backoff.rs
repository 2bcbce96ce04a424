//! Exponential backoff with jitter, for retrying connects and accepts.

use std::hash::{BuildHasher, RandomState};
use std::time::Duration;

/// Delays that double from `min` up to `max`; each is drawn uniformly from
/// the upper half of the current step, so that many clients retrying at once
/// spread out.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    step: Duration,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max,
            step: min,
        }
    }

    /// The next delay to wait.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let step = self.step;
        self.step = (self.step * 2).min(self.max);
        let half = step / 2;
        half + half.mul_f64(unit_random())
    }

    /// Back to the shortest delay, after a success.
    pub(crate) fn reset(&mut self) {
        self.step = self.min;
    }
}

/// A number in [0, 1). `RandomState` is seeded randomly per process and per
/// instance, which is all jitter needs.
fn unit_random() -> f64 {
    (RandomState::new().hash_one(std::time::Instant::now()) >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_within_bounds_and_reset() {
        let mut backoff = Backoff::new(Duration::from_millis(10), Duration::from_millis(80));
        let steps = [10, 20, 40, 80, 80];
        for step in steps {
            let delay = backoff.next_delay();
            let step = Duration::from_millis(step);
            assert!(
                delay >= step / 2 && delay <= step,
                "{delay:?} outside [{:?}, {step:?}]",
                step / 2
            );
        }
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(10));
    }
}
