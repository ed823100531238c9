//! A guard against SIGBUS in shared-memory mappings that another process can take away.
//!
//! The `shm` device is a file under a tmpfs that clients open by path to map their allocations.
//! A client (of the same user) can truncate that file or punch holes in it; the next access
//! memcoord makes to a page past the new end, or to a punched page on a full tmpfs, is a SIGBUS,
//! which would kill the worker and everything it holds for every client. No file permission or
//! seal can prevent it for a named tmpfs file (seals exist only for memfd), so the fault itself
//! is handled, as Wayland compositors do for their clients' shm pools:
//!
//! - every `shm` mapping registers its range and file here;
//! - a SIGBUS inside a registered range maps private zero pages over the faulting page (over the
//!   whole tail when the file now ends before it), counts the fault and returns, so the access
//!   completes on memory that is not the file's;
//! - every copy in or out of the mapping reads the fault count before and after
//!   ([`Guard::begin`], [`Guard::end`]): a fault in between makes it an error, never a signal,
//!   and the mapping is repaired (the file is given its length back and mapped again over the
//!   whole range) before the next copy.
//!
//! A SIGBUS anywhere else goes to the handler that was there before (Rust's own, for stack
//! guard pages), or kills the process as it would have.
//!
//! This is the only place that touches signals; everything in it that runs in the handler is a
//! plain system call or an atomic.

use std::sync::Once;
use std::sync::atomic::{AtomicI32, AtomicU64, AtomicUsize, Ordering};

/// How many mappings can be guarded at once (a worker has one `shm` device; tests make many).
const SLOTS: usize = 256;

struct Slot {
    base: AtomicUsize,
    len: AtomicUsize,
    fd: AtomicI32,
    /// Faults handled in this mapping since it was registered.
    faults: AtomicU64,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Slot = Slot {
    base: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    fd: AtomicI32::new(-1),
    faults: AtomicU64::new(0),
};

static TABLE: [Slot; SLOTS] = [EMPTY; SLOTS];
static PAGE: AtomicUsize = AtomicUsize::new(4096);
static INSTALL: Once = Once::new();

/// The SIGBUS disposition before ours, for faults that are not ours.
struct Previous(std::cell::UnsafeCell<std::mem::MaybeUninit<libc::sigaction>>);
// SAFETY: written once inside `INSTALL` before the handler is installed, only read after.
unsafe impl Sync for Previous {}
static PREVIOUS: Previous = Previous(std::cell::UnsafeCell::new(std::mem::MaybeUninit::zeroed()));

fn install() {
    INSTALL.call_once(|| {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if page > 0 {
            PAGE.store(page as usize, Ordering::Relaxed);
        }
        // SAFETY: a zeroed sigaction is valid; `PREVIOUS` is written here only, before the
        // handler that reads it exists.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_sigbus as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&raw mut action.sa_mask);
            let previous = (*PREVIOUS.0.get()).as_mut_ptr();
            if libc::sigaction(libc::SIGBUS, &raw const action, previous) != 0 {
                tracing::warn!(
                    "could not install the SIGBUS guard for shared memory: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    });
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let addr = unsafe { (*info).si_addr() } as usize;
    let page = PAGE.load(Ordering::Relaxed);
    for slot in &TABLE {
        let base = slot.base.load(Ordering::Acquire);
        let len = slot.len.load(Ordering::Acquire);
        if base == 0 || base == usize::MAX || addr < base || addr - base >= len {
            continue;
        }
        let fault_page = addr & !(page - 1);
        let mut end = fault_page + page;
        // Past the file's end every page faults: cover the whole tail at once.
        // SAFETY: fstat writes into the stat we own; the fd may be stale, then it fails.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstat(slot.fd.load(Ordering::Acquire), &raw mut st) } == 0 {
            let file_end = base.saturating_add((st.st_size as usize).div_ceil(page) * page);
            if file_end <= fault_page {
                end = base + len;
            }
        }
        // SAFETY: the range lies inside a mapping this process owns (registered, and
        // unregistered before it is unmapped); replacing its pages with private zero pages
        // only changes what the faulting access reads or writes.
        let r = unsafe {
            libc::mmap(
                fault_page as *mut libc::c_void,
                end - fault_page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if r != libc::MAP_FAILED {
            slot.faults.fetch_add(1, Ordering::AcqRel);
            return;
        }
        break;
    }
    // Not ours: whoever handled SIGBUS before handles it, or the default action ends the
    // process as it would have without this guard.
    // SAFETY: `PREVIOUS` was filled before this handler was installed.
    unsafe {
        let previous = &*(*PREVIOUS.0.get()).as_ptr();
        let handler = previous.sa_sigaction;
        if handler != libc::SIG_DFL && handler != libc::SIG_IGN {
            if previous.sa_flags & libc::SA_SIGINFO != 0 {
                let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    std::mem::transmute(handler);
                f(sig, info, ctx);
            } else {
                let f: extern "C" fn(libc::c_int) = std::mem::transmute(handler);
                f(sig);
            }
            return;
        }
        let mut default: libc::sigaction = std::mem::zeroed();
        default.sa_sigaction = libc::SIG_DFL;
        libc::sigaction(libc::SIGBUS, &raw const default, std::ptr::null_mut());
        // Returning re-runs the faulting access, which now ends the process.
    }
}

/// One guarded mapping: registered while it lives.
pub(crate) struct Guard {
    slot: Option<&'static Slot>,
    /// Faults repaired so far.
    repaired: AtomicU64,
    repairing: parking_lot::Mutex<()>,
}

impl Guard {
    /// Guards `[base, base + len)`, a shared mapping of `fd` from offset 0. The caller keeps
    /// the mapping and the descriptor until the guard is dropped.
    pub(crate) fn register(base: usize, len: usize, fd: i32) -> Guard {
        install();
        let slot = TABLE.iter().find(|s| {
            s.base
                .compare_exchange(0, usize::MAX, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        });
        match slot {
            Some(s) => {
                s.faults.store(0, Ordering::Release);
                s.len.store(len, Ordering::Release);
                s.fd.store(fd, Ordering::Release);
                s.base.store(base, Ordering::Release);
            }
            None => tracing::warn!(
                "more than {SLOTS} shared-memory mappings: this one is not guarded against \
                 another process truncating its file"
            ),
        }
        Guard {
            slot,
            repaired: AtomicU64::new(0),
            repairing: parking_lot::Mutex::new(()),
        }
    }

    fn faults(&self) -> u64 {
        self.slot.map_or(0, |s| s.faults.load(Ordering::Acquire))
    }

    /// Starts an access: repairs the mapping first if an earlier access faulted, and returns
    /// the count to compare with at the end.
    pub(crate) fn begin(&self) -> u64 {
        let now = self.faults();
        if now != self.repaired.load(Ordering::Acquire) {
            self.repair();
        }
        self.faults()
    }

    /// Ends an access begun at `epoch`: `Err` with the number of faults if any page it may
    /// have touched was taken away meanwhile (the access read zeros or wrote to nowhere);
    /// the mapping is repaired before this returns.
    pub(crate) fn end(&self, epoch: u64) -> Result<(), u64> {
        let now = self.faults();
        if now == epoch {
            return Ok(());
        }
        self.repair();
        Err(now - epoch)
    }

    /// Gives the file its length back and maps it again over the whole range, replacing the
    /// zero pages the handler put in.
    fn repair(&self) {
        let Some(slot) = self.slot else { return };
        let _one = self.repairing.lock();
        let seen = slot.faults.load(Ordering::Acquire);
        if seen == self.repaired.load(Ordering::Acquire) {
            return;
        }
        let (base, len, fd) = (
            slot.base.load(Ordering::Acquire),
            slot.len.load(Ordering::Acquire),
            slot.fd.load(Ordering::Acquire),
        );
        // SAFETY: fstat/ftruncate on the mapping's own descriptor; the mapping is re-created
        // over exactly its own range, shared, from the same file (pages still in the file keep
        // their bytes: they are the same page-cache pages).
        unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            if libc::fstat(fd, &raw mut st) == 0 && (st.st_size as u64) < len as u64 {
                tracing::error!(
                    "the shared-memory file was truncated by another process to {} bytes; \
                     giving it back its {} bytes (what lay past the cut is lost)",
                    st.st_size,
                    len
                );
                libc::ftruncate(fd, len as libc::off_t);
            }
            let r = libc::mmap(
                base as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED,
                fd,
                0,
            );
            if r == libc::MAP_FAILED {
                tracing::error!(
                    "could not map the shared-memory file again after a fault: {}",
                    std::io::Error::last_os_error()
                );
                return;
            }
        }
        self.repaired.store(seen, Ordering::Release);
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(s) = self.slot {
            s.base.store(usize::MAX, Ordering::Release);
            s.fd.store(-1, Ordering::Release);
            s.len.store(0, Ordering::Release);
            s.base.store(0, Ordering::Release);
        }
    }
}
