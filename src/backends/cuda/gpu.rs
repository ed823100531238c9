//! A GPU's own thread: the state it owns (context, reserved range, backed granules, staging
//! buffers, stream) and every driver call made on it. `CudaBackend` sends it jobs.

use super::{STAGING_BYTES, STAGING_SLOTS, check, is_pinned};
use crate::backends::{BackendError, Capacity, Fill};
use cudarc::driver::sys;

/// Host-side copies into or out of staging are split in parts of this size over rayon's
/// threads (one thread's memcpy is slower than the DMA it feeds).
const COPY_PART: usize = 4 << 20;

/// State owned by a GPU's thread.
pub(super) struct Gpu {
    id: String,
    ordinal: u32,
    base: sys::CUdeviceptr,
    pub(super) len: u64,
    pub(super) granularity: u64,
    /// One physical allocation per backed granule (0 = none).
    handles: Vec<sys::CUmemGenericAllocationHandle>,
    staging: [*mut u8; STAGING_SLOTS],
    stream: sys::CUstream,
    events: [sys::CUevent; STAGING_SLOTS],
    /// Device scratch for overlapping device-to-device moves.
    scratch: sys::CUdeviceptr,
    nvml: Option<nvml_wrapper::Nvml>,
    /// The first failure of a queued move, reported by the next `sync`.
    pub(super) queued_error: Option<BackendError>,
}

// SAFETY: the raw pointers and handles are only used on the GPU's own thread; the struct moves
// there once, at start.
unsafe impl Send for Gpu {}

pub(super) type Job = Box<dyn FnOnce(&mut Gpu) + Send>;

impl Gpu {
    fn prop(&self) -> sys::CUmemAllocationProp {
        // SAFETY: a plain C struct; zero is a valid "unset" for every field.
        let mut prop: sys::CUmemAllocationProp = unsafe { std::mem::zeroed() };
        prop.type_ = sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED;
        prop.location.type_ = sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE;
        prop.location.id = self.ordinal as i32;
        prop
    }

    pub(super) fn start(ordinal: u32, len: u64) -> Result<Gpu, BackendError> {
        let id = format!("cuda:{ordinal}");
        let err = |what: &'static str, message: String| BackendError::Device {
            device: id.clone(),
            what,
            message,
        };
        let nvml = nvml_wrapper::Nvml::init().ok();
        // SAFETY: driver calls with out-pointers to locals; the context is made current on
        // this (the GPU's) thread before anything else.
        unsafe {
            let mut dev = 0;
            check(
                sys::cuDeviceGet(&raw mut dev, ordinal as i32),
                "cuDeviceGet",
                &id,
            )?;
            let mut ctx = std::ptr::null_mut();
            check(
                sys::cuDevicePrimaryCtxRetain(&raw mut ctx, dev),
                "cuDevicePrimaryCtxRetain",
                &id,
            )?;
            check(sys::cuCtxSetCurrent(ctx), "cuCtxSetCurrent", &id)?;
            let mut gpu = Gpu {
                id: id.clone(),
                ordinal,
                base: 0,
                len: 0,
                granularity: 0,
                handles: Vec::new(),
                staging: [std::ptr::null_mut(); STAGING_SLOTS],
                stream: std::ptr::null_mut(),
                events: [std::ptr::null_mut(); STAGING_SLOTS],
                scratch: 0,
                nvml,
                queued_error: None,
            };
            let prop = gpu.prop();
            let mut g = 0usize;
            check(
                sys::cuMemGetAllocationGranularity(
                    &raw mut g,
                    &raw const prop,
                    sys::CUmemAllocationGranularity_flags::CU_MEM_ALLOC_GRANULARITY_RECOMMENDED,
                ),
                "cuMemGetAllocationGranularity",
                &id,
            )?;
            let g = (g as u64).max(1);
            let len = len.div_ceil(g) * g;
            let mut base = 0;
            check(
                sys::cuMemAddressReserve(&raw mut base, len as usize, g as usize, 0, 0),
                "cuMemAddressReserve",
                &id,
            )?;
            gpu.base = base;
            gpu.len = len;
            gpu.granularity = g;
            gpu.handles = vec![0; (len / g) as usize];
            for slot in 0..STAGING_SLOTS {
                let mut p = std::ptr::null_mut();
                check(
                    sys::cuMemHostAlloc(&raw mut p, STAGING_BYTES, 0),
                    "cuMemHostAlloc",
                    &id,
                )
                .map_err(|e| err("allocating pinned staging", e.to_string()))?;
                gpu.staging[slot] = p.cast::<u8>();
                check(
                    sys::cuEventCreate(&raw mut gpu.events[slot], 0),
                    "cuEventCreate",
                    &id,
                )?;
            }
            check(
                sys::cuStreamCreate(&raw mut gpu.stream, 0),
                "cuStreamCreate",
                &id,
            )?;
            check(
                sys::cuMemAlloc_v2(&raw mut gpu.scratch, STAGING_BYTES),
                "cuMemAlloc",
                &id,
            )?;
            Ok(gpu)
        }
    }

    pub(super) fn capacity(&self) -> Capacity {
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: out-pointers to locals; the context is current on this thread.
        unsafe { sys::cuMemGetInfo_v2(&raw mut free, &raw mut total) };
        let used = self
            .nvml
            .as_ref()
            .and_then(|n| n.device_by_index(self.ordinal).ok())
            .and_then(|d| d.memory_info().ok())
            .map(|m| m.used);
        let total_nvml = self
            .nvml
            .as_ref()
            .and_then(|n| n.device_by_index(self.ordinal).ok())
            .and_then(|d| d.memory_info().ok())
            .map(|m| m.total);
        Capacity {
            total: total_nvml.unwrap_or(total as u64),
            free: free as u64,
            used,
        }
    }

    pub(super) fn commit(&mut self, offset: u64, len: u64) -> Result<(), BackendError> {
        let g = self.granularity;
        let prop = self.prop();
        let mut mapped = Vec::new();
        let mut result = Ok(());
        for granule in offset / g..(offset + len).div_ceil(g) {
            if self.handles[granule as usize] != 0 {
                continue;
            }
            let mut h = 0;
            // SAFETY: maps one granule of our own reserved range to fresh physical memory.
            let r = unsafe {
                check(
                    sys::cuMemCreate(&raw mut h, g as usize, &raw const prop, 0),
                    "cuMemCreate",
                    &self.id,
                )
                .and_then(|()| {
                    let r = check(
                        sys::cuMemMap(self.base + granule * g, g as usize, 0, h, 0),
                        "cuMemMap",
                        &self.id,
                    );
                    if r.is_err() {
                        sys::cuMemRelease(h);
                    }
                    r
                })
            };
            match r {
                Ok(()) => {
                    self.handles[granule as usize] = h;
                    mapped.push(granule);
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        if result.is_ok() && !mapped.is_empty() {
            // SAFETY: a plain C struct filled in.
            let mut desc: sys::CUmemAccessDesc = unsafe { std::mem::zeroed() };
            desc.location.type_ = sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE;
            desc.location.id = self.ordinal as i32;
            desc.flags = sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
            // Access is granted per contiguous run of newly mapped granules.
            let mut i = 0;
            while i < mapped.len() && result.is_ok() {
                let mut j = i;
                while j + 1 < mapped.len() && mapped[j + 1] == mapped[j] + 1 {
                    j += 1;
                }
                let start = self.base + mapped[i] * g;
                let bytes = (mapped[j] - mapped[i] + 1) * g;
                // SAFETY: the range was just mapped.
                result = unsafe {
                    check(
                        sys::cuMemSetAccess(start, bytes as usize, &raw const desc, 1),
                        "cuMemSetAccess",
                        &self.id,
                    )
                };
                i = j + 1;
            }
        }
        if result.is_err() {
            for granule in mapped {
                self.release_granule(granule);
            }
        }
        result
    }

    fn release_granule(&mut self, granule: u64) {
        let h = std::mem::take(&mut self.handles[granule as usize]);
        if h != 0 {
            let g = self.granularity;
            // SAFETY: unmaps and frees a granule we mapped.
            unsafe {
                sys::cuMemUnmap(self.base + granule * g, g as usize);
                sys::cuMemRelease(h);
            }
        }
    }

    pub(super) fn release(&mut self, offset: u64, len: u64) {
        let g = self.granularity;
        for granule in offset / g..(offset + len).div_ceil(g) {
            self.release_granule(granule);
        }
    }

    fn dtoh_async(&mut self, slot: usize, offset: u64, n: usize) -> Result<(), BackendError> {
        // SAFETY: the staging slot is ours and free (its previous chunk was consumed).
        unsafe {
            check(
                sys::cuMemcpyDtoHAsync_v2(
                    self.staging[slot].cast(),
                    self.base + offset,
                    n,
                    self.stream,
                ),
                "cuMemcpyDtoHAsync",
                &self.id,
            )?;
            check(
                sys::cuEventRecord(self.events[slot], self.stream),
                "cuEventRecord",
                &self.id,
            )
        }
    }

    /// Device to host through the staging ring: DMAs run up to [`STAGING_SLOTS`] chunks ahead
    /// of the host copies out of staging.
    pub(super) fn read(
        &mut self,
        offset: u64,
        dst: *mut u8,
        len: usize,
    ) -> Result<(), BackendError> {
        if is_pinned(dst as usize, len) {
            // SAFETY: page-locked destination valid for `len` (the caller's, outliving this call).
            return unsafe {
                check(
                    sys::cuMemcpyDtoHAsync_v2(dst.cast(), self.base + offset, len, self.stream),
                    "cuMemcpyDtoHAsync",
                    &self.id,
                )
                .and_then(|()| {
                    check(
                        sys::cuStreamSynchronize(self.stream),
                        "cuStreamSynchronize",
                        &self.id,
                    )
                })
            };
        }
        let chunks: Vec<(usize, usize)> = (0..len.div_ceil(STAGING_BYTES))
            .map(|k| {
                (
                    k * STAGING_BYTES,
                    STAGING_BYTES.min(len - k * STAGING_BYTES),
                )
            })
            .collect();
        for (k, &(at, n)) in chunks.iter().enumerate().take(STAGING_SLOTS) {
            self.dtoh_async(k, offset + at as u64, n)?;
        }
        for (k, &(at, n)) in chunks.iter().enumerate() {
            let slot = k % STAGING_SLOTS;
            // SAFETY: waits for the chunk's DMA, then copies it out of staging into the
            // caller's buffer, which outlives this call.
            unsafe {
                check(
                    sys::cuEventSynchronize(self.events[slot]),
                    "cuEventSynchronize",
                    &self.id,
                )?;
                parallel_copy(self.staging[slot], dst.add(at), n);
            }
            if let Some(&(next_at, next_n)) = chunks.get(k + STAGING_SLOTS) {
                self.dtoh_async(slot, offset + next_at as u64, next_n)?;
            }
        }
        Ok(())
    }

    /// Host to device through the staging ring: the host copy of a chunk overlaps the DMAs of
    /// the chunks before it.
    pub(super) fn write(
        &mut self,
        offset: u64,
        src: *const u8,
        len: usize,
    ) -> Result<(), BackendError> {
        if is_pinned(src as usize, len) {
            // SAFETY: page-locked source valid for `len` (the caller's, outliving this call).
            return unsafe {
                check(
                    sys::cuMemcpyHtoDAsync_v2(self.base + offset, src.cast(), len, self.stream),
                    "cuMemcpyHtoDAsync",
                    &self.id,
                )
                .and_then(|()| {
                    check(
                        sys::cuStreamSynchronize(self.stream),
                        "cuStreamSynchronize",
                        &self.id,
                    )
                })
            };
        }
        self.staged_htod(offset, len, |done, slot| {
            // SAFETY: the caller's `src` is valid for `len` bytes and outlives this call;
            // `[done, done + slot.len())` lies inside it, and the slot is ours to write.
            unsafe { parallel_copy(src.add(done), slot.as_mut_ptr(), slot.len()) };
            Ok(())
        })
    }

    /// Host to device from `fill`, through the staging ring: each chunk is filled straight
    /// into pinned staging (a file is read there by `pread`, with no pageable copy on the way)
    /// while the DMA of the chunk before it runs. On any failure the stream is drained before
    /// returning, so no DMA still reads a staging slot the next call refills.
    pub(super) fn write_with(
        &mut self,
        offset: u64,
        len: usize,
        fill: Fill<'_>,
    ) -> Result<(), BackendError> {
        self.staged_htod(offset, len, |done, slot| {
            crate::backends::fill_parallel(slot, done as u64, fill).map_err(BackendError::Source)
        })
    }

    /// Host to device through the staging ring, one slot of at most [`STAGING_BYTES`] at a
    /// time: `fill_slot(done, slot)` puts the bytes from `done` into the pinned slot while the
    /// DMA of the slot before runs. On any failure the stream is drained before returning, so
    /// no DMA still reads a slot the next call refills.
    fn staged_htod(
        &mut self,
        offset: u64,
        len: usize,
        mut fill_slot: impl FnMut(usize, &mut [u8]) -> Result<(), BackendError>,
    ) -> Result<(), BackendError> {
        let mut done = 0usize;
        let mut i = 0usize;
        let mut result = Ok(());
        while done < len && result.is_ok() {
            let n = STAGING_BYTES.min(len - done);
            let slot = i % STAGING_SLOTS;
            if i >= STAGING_SLOTS {
                // SAFETY: waits for the DMA that last read this slot.
                result = unsafe {
                    check(
                        sys::cuEventSynchronize(self.events[slot]),
                        "cuEventSynchronize",
                        &self.id,
                    )
                };
                if result.is_err() {
                    break;
                }
            }
            // SAFETY: the slot is STAGING_BYTES (>= n) of pinned memory owned by this thread,
            // and no DMA reads it any more (its last one was waited for above, or it has not
            // been used by this call and every call drains the stream before returning).
            let staging = unsafe { std::slice::from_raw_parts_mut(self.staging[slot], n) };
            if let Err(e) = fill_slot(done, staging) {
                result = Err(e);
                break;
            }
            // SAFETY: copies the filled slot into our own mapped range; the event marks when
            // the slot may be refilled.
            result = unsafe {
                check(
                    sys::cuMemcpyHtoDAsync_v2(
                        self.base + offset + done as u64,
                        self.staging[slot] as *const _,
                        n,
                        self.stream,
                    ),
                    "cuMemcpyHtoDAsync",
                    &self.id,
                )
                .and_then(|()| {
                    check(
                        sys::cuEventRecord(self.events[slot], self.stream),
                        "cuEventRecord",
                        &self.id,
                    )
                })
            };
            done += n;
            i += 1;
        }
        // SAFETY: waits for the copies queued above.
        let drained = unsafe {
            check(
                sys::cuStreamSynchronize(self.stream),
                "cuStreamSynchronize",
                &self.id,
            )
        };
        result.and(drained)
    }

    pub(super) fn copy_within(&mut self, src: u64, dst: u64, len: u64) -> Result<(), BackendError> {
        let (s, d) = (self.base + src, self.base + dst);
        // SAFETY: copies inside our own mapped range (the arena only moves live, backed bytes).
        unsafe {
            if src.abs_diff(dst) >= len {
                check(
                    sys::cuMemcpyDtoDAsync_v2(d, s, len as usize, self.stream),
                    "cuMemcpyDtoD",
                    &self.id,
                )?;
            } else {
                // Overlapping: through device scratch, in the order that never overwrites bytes
                // not yet copied.
                let step = STAGING_BYTES as u64;
                let chunks: Vec<u64> = (0..len.div_ceil(step)).map(|k| k * step).collect();
                let order: Box<dyn Iterator<Item = &u64>> = if dst < src {
                    Box::new(chunks.iter())
                } else {
                    Box::new(chunks.iter().rev())
                };
                for &at in order {
                    let n = step.min(len - at) as usize;
                    check(
                        sys::cuMemcpyDtoDAsync_v2(self.scratch, s + at, n, self.stream),
                        "cuMemcpyDtoD",
                        &self.id,
                    )?;
                    check(
                        sys::cuMemcpyDtoDAsync_v2(d + at, self.scratch, n, self.stream),
                        "cuMemcpyDtoD",
                        &self.id,
                    )?;
                }
            }
        }
        Ok(())
    }

    pub(super) fn sync(&mut self) -> Result<(), BackendError> {
        let queued = self.queued_error.take();
        // SAFETY: waits for the stream.
        let r = unsafe {
            check(
                sys::cuStreamSynchronize(self.stream),
                "cuStreamSynchronize",
                &self.id,
            )
        };
        match queued {
            Some(e) => Err(e),
            None => r,
        }
    }

    pub(super) fn shutdown(&mut self) {
        for granule in 0..self.handles.len() as u64 {
            self.release_granule(granule);
        }
        // SAFETY: frees what `start` made; nothing uses it afterwards.
        unsafe {
            if self.base != 0 {
                sys::cuMemAddressFree(self.base, self.len as usize);
            }
            for slot in 0..STAGING_SLOTS {
                if !self.staging[slot].is_null() {
                    sys::cuMemFreeHost(self.staging[slot].cast());
                }
                if !self.events[slot].is_null() {
                    sys::cuEventDestroy_v2(self.events[slot]);
                }
            }
            if self.scratch != 0 {
                sys::cuMemFree_v2(self.scratch);
            }
            if !self.stream.is_null() {
                sys::cuStreamDestroy_v2(self.stream);
            }
        }
    }
}

/// memcpy split over rayon's threads.
///
/// # Safety
/// `src` and `dst` are valid for `len` bytes and do not overlap.
unsafe fn parallel_copy(src: *const u8, dst: *mut u8, len: usize) {
    use rayon::prelude::*;
    let (s, d) = (src as usize, dst as usize);
    (0..len.div_ceil(COPY_PART)).into_par_iter().for_each(|k| {
        let at = k * COPY_PART;
        let n = COPY_PART.min(len - at);
        // SAFETY: disjoint parts of the caller's valid, non-overlapping ranges.
        unsafe { std::ptr::copy_nonoverlapping((s + at) as *const u8, (d + at) as *mut u8, n) }
    });
}
