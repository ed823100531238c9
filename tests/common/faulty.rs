//! One test backend that misbehaves on demand, shared by every test that needs a device to fail
//! (commits, copies, writes past a byte count), to be slow (each write), or to be memory the CPU
//! does not address (no host slices, as a GPU). Host memory underneath, so bytes are real.

use memcoord::backends::{Backend, BackendError, Capacity, CpuBackend};
use memcoord::domain::{Handle, MemoryType};
use parking_lot::Mutex;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Duration;

/// What the backend does wrong, changed by the test while it runs.
pub struct Faults {
    /// Page commits fail.
    pub fail_commit: AtomicBool,
    /// Reads, writes and moves fail.
    pub fail_copy: AtomicBool,
    /// Writes fail once this many bytes were written (`u64::MAX`: never).
    pub fail_after_bytes: AtomicU64,
    /// Each write first sleeps this long (milliseconds).
    pub write_delay_ms: AtomicU64,
    /// Told when a write starts.
    pub write_started: Mutex<Option<mpsc::Sender<()>>>,
    written: AtomicU64,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            fail_commit: AtomicBool::new(false),
            fail_copy: AtomicBool::new(false),
            fail_after_bytes: AtomicU64::new(u64::MAX),
            write_delay_ms: AtomicU64::new(0),
            write_started: Mutex::new(None),
            written: AtomicU64::new(0),
        }
    }
}

pub struct FaultyBackend {
    inner: CpuBackend,
    id: &'static str,
    /// No host slices: copies go through `read` and `write`, as for a GPU.
    opaque: bool,
    faults: Arc<Faults>,
}

impl FaultyBackend {
    /// A device `id` of `len` bytes of host memory, and the switches of its faults.
    pub fn new(id: &'static str, len: u64) -> (FaultyBackend, Arc<Faults>) {
        let faults = Arc::new(Faults::default());
        (
            FaultyBackend {
                inner: CpuBackend::new(len).unwrap(),
                id,
                opaque: false,
                faults: Arc::clone(&faults),
            },
            faults,
        )
    }

    /// The same, but the CPU does not address it (no host slices; reported as VRAM).
    pub fn opaque(id: &'static str, len: u64) -> (FaultyBackend, Arc<Faults>) {
        let (mut b, faults) = FaultyBackend::new(id, len);
        b.opaque = true;
        (b, faults)
    }

    fn injected(&self, what: &str) -> BackendError {
        BackendError::Os {
            device: self.id.into(),
            what: "injected failure",
            source: std::io::Error::other(what.to_string()),
        }
    }
}

impl Backend for FaultyBackend {
    fn device_id(&self) -> &str {
        self.id
    }
    fn name(&self) -> &str {
        "a test device that fails on demand"
    }
    fn memory_type(&self) -> MemoryType {
        if self.opaque {
            MemoryType::VRAM
        } else {
            MemoryType::RAM
        }
    }
    fn capacity(&mut self) -> Capacity {
        self.inner.capacity()
    }
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn page_size(&self) -> u64 {
        self.inner.page_size()
    }
    fn commit(&mut self, offset: u64, len: u64) -> Result<(), BackendError> {
        if self.faults.fail_commit.load(Ordering::Relaxed) {
            return Err(self.injected("commit"));
        }
        self.inner.commit(offset, len)
    }
    fn release(&mut self, offset: u64, len: u64) {
        self.inner.release(offset, len);
    }
    fn host_slice(&self, offset: u64, len: u64) -> Option<&[u8]> {
        if self.opaque {
            return None;
        }
        self.inner.host_slice(offset, len)
    }
    fn host_slice_mut(&mut self, offset: u64, len: u64) -> Option<&mut [u8]> {
        if self.opaque {
            return None;
        }
        self.inner.host_slice_mut(offset, len)
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        if self.faults.fail_copy.load(Ordering::Relaxed) {
            return Err(self.injected("read"));
        }
        self.inner.read(offset, buf)
    }
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), BackendError> {
        if let Some(started) = self.faults.write_started.lock().as_ref() {
            let _ = started.send(());
        }
        let delay = self.faults.write_delay_ms.load(Ordering::Relaxed);
        if delay > 0 {
            std::thread::sleep(Duration::from_millis(delay));
        }
        let written = self.faults.written.load(Ordering::Relaxed);
        if self.faults.fail_copy.load(Ordering::Relaxed)
            || written + data.len() as u64 > self.faults.fail_after_bytes.load(Ordering::Relaxed)
        {
            return Err(self.injected("write"));
        }
        self.faults
            .written
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        self.inner.write(offset, data)
    }
    fn copy_within(&mut self, src: u64, dst: u64, len: u64) -> Result<(), BackendError> {
        if self.faults.fail_copy.load(Ordering::Relaxed) {
            return Err(self.injected("copy"));
        }
        self.inner.copy_within(src, dst, len)
    }
    fn handle(&self, _offset: u64) -> Option<Handle> {
        None
    }
}
