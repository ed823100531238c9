//! Exports (the contract's section 8.3): plain data describing memory another process maps,
//! and the arithmetic that lays an export's allocations out as mappable segments.

use std::time::SystemTime;
use uuid::Uuid;

/// One mappable piece of an export: `size_bytes` bytes of the shared file from `file_offset`,
/// mapped at `offset` of the export's byte range. `file_offset` and `size_bytes` are whole
/// pages, so `mmap` takes them as they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Where it starts in the export's byte range.
    pub offset: u64,
    /// Its length (whole pages).
    pub size_bytes: u64,
    /// Where it starts in the shared file (a page boundary).
    pub file_offset: u64,
}

/// An allocation of an export: where its bytes are in the export's byte range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportedAllocation {
    /// The allocation.
    pub allocation_id: Uuid,
    /// Its first byte in the export's byte range.
    pub offset: u64,
    /// Its bytes.
    pub size_bytes: u64,
}

/// A tensor of an exported model, as the safetensors header describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorView {
    /// Its name in the file.
    pub name: String,
    /// As the header writes it (`F16`, `BF16`, `F32`, …).
    pub dtype: String,
    /// Its dimensions.
    pub shape: Vec<u64>,
    /// The allocation holding it (`None` for a tensor of no bytes).
    pub allocation_id: Option<Uuid>,
    /// Its first byte in the export's byte range.
    pub offset: u64,
    /// Its bytes.
    pub size_bytes: u64,
}

/// One live export, without its secret.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportView {
    /// Its id.
    pub export_id: Uuid,
    /// The device its memory is on.
    pub device_id: String,
    /// The length of its byte range (whole pages).
    pub size_bytes: u64,
    /// Its allocations, where they are in the range.
    pub allocations: Vec<ExportedAllocation>,
    /// A model export's tensors (empty for an allocation).
    pub tensors: Vec<TensorView>,
    /// Whether its secret was used.
    pub claimed: bool,
    /// When it was made.
    pub created_at: SystemTime,
    /// Until when it may be claimed.
    pub expires_at: SystemTime,
}

/// Lays out allocations given as `(id, offset in the shared file, size)` as page-aligned
/// segments: each allocation's range is widened to whole pages (`page`, a power of two), and
/// ranges that overlap or touch in the file (neighbours in the same page, or back to back)
/// become one segment. Segments follow each other in the export's byte range in file order;
/// each allocation's `offset` in the range then counts the padding in front of it (the bytes
/// of its first page before it). Returns the segments, the allocations (in the order given)
/// and the range's length.
pub fn plan_segments(
    placed: &[(Uuid, u64, u64)],
    page: u64,
) -> (Vec<Segment>, Vec<ExportedAllocation>, u64) {
    let page = page.max(1);
    let mut order: Vec<usize> = (0..placed.len()).collect();
    order.sort_by_key(|&k| placed[k].1);
    let mut segments: Vec<Segment> = Vec::new();
    let mut offsets = vec![0u64; placed.len()];
    let mut total = 0u64;
    for k in order {
        let (_, at, size) = placed[k];
        let start = at / page * page;
        let end = (at + size.max(1)).div_ceil(page) * page;
        match segments.last_mut() {
            Some(last) if start <= last.file_offset + last.size_bytes => {
                let last_end = last.file_offset + last.size_bytes;
                if end > last_end {
                    last.size_bytes += end - last_end;
                    total += end - last_end;
                }
                offsets[k] = last.offset + (at - last.file_offset);
            }
            _ => {
                segments.push(Segment {
                    offset: total,
                    size_bytes: end - start,
                    file_offset: start,
                });
                offsets[k] = total + (at - start);
                total += end - start;
            }
        }
    }
    let allocations = placed
        .iter()
        .zip(offsets)
        .map(|(&(id, _, size), offset)| ExportedAllocation {
            allocation_id: id,
            offset,
            size_bytes: size,
        })
        .collect();
    (segments, allocations, total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neighbours_in_a_page_share_a_segment_and_distant_ones_do_not() {
        let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        // b before a in the file; a and b share page 1; c far away.
        let placed = [
            (a, 4096 + 200, 100),
            (b, 4096, 200),
            (c, 10 * 4096 + 64, 5000),
        ];
        let (segments, allocations, total) = plan_segments(&placed, 4096);
        assert_eq!(
            segments,
            vec![
                Segment {
                    offset: 0,
                    size_bytes: 4096,
                    file_offset: 4096
                },
                Segment {
                    offset: 4096,
                    size_bytes: 8192,
                    file_offset: 10 * 4096
                },
            ]
        );
        assert_eq!(total, 3 * 4096);
        let offsets: Vec<u64> = allocations.iter().map(|x| x.offset).collect();
        assert_eq!(offsets, vec![200, 0, 4096 + 64]);
        // Every allocation lies inside its segment, at the same distance from the segment's
        // start as in the file.
        for (x, &(_, at, size)) in allocations.iter().zip(&placed) {
            let s = segments
                .iter()
                .find(|s| x.offset >= s.offset && x.offset + size <= s.offset + s.size_bytes)
                .unwrap();
            assert_eq!(x.offset - s.offset, at - s.file_offset);
        }
    }

    #[test]
    fn back_to_back_pages_merge() {
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let (segments, _, total) = plan_segments(&[(a, 0, 4096), (b, 4096, 10)], 4096);
        assert_eq!(segments.len(), 1);
        assert_eq!(total, 8192);
    }
}
