//! Views: allocations, usage, fragmentation and device figures as plain-data views (`domain`).

use super::*;
use crate::domain::{ExportedAllocation, Segment, SessionId, plan_segments};
use std::fs::File;
use std::sync::Arc;

/// A backend that shared a range without covering a byte of it (a bug, said plainly).
fn not_covered(device: &str, at: u64) -> crate::backends::BackendError {
    crate::backends::BackendError::Device {
        device: device.to_string(),
        what: "exporting",
        message: format!("no shared piece covers offset {at}"),
    }
}

/// Allocations laid out for another process to map ([`AllocationEngine::share`]).
#[derive(Debug)]
pub struct Shared {
    /// The segments, in the order of the export's byte range, each with the file its
    /// descriptor opens.
    pub segments: Vec<(Segment, Arc<File>)>,
    /// Where each allocation is in the byte range.
    pub allocations: Vec<ExportedAllocation>,
    /// The byte range's length.
    pub size_bytes: u64,
}

impl AllocationEngine {
    pub(super) fn view(&self, r: &Record) -> AllocationView {
        let dev = &self.devices[r.device as usize];
        AllocationView {
            allocation_id: r.id,
            device_id: dev.arena.backend().device_id().to_string(),
            size_bytes: r.size,
            alignment: r.alignment(),
            allocation_type: r.kind,
            purpose: r.purpose.to_string(),
            persistent: r.persistent,
            owner: r.owner.wire(),
            tenant: r.holder.tenant.to_string(),
            client_pid: r.holder.client_pid,
            created_at: UNIX_EPOCH + Duration::from_micros(r.created_us),
            handle: r
                .placement
                .as_ref()
                .and_then(|p| dev.arena(r.pool).backend().handle(p.offset())),
        }
    }

    /// The client allocations a session asked for that end with it (not persistent), as
    /// hyphenated ids.
    pub fn held_by(&self, session: &SessionId) -> Vec<String> {
        self.records
            .iter()
            .filter(|r| {
                r.owner == Owner::Client
                    && !r.persistent
                    && r.holder.session.as_ref() == Some(session)
            })
            .map(|r| r.id.hyphenated().to_string())
            .collect()
    }

    /// Per session, the count and bytes of the live client allocations it asked for
    /// (persistent ones included), in one pass.
    pub fn session_holdings(&self) -> rustc_hash::FxHashMap<SessionId, (u64, u64)> {
        let mut by = rustc_hash::FxHashMap::default();
        for r in self.records.iter() {
            if let (Owner::Client, Some(s), false) = (&r.owner, r.holder.session, r.hidden) {
                let e: &mut (u64, u64) = by.entry(s).or_default();
                e.0 += 1;
                e.1 += r.size;
            }
        }
        by
    }

    /// One allocation as a view.
    pub fn allocation(&self, allocation_id: &str) -> Result<AllocationView, EngineError> {
        let (_, r) = self.record(allocation_id)?;
        Ok(self.view(r))
    }

    /// One allocation by id as a view.
    pub fn allocation_by_id(&self, id: &Uuid) -> Option<AllocationView> {
        self.records.get(id).map(|r| self.view(r))
    }

    /// A device's allocations matching `filter`, oldest first: the total count and one page.
    pub fn allocations(
        &self,
        device: usize,
        filter: &AllocationFilter,
        offset: u64,
        limit: u64,
    ) -> (u64, Vec<AllocationView>) {
        let mut matching: Vec<&Record> = self
            .records
            .iter()
            .filter(|r| {
                r.device as usize == device
                    && !r.hidden
                    && filter.kind.is_none_or(|k| k == r.kind)
                    && filter.purpose.as_deref().is_none_or(|p| p == &*r.purpose)
                    && filter.owner.as_deref().is_none_or(|o| r.owner.matches(o))
                    && filter
                        .tenant
                        .as_deref()
                        .is_none_or(|t| t == &*r.holder.tenant)
                    && filter
                        .client_pid
                        .is_none_or(|p| r.holder.client_pid == Some(p))
            })
            .collect();
        matching.sort_unstable_by_key(|r| r.seq);
        let total = matching.len() as u64;
        let page = matching
            .into_iter()
            .skip(offset.min(total) as usize)
            .take(limit as usize)
            .map(|r| self.view(r))
            .collect();
        (total, page)
    }

    /// A picture of the device's arena for the dashboard: its address range cut into `buckets`
    /// equal pieces (1 to 4,096), each with the bytes of live allocations by type and the rest
    /// free. One pass over the allocations; pinned-pool allocations are not in the arena.
    pub fn memory_map(&self, device: usize, buckets: usize) -> MemoryMap {
        let arena_bytes = self.devices[device].arena.backend().len().max(1);
        let n = buckets.clamp(1, 4096) as u64;
        let bucket_bytes = arena_bytes.div_ceil(n);
        let mut by_type = vec![[0u64; TYPE_COUNT]; n as usize];
        for r in self.records.iter() {
            let Some(p) = r
                .placement
                .as_ref()
                .filter(|_| r.device as usize == device && !r.pool)
            else {
                continue;
            };
            let (mut start, end) = (p.offset(), (p.offset() + r.size).min(arena_bytes));
            let t = r.kind.value() as usize % TYPE_COUNT;
            while start < end {
                let b = start / bucket_bytes;
                let bucket_end = ((b + 1) * bucket_bytes).min(end);
                by_type[b as usize][t] += bucket_end - start;
                start = bucket_end;
            }
        }
        MemoryMap {
            arena_bytes,
            bucket_bytes,
            buckets: by_type,
        }
    }

    /// A device's `limit` largest live allocations, largest first. One pass over them.
    pub fn largest_allocations(&self, device: usize, limit: usize) -> Vec<AllocationView> {
        let mut v: Vec<&Record> = self
            .records
            .iter()
            .filter(|r| r.device as usize == device && !r.hidden)
            .collect();
        if v.len() > limit {
            v.select_nth_unstable_by(limit, |a, b| b.size.cmp(&a.size));
            v.truncate(limit);
        }
        v.sort_unstable_by(|a, b| b.size.cmp(&a.size).then(a.seq.cmp(&b.seq)));
        v.into_iter().map(|r| self.view(r)).collect()
    }

    /// A device's counters.
    pub fn usage(&self, device: usize) -> UsageStats {
        let d = &self.devices[device];
        UsageStats {
            device_id: self.device_id(device).to_string(),
            allocated_bytes: d.allocated,
            reserved_bytes: d.reserved(),
            peak_allocated_bytes: d.peak_allocated,
            peak_reserved_bytes: d.peak_reserved,
            reservation_bytes: d.reservation,
            model_bytes: d.model_bytes,
            budget_bytes: d.budget,
            allocation_count: d.live,
            total_allocations: d.total_allocations,
            total_deallocations: d.total_deallocations,
            failed_allocations: d.failed_allocations,
            average_allocation_time_ms: if d.total_allocations == 0 {
                0.0
            } else {
                d.allocation_time_ms_sum / d.total_allocations as f64
            },
            tenant_bytes: d
                .tenant_bytes
                .iter()
                .map(|(t, b)| (t.to_string(), *b))
                .collect(),
        }
    }

    /// Where an allocation's bytes are in its device's arena: `(offset, size)`; `None` for a
    /// Reservation or an unknown id. For diagnostics and tests.
    pub fn placement_of(&self, id: &Uuid) -> Option<(u64, u64)> {
        let r = self.records.get(id)?;
        r.placement.map(|p| (p.offset(), r.size))
    }

    /// `(allocated_bytes, reserved_bytes)` of a device, without building a report.
    pub fn usage_counters(&self, device: usize) -> (u64, u64) {
        let d = &self.devices[device];
        (d.allocated, d.reserved())
    }

    /// (allocated + reservations) / budget × 100.
    pub fn utilization(&self, device: usize) -> f64 {
        self.devices[device].utilization()
    }

    /// What an allocate on the device could obtain now.
    pub fn available(&mut self, device: usize) -> u64 {
        self.devices[device].available()
    }

    /// How the device's free memory is split up.
    pub fn fragmentation(&mut self, device: usize) -> Fragmentation {
        let free = self.available(device);
        let d = &self.devices[device];
        let largest = d.arena.largest_free_block().min(free);
        Fragmentation {
            device_id: self.device_id(device).to_string(),
            fragmentation_percentage: health::fragmentation_percentage(free, largest),
            free_bytes: free,
            largest_free_block_bytes: largest,
            free_block_count: d.arena.free_regions(),
        }
    }

    /// A device's figures.
    pub fn info(&mut self, device: usize) -> DeviceInfo {
        let frag = self.fragmentation(device);
        let usage = self.utilization(device);
        let d = &mut self.devices[device];
        let cap = d.arena.backend_mut().capacity();
        let backend = d.arena.backend();
        DeviceInfo {
            device_id: backend.device_id().to_string(),
            name: backend.name().to_string(),
            memory_type: backend.memory_type(),
            total_memory: cap.total,
            available_memory: frag.free_bytes,
            used_memory: cap.used(),
            usage_percentage: if cap.total == 0 {
                0.0
            } else {
                cap.used() as f64 / cap.total as f64 * 100.0
            },
            health: health::health(usage, frag.fragmentation_percentage),
            fragmentation_percentage: frag.fragmentation_percentage,
            last_updated: SystemTime::now(),
        }
    }

    /// `health_score` of a device.
    pub fn health_score(&mut self, device: usize) -> f64 {
        let frag = self.fragmentation(device);
        health::health_score(self.utilization(device), frag.fragmentation_percentage)
    }

    /// Bytes of engine bookkeeping: the allocation table and every arena's metadata.
    pub fn metadata_bytes(&self) -> usize {
        self.records.heap_bytes()
            + self
                .devices
                .iter()
                .map(|d| d.arena.metadata_bytes())
                .sum::<usize>()
    }
}

impl AllocationEngine {
    /// How another process maps allocations of `device` given as `(id, offset, size)`: their
    /// ranges widened to whole pages and merged ([`plan_segments`]), then handed to the backend,
    /// which says what holds them ([`crate::backends::Backend::share`]): for `shm` exactly those
    /// ranges of its file; for a GPU the whole physical allocations under them (its driver maps
    /// a physical allocation only from its start), which may reach past the ranges and be
    /// shared by several of them. The pieces, each once, in address order, are laid back to back
    /// as the export's segments; an allocation's place in the byte range is its piece's segment
    /// plus its distance into the piece (an allocation spanning pieces spans adjacent ones,
    /// which follow each other there too). Returns the segments with the file each descriptor
    /// opens, the allocations' places and the range's length; `Ok(None)` when the device's
    /// memory is not shareable.
    pub fn share(
        &self,
        device: usize,
        placed: &[(Uuid, u64, u64)],
    ) -> Result<Option<Shared>, EngineError> {
        let backend = self.devices[device].arena.backend();
        let (merged, _, _) = plan_segments(placed, backend.page_size());
        let mut pieces: std::collections::BTreeMap<u64, crate::backends::SharedPiece> =
            std::collections::BTreeMap::new();
        for m in merged {
            let Some(got) = backend.share(m.file_offset, m.size_bytes)? else {
                return Ok(None);
            };
            for piece in got {
                pieces.entry(piece.offset).or_insert(piece);
            }
        }
        let mut segments = Vec::with_capacity(pieces.len());
        // (piece start, piece end, segment offset), in address order.
        let mut starts = Vec::with_capacity(pieces.len());
        let mut cursor = 0u64;
        for piece in pieces.into_values() {
            starts.push((piece.offset, piece.offset + piece.len, cursor));
            segments.push((
                Segment {
                    offset: cursor,
                    size_bytes: piece.len,
                    file_offset: piece.file_offset,
                },
                piece.file,
            ));
            cursor += piece.len;
        }
        let mut allocations = Vec::with_capacity(placed.len());
        for &(id, at, size) in placed {
            let k = starts.partition_point(|&(start, _, _)| start <= at);
            let (start, _, segment) = k
                .checked_sub(1)
                .map(|k| starts[k])
                .filter(|&(_, end, _)| at < end)
                .ok_or_else(|| EngineError::Backend(not_covered(backend.device_id(), at)))?;
            allocations.push(ExportedAllocation {
                allocation_id: id,
                offset: segment + (at - start),
                size_bytes: size,
            });
        }
        Ok(Some(Shared {
            segments,
            allocations,
            size_bytes: cursor,
        }))
    }

    /// Where an allocation's bytes start in its device's arena (`None` for a Reservation,
    /// which holds none, or one served by the pinned pool, which is not shareable).
    pub fn arena_offset(&self, id: &Uuid) -> Option<u64> {
        let r = self.records.get(id)?;
        if r.pool {
            return None;
        }
        r.placement.as_ref().map(Placement::offset)
    }

    /// The device's UUID (`GPU-…`), for GPUs.
    pub fn device_uuid(&self, device: usize) -> Option<String> {
        self.devices[device].arena.backend().device_uuid()
    }

    /// The kind of memory a device has.
    pub fn memory_type(&self, device: usize) -> crate::domain::MemoryType {
        self.devices[device].arena.backend().memory_type()
    }
}

impl AllocationEngine {
    /// Whether an allocation is in a transfer or still having its pages backed.
    pub fn is_busy(&self, id: &Uuid) -> bool {
        self.records.get(id).is_some_and(|r| r.busy)
    }
}
