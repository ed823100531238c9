//! Lifecycle: the one [`Shutdown`] signal every part of a running worker waits on, and the
//! [`Threads`] it owns. Nothing here knows of actions or transports.
//!
//! `main` makes one `Shutdown` and triggers it from a signal (SIGTERM, SIGINT) or from the end
//! of the input; every transport awaits it (HTTP stops accepting, stdio stops reading), then
//! ends the service through [`MemoryService::shut_down`](crate::service::MemoryService::shut_down).
//! Background threads sleep on a `Shutdown` too, so stopping them is one trigger and a join, not
//! a wait of up to their period.

use parking_lot::{Condvar, Mutex};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

#[derive(Default)]
struct Inner {
    triggered: AtomicBool,
    lock: Mutex<()>,
    changed: Condvar,
    notify: tokio::sync::Notify,
}

/// A one-way signal that the worker is stopping: triggered once, waited on by threads
/// (blocking) and tasks (async) alike. Clones share the signal.
#[derive(Clone, Default)]
pub struct Shutdown {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Shutdown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shutdown")
            .field("triggered", &self.is_triggered())
            .finish()
    }
}

impl Shutdown {
    /// A signal not triggered yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Triggers it: every waiter wakes. Later calls do nothing more.
    pub fn trigger(&self) {
        let _g = self.inner.lock.lock();
        self.inner.triggered.store(true, Ordering::Release);
        self.inner.changed.notify_all();
        self.inner.notify.notify_waiters();
    }

    /// Whether it was triggered.
    pub fn is_triggered(&self) -> bool {
        self.inner.triggered.load(Ordering::Acquire)
    }

    /// Completes once triggered (at once if it already was). Owns what it needs, so it can be
    /// handed to a spawned task or a server as its shutdown future.
    pub fn wait(&self) -> impl Future<Output = ()> + Send + 'static {
        let inner = Arc::clone(&self.inner);
        async move {
            loop {
                let notified = inner.notify.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if inner.triggered.load(Ordering::Acquire) {
                    return;
                }
                notified.await;
            }
        }
    }

    /// Blocks this thread until triggered.
    pub fn wait_blocking(&self) {
        let mut g = self.inner.lock.lock();
        while !self.is_triggered() {
            self.inner.changed.wait(&mut g);
        }
    }

    /// Sleeps `d`, or less if triggered meanwhile; returns whether it was triggered (a
    /// background thread's loop: `while !shutdown.sleep(period) { tick() }`).
    pub fn sleep(&self, d: Duration) -> bool {
        let deadline = Instant::now() + d;
        let mut g = self.inner.lock.lock();
        while !self.is_triggered() {
            if self.inner.changed.wait_until(&mut g, deadline).timed_out() {
                break;
            }
        }
        self.is_triggered()
    }
}

/// Background threads owned by one part of the worker: each sleeps on the same [`Shutdown`],
/// and [`Threads::stop`] triggers it and joins them all. Dropping it stops them too.
#[derive(Default)]
pub struct Threads {
    shutdown: Shutdown,
    handles: Mutex<Vec<JoinHandle<()>>>,
}

impl Threads {
    /// No threads yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts a named thread running `body`, which should return soon after its argument is
    /// triggered (sleep with [`Shutdown::sleep`]). A thread that cannot be started is logged
    /// and skipped: background work is a convenience, never a reason to fail.
    pub fn spawn(&self, name: &str, body: impl FnOnce(Shutdown) + Send + 'static) {
        let shutdown = self.shutdown.clone();
        match std::thread::Builder::new()
            .name(name.into())
            .spawn(move || body(shutdown))
        {
            Ok(h) => {
                let mut handles = self.handles.lock();
                // Threads that ended need no join: their handles go (many short ones, one per
                // background request, must not pile up).
                handles.retain(|h| !h.is_finished());
                handles.push(h);
            }
            Err(e) => tracing::warn!("could not start thread {name}: {e}"),
        }
    }

    /// Tells every thread to stop and waits for them (a thread that stops itself, by dropping
    /// the last owner of what holds these threads, is not waited for).
    pub fn stop(&self) {
        self.shutdown.trigger();
        let handles = std::mem::take(&mut *self.handles.lock());
        let me = std::thread::current().id();
        for h in handles {
            if h.thread().id() != me && h.join().is_err() {
                tracing::warn!("a background thread panicked");
            }
        }
    }
}

impl Drop for Threads {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trigger_wakes_sleepers_and_stops_threads() {
        let threads = Threads::new();
        let ticks = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let t = Arc::clone(&ticks);
        threads.spawn("test-ticker", move |stop| {
            while !stop.sleep(Duration::from_secs(60)) {
                t.fetch_add(1, Ordering::SeqCst);
            }
        });
        let started = Instant::now();
        threads.stop();
        assert!(started.elapsed() < Duration::from_secs(30));
        assert_eq!(ticks.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn ended_threads_do_not_pile_up_and_running_ones_are_joined() {
        let threads = Threads::new();
        for _ in 0..50 {
            threads.spawn("test-short", |_| {});
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(threads.handles.lock().len() < 50);
        let done = Arc::new(AtomicBool::new(false));
        let d = Arc::clone(&done);
        threads.spawn("test-work", move |_| {
            std::thread::sleep(Duration::from_millis(50));
            d.store(true, Ordering::SeqCst);
        });
        threads.stop();
        assert!(done.load(Ordering::SeqCst), "stop waits for work under way");
    }

    #[test]
    fn waiting_on_a_triggered_signal_returns_at_once() {
        let s = Shutdown::new();
        assert!(!s.sleep(Duration::from_millis(1)));
        let other = s.clone();
        std::thread::spawn(move || other.trigger());
        s.wait_blocking();
        assert!(s.sleep(Duration::from_secs(60)));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime");
        rt.block_on(s.wait());
    }
}
