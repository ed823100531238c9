//! Placement: where a new allocation goes (the pinned pool, the arena, or only the books for a
//! reservation), and the checks before it (the allocation limit, the budget, room).

use super::*;

impl AllocationEngine {
    /// Allocates now, or says why not: `NoRoom` if freeing memory could make room, `OverBudget`
    /// if nothing could. A failure changes nothing.
    pub fn try_allocate(
        &mut self,
        device: usize,
        spec: &AllocationSpec,
        now: SystemTime,
    ) -> Result<Uuid, EngineError> {
        self.place(device, spec, now, false).map(|(id, _)| id)
    }

    /// Like [`AllocationEngine::try_allocate`], but where the device's backend can back pages
    /// without the engine (host memory), the new pages are left for the caller to commit with
    /// the returned [`DeferredCommit`] after releasing the engine; the allocation stays unlisted and
    /// busy until [`AllocationEngine::finish_deferred`].
    pub fn try_allocate_deferred(
        &mut self,
        device: usize,
        spec: &AllocationSpec,
        now: SystemTime,
    ) -> Result<(Uuid, Option<DeferredCommit>), EngineError> {
        let defer = self.devices[device].arena.committer().is_some();
        self.place(device, spec, now, defer)
    }

    /// Ends a deferred allocation: publishes it if its pages were committed, or undoes it.
    pub fn finish_deferred(&mut self, id: &Uuid, pending: &DeferredCommit, committed: bool) {
        if committed {
            if let Some(r) = self.records.get_mut(id) {
                r.busy = false;
                r.hidden = false;
                // Listed from now on: a state file written while it was hidden lacks it.
                if r.persistent && r.owner == Owner::Client {
                    self.devices[r.device as usize].persistent_changes += 1;
                }
            }
            return;
        }
        if let Some(record) = self.records.remove(id) {
            let device = record.device as usize;
            let placement = record.placement;
            // Accounting as a free that never was; then the pages committed for it go back.
            let dev = &mut self.devices[device];
            dev.unaccount(&record);
            dev.total_allocations -= 1;
            dev.tally.uncount(record.kind);
            let now = dev.clock.millis();
            dev.history.undo_allocation(record.size, now);
            if let Some(p) = placement {
                dev.arena.abandon(&p, &pending.runs);
            }
        }
    }

    pub(super) fn place(
        &mut self,
        device: usize,
        spec: &AllocationSpec,
        now: SystemTime,
        defer: bool,
    ) -> Result<(Uuid, Option<DeferredCommit>), EngineError> {
        self.check_quota(device, &spec.holder.tenant, spec.size)?;
        let dev = &mut self.devices[device];
        if dev.live >= self.max_allocations {
            return Err(EngineError::TooMany {
                device: dev.arena.backend().device_id().to_string(),
                limit: self.max_allocations,
            });
        }
        if spec.size > dev.budget {
            return Err(EngineError::OverBudget {
                device: dev.arena.backend().device_id().to_string(),
                requested: spec.size,
                budget: dev.budget,
            });
        }
        let available = dev.available();
        let no_room = |dev: &Device, available, largest| EngineError::NoRoom {
            device: dev.arena.backend().device_id().to_string(),
            requested: spec.size,
            alignment: spec.alignment,
            available,
            largest,
        };
        if spec.size > available {
            return Err(no_room(dev, available, None));
        }
        let mut pending = None;
        let mut pool = false;
        let pooled = match (&mut dev.pinned, spec.kind) {
            // Staging buffers and model weights (offloaded models) go to pinned memory while
            // it has room: their copies to and from GPUs then run at the link's speed.
            (Some(pinned), MemoryAllocationType::Staging | MemoryAllocationType::ModelWeights) => {
                pinned.allocate(spec.size, spec.alignment).ok()
            }
            _ => None,
        };
        let placement = if spec.kind == MemoryAllocationType::Reservation {
            None
        } else if let Some(p) = pooled {
            pool = true;
            Some(p)
        } else {
            let placed = if defer {
                dev.arena
                    .allocate_deferred(spec.size, spec.alignment)
                    .map(|(p, runs)| {
                        if !runs.is_empty() {
                            pending = dev
                                .arena
                                .committer()
                                .map(|committer| DeferredCommit { runs, committer });
                        }
                        p
                    })
            } else {
                dev.arena.allocate(spec.size, spec.alignment)
            };
            match placed {
                Ok(p) => Some(p),
                Err(ArenaError::NoSpace) => {
                    // The arena spans more than the budget: what one request could get is
                    // capped by what is available. When that is enough, the alignment asked
                    // for is why it did not fit (the message names it), not fragmentation.
                    let largest = dev.arena.largest_free_block().min(available);
                    return Err(no_room(
                        dev,
                        available,
                        (largest < spec.size).then_some(largest),
                    ));
                }
                Err(ArenaError::Backend(e)) => return Err(e.into()),
            }
        };
        Ok(self.book(device, spec, placement, pool, pending, now))
    }

    /// Places allocations for `specs` (each of a non-zero size, default alignment, not a
    /// Reservation) back to back on `device`, their pages backed in one go: a model's tensors,
    /// so that they form one region (an export of the model is then a few segments). Errors
    /// like [`AllocationEngine::try_allocate`] for the whole group, which is all placed or not
    /// at all: `NoRoom` names the group's total when no free range holds it.
    pub fn try_allocate_group(
        &mut self,
        device: usize,
        specs: &[AllocationSpec],
        now: SystemTime,
    ) -> Result<Vec<Uuid>, EngineError> {
        if let Some(first) = specs.first() {
            let total = specs.iter().map(|s| s.size).sum();
            self.check_quota(device, &first.holder.tenant, total)?;
        }
        let dev = &mut self.devices[device];
        let name = dev.arena.backend().device_id().to_string();
        if dev.live + specs.len() as u64 > self.max_allocations {
            return Err(EngineError::TooMany {
                device: name,
                limit: self.max_allocations,
            });
        }
        let total: u64 = specs.iter().map(|s| s.size).sum();
        if total > dev.budget {
            return Err(EngineError::OverBudget {
                device: name,
                requested: total,
                budget: dev.budget,
            });
        }
        let available = dev.available();
        let sizes: Vec<u64> = specs.iter().map(|s| s.size).collect();
        let placed = if total > available || specs.iter().any(|s| s.size == 0) {
            Err(ArenaError::NoSpace)
        } else {
            dev.arena.allocate_group(&sizes)
        };
        let placements = match placed {
            Ok(p) => p,
            Err(ArenaError::NoSpace) => {
                let largest = dev.arena.largest_free_block().min(available);
                return Err(EngineError::NoRoom {
                    device: name,
                    requested: total,
                    alignment: 0,
                    available,
                    largest: (largest < total).then_some(largest),
                });
            }
            Err(ArenaError::Backend(e)) => return Err(e.into()),
        };
        Ok(specs
            .iter()
            .zip(placements)
            .map(|(spec, p)| self.book(device, spec, Some(p), false, None, now).0)
            .collect())
    }

    /// Books a placed allocation: counters, history, tally, and its record.
    fn book(
        &mut self,
        device: usize,
        spec: &AllocationSpec,
        placement: Option<Placement>,
        pool: bool,
        pending: Option<DeferredCommit>,
        now: SystemTime,
    ) -> (Uuid, Option<DeferredCommit>) {
        let dev = &mut self.devices[device];
        let now_ms = dev.clock.millis();
        if placement.is_some() {
            let before = dev.allocated;
            dev.allocated += spec.size;
            dev.note_peaks();
            dev.history.on_allocated(before, dev.allocated, now_ms);
        } else {
            dev.reservation += spec.size;
        }
        dev.note_charged();
        dev.live += 1;
        dev.total_allocations += 1;
        dev.history.on_allocation(spec.size, now_ms);
        let purpose_slot = dev.tally.add(Entry {
            size: spec.size,
            kind: spec.kind,
            purpose: &spec.purpose,
            persistent: spec.persistent,
            client: spec.owner == Owner::Client,
        });
        if matches!(spec.owner, Owner::Model(_)) {
            dev.model_bytes += spec.size;
        }
        dev.tenant_add(&spec.holder.tenant, spec.size);
        if spec.persistent && spec.owner == Owner::Client {
            dev.persistent_changes += 1;
        }
        let (id, slot) = self.records.next_id();
        let record = Record {
            id,
            size: spec.size,
            seq: self.next_seq,
            created_us: micros(now),
            placement,
            purpose: spec.purpose.as_str().into(),
            owner: spec.owner.clone(),
            holder: Arc::clone(&spec.holder),
            device: device as u16,
            kind: spec.kind,
            persistent: spec.persistent,
            reservation_align_log2: if spec.alignment == 0 {
                0
            } else {
                spec.alignment.trailing_zeros() as u8
            },
            busy: pending.is_some(),
            hidden: pending.is_some(),
            pool,
            purpose_slot,
        };
        self.next_seq += 1;
        self.records.insert(slot, record);
        (id, pending)
    }
}
