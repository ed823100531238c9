//! A two-level segregated-fit (TLSF) sub-allocator over a range of `u32` units: O(1) allocate
//! and free, all metadata out of band (the managed memory may be GPU memory).
//!
//! Why not the `offset-allocator` crate, which uses the same size classes: defragmentation must
//! rebuild the free lists from a new layout (allocations placed at chosen offsets), and that crate
//! can only hand out offsets of its own choosing; it also preallocates a fixed node table at
//! construction and cannot grow it. This one grows its node table on demand and can be rebuilt
//! from a layout in O(n).
//!
//! Size classes: a size in units is a small float with a 3-bit mantissa (8 classes per power of
//! two, at most 12.5% apart), 256 classes in all; a bitmap of non-empty classes finds the first
//! class that fits with two bit scans. A request first looks at the head of its own class (the
//! best fit when that block is large enough), then at the first non-empty class whose every block
//! fits it. The largest request that can succeed is therefore exactly the size of the head block
//! of the highest non-empty class, which [`Tlsf::largest_free`] reports.

#![deny(unsafe_code)]

const MANTISSA_BITS: u32 = 3;
const MANTISSA_VALUE: u32 = 1 << MANTISSA_BITS;
const MANTISSA_MASK: u32 = MANTISSA_VALUE - 1;
const TOP_BINS: usize = 32;
const LEAF_BINS_PER_TOP: usize = 8;
const BINS: usize = TOP_BINS * LEAF_BINS_PER_TOP;
const NONE: u32 = u32::MAX;
/// How many free blocks an aligned allocation examines when no block fits it whatever its
/// alignment (keeps it O(1)).
pub const ALIGNED_SEARCH_LIMIT: u32 = 64;

/// The class of `size`, rounding down (every block in the class is at least its floor).
fn class_round_down(size: u32) -> u32 {
    if size < MANTISSA_VALUE {
        return size;
    }
    let highest = 31 - size.leading_zeros();
    let mantissa_start = highest - MANTISSA_BITS;
    let exp = mantissa_start + 1;
    let mantissa = (size >> mantissa_start) & MANTISSA_MASK;
    (exp << MANTISSA_BITS) | mantissa
}

/// The class whose every block can hold `size`.
fn class_round_up(size: u32) -> u32 {
    if size < MANTISSA_VALUE {
        return size;
    }
    let highest = 31 - size.leading_zeros();
    let mantissa_start = highest - MANTISSA_BITS;
    let exp = mantissa_start + 1;
    let mut mantissa = (size >> mantissa_start) & MANTISSA_MASK;
    if size & ((1 << mantissa_start) - 1) != 0 {
        mantissa += 1;
    }
    // A mantissa overflow carries into the exponent, which is the next class.
    (exp << MANTISSA_BITS) + mantissa
}

#[derive(Clone, Copy, Debug)]
struct Node {
    offset: u32,
    size: u32,
    prev_phys: u32,
    next_phys: u32,
    prev_free: u32,
    next_free: u32,
    free: bool,
}

/// A block handed out by [`Tlsf::allocate`]: its offset and size in units, and the node that
/// records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Block {
    /// First unit.
    pub offset: u32,
    /// Units.
    pub size: u32,
    node: u32,
}

/// A TLSF allocator over `[0, capacity)` units.
pub struct Tlsf {
    capacity: u32,
    nodes: Vec<Node>,
    spare_nodes: Vec<u32>,
    heads: Vec<u32>,
    top_bitmap: u32,
    leaf_bitmaps: [u8; TOP_BINS],
    free_units: u64,
    free_blocks: u64,
    /// The node at offset 0 (start of the physical chain).
    first: u32,
}

impl Tlsf {
    /// An allocator with one free block of `capacity` units.
    pub fn new(capacity: u32) -> Self {
        let mut t = Tlsf {
            capacity,
            nodes: Vec::new(),
            spare_nodes: Vec::new(),
            heads: vec![NONE; BINS],
            top_bitmap: 0,
            leaf_bitmaps: [0; TOP_BINS],
            free_units: 0,
            free_blocks: 0,
            first: NONE,
        };
        t.rebuild(&[]);
        t
    }

    /// Units managed.
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Free units, in whatever pieces.
    pub fn free_units(&self) -> u64 {
        self.free_units
    }

    /// The number of free blocks.
    pub fn free_blocks(&self) -> u64 {
        self.free_blocks
    }

    /// The largest request that would succeed now.
    pub fn largest_free(&self) -> u32 {
        if self.top_bitmap == 0 {
            return 0;
        }
        let top = 31 - self.top_bitmap.leading_zeros();
        let leaf = 7 - u32::from(self.leaf_bitmaps[top as usize])
            .leading_zeros()
            .saturating_sub(24);
        let bin = (top << MANTISSA_BITS | leaf) as usize;
        self.nodes[self.heads[bin] as usize].size
    }

    fn new_node(&mut self, node: Node) -> u32 {
        match self.spare_nodes.pop() {
            Some(i) => {
                self.nodes[i as usize] = node;
                i
            }
            None => {
                self.nodes.push(node);
                (self.nodes.len() - 1) as u32
            }
        }
    }

    fn insert_free(&mut self, index: u32) {
        let size = self.nodes[index as usize].size;
        let bin = class_round_down(size) as usize;
        let (top, leaf) = (bin / LEAF_BINS_PER_TOP, bin % LEAF_BINS_PER_TOP);
        let head = self.heads[bin];
        {
            let n = &mut self.nodes[index as usize];
            n.free = true;
            n.prev_free = NONE;
            n.next_free = head;
        }
        if head != NONE {
            self.nodes[head as usize].prev_free = index;
        }
        self.heads[bin] = index;
        self.leaf_bitmaps[top] |= 1 << leaf;
        self.top_bitmap |= 1 << top;
        self.free_units += u64::from(size);
        self.free_blocks += 1;
    }

    fn remove_free(&mut self, index: u32) {
        let n = self.nodes[index as usize];
        let bin = class_round_down(n.size) as usize;
        if n.prev_free != NONE {
            self.nodes[n.prev_free as usize].next_free = n.next_free;
        } else {
            self.heads[bin] = n.next_free;
            if n.next_free == NONE {
                let (top, leaf) = (bin / LEAF_BINS_PER_TOP, bin % LEAF_BINS_PER_TOP);
                self.leaf_bitmaps[top] &= !(1 << leaf);
                if self.leaf_bitmaps[top] == 0 {
                    self.top_bitmap &= !(1 << top);
                }
            }
        }
        if n.next_free != NONE {
            self.nodes[n.next_free as usize].prev_free = n.prev_free;
        }
        self.nodes[index as usize].free = false;
        self.free_units -= u64::from(n.size);
        self.free_blocks -= 1;
    }

    /// The first non-empty class at or above `bin`.
    fn first_class_from(&self, bin: u32) -> Option<u32> {
        if bin as usize >= BINS {
            return None;
        }
        let top = bin / LEAF_BINS_PER_TOP as u32;
        let leaf = bin % LEAF_BINS_PER_TOP as u32;
        let leaf_mask = u32::from(self.leaf_bitmaps[top as usize]) & (!0u32 << leaf);
        if leaf_mask != 0 {
            return Some(top * LEAF_BINS_PER_TOP as u32 + leaf_mask.trailing_zeros());
        }
        let higher = if top + 1 >= 32 {
            0
        } else {
            self.top_bitmap & (!0u32 << (top + 1))
        };
        if higher == 0 {
            return None;
        }
        let t = higher.trailing_zeros();
        let l = u32::from(self.leaf_bitmaps[t as usize]).trailing_zeros();
        Some(t * LEAF_BINS_PER_TOP as u32 + l)
    }

    /// Allocates `size` units (at least 1). O(1).
    pub fn allocate(&mut self, size: u32) -> Option<Block> {
        if size == 0 {
            return None;
        }
        let own = class_round_down(size) as usize;
        let index = match self.heads[own] {
            h if h != NONE && self.nodes[h as usize].size >= size => h,
            _ => {
                let bin = self.first_class_from(class_round_up(size))?;
                self.heads[bin as usize]
            }
        };
        self.remove_free(index);
        let n = self.nodes[index as usize];
        if n.size > size {
            let rest = self.new_node(Node {
                offset: n.offset + size,
                size: n.size - size,
                prev_phys: index,
                next_phys: n.next_phys,
                prev_free: NONE,
                next_free: NONE,
                free: true,
            });
            if n.next_phys != NONE {
                self.nodes[n.next_phys as usize].prev_phys = rest;
            }
            let node = &mut self.nodes[index as usize];
            node.size = size;
            node.next_phys = rest;
            self.insert_free(rest);
        }
        Some(Block {
            offset: n.offset,
            size,
            node: index,
        })
    }

    /// Allocates `size` units starting at a multiple of `align` units (a power of two). The
    /// padding a misaligned free block needs is given back at once, so it costs nothing while
    /// the block lives. First a block that fits whatever its alignment (O(1)); failing that, up
    /// to [`ALIGNED_SEARCH_LIMIT`] free blocks of the classes that could hold `size` are checked
    /// for an aligned fit, so an exactly aligned gap is found when it is the only room.
    pub fn allocate_aligned(&mut self, size: u32, align: u32) -> Option<Block> {
        if align <= 1 {
            return self.allocate(size);
        }
        if size == 0 {
            return None;
        }
        let fits = |n: &Node| {
            u64::from(n.offset.next_multiple_of(align)) + u64::from(size)
                <= u64::from(n.offset) + u64::from(n.size)
        };
        let mut found = size
            .checked_add(align - 1)
            .and_then(|padded| self.first_class_from(class_round_up(padded)))
            .map(|bin| self.heads[bin as usize]);
        if found.is_none() {
            let mut examined = 0;
            let mut bin = Some(class_round_down(size));
            'search: while let Some(b) = bin {
                let mut i = self.heads[b as usize];
                while i != NONE {
                    if fits(&self.nodes[i as usize]) {
                        found = Some(i);
                        break 'search;
                    }
                    examined += 1;
                    if examined >= ALIGNED_SEARCH_LIMIT {
                        break 'search;
                    }
                    i = self.nodes[i as usize].next_free;
                }
                bin = self.first_class_from(b + 1);
            }
        }
        let index = found?;
        self.remove_free(index);
        let n = self.nodes[index as usize];
        let start = n.offset.next_multiple_of(align);
        let mut mid = index;
        if start > n.offset {
            let m = self.split_used(index, start);
            self.free(Block {
                offset: n.offset,
                size: start - n.offset,
                node: index,
            });
            mid = m;
        }
        if start + size < n.offset + n.size {
            let tail = self.split_used(mid, start + size);
            self.free(Block {
                offset: start + size,
                size: n.offset + n.size - start - size,
                node: tail,
            });
        }
        Some(Block {
            offset: start,
            size,
            node: mid,
        })
    }

    /// Splits a used node at `at` (inside it): the node keeps `[offset, at)`, a new used node
    /// gets `[at, end)`. Returns the new node.
    fn split_used(&mut self, index: u32, at: u32) -> u32 {
        let n = self.nodes[index as usize];
        debug_assert!(!n.free && at > n.offset && at < n.offset + n.size);
        let new = self.new_node(Node {
            offset: at,
            size: n.offset + n.size - at,
            prev_phys: index,
            next_phys: n.next_phys,
            prev_free: NONE,
            next_free: NONE,
            free: false,
        });
        if n.next_phys != NONE {
            self.nodes[n.next_phys as usize].prev_phys = new;
        }
        let node = &mut self.nodes[index as usize];
        node.size = at - n.offset;
        node.next_phys = new;
        new
    }

    /// Cuts a used block into used blocks of `sizes` units, back to back from its offset; what
    /// the sizes leave of it at the end is freed. The sizes must be non-zero and sum to at most
    /// the block's size. Returns the new blocks in order. O(`sizes`).
    pub fn split(&mut self, block: Block, sizes: &[u32]) -> Vec<Block> {
        let total: u64 = sizes.iter().map(|&s| u64::from(s)).sum();
        assert!(
            total <= u64::from(block.size) && sizes.iter().all(|&s| s > 0),
            "split: the sizes do not fit the block"
        );
        let mut out = Vec::with_capacity(sizes.len());
        let mut node = block.node;
        let mut at = block.offset;
        let end = block.offset + block.size;
        for &size in sizes {
            let next_at = at + size;
            let rest = (next_at < end).then(|| self.split_used(node, next_at));
            out.push(Block {
                offset: at,
                size,
                node,
            });
            at = next_at;
            match rest {
                Some(r) => node = r,
                None => break,
            }
        }
        if at < end {
            self.free(Block {
                offset: at,
                size: end - at,
                node,
            });
        }
        out
    }

    /// Frees a block, merging it with free neighbours. O(1).
    pub fn free(&mut self, block: Block) {
        let mut index = block.node;
        debug_assert!(!self.nodes[index as usize].free, "double free");
        let n = self.nodes[index as usize];
        // Merge with the previous block.
        if n.prev_phys != NONE && self.nodes[n.prev_phys as usize].free {
            let prev = n.prev_phys;
            self.remove_free(prev);
            let size = self.nodes[index as usize].size;
            let next = self.nodes[index as usize].next_phys;
            let p = &mut self.nodes[prev as usize];
            p.size += size;
            p.next_phys = next;
            if next != NONE {
                self.nodes[next as usize].prev_phys = prev;
            }
            self.spare_nodes.push(index);
            index = prev;
        }
        // Merge with the next block.
        let next = self.nodes[index as usize].next_phys;
        if next != NONE && self.nodes[next as usize].free {
            self.remove_free(next);
            let nn = self.nodes[next as usize];
            let node = &mut self.nodes[index as usize];
            node.size += nn.size;
            node.next_phys = nn.next_phys;
            if nn.next_phys != NONE {
                self.nodes[nn.next_phys as usize].prev_phys = index;
            }
            self.spare_nodes.push(next);
        }
        self.insert_free(index);
    }

    /// Forgets every block and lays out `used` (offset, size) blocks, sorted by offset and not
    /// overlapping, with free blocks in the gaps. Returns the new handles, in input order.
    /// O(n).
    pub fn rebuild(&mut self, used: &[(u32, u32)]) -> Vec<Block> {
        self.nodes.clear();
        self.spare_nodes.clear();
        self.heads.iter_mut().for_each(|h| *h = NONE);
        self.top_bitmap = 0;
        self.leaf_bitmaps = [0; TOP_BINS];
        self.free_units = 0;
        self.free_blocks = 0;
        let mut blocks = Vec::with_capacity(used.len());
        let mut pieces: Vec<(u32, u32, bool)> = Vec::with_capacity(used.len() * 2 + 1);
        let mut cursor = 0u32;
        for &(offset, size) in used {
            assert!(offset >= cursor, "rebuild: blocks overlap or are unsorted");
            if offset > cursor {
                pieces.push((cursor, offset - cursor, true));
            }
            pieces.push((offset, size, false));
            cursor = offset + size;
        }
        assert!(
            cursor <= self.capacity,
            "rebuild: a block lies past the end"
        );
        if cursor < self.capacity {
            pieces.push((cursor, self.capacity - cursor, true));
        }
        let mut prev = NONE;
        for (i, &(offset, size, free)) in pieces.iter().enumerate() {
            let index = i as u32;
            self.nodes.push(Node {
                offset,
                size,
                prev_phys: prev,
                next_phys: if i + 1 < pieces.len() {
                    index + 1
                } else {
                    NONE
                },
                prev_free: NONE,
                next_free: NONE,
                free: false,
            });
            prev = index;
            if free {
                self.insert_free(index);
            } else {
                blocks.push(Block {
                    offset,
                    size,
                    node: index,
                });
            }
        }
        self.first = if pieces.is_empty() { NONE } else { 0 };
        blocks
    }

    /// Free ranges `(offset, size)` in address order. O(blocks).
    pub fn free_ranges(&self) -> Vec<(u32, u32)> {
        let mut out = Vec::new();
        let mut i = self.first;
        while i != NONE {
            let n = &self.nodes[i as usize];
            if n.free {
                out.push((n.offset, n.size));
            }
            i = n.next_phys;
        }
        out
    }

    /// Bytes of bookkeeping held (for the metadata-per-allocation figure).
    pub fn metadata_bytes(&self) -> usize {
        self.nodes.capacity() * std::mem::size_of::<Node>()
            + self.spare_nodes.capacity() * 4
            + self.heads.capacity() * 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_bracket_sizes() {
        for size in [
            1u32,
            7,
            8,
            9,
            15,
            16,
            17,
            100,
            1000,
            4097,
            1 << 20,
            (1 << 20) + 1,
            u32::MAX / 2,
        ] {
            let down = class_round_down(size);
            let up = class_round_up(size);
            assert!(down <= up);
            assert!(up - down <= 1, "{size}");
        }
    }

    #[test]
    fn allocates_frees_and_merges() {
        let mut t = Tlsf::new(1000);
        let a = t.allocate(100).unwrap();
        let b = t.allocate(200).unwrap();
        let c = t.allocate(300).unwrap();
        assert_eq!((a.offset, b.offset, c.offset), (0, 100, 300));
        assert_eq!(t.free_units(), 400);
        t.free(b);
        assert_eq!(t.free_blocks(), 2);
        t.free(a);
        assert_eq!(t.free_blocks(), 2, "a merged with b");
        t.free(c);
        assert_eq!(t.free_blocks(), 1);
        assert_eq!(t.largest_free(), 1000);
    }

    #[test]
    fn the_whole_range_is_allocatable_and_largest_is_exact() {
        for cap in [1u32, 9, 1000, 123_457, u32::MAX - 1] {
            let mut t = Tlsf::new(cap);
            assert_eq!(t.largest_free(), cap);
            let all = t.allocate(cap).expect("whole range");
            assert!(t.allocate(1).is_none());
            t.free(all);
            assert_eq!(t.largest_free(), cap);
        }
    }

    #[test]
    fn aligned_allocations_give_their_padding_back() {
        let mut t = Tlsf::new(1000);
        let a = t.allocate(3).unwrap();
        let b = t.allocate_aligned(10, 64).unwrap();
        assert_eq!(b.offset, 64);
        assert_eq!(t.free_units(), 1000 - 3 - 10);
        assert_eq!(t.free_ranges(), vec![(3, 61), (74, 926)]);
        t.free(b);
        t.free(a);
        assert_eq!(t.free_ranges(), vec![(0, 1000)]);
        // An exactly aligned gap of the right size is used when it is the only room.
        let mut t = Tlsf::new(256);
        let blocks = t.rebuild(&[(0, 64), (192, 64)]);
        let c = t
            .allocate_aligned(128, 64)
            .unwrap_or_else(|| panic!("{:?}", t.free_ranges()));
        assert_eq!(c.offset, 64);
        let _ = blocks;
    }

    #[test]
    fn split_cuts_a_block_back_to_back_and_frees_the_rest() {
        let mut t = Tlsf::new(1000);
        let b = t.allocate(100).unwrap();
        let parts = t.split(b, &[10, 20, 30]);
        let spans: Vec<(u32, u32)> = parts.iter().map(|p| (p.offset, p.size)).collect();
        assert_eq!(
            spans,
            vec![(b.offset, 10), (b.offset + 10, 20), (b.offset + 30, 30)]
        );
        assert_eq!(t.free_units(), 1000 - 60);
        // Each part frees on its own, and everything merges back into one block.
        for p in parts {
            t.free(p);
        }
        assert_eq!(t.free_units(), 1000);
        assert_eq!(t.free_blocks(), 1);
        // An exact split leaves nothing to free.
        let b = t.allocate(30).unwrap();
        let parts = t.split(b, &[15, 15]);
        assert_eq!(parts.len(), 2);
        assert_eq!(t.free_units(), 1000 - 30);
    }

    #[test]
    fn rebuild_lays_out_blocks_and_gaps() {
        let mut t = Tlsf::new(100);
        let blocks = t.rebuild(&[(10, 5), (15, 5), (50, 10)]);
        assert_eq!(
            blocks.iter().map(|b| b.offset).collect::<Vec<_>>(),
            vec![10, 15, 50]
        );
        assert_eq!(t.free_ranges(), vec![(0, 10), (20, 30), (60, 40)]);
        assert_eq!(t.free_units(), 80);
        t.free(blocks[1]);
        assert_eq!(t.free_ranges(), vec![(0, 10), (15, 35), (60, 40)]);
        let x = t.allocate(40).unwrap();
        assert_eq!(x.offset, 60);
    }
}
