//! Liveness: every long-running loop of the relay beats as it makes progress (a worker
//! at each batch and each confirmed or failed message, the lease keeper at each renewal).
//! The relay is live while none of them has been silent for longer than the stall timeout;
//! a loop stuck in a deadlock or an I/O call that never returns stops beating.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

/// One heartbeat slot per loop.
#[derive(Debug)]
pub struct Heartbeats {
    start: Instant,
    names: Vec<String>,
    beats: Vec<AtomicU64>,
}

impl Heartbeats {
    /// Slots for the named loops, all beating now.
    pub fn new(names: Vec<String>) -> Self {
        let beats = names.iter().map(|_| AtomicU64::new(0)).collect();
        Self {
            start: Instant::now(),
            names,
            beats,
        }
    }

    /// Loop `slot` made progress.
    pub fn beat(&self, slot: usize) {
        let now = self.start.elapsed().as_millis() as u64;
        if let Some(b) = self.beats.get(slot) {
            b.store(now, Ordering::Relaxed);
        }
    }

    /// The loops silent for longer than `timeout`, with how long each has been silent.
    pub fn stalled(&self, timeout: Duration) -> Vec<(String, Duration)> {
        let now = self.start.elapsed();
        self.names
            .iter()
            .zip(&self.beats)
            .filter_map(|(name, beat)| {
                let silent =
                    now.saturating_sub(Duration::from_millis(beat.load(Ordering::Relaxed)));
                (silent > timeout).then(|| (name.clone(), silent))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loop_that_stops_beating_is_reported_and_one_that_beats_is_not() {
        let h = Heartbeats::new(vec!["worker 0".into(), "worker 1".into()]);
        assert!(h.stalled(Duration::from_millis(20)).is_empty());
        std::thread::sleep(Duration::from_millis(40));
        h.beat(1);
        let stalled = h.stalled(Duration::from_millis(20));
        assert_eq!(stalled.len(), 1, "{stalled:?}");
        assert_eq!(stalled[0].0, "worker 0");
        assert!(stalled[0].1 >= Duration::from_millis(40));
    }
}
