//! A GPU's own thread: the state it owns (context, reserved range, backed granules, staging
//! buffers, stream) and every driver call made on it. `CudaBackend` sends it jobs.

use super::chunks::{Chunk, Chunks, MAX_CHUNK_BYTES, Piece};
use super::{STAGING_BYTES, STAGING_SLOTS, check, is_pinned};
use crate::backends::{BackendError, Capacity, Fill, SharedPiece};
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
    /// The physical allocations backing the granules (see `chunks.rs`).
    chunks: Chunks,
    /// Whether physical memory is made exportable (the driver supports POSIX file-descriptor
    /// handles on this GPU).
    pub(super) exportable: bool,
    /// The GPU's UUID as NVML writes it (`GPU-…`).
    pub(super) uuid: Option<String>,
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
        if self.exportable {
            prop.requestedHandleTypes =
                sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
        }
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
                chunks: Chunks::new(0, 1),
                exportable: false,
                uuid: None,
                staging: [std::ptr::null_mut(); STAGING_SLOTS],
                stream: std::ptr::null_mut(),
                events: [std::ptr::null_mut(); STAGING_SLOTS],
                scratch: 0,
                nvml,
                queued_error: None,
            };
            let mut posix_fd = 0;
            let supported = sys::cuDeviceGetAttribute(
                &raw mut posix_fd,
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED,
                dev,
            );
            gpu.exportable = supported == sys::CUresult::CUDA_SUCCESS && posix_fd == 1;
            let mut uuid: sys::CUuuid = std::mem::zeroed();
            if sys::cuDeviceGetUuid_v2(&raw mut uuid, dev) == sys::CUresult::CUDA_SUCCESS {
                gpu.uuid = Some(format_uuid(&uuid.bytes));
            }
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
            gpu.chunks = Chunks::new(len / g, (MAX_CHUNK_BYTES / g).max(1));
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

    /// Backs granules of `[offset, offset + len)`: each run of unbacked ones with one physical
    /// allocation of up to `MAX_CHUNK_BYTES` (see `chunks.rs` for why), mapped whole and made
    /// readable and writable. On failure nothing new stays backed.
    pub(super) fn commit(&mut self, offset: u64, len: u64) -> Result<(), BackendError> {
        let g = self.granularity;
        let (base, ordinal, prop) = (self.base, self.ordinal, self.prop());
        let id = self.id.clone();
        self.chunks.commit(
            offset / g,
            (offset + len).div_ceil(g),
            |first, count| create_chunk(&id, base + first * g, count * g, &prop, ordinal),
            |chunk| destroy_chunk(base, g, chunk),
        )
    }

    /// Gives back granules of `[offset, offset + len)`; a physical allocation goes back to the
    /// driver with its last granule in use.
    pub(super) fn release(&mut self, offset: u64, len: u64) {
        let g = self.granularity;
        let base = self.base;
        self.chunks
            .release(offset / g, (offset + len).div_ceil(g), |chunk| {
                destroy_chunk(base, g, chunk);
            });
    }

    /// Descriptors for another process to map `[offset, offset + len)`: one per physical
    /// allocation under the range, each whole (its place in the arena, and `file_offset` 0),
    /// so the pieces may reach past the range. Whole, because the driver maps a physical
    /// allocation only from its start: `cuMemMap` at a non-zero offset into one is
    /// `CUDA_ERROR_NOT_SUPPORTED` (H200, driver 580). `Ok(None)` where the driver cannot export.
    pub(super) fn share(
        &self,
        offset: u64,
        len: u64,
    ) -> Result<Option<Vec<SharedPiece>>, BackendError> {
        if !self.exportable {
            return Ok(None);
        }
        let g = self.granularity;
        let mut pieces: Vec<Piece> = self
            .chunks
            .pieces(offset / g, (offset + len).div_ceil(g))
            .ok_or_else(|| BackendError::Device {
                device: self.id.clone(),
                what: "exporting",
                message: "part of the range is not backed".into(),
            })?;
        pieces.dedup_by_key(|p| p.chunk.first);
        let mut out = Vec::with_capacity(pieces.len());
        for p in pieces {
            let mut fd: std::ffi::c_int = -1;
            // SAFETY: exports a physical allocation this thread made with POSIX
            // file-descriptor handles requested; the driver writes an int into `fd`.
            unsafe {
                check(
                    sys::cuMemExportToShareableHandle(
                        (&raw mut fd).cast(),
                        p.chunk.handle,
                        sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
                        0,
                    ),
                    "cuMemExportToShareableHandle",
                    &self.id,
                )?;
            }
            // SAFETY: the driver handed us a new descriptor that nothing else owns.
            let file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
            out.push(SharedPiece {
                offset: p.chunk.first * g,
                len: p.chunk.count * g,
                file: std::sync::Arc::new(file),
                file_offset: 0,
            });
        }
        Ok(Some(out))
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
        let (base, g) = (self.base, self.granularity);
        self.chunks.drain(|chunk| destroy_chunk(base, g, chunk));
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

/// `GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, as NVML and `nvidia-smi -L` write a UUID.
fn format_uuid(bytes: &[std::ffi::c_char; 16]) -> String {
    let hex: String = bytes.iter().map(|&b| format!("{:02x}", b as u8)).collect();
    format!(
        "GPU-{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// Makes one physical allocation of `bytes`, maps it whole at `at` and makes it readable and
/// writable from the GPU; on failure undoes what it did. Returns its handle.
fn create_chunk(
    device: &str,
    at: sys::CUdeviceptr,
    bytes: u64,
    prop: &sys::CUmemAllocationProp,
    ordinal: u32,
) -> Result<u64, BackendError> {
    let mut h: sys::CUmemGenericAllocationHandle = 0;
    // SAFETY: creates physical memory and maps it into our own reserved range, which `at`
    // and `bytes` lie in (whole granules, not mapped now: the caller's bookkeeping says so).
    unsafe {
        check(
            sys::cuMemCreate(&raw mut h, bytes as usize, prop, 0),
            "cuMemCreate",
            device,
        )?;
        if let Err(e) = check(
            sys::cuMemMap(at, bytes as usize, 0, h, 0),
            "cuMemMap",
            device,
        ) {
            sys::cuMemRelease(h);
            return Err(e);
        }
        let mut desc: sys::CUmemAccessDesc = std::mem::zeroed();
        desc.location.type_ = sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE;
        desc.location.id = ordinal as i32;
        desc.flags = sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
        if let Err(e) = check(
            sys::cuMemSetAccess(at, bytes as usize, &raw const desc, 1),
            "cuMemSetAccess",
            device,
        ) {
            sys::cuMemUnmap(at, bytes as usize);
            sys::cuMemRelease(h);
            return Err(e);
        }
    }
    Ok(h)
}

/// Unmaps a chunk and releases its physical memory (freed once no other process holds it).
fn destroy_chunk(base: sys::CUdeviceptr, g: u64, chunk: &Chunk) {
    // SAFETY: unmaps exactly the mapping `create_chunk` made and releases its handle.
    unsafe {
        sys::cuMemUnmap(base + chunk.first * g, (chunk.count * g) as usize);
        sys::cuMemRelease(chunk.handle);
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
