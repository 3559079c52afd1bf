//! Capped exponential backoff with jitter, shared by the relay and the consumer.

use std::time::Duration;

use rand::Rng;

/// Capped exponential backoff with jitter: the one backoff of the relay's reconnect, settle
/// and lease loops and of the consumer's reconnect and retry loops.
///
/// Each delay lies between half the current ceiling and the ceiling; the ceiling starts at
/// 100 ms (or `max`, if lower) and doubles up to `max`. [`Backoff::reset`] after a success.
#[derive(Debug)]
pub struct Backoff {
    current: Duration,
    max: Duration,
}

impl Backoff {
    const START: Duration = Duration::from_millis(100);

    /// Starts at 100 ms and doubles up to `max`.
    pub fn new(max: Duration) -> Self {
        Self {
            current: Self::START.min(max),
            max,
        }
    }

    /// The next ceiling without advancing.
    pub fn peek(&self) -> Duration {
        self.current
    }

    /// A delay between half the current ceiling and the ceiling; then doubles the ceiling.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.current;
        self.current = (self.current * 2).min(self.max);
        let half = ceiling / 2;
        half + rand::rng().random_range(Duration::ZERO..=half)
    }

    /// Back to the start after a success.
    pub fn reset(&mut self) {
        self.current = Self::START.min(self.max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_secs(1));
        let waits: Vec<_> = (0..10).map(|_| b.next_delay()).collect();
        assert!(waits[0] <= Duration::from_millis(100));
        assert!(
            waits.iter().all(|w| *w <= Duration::from_secs(1)),
            "{waits:?}"
        );
        assert!(
            waits[9] >= Duration::from_millis(500),
            "capped delays stay near the cap: {waits:?}"
        );
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
