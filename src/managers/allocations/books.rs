//! The engine's books: a device's arena, budget and counters ([`Device`]), and one live
//! allocation's record ([`Record`]). Accounting only; placement decisions live in
//! `placement.rs`.

use super::*;

pub(super) struct Device {
    pub(super) arena: Arena,
    /// Page-locked memory for `Staging` allocations (host devices beside a GPU).
    pub(super) pinned: Option<Arena>,
    pub(super) pressure: PressureTracker,
    pub(super) budget: u64,
    pub(super) allocated: u64,
    pub(super) reservation: u64,
    pub(super) peak_allocated: u64,
    pub(super) peak_reserved: u64,
    pub(super) live: u64,
    pub(super) total_allocations: u64,
    pub(super) total_deallocations: u64,
    pub(super) failed_allocations: u64,
    pub(super) allocation_time_ms_sum: f64,
    pub(super) waiting: u64,
    pub(super) model_bytes: u64,
    pub(super) tally: Tally,
    pub(super) history: History,
    /// Bumped whenever a persistent client allocation comes or goes (state files follow it).
    pub(super) persistent_changes: u64,
    /// Persistent allocations here are recorded in a state file (`--state-dir`).
    pub(super) durable: bool,
    /// The engine's clock.
    pub(super) clock: Arc<dyn Clock>,
    /// Placements of recorded persistent allocations that were freed or moved away, with the
    /// `persistent_changes` that dropped them: their memory is not given back or reused until
    /// a state file that no longer lists them is written ([`AllocationEngine::release_held`]),
    /// so a crash in between never leaves a state file naming memory already given back.
    pub(super) held: Vec<(u64, Placement)>,
    /// Bytes each tenant holds here (allocations, Reservations and the models it loaded),
    /// what its quota is checked against. A tenant holding nothing has no entry.
    pub(super) tenant_bytes: std::collections::HashMap<Arc<str>, u64>,
}

impl Device {
    /// Frees a placement of the device's arena (or pool); a recorded persistent one is held
    /// instead until the state file drops it.
    pub(super) fn free_placement(&mut self, p: &Placement, pool: bool, recorded: bool) {
        if recorded && self.durable && !pool {
            self.held.push((self.persistent_changes, *p));
        } else {
            self.arena_mut(pool).free(p);
        }
    }

    pub(super) fn arena(&self, pool: bool) -> &Arena {
        match (&self.pinned, pool) {
            (Some(p), true) => p,
            _ => &self.arena,
        }
    }

    pub(super) fn arena_mut(&mut self, pool: bool) -> &mut Arena {
        match (&mut self.pinned, pool) {
            (Some(p), true) => p,
            _ => &mut self.arena,
        }
    }

    /// Bytes held from the system: backed pages, and the whole pinned pool.
    pub(super) fn reserved(&self) -> u64 {
        self.arena.backed_bytes() + self.pinned.as_ref().map_or(0, |p| p.backend().len())
    }

    pub(super) fn charged(&self) -> u64 {
        self.allocated + self.reservation
    }

    /// What an allocate could obtain now: room in the budget, capped by what the device has
    /// free plus what this service holds but does not use.
    pub(super) fn available(&mut self) -> u64 {
        let room = self.budget.saturating_sub(self.charged());
        let free = self.arena.backend_mut().capacity().free;
        let pooled = self.arena.backed_bytes().saturating_sub(self.allocated);
        room.min(free.saturating_add(pooled))
    }

    pub(super) fn utilization(&self) -> f64 {
        if self.budget == 0 {
            0.0
        } else {
            self.charged() as f64 / self.budget as f64 * 100.0
        }
    }

    pub(super) fn note_charged(&mut self) {
        let charged = self.charged();
        let clock = &self.clock;
        self.pressure.on_charged_fast(charged, || clock.millis());
    }

    /// Records this second's usage sample in the history (`memory.analytics`).
    pub(super) fn sample_history(&mut self, now: u64) {
        let sample = Sample {
            used_memory: self.arena.backend_mut().capacity().used(),
            allocated_bytes: self.allocated,
            reserved_bytes: self.reserved(),
        };
        self.history.sample(sample, now);
    }

    pub(super) fn note_peaks(&mut self) {
        self.peak_allocated = self.peak_allocated.max(self.allocated);
        self.peak_reserved = self.peak_reserved.max(self.reserved());
    }

    /// Counts `size` bytes more for `tenant`.
    pub(super) fn tenant_add(&mut self, tenant: &Arc<str>, size: u64) {
        match self.tenant_bytes.get_mut(tenant) {
            Some(b) => *b += size,
            None => {
                self.tenant_bytes.insert(Arc::clone(tenant), size);
            }
        }
    }

    /// Counts `size` bytes less for `tenant` (its entry goes when it holds nothing).
    pub(super) fn untenant(&mut self, tenant: &str, size: u64) {
        if let Some(b) = self.tenant_bytes.get_mut(tenant) {
            *b = b.saturating_sub(size);
            if *b == 0 {
                self.tenant_bytes.remove(tenant);
            }
        }
    }

    /// Takes an allocation's bytes off the device's books (freed, or moved elsewhere).
    pub(super) fn unaccount(&mut self, r: &Record) {
        let now = self.clock.millis();
        if r.placement.is_some() {
            let before = self.allocated;
            self.allocated -= r.size;
            self.history.on_allocated(before, self.allocated, now);
        } else {
            self.reservation -= r.size;
        }
        self.note_charged();
        self.live -= 1;
        if matches!(r.owner, Owner::Model(_)) {
            self.model_bytes -= r.size;
        }
        self.tally.remove(r.entry(), r.purpose_slot);
        self.untenant(&r.holder.tenant, r.size);
        if r.persistent && r.owner == Owner::Client {
            self.persistent_changes += 1;
        }
    }
}

/// One live allocation's bookkeeping, kept small (the metadata budget is 200 bytes a live
/// allocation, purpose strings aside).
pub(super) struct Record {
    pub(super) id: Uuid,
    pub(super) size: u64,
    pub(super) seq: u64,
    /// Microseconds since the Unix epoch.
    pub(super) created_us: u64,
    pub(super) placement: Option<Placement>,
    pub(super) purpose: Box<str>,
    pub(super) owner: Owner,
    /// Who asked for it (shared by every allocation of one session).
    pub(super) holder: Arc<Caller>,
    pub(super) device: u16,
    pub(super) kind: MemoryAllocationType,
    pub(super) persistent: bool,
    /// log2 of the requested alignment, for Reservations (0 = none asked).
    pub(super) reservation_align_log2: u8,
    /// In a transfer: not freed, moved or transferred again until it ends.
    pub(super) busy: bool,
    /// The destination of a transfer in progress: not listed until it completes.
    pub(super) hidden: bool,
    /// Lives in the device's pinned pool.
    pub(super) pool: bool,
    /// Its purpose's slot in the device's tally.
    pub(super) purpose_slot: u32,
}

impl HasId for Record {
    fn id(&self) -> &Uuid {
        &self.id
    }
}

impl Record {
    /// ALLOCATION_IN_USE for a client's deallocate or transfer: the allocation is in a transfer
    /// or belongs to a model.
    /// `busy` and `model_hint` finish the two messages.
    pub(super) fn in_use(
        &self,
        allocation_id: &str,
        busy: &str,
        model_hint: &str,
    ) -> Option<EngineError> {
        if self.busy {
            return Some(EngineError::InUse(format!(
                "Allocation {allocation_id} {busy}"
            )));
        }
        match &self.owner {
            Owner::Model(name) => Some(EngineError::InUse(format!(
                "Allocation {allocation_id} holds weights of model {name}{model_hint}"
            ))),
            Owner::Client => None,
        }
    }

    /// A listed persistent client allocation on `device`.
    pub(super) fn persistent_client_on(&self, device: usize) -> bool {
        self.device as usize == device
            && self.persistent
            && self.owner == Owner::Client
            && !self.hidden
    }

    pub(super) fn entry(&self) -> Entry<'_> {
        Entry {
            size: self.size,
            kind: self.kind,
            purpose: &self.purpose,
            persistent: self.persistent,
            client: self.owner == Owner::Client,
        }
    }

    /// What a twin of this allocation on another device is made of (transfers, offloads):
    /// same size, alignment, type, purpose, persistence and owner.
    pub(super) fn twin_spec(&self) -> AllocationSpec {
        AllocationSpec {
            size: self.size,
            alignment: self.alignment(),
            kind: self.kind,
            purpose: self.purpose.to_string(),
            persistent: self.persistent,
            owner: self.owner.clone(),
            holder: Arc::clone(&self.holder),
        }
    }

    pub(super) fn alignment(&self) -> u64 {
        match &self.placement {
            Some(p) => p.alignment(),
            None if self.reservation_align_log2 == 0 => 0,
            None => 1 << self.reservation_align_log2,
        }
    }
}
