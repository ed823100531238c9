//! The core's clock, a parameter: the engine reads time only through a [`Clock`] it is given,
//! so tests can advance time instead of sleeping (a pressure level that falls after its hold, a
//! failure that counts for a minute, an analytics window).

use std::sync::atomic::{AtomicU64, Ordering};

/// Milliseconds on a monotonic clock.
pub trait Clock: Send + Sync {
    /// Now, in milliseconds from an arbitrary start.
    fn millis(&self) -> u64;
}

/// The machine's monotonic clock (CLOCK_MONOTONIC_COARSE: a few nanoseconds to read; it is
/// read on every allocation).
pub struct MonotonicClock;

impl Clock for MonotonicClock {
    fn millis(&self) -> u64 {
        crate::backends::coarse_millis()
    }
}

/// A clock that moves only when told to (tests).
pub struct ManualClock(AtomicU64);

impl ManualClock {
    /// Starts at `millis`.
    pub fn new(millis: u64) -> Self {
        ManualClock(AtomicU64::new(millis))
    }

    /// Moves it forward.
    pub fn advance(&self, by: std::time::Duration) {
        self.0.fetch_add(by.as_millis() as u64, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn millis(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}
