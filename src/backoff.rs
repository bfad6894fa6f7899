//! One backoff policy for every retry loop.
//!
//! Whatever is retried — a job the registry could not take, the whole
//! dispatch while the registry is down, the publisher's sink, a transaction
//! that lost a race — waits the same way: a first delay that doubles with
//! every attempt up to a ceiling, scaled by a random factor so that things
//! that failed together do not all come back at the same instant. Loops
//! differ only in the numbers, so each names its own [`Backoff`].

use std::ops::Range;
use std::time::Duration;

/// How long the retries of one kind of thing wait.
#[derive(Debug, Clone, PartialEq)]
pub struct Backoff {
    /// The delay before the first retry (attempt 0), before jitter.
    pub first: Duration,
    /// The delay doubles with each attempt, at most this many times.
    pub doublings: u32,
    /// No delay is longer than this before jitter (`Duration::MAX`: no cap
    /// beyond the doublings).
    pub cap: Duration,
    /// The delay is scaled by a factor drawn uniformly from this range.
    pub jitter: Range<f64>,
}

/// Jobs, the registry outage hold and the publisher: 0.5 s, 1 s, 2 s … up to
/// 30 s, each within ±20 %.
pub const RETRY: Backoff = Backoff {
    first: Duration::from_millis(500),
    doublings: 6,
    cap: Duration::from_secs(30),
    jitter: 0.8..1.2,
};

impl Backoff {
    /// The delay for `attempt` (0 for the first retry), before jitter.
    pub fn window(&self, attempt: u32) -> Duration {
        // `min(31)` keeps the shift defined whatever `doublings` says.
        let doublings = attempt.min(self.doublings).min(31);
        self.first.saturating_mul(1 << doublings).min(self.cap)
    }

    /// The delay for `attempt` (0 for the first retry), jittered.
    pub fn delay(&self, attempt: u32) -> Duration {
        self.window(attempt)
            .mul_f64(rand::random_range(self.jitter.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        assert!(RETRY.delay(0) < Duration::from_millis(700));
        assert!(RETRY.delay(3) > Duration::from_secs(3));
        assert!(RETRY.delay(40) <= Duration::from_secs(36));
    }

    /// The registry's transaction retries: 20 ms doubling eight times, each
    /// somewhere between half the window and all of it.
    #[test]
    fn a_policy_without_a_cap_stops_at_its_doublings() {
        let conflict = Backoff {
            first: Duration::from_millis(20),
            doublings: 8,
            cap: Duration::MAX,
            jitter: 0.5..1.0,
        };
        for attempt in 0..4 {
            let window = Duration::from_millis(20) * 2u32.pow(attempt);
            assert_eq!(conflict.window(attempt), window);
            let pause = conflict.delay(attempt);
            assert!(pause >= window / 2 && pause <= window, "{attempt}: {pause:?}");
        }
        assert_eq!(conflict.window(u32::MAX), Duration::from_millis(20) * 256);
    }
}
