//! An arena: one device's mapped range, carved up by an out-of-band sub-allocator, with pages
//! backed only while live allocations touch them.
//!
//! All bookkeeping lives here, outside the managed memory (GPU memory cannot hold CPU headers).
//! Page accounting is O(1) per allocate and free: a page inside an allocation belongs to it
//! alone, so only the first and last page of each allocation need a reference count.

use crate::backends::{Backend, BackendError};
use offset_allocator::{Allocation, Allocator};
use rustc_hash::FxHashMap;

/// The most live allocations one arena tracks (the sub-allocator preallocates its nodes).
pub const MAX_LIVE_ALLOCATIONS: u32 = 512 * 1024;

/// Why an arena could not place an allocation.
#[derive(Debug, thiserror::Error)]
pub enum ArenaError {
    /// No free range is large enough (or the allocation table is full).
    #[error("no free range large enough")]
    NoSpace,
    /// The backend could not back the pages.
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// Where an allocation sits in its arena.
#[derive(Clone, Copy)]
pub struct Placement {
    /// Byte offset of the allocation's first byte (aligned as asked).
    pub offset: u64,
    /// Bytes of the allocation.
    pub size: u64,
    block: Allocation,
    block_start: u64,
    block_len: u64,
}

impl std::fmt::Debug for Placement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Placement")
            .field("offset", &self.offset)
            .field("size", &self.size)
            .field("block_start", &self.block_start)
            .field("block_len", &self.block_len)
            .finish()
    }
}

/// One device's memory and its sub-allocator.
pub struct Arena {
    backend: Box<dyn Backend>,
    sub: Allocator,
    /// Sub-allocator unit in bytes (a power of two; the sub-allocator counts in u32 units).
    unit: u64,
    page: u64,
    /// Reference counts of pages that are the first or last page of some live allocation.
    boundary_refs: FxHashMap<u64, u32>,
    backed_bytes: u64,
}

impl Arena {
    /// The smallest unit, and the default alignment of host devices.
    pub const MIN_UNIT: u64 = 64;

    /// An arena over the whole of `backend`'s range.
    pub fn new(backend: Box<dyn Backend>) -> Self {
        let len = backend.len();
        // Units must number fewer than 2^32.
        let mut unit = Self::MIN_UNIT;
        while len / unit >= u32::MAX as u64 {
            unit *= 2;
        }
        let units = (len / unit) as u32;
        let page = backend.page_size();
        Arena {
            backend,
            sub: Allocator::with_max_allocs(units, MAX_LIVE_ALLOCATIONS),
            unit,
            page,
            boundary_refs: FxHashMap::default(),
            backed_bytes: 0,
        }
    }

    /// The backend.
    pub fn backend(&self) -> &dyn Backend {
        self.backend.as_ref()
    }

    /// The backend, mutably.
    pub fn backend_mut(&mut self) -> &mut dyn Backend {
        self.backend.as_mut()
    }

    /// The alignment used when a request asks for 0.
    pub fn default_alignment(&self) -> u64 {
        self.unit
    }

    /// Bytes of pages backed now.
    pub fn backed_bytes(&self) -> u64 {
        self.backed_bytes
    }

    /// Places `size` bytes at a multiple of `alignment` (0 = default) and backs their pages.
    pub fn allocate(&mut self, size: u64, alignment: u64) -> Result<Placement, ArenaError> {
        let align = alignment.max(self.unit);
        let units = size.div_ceil(self.unit) + (align / self.unit - 1);
        let units = u32::try_from(units).map_err(|_| ArenaError::NoSpace)?;
        let block = self.sub.allocate(units).ok_or(ArenaError::NoSpace)?;
        let block_start = block.offset as u64 * self.unit;
        let block_len = units as u64 * self.unit;
        let offset = block_start.next_multiple_of(align);
        let placement = Placement {
            offset,
            size,
            block,
            block_start,
            block_len,
        };
        if let Some((start, len)) = self.acquire_pages(block_start, block_len)
            && let Err(e) = self.backend.commit(start, len)
        {
            self.release_pages(block_start, block_len, false);
            self.sub.free(block);
            return Err(e.into());
        }
        Ok(placement)
    }

    /// Frees a placement and gives back the pages no other allocation touches.
    pub fn free(&mut self, placement: &Placement) {
        self.sub.free(placement.block);
        self.release_pages(placement.block_start, placement.block_len, true);
    }

    /// Counts the pages of `[start, start + len)` as used; returns the range that was backed by
    /// nothing before (to commit), if any.
    fn acquire_pages(&mut self, start: u64, len: u64) -> Option<(u64, u64)> {
        let first = start / self.page;
        let last = (start + len - 1) / self.page;
        let mut new_first = first;
        let mut new_last = last;
        if self.add_ref(first) > 1 {
            new_first += 1;
        }
        if last != first && self.add_ref(last) > 1 {
            new_last -= 1;
        }
        if new_first > new_last || (first == last && new_first != first) {
            return None;
        }
        let bytes = (new_last - new_first + 1) * self.page;
        self.backed_bytes += bytes;
        Some((new_first * self.page, bytes))
    }

    /// Uncounts the pages of `[start, start + len)`; gives back those left untouched.
    fn release_pages(&mut self, start: u64, len: u64, give_back: bool) {
        let first = start / self.page;
        let last = (start + len - 1) / self.page;
        let mut free_first = first;
        let mut free_last = last;
        if self.drop_ref(first) > 0 {
            free_first += 1;
        }
        if last != first && self.drop_ref(last) > 0 {
            free_last = free_last.saturating_sub(1);
        }
        if free_first > free_last || (first == last && free_first != first) {
            return;
        }
        let bytes = (free_last - free_first + 1) * self.page;
        self.backed_bytes -= bytes;
        if give_back {
            self.backend.release(free_first * self.page, bytes);
        }
    }

    fn add_ref(&mut self, page: u64) -> u32 {
        let r = self.boundary_refs.entry(page).or_insert(0);
        *r += 1;
        *r
    }

    fn drop_ref(&mut self, page: u64) -> u32 {
        match self.boundary_refs.get_mut(&page) {
            Some(r) if *r > 1 => {
                *r -= 1;
                *r
            }
            _ => {
                self.boundary_refs.remove(&page);
                0
            }
        }
    }

    /// The largest allocation (default alignment) that the sub-allocator could place now.
    pub fn largest_free_block(&self) -> u64 {
        self.sub.storage_report().largest_free_region as u64 * self.unit
    }

    /// Free bytes in the arena, in whatever pieces.
    pub fn free_bytes(&self) -> u64 {
        self.sub.storage_report().total_free_space as u64 * self.unit
    }

    /// The number of free ranges in the arena.
    pub fn free_regions(&self) -> u64 {
        self.sub
            .storage_report_full()
            .free_regions
            .iter()
            .map(|r| r.count as u64)
            .sum()
    }

    /// Copies bytes of an allocation out, from `offset` within it.
    pub fn read(&self, p: &Placement, offset: u64, buf: &mut [u8]) {
        self.backend.read(p.offset + offset, buf);
    }

    /// Copies bytes into an allocation, from `offset` within it.
    pub fn write(&mut self, p: &Placement, offset: u64, data: &[u8]) {
        self.backend.write(p.offset + offset, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backends::CpuBackend;

    fn arena(len: u64) -> Arena {
        Arena::new(Box::new(CpuBackend::new(len).unwrap()))
    }

    #[test]
    fn backs_only_touched_pages_and_gives_them_back() {
        let mut a = arena(1 << 20);
        let x = a.allocate(100, 0).unwrap();
        assert_eq!(a.backed_bytes(), 4096);
        let y = a.allocate(100, 0).unwrap();
        assert_eq!(a.backed_bytes(), 4096, "same page");
        let big = a.allocate(3 * 4096, 0).unwrap();
        assert_eq!(a.backed_bytes(), 4 * 4096);
        a.free(&x);
        assert_eq!(a.backed_bytes(), 4 * 4096, "y still on page 0");
        a.free(&y);
        a.free(&big);
        assert_eq!(a.backed_bytes(), 0);
        assert_eq!(a.free_bytes(), 1 << 20);
    }

    #[test]
    fn honours_alignment_and_keeps_bytes() {
        let mut a = arena(1 << 22);
        let _pad = a.allocate(64, 0).unwrap();
        let p = a.allocate(1000, 65536).unwrap();
        assert_eq!(p.offset % 65536, 0);
        let data: Vec<u8> = (0..1000).map(|i| (i % 251) as u8).collect();
        a.write(&p, 0, &data);
        let mut back = vec![0; 1000];
        a.read(&p, 0, &mut back);
        assert_eq!(back, data);
    }

    #[test]
    fn reports_no_space() {
        let mut a = arena(1 << 16);
        let _x = a.allocate(1 << 16, 0).unwrap();
        assert!(matches!(a.allocate(1, 0), Err(ArenaError::NoSpace)));
    }
}
