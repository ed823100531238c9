//! A stream reader's brief spin before it blocks (`--spin-us`).
//!
//! A client that sends its next request right after reading an answer (one request at a
//! time, the common case for a worker process) finds the reading thread asleep in `read`; the
//! kernel has to wake it, and on a host whose idle cores sit in deep sleep states that wake
//! costs more than handling the request. So after answering, the reader watches its stream
//! for up to the spin window (`poll` with a zero timeout, which never blocks) and only then
//! blocks in `read`.
//!
//! What it costs is CPU: a spinning reader keeps one core busy for up to the window after
//! each answer. Two rules bound that:
//! - **adaptive**: a reader spins only while its client has been quick: when the last request
//!   took longer than the window to come, the next wait blocks at once (and is timed, so that
//!   a client that becomes quick again is spun for again);
//! - **few at once**: at most a quarter of the host's cores spin at a time (none on a host of
//!   fewer than four cores); a reader that finds them all taken blocks at once.
//!
//! `--spin-us 0` turns it off: every wait blocks in `read`.

use crate::backends::fdpass::readable_now;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The default spin window, in microseconds.
pub const DEFAULT_SPIN_MICROS: u64 = 50;

/// Readers spinning now, across the process.
static SPINNING: AtomicUsize = AtomicUsize::new(0);

/// The most readers that may spin at once: a quarter of the cores (none on a host of fewer
/// than four, where a spinning reader would take the core its client needs).
fn max_spinning() -> usize {
    static MAX: OnceLock<usize> = OnceLock::new();
    *MAX.get_or_init(|| {
        std::thread::available_parallelism()
            .map(|n| n.get() / 4)
            .unwrap_or(0)
    })
}

/// A place among the spinning readers, given back when dropped.
struct Slot;

impl Slot {
    fn take() -> Option<Slot> {
        let max = max_spinning();
        SPINNING
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        SPINNING.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One reader's spin before its blocking reads.
pub struct Spinner<'a> {
    fd: BorrowedFd<'a>,
    window: Duration,
    /// Whether the client's last request came within the window.
    quick: bool,
    /// When the reader began a wait it did not spin through (to time the request's coming).
    blocked_since: Option<Instant>,
}

impl<'a> Spinner<'a> {
    /// A spinner over `input`'s descriptor with a window of `window` (None when it is zero).
    pub fn new(input: &'a impl AsFd, window: Duration) -> Option<Spinner<'a>> {
        (!window.is_zero()).then(|| Spinner {
            fd: input.as_fd(),
            window,
            quick: true,
            blocked_since: None,
        })
    }

    /// Call before a read that may block: returns once there is something to read, or once
    /// the window has passed (or at once, when the client has been slow or enough readers
    /// spin already); the read that follows then blocks as usual.
    pub fn before_read(&mut self) {
        let started = Instant::now();
        let slot = if self.quick { Slot::take() } else { None };
        if slot.is_some() {
            loop {
                if readable_now(self.fd) {
                    return;
                }
                if started.elapsed() >= self.window {
                    break;
                }
                for _ in 0..16 {
                    std::hint::spin_loop();
                }
            }
        }
        self.blocked_since = Some(started);
    }

    /// Call after the read returned: notes whether the request came within the window.
    pub fn after_read(&mut self) {
        if let Some(since) = self.blocked_since.take() {
            self.quick = since.elapsed() < self.window;
        } else {
            self.quick = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    #[test]
    fn it_returns_at_once_when_there_is_something_to_read() {
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(b"x").unwrap();
        let mut s = Spinner::new(&b, Duration::from_secs(5)).unwrap();
        let t = Instant::now();
        s.before_read();
        assert!(t.elapsed() < Duration::from_secs(1));
        s.after_read();
        assert!(s.quick);
    }

    #[test]
    fn a_slow_client_is_not_spun_for_until_it_is_quick_again() {
        let (_a, b) = UnixStream::pair().unwrap();
        let mut s = Spinner::new(&b, Duration::from_millis(2)).unwrap();
        // Nothing comes: the spin ends with the window, and the (simulated) blocking read
        // takes longer than the window, so the client counts as slow.
        s.before_read();
        std::thread::sleep(Duration::from_millis(5));
        s.after_read();
        assert!(!s.quick);
        // Slow: no spin, the wait is timed; a request within the window makes it quick.
        let t = Instant::now();
        s.before_read();
        assert!(
            t.elapsed() < Duration::from_millis(2),
            "no spin for a slow client"
        );
        s.after_read();
        assert!(s.quick);
    }

    #[test]
    fn zero_turns_it_off() {
        let (_a, b) = UnixStream::pair().unwrap();
        assert!(Spinner::new(&b, Duration::ZERO).is_none());
    }
}
