//! NVIDIA GPUs as devices: VRAM arenas on the CUDA virtual memory API.
//!
//! Every unsafe driver call of the project is in this module: probing, the pinned pool and the
//! backend's side here, the GPU thread's state and its driver calls in `gpu.rs`. The driver
//! (libcuda) and NVML are loaded at run time: without them the same binary lists only host
//! devices, and [`probe`] says why. cudarc panics when libcuda is absent, so the library is looked for first and every
//! driver entry point is called inside `catch_unwind`.
//!
//! Each GPU gets one dedicated thread that owns its context (contexts are per thread) and makes
//! every driver call for it; [`CudaBackend`] sends it closures and waits for their results.
//! The arena's range is reserved with `cuMemAddressReserve`; pages (the allocation granularity,
//! 2 MiB on an H200) are backed with `cuMemCreate` + `cuMemMap` + `cuMemSetAccess`, each run
//! of pages a commit asks for by one physical allocation of up to 1 GiB (`chunks.rs` says
//! why: exports), and given back with `cuMemUnmap` + `cuMemRelease`. Physical memory is
//! created exportable as POSIX file descriptors where the driver supports it
//! ([`Backend::share`]). No managed memory. Host copies go through two
//! pinned staging buffers, so the host-side copy of one chunk overlaps the DMA of the other.

mod chunks;
mod gpu;

use super::{Backend, BackendError, CachedCapacity, Capacity, Fill, SharedPiece};
use crate::domain::{Handle, MemoryType};
use cudarc::driver::sys;
use gpu::{Gpu, Job};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc;
use std::thread::JoinHandle;

/// Bytes of each pinned staging buffer.
pub const STAGING_BYTES: usize = 64 << 20;
/// Pinned staging buffers in the ring.
pub const STAGING_SLOTS: usize = 2;

/// A GPU found by [`probe`].
#[derive(Debug, Clone)]
pub struct GpuInfo {
    /// Its ordinal (`cuda:N`).
    pub ordinal: u32,
    /// Its name.
    pub name: String,
    /// Its memory in bytes.
    pub total_memory: u64,
}

fn check(r: sys::CUresult, what: &'static str, device: &str) -> Result<(), BackendError> {
    if r == sys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(BackendError::Device {
            device: device.to_string(),
            what,
            message: format!("{r:?}"),
        })
    }
}

/// Runs driver code, turning a panic (cudarc's answer to a missing symbol) into an error.
fn contained<T>(what: &'static str, f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(_) => Err(format!(
            "{what}: the CUDA driver library panicked (missing symbol?)"
        )),
    }
}

/// Finds the GPUs, or says why there are none.
pub fn probe() -> Result<Vec<GpuInfo>, String> {
    // SAFETY: only tries to open the library.
    if !unsafe { sys::is_culib_present() } {
        return Err("no CUDA driver library (libcuda) found".into());
    }
    contained("probing GPUs", || {
        // SAFETY: plain driver calls with out-pointers to locals.
        unsafe {
            let r = sys::cuInit(0);
            if r != sys::CUresult::CUDA_SUCCESS {
                return Err(format!("cuInit failed: {r:?}"));
            }
            let mut count = 0;
            let r = sys::cuDeviceGetCount(&raw mut count);
            if r != sys::CUresult::CUDA_SUCCESS {
                return Err(format!("cuDeviceGetCount failed: {r:?}"));
            }
            let mut gpus = Vec::new();
            for ordinal in 0..count {
                let mut dev = 0;
                if sys::cuDeviceGet(&raw mut dev, ordinal) != sys::CUresult::CUDA_SUCCESS {
                    continue;
                }
                let mut name = [0 as std::ffi::c_char; 256];
                sys::cuDeviceGetName(name.as_mut_ptr(), 255, dev);
                let name = std::ffi::CStr::from_ptr(name.as_ptr())
                    .to_string_lossy()
                    .into_owned();
                let mut total = 0usize;
                sys::cuDeviceTotalMem_v2(&raw mut total, dev);
                gpus.push(GpuInfo {
                    ordinal: ordinal as u32,
                    name,
                    total_memory: total as u64,
                });
            }
            if gpus.is_empty() {
                return Err("the CUDA driver reports no GPU".into());
            }
            Ok(gpus)
        }
    })
}

/// Host ranges `(address, length)` that are page-locked (pinned pools): copies from or into
/// them go straight to the DMA engine, without staging.
static PINNED: std::sync::Mutex<Vec<(usize, usize)>> = std::sync::Mutex::new(Vec::new());

fn is_pinned(ptr: usize, len: usize) -> bool {
    PINNED
        .lock()
        .map(|p| p.iter().any(|&(a, l)| ptr >= a && ptr + len <= a + l))
        .unwrap_or(false)
}

/// Page-locked host memory (cuMemHostAlloc, portable to every context) serving `cpu`
/// allocations of type `Staging`: transfers between it and a GPU run at the link's speed.
pub struct PinnedPool {
    ptr: usize,
    len: u64,
    jobs: mpsc::Sender<Job>,
}

impl Drop for PinnedPool {
    fn drop(&mut self) {
        if let Ok(mut p) = PINNED.lock() {
            p.retain(|&(a, _)| a != self.ptr);
        }
        let ptr = self.ptr;
        // SAFETY: frees the pool allocated in `CudaBackend::pinned_pool`; nothing refers to it
        // any more (its arena is being dropped).
        let _ = self.jobs.send(Box::new(move |_| unsafe {
            sys::cuMemFreeHost(ptr as *mut _);
        }));
    }
}

impl Backend for PinnedPool {
    fn device_id(&self) -> &str {
        "cpu"
    }
    fn name(&self) -> &str {
        "Host RAM, pinned pool"
    }
    fn memory_type(&self) -> MemoryType {
        MemoryType::RAM
    }
    fn capacity(&mut self) -> Capacity {
        super::meminfo()
    }
    fn len(&self) -> u64 {
        self.len
    }
    fn page_size(&self) -> u64 {
        4096
    }
    fn commit(&mut self, _offset: u64, _len: u64) -> Result<(), BackendError> {
        Ok(()) // the whole pool is resident and locked from the start
    }
    fn release(&mut self, _offset: u64, _len: u64) {}
    fn host_slice(&self, offset: u64, len: u64) -> Option<&[u8]> {
        if offset.checked_add(len)? > self.len {
            return None;
        }
        // SAFETY: inside the pool, which lives as long as `self`; shared borrow of `self`.
        Some(unsafe {
            std::slice::from_raw_parts((self.ptr + offset as usize) as *const u8, len as usize)
        })
    }
    fn host_slice_mut(&mut self, offset: u64, len: u64) -> Option<&mut [u8]> {
        if offset.checked_add(len)? > self.len {
            return None;
        }
        // SAFETY: inside the pool, which lives as long as `self`; exclusive borrow of `self`.
        Some(unsafe {
            std::slice::from_raw_parts_mut((self.ptr + offset as usize) as *mut u8, len as usize)
        })
    }
    fn handle(&self, _offset: u64) -> Option<Handle> {
        None
    }
}

/// A GPU's VRAM as a backend. Calls are carried out on the GPU's dedicated thread.
pub struct CudaBackend {
    id: String,
    name: String,
    len: u64,
    granularity: u64,
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
    capacity: CachedCapacity,
    uuid: Option<String>,
}

impl CudaBackend {
    /// Starts GPU `ordinal`'s thread and reserves `len` bytes of its address space.
    pub fn new(ordinal: u32, name: String, len: u64) -> Result<Self, BackendError> {
        let id = format!("cuda:{ordinal}");
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let (jobs_tx, jobs_rx) = mpsc::channel::<Job>();
        let thread = std::thread::Builder::new()
            .name(format!("memcoord-{id}"))
            .spawn(move || {
                let started = catch_unwind(AssertUnwindSafe(|| Gpu::start(ordinal, len)))
                    .unwrap_or_else(|_| {
                        Err(BackendError::Device {
                            device: format!("cuda:{ordinal}"),
                            what: "starting",
                            message: "the CUDA driver library panicked".into(),
                        })
                    });
                let mut gpu = match started {
                    Ok(gpu) => {
                        let _ = ready_tx.send(Ok((gpu.len, gpu.granularity, gpu.uuid.clone())));
                        gpu
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                while let Ok(job) = jobs_rx.recv() {
                    job(&mut gpu);
                }
                gpu.shutdown();
            })
            .map_err(|e| BackendError::Os {
                device: id.clone(),
                what: "starting the GPU thread",
                source: e,
            })?;
        let (len, granularity, uuid) = ready_rx.recv().map_err(|_| BackendError::Device {
            device: id.clone(),
            what: "starting",
            message: "the GPU thread ended".into(),
        })??;
        Ok(CudaBackend {
            id,
            name,
            len,
            granularity,
            jobs: Some(jobs_tx),
            thread: Some(thread),
            capacity: CachedCapacity::new(),
            uuid,
        })
    }

    /// Runs `f` on the GPU's thread and waits for its result.
    fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Gpu) -> T + Send + 'static,
    ) -> Result<T, BackendError> {
        let gone = || BackendError::Device {
            device: self.id.clone(),
            what: "calling the GPU thread",
            message: "the GPU thread is gone".into(),
        };
        let (tx, rx) = mpsc::sync_channel(1);
        let job: Job = Box::new(move |gpu| {
            let r = catch_unwind(AssertUnwindSafe(|| f(gpu)));
            let _ = tx.send(r);
        });
        self.jobs
            .as_ref()
            .ok_or_else(gone)?
            .send(job)
            .map_err(|_| gone())?;
        match rx.recv().map_err(|_| gone())? {
            Ok(v) => Ok(v),
            Err(_) => Err(BackendError::Device {
                device: self.id.clone(),
                what: "a driver call",
                message: "panicked on the GPU thread".into(),
            }),
        }
    }
}

impl CudaBackend {
    /// Allocates a pool of `len` bytes of page-locked host memory through this GPU's context
    /// (portable: every context may DMA from it).
    pub fn pinned_pool(&self, len: u64) -> Result<PinnedPool, BackendError> {
        let id = self.id.clone();
        let ptr = self.call(move |_| {
            let mut p = std::ptr::null_mut();
            // SAFETY: allocates host memory with an out-pointer to a local.
            unsafe {
                check(
                    sys::cuMemHostAlloc(&raw mut p, len as usize, sys::CU_MEMHOSTALLOC_PORTABLE),
                    "cuMemHostAlloc (pinned pool)",
                    &id,
                )
                .map(|()| p as usize)
            }
        })??;
        if let Ok(mut p) = PINNED.lock() {
            p.push((ptr, len as usize));
        }
        let jobs = self.jobs.clone().ok_or_else(|| BackendError::Device {
            device: self.id.clone(),
            what: "pinned pool",
            message: "the GPU thread is gone".into(),
        })?;
        Ok(PinnedPool { ptr, len, jobs })
    }
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Backend for CudaBackend {
    fn device_id(&self) -> &str {
        &self.id
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn memory_type(&self) -> MemoryType {
        MemoryType::VRAM
    }
    fn capacity(&mut self) -> Capacity {
        let jobs = self.jobs.clone();
        self.capacity.get(|| {
            let (tx, rx) = mpsc::sync_channel(1);
            let job: Job = Box::new(move |g| {
                let _ = tx.send(g.capacity());
            });
            jobs.and_then(|j| j.send(job).ok())
                .and_then(|()| rx.recv().ok())
                .unwrap_or(Capacity {
                    total: 0,
                    free: 0,
                    used: None,
                })
        })
    }
    fn len(&self) -> u64 {
        self.len
    }
    fn page_size(&self) -> u64 {
        self.granularity
    }
    fn min_alignment(&self) -> u64 {
        256
    }
    fn commit(&mut self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.call(move |g| g.commit(offset, len))?
    }
    fn release(&mut self, offset: u64, len: u64) {
        let _ = self.call(move |g| g.release(offset, len));
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        let (ptr, len) = (buf.as_mut_ptr() as usize, buf.len());
        // The pointer crosses to the GPU thread as an integer; `call` waits for the job, so
        // `buf` outlives every use of it.
        self.call(move |g| g.read(offset, ptr as *mut u8, len))?
    }
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), BackendError> {
        let (ptr, len) = (data.as_ptr() as usize, data.len());
        // As in `read`: `data` outlives the job.
        self.call(move |g| g.write(offset, ptr as *const u8, len))?
    }
    fn write_with(&mut self, offset: u64, len: u64, fill: Fill<'_>) -> Result<(), BackendError> {
        // SAFETY: only the lifetime is widened. `call` returns once the job has run (or was
        // dropped unrun), so the GPU thread never uses `fill` after this function returns.
        let fill: Fill<'static> = unsafe { std::mem::transmute::<Fill<'_>, Fill<'static>>(fill) };
        self.call(move |g| g.write_with(offset, len as usize, fill))?
    }
    fn copy_within(&mut self, src: u64, dst: u64, len: u64) -> Result<(), BackendError> {
        // Queued without waiting: the GPU thread carries jobs out in order, and `sync` waits.
        let job: Job = Box::new(move |g| {
            if g.queued_error.is_none()
                && let Err(e) = g.copy_within(src, dst, len)
            {
                g.queued_error = Some(e);
            }
        });
        self.jobs
            .as_ref()
            .and_then(|j| j.send(job).ok())
            .ok_or_else(|| BackendError::Device {
                device: self.id.clone(),
                what: "calling the GPU thread",
                message: "the GPU thread is gone".into(),
            })
    }
    fn sync(&mut self) -> Result<(), BackendError> {
        self.call(gpu::Gpu::sync)?
    }
    fn defragment_pass_bytes(&self) -> u64 {
        // Device-to-device copies run at about 4 TB/s (read + write) on an H200: 8 GiB is ~4 ms.
        8 << 30
    }
    fn handle(&self, _offset: u64) -> Option<Handle> {
        None
    }
    fn share(&self, offset: u64, len: u64) -> Result<Option<Vec<SharedPiece>>, BackendError> {
        self.call(move |g| g.share(offset, len))?
    }
    fn device_uuid(&self) -> Option<String> {
        self.uuid.clone()
    }
}
