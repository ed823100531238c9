//! Backends: where the bytes of a device's arena come from (host RAM, a shared-memory file,
//! NVIDIA VRAM). Each backend maps one contiguous range of address space, backs pages of it on
//! request and gives them back; the arena above decides which pages.
//!
//! This is the only layer that calls the operating system's memory APIs.

pub mod cuda;
pub mod fdpass;
pub(crate) mod files;
mod host;
mod sigbus;
mod sysinfo;

pub use host::{CpuBackend, DEFAULT_SHM_MODE, ShmBackend, has_hole, remove_stale_shm_files};
pub use sysinfo::{
    MemoryLimit, cgroup_memory_limit, cgroup_memory_limit_in, meminfo, tmpfs_capacity,
};

use crate::domain::{Handle, MemoryType};

/// Ends this process at once with SIGKILL, as a crash would: no destructor, no clean-up, no
/// answer. For crash tests only (`MEMCOORD_TEST_FAILPOINT`).
pub fn kill_this_process() {
    // SAFETY: raising a signal in our own process has no preconditions.
    unsafe { libc::raise(libc::SIGKILL) };
}

/// What went wrong in a backend.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The device failed a copy or a driver call.
    #[error("{device}: {what} failed: {message}")]
    Device {
        /// The device.
        device: String,
        /// What was being done.
        what: &'static str,
        /// The driver's words.
        message: String,
    },
    /// The operating system refused to map or back memory.
    #[error("{device}: {what}: {source}")]
    Os {
        /// The device.
        device: String,
        /// What was being done.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The source of a [`Backend::write_with`] could not give its bytes (a file that shrank
    /// while it was read, say); nothing is wrong with the device.
    #[error("reading the source failed: {0}")]
    Source(std::io::Error),
}

/// The source of the bytes of a [`Backend::write_with`]: `fill(at, buf)` fills `buf` with the
/// source's bytes `[at, at + buf.len())`, `at` counted from the start of the write. It may be
/// called from several threads at once, for disjoint parts.
pub type Fill<'a> = &'a (dyn Fn(u64, &mut [u8]) -> std::io::Result<()> + Sync);

/// The part of a [`Backend::write_with`] one thread fills: one thread's `pread` out of the page
/// cache is slower than the memory (or the DMA) it feeds.
const FILL_PART: usize = 4 << 20;

/// Bytes of the bounce buffer of the default [`Backend::write_with`], for memory the CPU cannot
/// address.
const BOUNCE_BYTES: u64 = 64 << 20;

/// Fills `dst` with the source's bytes from `at`, in parts of [`FILL_PART`] over rayon's
/// threads.
pub(crate) fn fill_parallel(dst: &mut [u8], at: u64, fill: Fill<'_>) -> std::io::Result<()> {
    use rayon::prelude::*;
    if dst.len() <= FILL_PART {
        return fill(at, dst);
    }
    dst.par_chunks_mut(FILL_PART)
        .enumerate()
        .try_for_each(|(k, part)| fill(at + (k * FILL_PART) as u64, part))
}

pub(crate) fn not_addressable(device: &str, what: &'static str) -> BackendError {
    BackendError::Device {
        device: device.to_string(),
        what,
        message: "the range is outside the mapping or not host memory".into(),
    }
}

/// Backs pages of a backend's range from any thread, without `&mut` access to the backend, so
/// the engine need not be held while a large allocation's pages are faulted in.
pub trait Committer: Send + Sync {
    /// Backs the pages of `[offset, offset + len)`.
    fn commit(&self, offset: u64, len: u64) -> Result<(), BackendError>;
}

/// A device's capacity as the device itself reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    /// Total bytes (RAM: MemTotal; tmpfs: its size).
    pub total: u64,
    /// Bytes free for anyone on the device now.
    pub free: u64,
    /// Bytes in use as the device reports them (NVML for GPUs); `None`: total − free.
    pub used: Option<u64>,
}

impl Capacity {
    /// Bytes in use on the device, by every process.
    pub fn used(&self) -> u64 {
        self.used.unwrap_or(self.total.saturating_sub(self.free))
    }
}

/// How long a capacity reading is reused: reading /proc/meminfo or asking the driver costs
/// more than an allocation.
const CAPACITY_TTL: std::time::Duration = std::time::Duration::from_millis(100);

/// Milliseconds of CLOCK_MONOTONIC_COARSE: a few nanoseconds to read where `Instant::now`
/// costs tens (it is read on every allocation to decide whether a capacity reading is stale).
pub fn coarse_millis() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &raw mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

/// A capacity reading reused for [`CAPACITY_TTL`].
pub(crate) struct CachedCapacity {
    value: Capacity,
    /// When it was read (coarse milliseconds); `None` before the first reading.
    at: Option<u64>,
}

impl CachedCapacity {
    pub(crate) fn new() -> Self {
        CachedCapacity {
            value: Capacity {
                total: 0,
                free: 0,
                used: None,
            },
            at: None,
        }
    }

    pub(crate) fn get(&mut self, read: impl FnOnce() -> Capacity) -> Capacity {
        let now = coarse_millis();
        if self
            .at
            .is_none_or(|t| now.saturating_sub(t) > CAPACITY_TTL.as_millis() as u64)
        {
            self.value = read();
            self.at = Some(now);
        }
        self.value
    }
}

/// One device's memory: a mapped range of `len()` bytes whose pages are backed on demand.
///
/// Offsets and lengths passed to `commit` and `release` are multiples of `page_size()`;
/// `read`, `write` and `copy_within` take any in-bounds range.
pub trait Backend: Send {
    /// The device id (`cpu`, `shm`, `cuda:0`).
    fn device_id(&self) -> &str;
    /// A name for people.
    fn name(&self) -> &str;
    /// The kind of memory.
    fn memory_type(&self) -> MemoryType;
    /// The device's capacity now (may be cached for a short while).
    fn capacity(&mut self) -> Capacity;
    /// The mapped length in bytes.
    fn len(&self) -> u64;
    /// Whether the mapping is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The backing granularity in bytes.
    fn page_size(&self) -> u64;
    /// The default alignment of an allocation (at least 64).
    fn min_alignment(&self) -> u64 {
        64
    }
    /// Backs the pages of `[offset, offset + len)` with real memory.
    fn commit(&mut self, offset: u64, len: u64) -> Result<(), BackendError>;
    /// Gives the pages of `[offset, offset + len)` back to the system; their contents are lost.
    fn release(&mut self, offset: u64, len: u64);
    /// The bytes of `[offset, offset + len)` as host memory, for memory the CPU addresses
    /// directly (lets a transfer copy straight from or into it). Host backends implement this
    /// pair and get `read`, `write` and `copy_within` from it.
    fn host_slice(&self, _offset: u64, _len: u64) -> Option<&[u8]> {
        None
    }
    /// The same, mutably.
    fn host_slice_mut(&mut self, _offset: u64, _len: u64) -> Option<&mut [u8]> {
        None
    }
    /// Copies bytes out of the mapping.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        let src = self
            .host_slice(offset, buf.len() as u64)
            .ok_or_else(|| not_addressable(self.device_id(), "read"))?;
        let token = self.begin_access();
        buf.copy_from_slice(src);
        self.end_access(token)
    }
    /// Copies bytes into the mapping.
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), BackendError> {
        let id = self.device_id().to_string();
        let token = self.begin_access();
        let dst = self
            .host_slice_mut(offset, data.len() as u64)
            .ok_or_else(|| not_addressable(&id, "write"))?;
        dst.copy_from_slice(data);
        self.end_access(token)
    }
    /// Writes `len` bytes at `offset`, taken from `fill` ([`Fill`]) straight into the device's
    /// memory where the CPU addresses it (a file is read into the mapping with no copy in
    /// between), else through a bounce buffer. A failure of `fill` is
    /// [`BackendError::Source`]; the range then holds some of the bytes.
    fn write_with(&mut self, offset: u64, len: u64, fill: Fill<'_>) -> Result<(), BackendError> {
        let token = self.begin_access();
        if let Some(dst) = self.host_slice_mut(offset, len) {
            let filled = fill_parallel(dst, 0, fill).map_err(BackendError::Source);
            return filled.and(self.end_access(token));
        }
        let mut buf = vec![0u8; len.min(BOUNCE_BYTES) as usize];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(BOUNCE_BYTES) as usize;
            fill_parallel(&mut buf[..n], done, fill).map_err(BackendError::Source)?;
            self.write(offset + done, &buf[..n])?;
            done += n as u64;
        }
        Ok(())
    }
    /// Moves `len` bytes from `src` to `dst` inside the mapping (ranges may overlap). A
    /// backend may only queue the move; moves are carried out in order, and [`Backend::sync`]
    /// waits for them (and reports a failure of any).
    fn copy_within(&mut self, src: u64, dst: u64, len: u64) -> Result<(), BackendError> {
        let lo = src.min(dst);
        let id = self.device_id().to_string();
        let token = self.begin_access();
        let span = self
            .host_slice_mut(lo, src.max(dst) + len - lo)
            .ok_or_else(|| not_addressable(&id, "copy"))?;
        let s = (src - lo) as usize;
        span.copy_within(s..s + len as usize, (dst - lo) as usize);
        self.end_access(token)
    }
    /// How many bytes one defragmentation pass may move here: a pass holds the engine, so it
    /// should last a few milliseconds at the device's copy speed.
    fn defragment_pass_bytes(&self) -> u64 {
        64 << 20
    }
    /// Waits for queued moves.
    fn sync(&mut self) -> Result<(), BackendError> {
        Ok(())
    }
    /// A [`Committer`] for this backend, where committing pages needs no exclusive access.
    fn committer(&self) -> Option<std::sync::Arc<dyn Committer>> {
        None
    }
    /// Where another process maps the bytes at `offset`, for shareable memory.
    fn handle(&self, offset: u64) -> Option<Handle>;
    /// The file holding this device's memory, for memory another process may map through a
    /// descriptor (an export's claim passes it); offsets in it are the backend's offsets.
    fn shared_file(&self) -> Option<std::sync::Arc<std::fs::File>> {
        None
    }
    /// For memory kept in a file that outlives the worker (a state directory's `shm`
    /// file): whether the file stays when the backend goes. Nothing for other backends.
    fn keep_file(&mut self, _keep: bool) {}
    /// Starts a copy that reads or writes this backend's memory through
    /// [`Backend::host_slice`] or [`Backend::host_slice_mut`]; pass what it returns to
    /// [`Backend::end_access`] when the copy is done. Memory that another process can take
    /// away (an `shm` file truncated through its path) is guarded: see [`Backend::end_access`].
    fn begin_access(&self) -> u64 {
        0
    }
    /// Ends a copy begun with [`Backend::begin_access`]: an error if memory it touched was
    /// taken away by another process meanwhile (the copy then read zeros or wrote nowhere),
    /// never a signal.
    fn end_access(&self, _token: u64) -> Result<(), BackendError> {
        Ok(())
    }
}
