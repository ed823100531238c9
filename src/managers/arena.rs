//! An arena: one device's mapped range, carved up by an out-of-band sub-allocator ([`Tlsf`]),
//! with pages backed only while live allocations need them.
//!
//! All bookkeeping lives here, outside the managed memory (GPU memory cannot hold CPU headers).
//! Page accounting is O(1) per allocate and free: a page inside an allocation belongs to it
//! alone, so only the first and last page of each allocation need a reference count. A bitmap
//! records which pages are backed. Pages that stop being used stay backed as a cache while the
//! arena holds no more than its working set's high-water mark (see `cache_limit`), so that a
//! free followed by an allocate does not pay a page fault or a driver call; beyond that they go
//! back to the system at once, and [`Arena::trim`] gives back the whole cache.

use super::tlsf::{Block, Tlsf};
use crate::backends::{Backend, BackendError};

/// Why an arena could not place an allocation.
#[derive(Debug, thiserror::Error)]
pub enum ArenaError {
    /// No free range is large enough.
    #[error("no free range large enough")]
    NoSpace,
    /// The backend could not back the pages.
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// Where an allocation sits in its arena (16 bytes: it is kept for every live allocation).
#[derive(Clone, Copy, Debug)]
pub struct Placement {
    block: Block,
    align_log2: u8,
    unit_log2: u8,
}

impl Placement {
    /// Byte offset of the allocation's first byte (aligned as asked).
    pub fn offset(&self) -> u64 {
        u64::from(self.block.offset) << self.unit_log2
    }

    /// Bytes of the block holding the allocation (its size rounded up to whole units).
    pub fn block_bytes(&self) -> u64 {
        u64::from(self.block.size) << self.unit_log2
    }

    /// Alignment of `offset`, in bytes.
    pub fn alignment(&self) -> u64 {
        1 << self.align_log2
    }
}

/// Reference counts of pages that are the first or last page of some live allocation, in
/// chunks allocated on first use (a device's pages can number in the millions).
struct PageRefs {
    chunks: Vec<Option<Box<[u16]>>>,
}

const PAGE_REF_CHUNK: u64 = 4096;

impl PageRefs {
    fn new(pages: u64) -> Self {
        PageRefs {
            chunks: (0..pages.div_ceil(PAGE_REF_CHUNK)).map(|_| None).collect(),
        }
    }

    fn slot(&mut self, page: u64) -> &mut u16 {
        let chunk = self.chunks[(page / PAGE_REF_CHUNK) as usize]
            .get_or_insert_with(|| vec![0u16; PAGE_REF_CHUNK as usize].into_boxed_slice());
        &mut chunk[(page % PAGE_REF_CHUNK) as usize]
    }

    /// Adds a reference; returns the new count.
    fn add(&mut self, page: u64) -> u32 {
        let r = self.slot(page);
        *r += 1;
        u32::from(*r)
    }

    /// Drops a reference; returns the new count.
    fn drop_ref(&mut self, page: u64) -> u32 {
        let r = self.slot(page);
        *r = r.saturating_sub(1);
        u32::from(*r)
    }

    fn clear(&mut self) {
        self.chunks.iter_mut().for_each(|c| *c = None);
    }

    /// The current count (no chunk is made to read it).
    fn count(&self, page: u64) -> u32 {
        self.chunks
            .get((page / PAGE_REF_CHUNK) as usize)
            .and_then(|c| c.as_ref())
            .map_or(0, |c| u32::from(c[(page % PAGE_REF_CHUNK) as usize]))
    }

    fn heap_bytes(&self) -> usize {
        self.chunks.capacity() * 8
            + self.chunks.iter().flatten().count() * PAGE_REF_CHUNK as usize * 2
    }
}

/// What a compaction pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Compaction {
    /// Allocations moved.
    pub moved_count: u64,
    /// Their bytes.
    pub moved_bytes: u64,
    /// Movable allocations left in place because the pass's byte budget ran out.
    pub deferred_count: u64,
    /// Bytes of pages given back to the system afterwards.
    pub released_bytes: u64,
}

/// One device's memory and its sub-allocator.
pub struct Arena {
    backend: Box<dyn Backend>,
    tlsf: Tlsf,
    /// Sub-allocator unit in bytes (a power of two; the sub-allocator counts in u32 units).
    unit: u64,
    page: u64,
    /// Reference counts of pages that are the first or last page of some live allocation.
    boundary_refs: PageRefs,
    /// One bit per page: backed now.
    backed: Vec<u64>,
    backed_bytes: u64,
    /// Bytes of pages spanned by live allocations.
    in_use_bytes: u64,
    /// The most `in_use_bytes` has been since the last trim.
    peak_in_use_bytes: u64,
}

impl Arena {
    /// The smallest unit, and the default alignment of host devices.
    pub const MIN_UNIT: u64 = 64;

    /// An arena over the whole of `backend`'s range.
    pub fn new(backend: Box<dyn Backend>) -> Self {
        let len = backend.len();
        // Units must number fewer than 2^32.
        let mut unit = backend
            .min_alignment()
            .max(Self::MIN_UNIT)
            .next_power_of_two();
        while len / unit >= u64::from(u32::MAX) {
            unit *= 2;
        }
        let units = (len / unit) as u32;
        let page = backend.page_size();
        let pages = len.div_ceil(page);
        assert!(
            pages < u64::from(u32::MAX),
            "an arena holds fewer than 2^32 pages"
        );
        Arena {
            backend,
            tlsf: Tlsf::new(units),
            unit,
            page,
            boundary_refs: PageRefs::new(pages),
            backed: vec![0; pages.div_ceil(64) as usize],
            backed_bytes: 0,
            in_use_bytes: 0,
            peak_in_use_bytes: 0,
        }
    }

    /// The backend.
    pub fn backend(&self) -> &dyn Backend {
        self.backend.as_ref()
    }

    /// Something that backs this arena's pages without `&mut` access, if the backend has it.
    pub fn committer(&self) -> Option<std::sync::Arc<dyn crate::backends::Committer>> {
        self.backend.committer()
    }

    /// The backend, mutably.
    pub fn backend_mut(&mut self) -> &mut dyn Backend {
        self.backend.as_mut()
    }

    /// The alignment used when a request asks for 0.
    pub fn default_alignment(&self) -> u64 {
        self.unit
    }

    /// Bytes of pages backed now (`reserved_bytes`).
    pub fn backed_bytes(&self) -> u64 {
        self.backed_bytes
    }

    /// Bytes of pages backed but used by no live allocation (the cache).
    pub fn cached_bytes(&self) -> u64 {
        self.backed_bytes - self.in_use_bytes
    }

    /// Freed pages stay backed while the arena holds no more than the most it has ever had in
    /// use (at least 16 pages): a workload that cycles through the same working set (denoising
    /// steps) then reuses backed pages instead of faulting them in again, and `reserved` never
    /// exceeds the working set's high-water mark. [`Arena::trim`] gives the cache back.
    fn cache_limit(&self) -> u64 {
        (self.peak_in_use_bytes - self.in_use_bytes).max(16 * self.page)
    }

    /// Places `size` bytes at a multiple of `alignment` (0 = default) and backs their pages. If
    /// the system refuses the pages while this arena caches some, the cache goes back first and
    /// the allocation is tried once more.
    pub fn allocate(&mut self, size: u64, alignment: u64) -> Result<Placement, ArenaError> {
        match self.try_allocate(size, alignment) {
            Err(ArenaError::Backend(e)) if self.cached_bytes() > 0 => {
                tracing::debug!("{e}; giving back cached pages and retrying");
                self.trim();
                self.try_allocate(size, alignment)
            }
            r => r,
        }
    }

    /// Finds room for `size` bytes at a multiple of `alignment` (0 = default); no pages yet.
    fn place_block(&mut self, size: u64, alignment: u64) -> Result<Placement, ArenaError> {
        let align = alignment.max(self.unit);
        let units = u32::try_from(size.div_ceil(self.unit)).map_err(|_| ArenaError::NoSpace)?;
        let align_units = u32::try_from(align / self.unit).map_err(|_| ArenaError::NoSpace)?;
        let block = self
            .tlsf
            .allocate_aligned(units, align_units)
            .ok_or(ArenaError::NoSpace)?;
        Ok(Placement {
            block,
            align_log2: align.trailing_zeros() as u8,
            unit_log2: self.unit.trailing_zeros() as u8,
        })
    }

    fn try_allocate(&mut self, size: u64, alignment: u64) -> Result<Placement, ArenaError> {
        let placement = self.place_block(size, alignment)?;
        let block = placement.block;
        let (start, len) = self.block_range(&block);
        if let Some((first, last)) = self.acquire_pages(start, len)
            && let Err(e) = self.back(first, last)
        {
            self.release_pages(start, len);
            self.tlsf.free(block);
            return Err(e.into());
        }
        Ok(placement)
    }

    /// Places allocations of `sizes` bytes (each non-zero, at the default alignment) back to
    /// back in one free range and backs all their pages with one call to the backend per run
    /// of unbacked pages. A model's tensors go in this way: on a GPU, one commit of the whole
    /// run lets the backend hold it in a few large physical allocations, so an export of the
    /// model is a few segments rather than one per page (see `backends::cuda`). If the system
    /// refuses the pages while this arena caches some, the cache goes back first and the group
    /// is tried once more. On failure nothing stays placed.
    pub fn allocate_group(&mut self, sizes: &[u64]) -> Result<Vec<Placement>, ArenaError> {
        match self.try_allocate_group(sizes) {
            Err(ArenaError::Backend(e)) if self.cached_bytes() > 0 => {
                tracing::debug!("{e}; giving back cached pages and retrying");
                self.trim();
                self.try_allocate_group(sizes)
            }
            r => r,
        }
    }

    fn try_allocate_group(&mut self, sizes: &[u64]) -> Result<Vec<Placement>, ArenaError> {
        let units: Vec<u32> = sizes
            .iter()
            .map(|&s| u32::try_from(s.div_ceil(self.unit)).ok().filter(|&u| u > 0))
            .collect::<Option<_>>()
            .ok_or(ArenaError::NoSpace)?;
        let total: u64 = units.iter().map(|&u| u64::from(u)).sum();
        if units.is_empty() {
            return Ok(Vec::new());
        }
        let whole = self.place_block(total * self.unit, 0)?;
        let blocks = self.tlsf.split(whole.block, &units);
        let placements: Vec<Placement> = blocks
            .into_iter()
            .map(|block| Placement { block, ..whole })
            .collect();
        let mut span: Option<(u64, u64)> = None;
        for p in &placements {
            let (start, len) = self.block_range(&p.block);
            if let Some((first, last)) = self.acquire_pages(start, len) {
                span = Some(span.map_or((first, last), |(a, _)| (a, last)));
            }
        }
        if let Some((first, last)) = span
            && let Err(e) = self.back(first, last)
        {
            for p in &placements {
                let (start, len) = self.block_range(&p.block);
                self.release_pages(start, len);
                self.tlsf.free(p.block);
            }
            return Err(e.into());
        }
        Ok(placements)
    }

    /// Places `size` bytes like [`Arena::allocate`] but does not back the new pages: they are
    /// counted as backed and returned as byte ranges for the caller to commit through the
    /// backend's [`Committer`](crate::backends::Committer) without holding the engine. If that
    /// fails, [`Arena::abandon`] undoes it.
    pub fn allocate_deferred(
        &mut self,
        size: u64,
        alignment: u64,
    ) -> Result<(Placement, Vec<(u64, u64)>), ArenaError> {
        let placement = self.place_block(size, alignment)?;
        let block = placement.block;
        let (start, len) = self.block_range(&block);
        let mut runs = Vec::new();
        if let Some((first, last)) = self.acquire_pages(start, len) {
            // The block's end pages are the only ones a neighbour placed meanwhile can share,
            // and a neighbour trusts the backed bit: it writes at once. Were an end page only
            // marked backed here and faulted in later by another thread, that neighbour would
            // write to a page nothing backs (on a full tmpfs: SIGBUS). So the end pages are
            // backed now, under the engine; only the interior, this allocation's alone while it
            // lives, is left to the caller.
            let mut synced = self.back(first, first);
            if synced.is_ok() && last != first {
                synced = self.back(last, last);
            }
            if let Err(e) = synced {
                // The pages backed before the failure stay as cache; nothing else changed.
                self.release_pages(start, len);
                self.tlsf.free(block);
                return Err(e.into());
            }
            let interior = if last > first + 1 {
                self.runs(first + 1, last - 1, false)
            } else {
                Vec::new()
            };
            for (a, b) in interior {
                for p in a..=b {
                    self.set_backed(p, true);
                }
                self.backed_bytes += (b - a + 1) * self.page;
                runs.push((a * self.page, (b - a + 1) * self.page));
            }
        }
        Ok((placement, runs))
    }

    /// Undoes [`Arena::allocate_deferred`] whose commit failed: frees the placement and gives
    /// back the pages of `runs` that no other allocation has come to share meanwhile.
    pub fn abandon(&mut self, placement: &Placement, runs: &[(u64, u64)]) {
        self.free(placement);
        for &(offset, len) in runs {
            let mut first = offset / self.page;
            let mut last = (offset + len) / self.page - 1;
            // Only the ends of a run can be shared (they may be another allocation's boundary).
            if self.boundary_refs.count(first) > 0 {
                first += 1;
            }
            if last >= first && self.boundary_refs.count(last) > 0 {
                last = last.saturating_sub(1);
            }
            if last >= first {
                self.unback(first, last);
            }
        }
    }

    /// Frees a placement; pages no other allocation touches are cached or given back.
    pub fn free(&mut self, placement: &Placement) {
        let (start, len) = self.block_range(&placement.block);
        self.tlsf.free(placement.block);
        if let Some((first, last)) = self.release_pages(start, len)
            && self.cached_bytes() > self.cache_limit()
        {
            self.unback(first, last);
        }
    }

    fn block_range(&self, block: &Block) -> (u64, u64) {
        (
            u64::from(block.offset) * self.unit,
            u64::from(block.size) * self.unit,
        )
    }

    /// Counts the pages of `[start, start + len)` as used; returns the pages (first, last) that
    /// no live allocation used before, if any.
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
        self.in_use_bytes += (new_last - new_first + 1) * self.page;
        self.peak_in_use_bytes = self.peak_in_use_bytes.max(self.in_use_bytes);
        Some((new_first, new_last))
    }

    /// Uncounts the pages of `[start, start + len)`; returns the pages no live allocation uses
    /// any more, if any.
    fn release_pages(&mut self, start: u64, len: u64) -> Option<(u64, u64)> {
        let first = start / self.page;
        let last = (start + len - 1) / self.page;
        let mut free_first = first;
        let mut free_last = last;
        if self.drop_ref(first) > 0 {
            free_first += 1;
        }
        if last != first && self.drop_ref(last) > 0 {
            free_last -= 1;
        }
        if free_first > free_last || (first == last && free_first != first) {
            return None;
        }
        self.in_use_bytes -= (free_last - free_first + 1) * self.page;
        Some((free_first, free_last))
    }

    fn add_ref(&mut self, page: u64) -> u32 {
        self.boundary_refs.add(page)
    }

    fn drop_ref(&mut self, page: u64) -> u32 {
        self.boundary_refs.drop_ref(page)
    }

    fn is_backed(&self, page: u64) -> bool {
        self.backed[(page / 64) as usize] & (1 << (page % 64)) != 0
    }

    fn set_backed(&mut self, page: u64, on: bool) {
        let w = &mut self.backed[(page / 64) as usize];
        if on {
            *w |= 1 << (page % 64);
        } else {
            *w &= !(1 << (page % 64));
        }
    }

    /// Runs `[a, b]` of pages in `[first, last]` whose backed bit equals `state`.
    fn runs(&self, first: u64, last: u64, state: bool) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut p = first;
        while p <= last {
            // Skip whole words quickly.
            let word = self.backed[(p / 64) as usize];
            if p.is_multiple_of(64) && p + 63 <= last && word == if state { 0 } else { u64::MAX } {
                p += 64;
                continue;
            }
            if self.is_backed(p) == state {
                let a = p;
                while p <= last && self.is_backed(p) == state {
                    p += 1;
                }
                out.push((a, p - 1));
            } else {
                p += 1;
            }
        }
        out
    }

    /// Backs every unbacked page of `[first, last]`.
    fn back(&mut self, first: u64, last: u64) -> Result<(), BackendError> {
        for (a, b) in self.runs(first, last, false) {
            self.backend
                .commit(a * self.page, (b - a + 1) * self.page)?;
            for p in a..=b {
                self.set_backed(p, true);
            }
            self.backed_bytes += (b - a + 1) * self.page;
        }
        Ok(())
    }

    /// Gives back every backed page of `[first, last]`; returns the bytes given back.
    fn unback(&mut self, first: u64, last: u64) -> u64 {
        let mut released = 0;
        for (a, b) in self.runs(first, last, true) {
            let bytes = (b - a + 1) * self.page;
            self.backend.release(a * self.page, bytes);
            for p in a..=b {
                self.set_backed(p, false);
            }
            released += bytes;
        }
        self.backed_bytes -= released;
        released
    }

    /// Gives back every backed page that no live allocation touches (the cache), and starts
    /// the high-water mark again from what is in use. Returns the bytes given back.
    pub fn trim(&mut self) -> u64 {
        self.peak_in_use_bytes = self.in_use_bytes;
        self.trim_to(0)
    }

    /// Gives back cached pages, highest addresses first, until at most `keep` bytes stay
    /// cached. Returns the bytes given back.
    fn trim_to(&mut self, keep: u64) -> u64 {
        let mut released = 0;
        for (offset, size) in self.tlsf.free_ranges().into_iter().rev() {
            if self.cached_bytes() <= keep {
                break;
            }
            let start = u64::from(offset) * self.unit;
            let end = start + u64::from(size) * self.unit;
            let first = start.div_ceil(self.page);
            let end_page = end / self.page;
            if end_page <= first {
                continue;
            }
            for (a, b) in self.runs(first, end_page - 1, true).into_iter().rev() {
                let excess = self.cached_bytes().saturating_sub(keep);
                if excess == 0 {
                    break;
                }
                let pages = excess.div_ceil(self.page).min(b - a + 1);
                released += self.unback(b + 1 - pages, b);
            }
        }
        released
    }

    /// The largest allocation (default alignment) that could be placed now.
    pub fn largest_free_block(&self) -> u64 {
        u64::from(self.tlsf.largest_free()) * self.unit
    }

    /// Free bytes in the arena, in whatever pieces.
    pub fn free_bytes(&self) -> u64 {
        self.tlsf.free_units() * self.unit
    }

    /// The number of free ranges in the arena.
    pub fn free_regions(&self) -> u64 {
        self.tlsf.free_blocks()
    }

    /// Bytes of sub-allocator and page bookkeeping.
    pub fn metadata_bytes(&self) -> usize {
        self.tlsf.metadata_bytes() + self.backed.capacity() * 8 + self.boundary_refs.heap_bytes()
    }

    /// Copies bytes of an allocation out, from `offset` within it.
    pub fn read(&self, p: &Placement, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        self.backend.read(p.offset() + offset, buf)
    }

    /// Copies bytes into an allocation, from `offset` within it.
    pub fn write(&mut self, p: &Placement, offset: u64, data: &[u8]) -> Result<(), BackendError> {
        self.backend.write(p.offset() + offset, data)
    }

    /// Writes `len` bytes into an allocation, from `offset` within it, taken from `fill`
    /// ([`Backend::write_with`]).
    pub fn write_with(
        &mut self,
        p: &Placement,
        offset: u64,
        len: u64,
        fill: crate::backends::Fill<'_>,
    ) -> Result<(), BackendError> {
        self.backend.write_with(p.offset() + offset, len, fill)
    }

    /// Takes over allocations an earlier process left in this (fresh) arena's memory: places
    /// them at their byte offsets, marks their pages backed, and gives back every other page
    /// (what the earlier process held for anything else). `ranges` are (offset, size,
    /// alignment) in bytes; they must be unit-aligned, inside the arena and not overlap.
    pub fn adopt(&mut self, ranges: &[(u64, u64, u64)]) -> Result<Vec<Placement>, String> {
        if self.in_use_bytes > 0 || self.tlsf.free_units() != u64::from(self.tlsf.capacity()) {
            return Err("the arena is not empty".into());
        }
        let mut order: Vec<usize> = (0..ranges.len()).collect();
        order.sort_by_key(|&i| ranges[i].0);
        let mut layout = Vec::with_capacity(ranges.len());
        let mut end = 0u64;
        for &i in &order {
            let (offset, size, alignment) = ranges[i];
            if !offset.is_multiple_of(self.unit) || offset < end || size == 0 {
                return Err(format!(
                    "allocation at offset {offset} overlaps or is misaligned"
                ));
            }
            let units = size.div_ceil(self.unit);
            end = offset + units * self.unit;
            if end > u64::from(self.tlsf.capacity()) * self.unit {
                return Err(format!(
                    "allocation at offset {offset} ({size} bytes) lies beyond the arena"
                ));
            }
            let _ = alignment;
            layout.push(((offset / self.unit) as u32, units as u32));
        }
        let blocks = self.tlsf.rebuild(&layout);
        let mut placements = vec![None; ranges.len()];
        for (&i, block) in order.iter().zip(blocks) {
            let align = ranges[i].2.max(self.unit);
            let p = Placement {
                block,
                align_log2: align.trailing_zeros() as u8,
                unit_log2: self.unit.trailing_zeros() as u8,
            };
            let (start, len) = self.block_range(&p.block);
            let (first, last) = (start / self.page, (start + len - 1) / self.page);
            // The pages hold the adopted bytes already: mark them, never touch them (a commit
            // may write to fault pages in).
            for (a, b) in self.runs(first, last, false) {
                for p in a..=b {
                    self.set_backed(p, true);
                }
                self.backed_bytes += (b - a + 1) * self.page;
            }
            self.acquire_pages(start, len);
            placements[i] = Some(p);
        }
        // Whatever else the earlier process had in this memory goes back now.
        let pages = self.backend.len() / self.page;
        if pages > 0 {
            for (a, b) in self.runs(0, pages - 1, false) {
                self.backend.release(a * self.page, (b - a + 1) * self.page);
            }
        }
        Ok(placements.into_iter().flatten().collect())
    }

    /// The largest free block (bytes) that [`Arena::compact`] with no limit would leave:
    /// the same walk, as arithmetic only; nothing moves. `placements` holds every live
    /// placement of the arena with whether it may move.
    pub fn compaction_preview(&self, placements: &mut [(Placement, bool)]) -> u64 {
        placements.sort_unstable_by_key(|(p, _)| p.block.offset);
        let mut cursor = 0u32;
        let mut largest = 0u32;
        for (p, movable) in placements.iter() {
            let align_units = (p.alignment() / self.unit).max(1) as u32;
            let target = cursor.next_multiple_of(align_units);
            let start = if *movable && target < p.block.offset {
                target
            } else {
                p.block.offset
            };
            largest = largest.max(start.saturating_sub(cursor));
            cursor = start + p.block.size;
        }
        largest = largest.max(self.tlsf.capacity().saturating_sub(cursor));
        u64::from(largest) * self.unit
    }

    /// Slides movable allocations toward the start of the arena, in address order, moving at
    /// most `max_bytes` (at least one allocation); fixed ones stay. Contents are preserved byte
    /// for byte (overlapping moves are memmoves toward lower addresses); every placement is
    /// updated in place. The pages the moves vacate follow the cache rule of `free`: kept up to
    /// the working set's high-water mark, given back beyond it ([`Arena::trim`] gives back all).
    ///
    /// `placements` holds every live placement of the arena with whether it may move.
    pub fn compact(
        &mut self,
        placements: &mut [(&mut Placement, bool)],
        max_bytes: u64,
    ) -> Compaction {
        placements.sort_unstable_by_key(|(p, _)| p.block.offset);
        let mut report = Compaction::default();
        let mut cursor = 0u32;
        let mut layout = Vec::with_capacity(placements.len());
        let mut stopped = false;
        for (p, movable) in placements.iter_mut() {
            let block = p.block;
            let budget_left = report.moved_count == 0 || report.moved_bytes < max_bytes;
            let align_units = (p.alignment() / self.unit).max(1) as u32;
            let target = cursor.next_multiple_of(align_units);
            // Back the destination's pages before writing to them; if the system refuses,
            // stop moving (everything stays consistent, nothing is lost).
            let can_move = *movable && target < block.offset && budget_left && !stopped && {
                let first = (u64::from(target) * self.unit) / self.page;
                let last = (u64::from(target + block.size) * self.unit - 1) / self.page;
                match self.back(first, last) {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::warn!("defragment stopped early: {e}");
                        stopped = true;
                        false
                    }
                }
            };
            let can_move = can_move && {
                let new_offset = u64::from(target) * self.unit;
                match self
                    .backend
                    .copy_within(p.offset(), new_offset, p.block_bytes())
                {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::error!("defragment stopped: {e}");
                        stopped = true;
                        false
                    }
                }
            };
            if can_move {
                layout.push((target, block.size));
                report.moved_count += 1;
                report.moved_bytes += p.block_bytes();
                cursor = target + block.size;
            } else {
                if *movable && target < block.offset {
                    report.deferred_count += 1;
                }
                layout.push((block.offset, block.size));
                cursor = block.offset + block.size;
            }
        }
        // Moves may only be queued (GPU); wait for them before the new layout is used.
        if let Err(e) = self.backend.sync() {
            tracing::error!("defragment: a queued move failed: {e}");
        }
        let blocks = self.tlsf.rebuild(&layout);
        for ((p, _), b) in placements.iter_mut().zip(blocks) {
            p.block = b;
        }
        // Recount page use from the new layout.
        self.boundary_refs.clear();
        self.in_use_bytes = 0;
        for (p, _) in placements.iter() {
            let (start, len) = self.block_range(&p.block);
            self.acquire_pages(start, len);
        }
        report.released_bytes = self.trim_to(self.cache_limit());
        report
    }
}

#[cfg(test)]
mod tests;
