//! The signal that memory came back. The engine raises it itself whenever bytes go back (an
//! allocation freed, a move's source given up, memory held for a state file released, a
//! defragment that moved something), so whoever waits for room, asynchronously (an allocate)
//! or on a blocking thread (a model load, an acquire), wakes without polling and without every
//! free path having to remember to say so. The service raises it too for what is not the
//! engine's: shutdown, a model that finished loading.

use parking_lot::{Condvar, Mutex};
use std::time::Instant;

/// Raised when room may have appeared; waited on by generation, so no raise is missed between
/// a look at the books and the wait.
#[derive(Default)]
pub struct RoomSignal {
    generation: Mutex<u64>,
    raised: Condvar,
    notify: tokio::sync::Notify,
}

impl RoomSignal {
    /// Wakes every waiter.
    pub fn raise(&self) {
        *self.generation.lock() += 1;
        self.raised.notify_all();
        self.notify.notify_waiters();
    }

    /// How many times it was raised: read it before looking at the books, then
    /// [`RoomSignal::wait_until`] with it.
    pub fn generation(&self) -> u64 {
        *self.generation.lock()
    }

    /// Blocks until it is raised after `seen` (returns true) or until `deadline` (false).
    pub fn wait_until(&self, seen: u64, deadline: Instant) -> bool {
        let mut g = self.generation.lock();
        while *g == seen {
            if self.raised.wait_until(&mut g, deadline).timed_out() {
                return *g != seen;
            }
        }
        true
    }

    /// A future that completes at the next raise (create it, `enable` it, then look at the
    /// books, then await it: a raise in between is not missed).
    pub fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.notify.notified()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn a_raise_wakes_a_blocking_waiter_and_none_is_missed() {
        let s = Arc::new(RoomSignal::default());
        let seen = s.generation();
        // Raised before the wait: the wait returns at once.
        s.raise();
        assert!(s.wait_until(seen, Instant::now() + Duration::from_secs(5)));
        // Not raised: the wait ends at its deadline.
        let seen = s.generation();
        assert!(!s.wait_until(seen, Instant::now() + Duration::from_millis(10)));
        // Raised from another thread while waiting.
        let other = Arc::clone(&s);
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            other.raise();
        });
        assert!(s.wait_until(seen, Instant::now() + Duration::from_secs(5)));
        t.join().unwrap();
    }
}
