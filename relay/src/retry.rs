//! How long a message waits before its next attempt, and when it is dead.

use std::time::Duration;

use rand::Rng;

/// Capped exponential backoff with jitter, as a value.
///
/// After the `n`-th failed attempt a message waits
/// `min(initial_delay × factor^(n-1), max_delay)`, spread by ±`jitter` of itself (never above
/// `max_delay`); after `max_attempts` failed attempts it is dead.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Delay after the first failure. Default 1 s.
    pub initial_delay: Duration,
    /// Growth per further failure, at least 1. Default 2.
    pub factor: f64,
    /// Cap on the delay. Default 5 min.
    pub max_delay: Duration,
    /// Random spread as a fraction of the delay, 0 to 1. Default 0.2.
    pub jitter: f64,
    /// Failed attempts after which the message is dead, at least 1. Default 12.
    pub max_attempts: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            initial_delay: Duration::from_secs(1),
            factor: 2.0,
            max_delay: Duration::from_secs(300),
            jitter: 0.2,
            max_attempts: 12,
        }
    }
}

/// What to do with a message after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Next {
    /// Try again after this delay.
    RetryAfter(Duration),
    /// Give up: the message is dead.
    Dead,
}

impl RetryPolicy {
    /// Checks the values, naming the setting at fault.
    pub fn validate(&self) -> Result<(), String> {
        if self.initial_delay.is_zero() {
            return Err("retry.initial_delay must be longer than zero".into());
        }
        if !(self.factor.is_finite() && self.factor >= 1.0) {
            return Err(format!(
                "retry.factor must be at least 1 (got {})",
                self.factor
            ));
        }
        if self.max_delay < self.initial_delay {
            return Err("retry.max_delay must be at least retry.initial_delay".into());
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err(format!(
                "retry.jitter must be between 0 and 1 (got {})",
                self.jitter
            ));
        }
        if self.max_attempts == 0 {
            return Err("retry.max_attempts must be at least 1".into());
        }
        Ok(())
    }

    /// The un-jittered delay after `failures` failed attempts (`failures` ≥ 1).
    pub fn base_delay(&self, failures: u32) -> Duration {
        let exponent = failures.saturating_sub(1).min(1024) as i32;
        let secs = self.initial_delay.as_secs_f64() * self.factor.powi(exponent);
        // `min` also tames an infinite product.
        Duration::from_secs_f64(secs.min(self.max_delay.as_secs_f64()))
    }

    /// What follows the `failures`-th failed attempt.
    pub fn next(&self, failures: u32, rng: &mut impl Rng) -> Next {
        if failures >= self.max_attempts {
            return Next::Dead;
        }
        let base = self.base_delay(failures).as_secs_f64();
        let spread = if self.jitter > 0.0 {
            rng.random_range(-self.jitter..=self.jitter)
        } else {
            0.0
        };
        let secs = (base * (1.0 + spread)).clamp(0.0, self.max_delay.as_secs_f64());
        Next::RetryAfter(Duration::from_secs_f64(secs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, SeedableRng};

    fn policy() -> RetryPolicy {
        RetryPolicy {
            initial_delay: Duration::from_millis(100),
            factor: 3.0,
            max_delay: Duration::from_secs(2),
            jitter: 0.0,
            max_attempts: 5,
        }
    }

    #[test]
    fn grows_by_factor_then_caps() {
        let p = policy();
        let seen: Vec<_> = (1..=4).map(|n| p.base_delay(n)).collect();
        assert_eq!(
            seen,
            [100, 300, 900, 2000].map(Duration::from_millis),
            "delays after 1..4 failures"
        );
        assert_eq!(
            p.base_delay(u32::MAX),
            Duration::from_secs(2),
            "huge exponents stay capped"
        );
    }

    #[test]
    fn dead_after_max_attempts() {
        let mut rng = StdRng::seed_from_u64(1);
        let p = policy();
        assert!(matches!(p.next(4, &mut rng), Next::RetryAfter(_)));
        assert_eq!(p.next(5, &mut rng), Next::Dead);
    }

    #[test]
    fn jitter_stays_within_its_band_and_under_the_cap() {
        let p = RetryPolicy {
            jitter: 0.5,
            ..policy()
        };
        let mut rng = StdRng::seed_from_u64(7);
        let mut distinct = std::collections::HashSet::new();
        for failures in 1..5 {
            let base = p.base_delay(failures).as_secs_f64();
            for _ in 0..200 {
                let Next::RetryAfter(d) = p.next(failures, &mut rng) else {
                    panic!("not dead yet")
                };
                let d = d.as_secs_f64();
                assert!(
                    d >= base * 0.5 - 1e-9 && d <= (base * 1.5).min(2.0) + 1e-9,
                    "{d} vs base {base}"
                );
                distinct.insert(d.to_bits());
            }
        }
        assert!(
            distinct.len() > 100,
            "jitter should spread delays, saw {} distinct",
            distinct.len()
        );
    }

    #[test]
    fn validation_names_the_setting() {
        let bad = RetryPolicy {
            factor: 0.5,
            ..policy()
        };
        assert!(bad.validate().unwrap_err().contains("retry.factor"));
        let bad = RetryPolicy {
            jitter: 2.0,
            ..policy()
        };
        assert!(bad.validate().unwrap_err().contains("retry.jitter"));
        let bad = RetryPolicy {
            max_attempts: 0,
            ..policy()
        };
        assert!(bad.validate().unwrap_err().contains("retry.max_attempts"));
    }
}
