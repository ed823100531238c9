//! The core's clock, a parameter: the engine and the service read time only through a
//! [`Clock`] they are given, so tests can advance time instead of sleeping (a pressure level
//! that falls after its hold, a failure that counts for a minute, an analytics window, a
//! model's keep-alive, an allocation old enough to review).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

/// Milliseconds on a monotonic clock, and the wall time that goes with them.
pub trait Clock: Send + Sync {
    /// Now, in milliseconds from an arbitrary start.
    fn millis(&self) -> u64;

    /// Now, as wall time (what the protocol's timestamps show, and what ages are counted
    /// from: a model's last use, an allocation's last touch).
    fn wall(&self) -> SystemTime;
}

/// The machine's monotonic clock (CLOCK_MONOTONIC_COARSE: a few nanoseconds to read; it is
/// read on every allocation) and its wall clock.
pub struct MonotonicClock;

impl Clock for MonotonicClock {
    fn millis(&self) -> u64 {
        crate::backends::coarse_millis()
    }

    fn wall(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that moves only when told to (tests). Its wall time starts at the real wall time
/// when it is made and moves with it.
pub struct ManualClock {
    millis: AtomicU64,
    start_millis: u64,
    start_wall: SystemTime,
}

impl ManualClock {
    /// Starts at `millis`.
    pub fn new(millis: u64) -> Self {
        ManualClock {
            millis: AtomicU64::new(millis),
            start_millis: millis,
            start_wall: SystemTime::now(),
        }
    }

    /// Moves it forward.
    pub fn advance(&self, by: Duration) {
        self.millis
            .fetch_add(by.as_millis() as u64, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn millis(&self) -> u64 {
        self.millis.load(Ordering::SeqCst)
    }

    fn wall(&self) -> SystemTime {
        let moved = self.millis().saturating_sub(self.start_millis);
        self.start_wall + Duration::from_millis(moved)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_its_wall_time_with_it() {
        let c = ManualClock::new(5_000);
        let w = c.wall();
        c.advance(Duration::from_millis(1500));
        assert_eq!(c.millis(), 6_500);
        assert_eq!(
            c.wall().duration_since(w).ok(),
            Some(Duration::from_millis(1500))
        );
    }
}
