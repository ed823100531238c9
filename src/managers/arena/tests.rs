//! Unit tests of the arena: page backing and caching, alignment, compaction, and pages of a
//! deferred allocation.
use super::*;
use crate::backends::CpuBackend;

fn arena(len: u64) -> Arena {
    Arena::new(Box::new(CpuBackend::new(len).unwrap()))
}

/// A host backend that remembers which pages were really committed (through the backend
/// or its committer), as opposed to marked backed, and every call to its `commit`.
struct Recording {
    inner: CpuBackend,
    committed: std::sync::Arc<parking_lot::Mutex<std::collections::BTreeSet<u64>>>,
    calls: std::sync::Arc<parking_lot::Mutex<Vec<(u64, u64)>>>,
}

struct RecordingCommitter(std::sync::Arc<parking_lot::Mutex<std::collections::BTreeSet<u64>>>);

impl crate::backends::Committer for RecordingCommitter {
    fn commit(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.0.lock().extend((offset / 4096)..(offset + len) / 4096);
        Ok(())
    }
}

impl Backend for Recording {
    fn device_id(&self) -> &str {
        "cpu"
    }
    fn name(&self) -> &str {
        "recording"
    }
    fn memory_type(&self) -> crate::domain::MemoryType {
        crate::domain::MemoryType::RAM
    }
    fn capacity(&mut self) -> crate::backends::Capacity {
        self.inner.capacity()
    }
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn page_size(&self) -> u64 {
        4096
    }
    fn commit(&mut self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.calls.lock().push((offset, len));
        self.committed
            .lock()
            .extend((offset / 4096)..(offset + len) / 4096);
        self.inner.commit(offset, len)
    }
    fn host_slice(&self, offset: u64, len: u64) -> Option<&[u8]> {
        self.inner.host_slice(offset, len)
    }
    fn host_slice_mut(&mut self, offset: u64, len: u64) -> Option<&mut [u8]> {
        self.inner.host_slice_mut(offset, len)
    }
    fn release(&mut self, offset: u64, len: u64) {
        let mut c = self.committed.lock();
        for p in (offset / 4096)..(offset + len) / 4096 {
            c.remove(&p);
        }
    }
    fn committer(&self) -> Option<std::sync::Arc<dyn crate::backends::Committer>> {
        Some(std::sync::Arc::new(RecordingCommitter(
            self.committed.clone(),
        )))
    }
    fn handle(&self, _offset: u64) -> Option<crate::domain::Handle> {
        None
    }
}

/// Issue 19, item 1: a large allocation's pages are committed off the engine; a small
/// neighbour placed meanwhile on the large one's last page must find that page really
/// backed (it was only marked so, and the neighbour's first write faulted it in on a full
/// tmpfs: SIGBUS).
#[test]
fn a_neighbour_never_shares_a_page_still_to_be_committed() {
    let committed = std::sync::Arc::new(parking_lot::Mutex::new(Default::default()));
    let mut a = Arena::new(Box::new(Recording {
        inner: CpuBackend::new(1 << 24).unwrap(),
        committed: committed.clone(),
        calls: Default::default(),
    }));
    for (lead, size) in [(0, 10 * 4096 + 100), (100, 3 * 4096), (4000, 4096 + 10)] {
        let lead = (lead > 0).then(|| a.allocate(lead, 0).unwrap());
        let (big, runs) = a.allocate_deferred(size, 0).unwrap();
        // The committer has not run yet. A neighbour comes.
        let small = a.allocate(200, 0).unwrap();
        let (so, sl) = (small.offset(), small.block_bytes());
        for page in so / 4096..=(so + sl - 1) / 4096 {
            assert!(
                committed.lock().contains(&page),
                "page {page} of a published allocation is not backed (big at {}, {size} bytes)",
                big.offset()
            );
        }
        // The deferred runs never include a page another allocation can share.
        for &(o, l) in &runs {
            assert!(o > big.offset() && o + l < big.offset() + big.block_bytes());
        }
        a.free(&small);
        a.abandon(&big, &runs);
        if let Some(l) = lead {
            a.free(&l);
        }
    }
}

#[test]
fn backs_only_touched_pages_and_caches_a_few() {
    let mut a = arena(1 << 22);
    let x = a.allocate(100, 0).unwrap();
    assert_eq!(a.backed_bytes(), 4096);
    let y = a.allocate(100, 0).unwrap();
    assert_eq!(a.backed_bytes(), 4096, "same page");
    let big = a.allocate(3 * 4096, 0).unwrap();
    assert_eq!(a.backed_bytes(), 4 * 4096);
    a.free(&x);
    a.free(&y);
    a.free(&big);
    assert_eq!(a.backed_bytes(), 4 * 4096, "up to 16 pages stay cached");
    assert_eq!(a.cached_bytes(), 4 * 4096);
    assert_eq!(a.trim(), 4 * 4096);
    assert_eq!(a.backed_bytes(), 0);
    assert_eq!(a.free_bytes(), 1 << 22);
}

#[test]
fn caches_up_to_the_high_water_mark_and_trims() {
    let mut a = arena(1 << 24);
    let big = a.allocate(1 << 20, 0).unwrap();
    a.free(&big);
    assert_eq!(
        a.backed_bytes(),
        1 << 20,
        "within the high-water mark: cached"
    );
    // Reused without new pages.
    let again = a.allocate(1 << 20, 0).unwrap();
    assert_eq!(a.backed_bytes(), 1 << 20);
    a.free(&again);
    assert_eq!(a.trim(), 1 << 20);
    assert_eq!(a.backed_bytes(), 0);
    // After a trim the high-water mark starts again from what is in use.
    let small = a.allocate(4096, 0).unwrap();
    let big = a.allocate(1 << 20, 0).unwrap();
    a.free(&big);
    assert!(a.backed_bytes() <= (1 << 20) + 4096);
    a.free(&small);
}

#[test]
fn honours_alignment_and_keeps_bytes() {
    let mut a = arena(1 << 22);
    let _pad = a.allocate(64, 0).unwrap();
    let p = a.allocate(1000, 65536).unwrap();
    assert_eq!(p.offset() % 65536, 0);
    let data: Vec<u8> = (0..1000).map(|i| (i % 251) as u8).collect();
    a.write(&p, 0, &data).unwrap();
    let mut back = vec![0; 1000];
    a.read(&p, 0, &mut back).unwrap();
    assert_eq!(back, data);
}

#[test]
fn reports_no_space() {
    let mut a = arena(1 << 16);
    let _x = a.allocate(1 << 16, 0).unwrap();
    assert!(matches!(a.allocate(1, 0), Err(ArenaError::NoSpace)));
}

#[test]
fn compaction_moves_down_keeps_bytes_and_pins() {
    let mut a = arena(1 << 24);
    let size = |i: u64| 10_000 + i * 100;
    let mut ps: Vec<Placement> = (0..40).map(|i| a.allocate(size(i), 0).unwrap()).collect();
    for (i, p) in ps.iter().enumerate() {
        let data: Vec<u8> = (0..size(i as u64))
            .map(|j| (i as u64 * 7 + j) as u8)
            .collect();
        a.write(p, 0, &data).unwrap();
    }
    // Free every other one: fragmentation.
    let kept: Vec<Placement> = ps
        .drain(..)
        .enumerate()
        .filter_map(|(i, p)| {
            if i % 2 == 0 {
                a.free(&p);
                None
            } else {
                Some(p)
            }
        })
        .collect();
    let mut kept = kept;
    let frag_before = a.largest_free_block();
    let fixed_offset = kept[5].offset();
    let originals: Vec<u64> = kept.iter().map(super::Placement::offset).collect();
    let mut refs: Vec<(&mut Placement, bool)> = kept
        .iter_mut()
        .enumerate()
        .map(|(i, p)| (p, i != 5))
        .collect();
    let r = a.compact(&mut refs, u64::MAX);
    assert!(r.moved_count > 0);
    assert!(a.largest_free_block() > frag_before);
    assert_eq!(kept[5].offset(), fixed_offset, "fixed stays");
    for (k, p) in kept.iter().enumerate() {
        let i = 2 * k + 1;
        let n = size(i as u64);
        let mut back = vec![0; n as usize];
        a.read(p, 0, &mut back).unwrap();
        let want: Vec<u8> = (0..n).map(|j| (i as u64 * 7 + j) as u8).collect();
        assert_eq!(
            back,
            want,
            "allocation {k} (was at {}, now {})",
            originals[k],
            p.offset()
        );
    }
    // Everything frees cleanly afterwards.
    for p in &kept {
        a.free(p);
    }
    a.trim();
    assert_eq!(a.backed_bytes(), 0);
    assert_eq!(a.free_regions(), 1);
}

/// A group (a model's tensors) lies back to back and its pages are backed in one call, so a
/// GPU backend can hold it in a few physical allocations; each member frees on its own, and
/// the accounting ends where it began.
#[test]
fn a_group_lies_back_to_back_and_is_backed_in_one_commit() {
    let calls = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
    let mut a = Arena::new(Box::new(Recording {
        inner: CpuBackend::new(1 << 24).unwrap(),
        committed: Default::default(),
        calls: calls.clone(),
    }));
    let page = a.backend().page_size();
    let lead = a.allocate(100, 0).unwrap();
    calls.lock().clear();
    let sizes = [3 * page + 10, 64, 5 * page, 1, 7 * page + 3];
    let group = a.allocate_group(&sizes).unwrap();
    assert_eq!(
        calls.lock().len(),
        1,
        "one commit for the whole run: {calls:?}"
    );
    let mut end = group[0].offset();
    for (p, &size) in group.iter().zip(&sizes) {
        assert_eq!(p.offset(), end, "back to back");
        assert!(p.block_bytes() >= size);
        end = p.offset() + p.block_bytes();
    }
    // The bytes are real memory: a pattern written to each member reads back.
    for (k, p) in group.iter().enumerate() {
        let data: Vec<u8> = (0..p.block_bytes())
            .map(|i| (i as u8) ^ (k as u8))
            .collect();
        a.write(p, 0, &data).unwrap();
    }
    for (k, p) in group.iter().enumerate() {
        let mut back = vec![0u8; p.block_bytes() as usize];
        a.read(p, 0, &mut back).unwrap();
        assert!(
            back.iter()
                .enumerate()
                .all(|(i, &b)| b == (i as u8) ^ (k as u8))
        );
    }
    for p in &group {
        a.free(p);
    }
    a.free(&lead);
    a.trim();
    assert_eq!(a.backed_bytes(), 0);
    assert_eq!(a.free_bytes(), a.backend().len());
    assert_eq!(a.free_regions(), 1);
}

/// A group that does not fit anywhere places nothing.
#[test]
fn a_group_that_does_not_fit_places_nothing() {
    let mut a = arena(1 << 20);
    let free = a.free_bytes();
    assert!(matches!(
        a.allocate_group(&[600 << 10, 600 << 10]),
        Err(ArenaError::NoSpace)
    ));
    assert_eq!(a.free_bytes(), free);
    assert_eq!(a.backed_bytes(), 0);
}
