//! Which physical allocation backs each granule of a GPU arena: the bookkeeping of
//! [`super::gpu::Gpu`], kept apart from the driver calls so that it is tested without a GPU.
//!
//! ## Why chunks rather than one physical allocation per granule
//! Another process maps exported VRAM by importing one descriptor per physical allocation
//! (`cuMemImportFromShareableHandle`, then `cuMemMap`). Measured on an H200 for 2,560 MiB
//! claimed by a second process: as 1,280 granules of 2 MiB, one descriptor each, the importer
//! needs 132 ms (48 ms of it receiving descriptors); as one physical allocation, 1.0 ms. So a
//! commit backs each run of unbacked granules with one physical allocation (a *chunk*) of up to
//! [`MAX_CHUNK_BYTES`], mapped whole. A model's tensors are placed back to back and committed
//! in one call (`Arena::allocate_group`), so a model of 2.5 GB is three chunks and its export
//! three segments. Small allocations still commit a granule or two at a time.
//!
//! A mapping cannot be partly unmapped (`cuMemUnmap` takes whole mappings), so a granule the
//! arena gives back while the rest of its chunk is in use stays mapped, marked not live, and
//! is live again at no cost when the arena backs it again; the chunk's memory goes back to the
//! driver when its last live granule does. Memory held that way is at most one chunk per run
//! of partly used granules; the device's own figures (`cuMemGetInfo`, NVML) always count it.

/// The largest physical allocation one commit makes: a 2.5 GB model is three of them. Larger
/// chunks would save little (the import of one costs about 0.1 ms) and would keep more
/// memory held when a chunk is partly given back.
pub(super) const MAX_CHUNK_BYTES: u64 = 1 << 30;

/// One physical allocation, mapped whole over `count` granules from granule `first`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Chunk {
    /// The driver's handle of the physical allocation.
    pub(super) handle: u64,
    /// Its first granule in the arena.
    pub(super) first: u64,
    /// Its granules.
    pub(super) count: u64,
    /// How many of them the arena counts as backed.
    live: u64,
}

/// A run of granules `[first, end)` held by one chunk, for an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Piece {
    /// The run's first granule.
    pub(super) first: u64,
    /// One past its last granule.
    pub(super) end: u64,
    /// The chunk holding it.
    pub(super) chunk: Chunk,
}

/// Every granule's chunk.
pub(super) struct Chunks {
    /// Per granule: 0 = nothing backs it, else 1 + the index of its chunk in `chunks`.
    owner: Vec<u32>,
    /// Per granule: whether the arena counts it as backed.
    live: Vec<bool>,
    chunks: Vec<Option<Chunk>>,
    spare: Vec<u32>,
    max_granules: u64,
}

impl Chunks {
    /// Bookkeeping for `granules` granules, with chunks of at most `max_granules`.
    pub(super) fn new(granules: u64, max_granules: u64) -> Self {
        Chunks {
            owner: vec![0; granules as usize],
            live: vec![false; granules as usize],
            chunks: Vec::new(),
            spare: Vec::new(),
            max_granules: max_granules.max(1),
        }
    }

    /// Backs granules `[first, end)`: a granule already mapped becomes live again; each run of
    /// unmapped granules gets chunks from `create(first, count)` (which makes and maps the
    /// physical memory and returns its handle). If `create` fails, the chunks made here go
    /// through `destroy` and every granule is as it was.
    pub(super) fn commit<E>(
        &mut self,
        first: u64,
        end: u64,
        mut create: impl FnMut(u64, u64) -> Result<u64, E>,
        mut destroy: impl FnMut(&Chunk),
    ) -> Result<(), E> {
        let mut revived = Vec::new();
        let mut made = Vec::new();
        let mut k = first;
        while k < end {
            let o = self.owner[k as usize];
            if o != 0 {
                if !self.live[k as usize] {
                    self.live[k as usize] = true;
                    self.chunk_mut(o).live += 1;
                    revived.push(k);
                }
                k += 1;
                continue;
            }
            let mut j = k;
            while j < end && self.owner[j as usize] == 0 && j - k < self.max_granules {
                j += 1;
            }
            match create(k, j - k) {
                Ok(handle) => made.push(self.insert(Chunk {
                    handle,
                    first: k,
                    count: j - k,
                    live: j - k,
                })),
                Err(e) => {
                    for slot in made {
                        let chunk = self.remove(slot);
                        destroy(&chunk);
                    }
                    for g in revived {
                        self.live[g as usize] = false;
                        let o = self.owner[g as usize];
                        self.chunk_mut(o).live -= 1;
                    }
                    return Err(e);
                }
            }
            k = j;
        }
        Ok(())
    }

    /// Gives back granules `[first, end)`: each live one stops being live, and a chunk left
    /// with none goes through `destroy` (unmap and release).
    pub(super) fn release(&mut self, first: u64, end: u64, mut destroy: impl FnMut(&Chunk)) {
        for g in first..end {
            let o = self.owner[g as usize];
            if o == 0 || !self.live[g as usize] {
                continue;
            }
            self.live[g as usize] = false;
            let chunk = self.chunk_mut(o);
            chunk.live -= 1;
            if chunk.live == 0 {
                let chunk = self.remove(o - 1);
                destroy(&chunk);
            }
        }
    }

    /// The runs of `[first, end)` by chunk, in order; `None` if a granule of it is not live.
    pub(super) fn pieces(&self, first: u64, end: u64) -> Option<Vec<Piece>> {
        let mut out: Vec<Piece> = Vec::new();
        for g in first..end {
            let o = self.owner[g as usize];
            if o == 0 || !self.live[g as usize] {
                return None;
            }
            let chunk = self.chunks[(o - 1) as usize]?;
            match out.last_mut() {
                Some(p) if p.chunk.first == chunk.first && p.end == g => p.end = g + 1,
                _ => out.push(Piece {
                    first: g,
                    end: g + 1,
                    chunk,
                }),
            }
        }
        Some(out)
    }

    /// Removes every chunk, each through `destroy`.
    pub(super) fn drain(&mut self, mut destroy: impl FnMut(&Chunk)) {
        for slot in 0..self.chunks.len() {
            if let Some(c) = self.chunks[slot].take() {
                destroy(&c);
            }
        }
        self.owner.iter_mut().for_each(|o| *o = 0);
        self.live.iter_mut().for_each(|l| *l = false);
        self.chunks.clear();
        self.spare.clear();
    }

    /// The chunks alive now.
    #[cfg(test)]
    fn count(&self) -> usize {
        self.chunks.iter().flatten().count()
    }

    fn chunk_mut(&mut self, owner: u32) -> &mut Chunk {
        self.chunks[(owner - 1) as usize]
            .as_mut()
            .expect("a granule's owner is a live chunk")
    }

    fn insert(&mut self, chunk: Chunk) -> u32 {
        let slot = match self.spare.pop() {
            Some(s) => {
                self.chunks[s as usize] = Some(chunk);
                s
            }
            None => {
                self.chunks.push(Some(chunk));
                (self.chunks.len() - 1) as u32
            }
        };
        for g in chunk.first..chunk.first + chunk.count {
            self.owner[g as usize] = slot + 1;
            self.live[g as usize] = true;
        }
        slot
    }

    fn remove(&mut self, slot: u32) -> Chunk {
        let chunk = self.chunks[slot as usize]
            .take()
            .expect("a chunk removed once");
        for g in chunk.first..chunk.first + chunk.count {
            self.owner[g as usize] = 0;
            self.live[g as usize] = false;
        }
        self.spare.push(slot);
        chunk
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// Runs a commit with a counter for handles and a log of destroyed chunks.
    fn commit(c: &mut Chunks, first: u64, end: u64, next: &mut u64, destroyed: &RefCell<Vec<u64>>) {
        c.commit::<()>(
            first,
            end,
            |_, _| {
                *next += 1;
                Ok(*next)
            },
            |ch| destroyed.borrow_mut().push(ch.handle),
        )
        .unwrap();
    }

    #[test]
    fn a_run_is_one_chunk_up_to_the_cap_and_exports_as_few_pieces() {
        let mut c = Chunks::new(100, 8);
        let destroyed = RefCell::new(Vec::new());
        let mut next = 0;
        commit(&mut c, 2, 22, &mut next, &destroyed);
        assert_eq!(c.count(), 3, "20 granules in chunks of at most 8");
        let pieces = c.pieces(2, 22).unwrap();
        let spans: Vec<(u64, u64)> = pieces.iter().map(|p| (p.first, p.end)).collect();
        assert_eq!(spans, vec![(2, 10), (10, 18), (18, 22)]);
        // A sub-range starts inside a chunk: its offset in the chunk is first - chunk.first.
        let inner = c.pieces(5, 12).unwrap();
        assert_eq!(inner[0].first - inner[0].chunk.first, 3);
        assert_eq!(inner.len(), 2);
        // A granule not backed has no piece.
        assert!(c.pieces(0, 5).is_none());
    }

    #[test]
    fn a_chunk_goes_back_with_its_last_live_granule_and_revives_for_free() {
        let mut c = Chunks::new(16, 8);
        let destroyed = RefCell::new(Vec::new());
        let mut next = 0;
        commit(&mut c, 0, 4, &mut next, &destroyed);
        c.release(1, 3, |ch| destroyed.borrow_mut().push(ch.handle));
        assert!(destroyed.borrow().is_empty(), "two granules still live");
        assert!(
            c.pieces(0, 4).is_none(),
            "released granules are not exportable"
        );
        // Backing them again makes no new chunk.
        commit(&mut c, 1, 3, &mut next, &destroyed);
        assert_eq!(next, 1);
        assert_eq!(c.pieces(0, 4).unwrap().len(), 1);
        c.release(0, 4, |ch| destroyed.borrow_mut().push(ch.handle));
        assert_eq!(*destroyed.borrow(), vec![1]);
        assert_eq!(c.count(), 0);
        // Released twice: nothing more happens.
        c.release(0, 4, |ch| destroyed.borrow_mut().push(ch.handle));
        assert_eq!(destroyed.borrow().len(), 1);
    }

    #[test]
    fn a_failed_commit_leaves_everything_as_it_was() {
        let mut c = Chunks::new(32, 4);
        let destroyed = RefCell::new(Vec::new());
        let mut next = 0;
        commit(&mut c, 0, 4, &mut next, &destroyed);
        c.release(2, 4, |_| {});
        // Revives 2 and 3, makes a chunk of 4..8, then fails on 8..12.
        let mut calls = 0;
        let r = c.commit(
            2,
            12,
            |_, _| {
                calls += 1;
                if calls == 2 {
                    Err("no memory")
                } else {
                    Ok(100 + calls)
                }
            },
            |ch| destroyed.borrow_mut().push(ch.handle),
        );
        assert_eq!(r, Err("no memory"));
        assert_eq!(*destroyed.borrow(), vec![101]);
        assert!(
            c.pieces(2, 4).is_none(),
            "revived granules are released again"
        );
        assert!(c.pieces(0, 2).is_some());
        assert_eq!(c.count(), 1);
        // And the first chunk still goes back when its two live granules do.
        c.release(0, 2, |ch| destroyed.borrow_mut().push(ch.handle));
        assert_eq!(c.count(), 0);
    }

    #[test]
    fn drain_destroys_every_chunk_once() {
        let mut c = Chunks::new(32, 4);
        let destroyed = RefCell::new(Vec::new());
        let mut next = 0;
        commit(&mut c, 0, 10, &mut next, &destroyed);
        commit(&mut c, 20, 21, &mut next, &destroyed);
        c.drain(|ch| destroyed.borrow_mut().push(ch.handle));
        let mut d = destroyed.into_inner();
        d.sort_unstable();
        assert_eq!(d, vec![1, 2, 3, 4]);
    }
}
