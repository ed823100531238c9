//! Compaction: defragmentation passes, their preview, and giving cached pages back.

use super::*;

impl AllocationEngine {
    /// The bytes one defragmentation pass moves on a device (the backend's choice).
    pub fn defragment_pass_bytes(&self, device: usize) -> u64 {
        self.devices[device].arena.backend().defragment_pass_bytes()
    }

    /// One bounded defragmentation pass over a device: moves at most `max_bytes` (at least one
    /// allocation). Persistent allocations and those in `fixed` stay where they are.
    pub fn defragment_pass(
        &mut self,
        device: usize,
        max_bytes: u64,
        fixed: &[Uuid],
    ) -> DefragmentPass {
        let mut fixed_count = 0;
        let mut placements: Vec<(&mut Placement, bool)> = Vec::new();
        for r in self.records.iter_mut() {
            if r.device as usize != device || r.pool {
                continue;
            }
            let fixed_here = r.persistent || r.busy || fixed.contains(&r.id);
            if let Some(p) = r.placement.as_mut() {
                let movable = !fixed_here;
                if !movable {
                    fixed_count += 1;
                }
                placements.push((p, movable));
            }
        }
        // Memory held for the state file stays where it is, untouched.
        let mut held = std::mem::take(&mut self.devices[device].held);
        for (_, p) in &mut held {
            placements.push((p, false));
        }
        let dev = &mut self.devices[device];
        let compaction = dev.arena.compact(&mut placements, max_bytes);
        dev.held = held;
        if compaction.moved_count > 0 {
            // Free space came together: a request that did not fit may now.
            self.room.raise();
        }
        DefragmentPass {
            compaction,
            fixed_count,
        }
    }

    /// The largest single allocation a full `memory.defragment` would make possible on the
    /// device (capped, like `largest_free_block_bytes`, by what the budget allows now).
    /// Walks the device's allocations; moves nothing.
    pub fn defragment_preview(&mut self, device: usize, fixed: &[Uuid]) -> u64 {
        let mut placements: Vec<(Placement, bool)> = self
            .records
            .iter()
            .filter(|r| r.device as usize == device && !r.pool)
            .filter_map(|r| {
                let movable = !(r.persistent || r.busy || fixed.contains(&r.id));
                r.placement.map(|p| (p, movable))
            })
            .chain(self.devices[device].held.iter().map(|(_, p)| (*p, false)))
            .collect();
        let largest = self.devices[device]
            .arena
            .compaction_preview(&mut placements);
        largest.min(self.available(device))
    }

    /// Gives back the device's cached pages; returns the bytes.
    pub fn trim(&mut self, device: usize) -> u64 {
        self.devices[device].arena.trim()
    }
}
