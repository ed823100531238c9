//! The allocation engine: every device's arena and budget, every live allocation, and the
//! counters the service reports. Callers serialise access (the service holds it in a mutex).

use super::analytics::{DurationHistogram, History, HistoryReport, Sample};
use super::arena::{Arena, ArenaError, Compaction, Placement};
use super::clock::{Clock, MonotonicClock};
use super::health;
use super::pressure::PressureTracker;
use super::records::{HasId, RecordTable};
use super::room::RoomSignal;
use super::tally::{Entry, TYPE_COUNT, Tally};
use crate::backends::{Backend, BackendError};
use crate::domain::{
    AllocationView, DeviceInfo, Fragmentation, MemoryAllocationType, PressureView, UsageStats,
};
use crate::units::format_bytes;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use uuid::Uuid;

mod compaction;
mod persistence;
mod telemetry;
mod transfer;
mod types;
mod views;

pub use types::*;

/// `" aligned to N"` for an alignment large enough to be why a request does not fit (a page
/// or more), else nothing.
pub fn aligned_note(alignment: u64) -> String {
    if alignment >= 4096 {
        format!(" aligned to {}", format_bytes(alignment))
    } else {
        String::new()
    }
}

struct Device {
    arena: Arena,
    /// Page-locked memory for `Staging` allocations (host devices beside a GPU).
    pinned: Option<Arena>,
    pressure: PressureTracker,
    budget: u64,
    allocated: u64,
    reservation: u64,
    peak_allocated: u64,
    peak_reserved: u64,
    live: u64,
    total_allocations: u64,
    total_deallocations: u64,
    failed_allocations: u64,
    allocation_time_ms_sum: f64,
    waiting: u64,
    model_bytes: u64,
    tally: Tally,
    history: History,
    /// Bumped whenever a persistent client allocation comes or goes (state files follow it).
    persistent_changes: u64,
    /// Persistent allocations here are recorded in a state file (`--state-dir`).
    durable: bool,
    /// The engine's clock.
    clock: Arc<dyn Clock>,
    /// Placements of recorded persistent allocations that were freed or moved away, with the
    /// `persistent_changes` that dropped them: their memory is not given back or reused until
    /// a state file that no longer lists them is written ([`AllocationEngine::release_held`]),
    /// so a crash in between never leaves a state file naming memory already given back.
    held: Vec<(u64, Placement)>,
}

impl Device {
    /// Frees a placement of the device's arena (or pool); a recorded persistent one is held
    /// instead until the state file drops it.
    fn free_placement(&mut self, p: &Placement, pool: bool, recorded: bool) {
        if recorded && self.durable && !pool {
            self.held.push((self.persistent_changes, *p));
        } else {
            self.arena_mut(pool).free(p);
        }
    }

    fn arena(&self, pool: bool) -> &Arena {
        match (&self.pinned, pool) {
            (Some(p), true) => p,
            _ => &self.arena,
        }
    }

    fn arena_mut(&mut self, pool: bool) -> &mut Arena {
        match (&mut self.pinned, pool) {
            (Some(p), true) => p,
            _ => &mut self.arena,
        }
    }

    /// Bytes held from the system: backed pages, and the whole pinned pool.
    fn reserved(&self) -> u64 {
        self.arena.backed_bytes() + self.pinned.as_ref().map_or(0, |p| p.backend().len())
    }

    fn charged(&self) -> u64 {
        self.allocated + self.reservation
    }

    /// What an allocate could obtain now: room in the budget, capped by what the device has
    /// free plus what this service holds but does not use.
    fn available(&mut self) -> u64 {
        let room = self.budget.saturating_sub(self.charged());
        let free = self.arena.backend_mut().capacity().free;
        let pooled = self.arena.backed_bytes().saturating_sub(self.allocated);
        room.min(free.saturating_add(pooled))
    }

    fn utilization(&self) -> f64 {
        if self.budget == 0 {
            0.0
        } else {
            self.charged() as f64 / self.budget as f64 * 100.0
        }
    }

    fn note_charged(&mut self) {
        let charged = self.charged();
        let clock = &self.clock;
        self.pressure.on_charged_fast(charged, || clock.millis());
    }

    /// Records this second's usage sample in the history (`memory.analytics`).
    fn sample_history(&mut self, now: u64) {
        let sample = Sample {
            used_memory: self.arena.backend_mut().capacity().used(),
            allocated_bytes: self.allocated,
            reserved_bytes: self.reserved(),
        };
        self.history.sample(sample, now);
    }

    fn note_peaks(&mut self) {
        self.peak_allocated = self.peak_allocated.max(self.allocated);
        self.peak_reserved = self.peak_reserved.max(self.reserved());
    }

    /// Takes an allocation's bytes off the device's books (freed, or moved elsewhere).
    fn unaccount(&mut self, r: &Record) {
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
        if r.persistent && r.owner == Owner::Client {
            self.persistent_changes += 1;
        }
    }
}

/// One live allocation's bookkeeping, kept small (the metadata budget is 200 bytes a live
/// allocation, purpose strings aside).
struct Record {
    id: Uuid,
    size: u64,
    seq: u64,
    /// Microseconds since the Unix epoch.
    created_us: u64,
    placement: Option<Placement>,
    purpose: Box<str>,
    owner: Owner,
    device: u16,
    kind: MemoryAllocationType,
    persistent: bool,
    /// log2 of the requested alignment, for Reservations (0 = none asked).
    reservation_align_log2: u8,
    /// In a transfer: not freed, moved or transferred again until it ends.
    busy: bool,
    /// The destination of a transfer in progress: not listed until it completes.
    hidden: bool,
    /// Lives in the device's pinned pool.
    pool: bool,
    /// Its purpose's slot in the device's tally.
    purpose_slot: u32,
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
    fn in_use(&self, allocation_id: &str, busy: &str, model_hint: &str) -> Option<EngineError> {
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
    fn persistent_client_on(&self, device: usize) -> bool {
        self.device as usize == device
            && self.persistent
            && self.owner == Owner::Client
            && !self.hidden
    }

    fn entry(&self) -> Entry<'_> {
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
    fn twin_spec(&self) -> AllocationSpec {
        AllocationSpec {
            size: self.size,
            alignment: self.alignment(),
            kind: self.kind,
            purpose: self.purpose.to_string(),
            persistent: self.persistent,
            owner: self.owner.clone(),
        }
    }

    fn alignment(&self) -> u64 {
        match &self.placement {
            Some(p) => p.alignment(),
            None if self.reservation_align_log2 == 0 => 0,
            None => 1 << self.reservation_align_log2,
        }
    }
}

/// Every device and every live allocation.
pub struct AllocationEngine {
    devices: Vec<Device>,
    records: RecordTable<Record>,
    next_seq: u64,
    max_allocations: u64,
    /// Raised whenever bytes go back (see [`RoomSignal`]).
    room: Arc<RoomSignal>,
    /// Where time comes from (see [`Clock`]).
    clock: Arc<dyn Clock>,
}

/// The most live allocations a device may hold, by default (each costs about 160 bytes of
/// bookkeeping).
pub const DEFAULT_MAX_ALLOCATIONS: u64 = 10_000_000;

fn micros(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

impl AllocationEngine {
    /// An engine over the given devices, in the order `list_devices` reports them.
    pub fn new(devices: Vec<DeviceSetup>) -> Self {
        Self::with_clock(devices, Arc::new(MonotonicClock))
    }

    /// An engine over the given devices that reads time from `clock` (tests pass a
    /// [`ManualClock`](super::clock::ManualClock) and advance it instead of sleeping).
    pub fn with_clock(devices: Vec<DeviceSetup>, clock: Arc<dyn Clock>) -> Self {
        AllocationEngine {
            devices: devices
                .into_iter()
                .map(|d| Device {
                    arena: Arena::new(d.backend),
                    pinned: d.pinned.map(Arena::new),
                    pressure: PressureTracker::default(),
                    budget: d.budget,
                    allocated: 0,
                    reservation: 0,
                    peak_allocated: 0,
                    peak_reserved: 0,
                    live: 0,
                    total_allocations: 0,
                    total_deallocations: 0,
                    failed_allocations: 0,
                    allocation_time_ms_sum: 0.0,
                    waiting: 0,
                    model_bytes: 0,
                    tally: Tally::default(),
                    history: History::new(clock.millis()),
                    clock: Arc::clone(&clock),
                    persistent_changes: 0,
                    durable: false,
                    held: Vec::new(),
                })
                .collect(),
            records: RecordTable::new(),
            next_seq: 0,
            max_allocations: DEFAULT_MAX_ALLOCATIONS,
            room: Arc::default(),
            clock,
        }
    }

    /// The signal the engine raises whenever bytes go back: wait on it for room.
    pub fn room(&self) -> Arc<RoomSignal> {
        Arc::clone(&self.room)
    }

    /// Sets the most live allocations a device may hold.
    pub fn set_max_allocations(&mut self, n: u64) {
        self.max_allocations = n.max(1);
    }

    /// The index of a device, by id.
    pub fn device_index(&self, device_id: &str) -> Result<usize, EngineError> {
        self.devices
            .iter()
            .position(|d| d.arena.backend().device_id() == device_id)
            .ok_or_else(|| EngineError::UnknownDevice(device_id.to_string()))
    }

    /// The number of devices.
    pub fn device_count(&self) -> usize {
        self.devices.len()
    }

    /// A device's id.
    pub fn device_id(&self, index: usize) -> &str {
        self.devices[index].arena.backend().device_id()
    }

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
    /// the returned [`Committer`] after releasing the engine; the allocation stays unlisted and
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

    fn place(
        &mut self,
        device: usize,
        spec: &AllocationSpec,
        now: SystemTime,
        defer: bool,
    ) -> Result<(Uuid, Option<DeferredCommit>), EngineError> {
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
        Ok((id, pending))
    }

    fn find(&self, allocation_id: &str) -> Option<Uuid> {
        Uuid::parse_str(allocation_id)
            .ok()
            .filter(|id| self.records.get(id).is_some())
    }

    /// Frees an allocation; with `device`, only if it lives there.
    pub fn deallocate(
        &mut self,
        allocation_id: &str,
        device: Option<usize>,
    ) -> Result<Freed, EngineError> {
        let not_found = || EngineError::AllocationNotFound(allocation_id.to_string());
        let id = self.find(allocation_id).ok_or_else(not_found)?;
        let r = self.records.get(&id).ok_or_else(not_found)?;
        if device.is_some_and(|d| r.device as usize != d) || r.hidden {
            return Err(not_found());
        }
        if let Some(e) = r.in_use(
            allocation_id,
            "is being transferred; deallocate it when the transfer ends",
            "; unload the model instead",
        ) {
            return Err(e);
        }
        self.free_id(&id).ok_or_else(not_found)
    }

    /// Frees an allocation by id.
    pub fn free_id(&mut self, id: &Uuid) -> Option<Freed> {
        let record = self.records.remove(id)?;
        Some(self.release(record))
    }

    fn release(&mut self, record: Record) -> Freed {
        let recorded = record.persistent_client_on(record.device as usize);
        let dev = &mut self.devices[record.device as usize];
        // Off the books first: a recorded persistent placement is held under the change that
        // dropped it.
        dev.unaccount(&record);
        if let Some(p) = &record.placement {
            dev.free_placement(p, record.pool, recorded);
        }
        self.room.raise();
        dev.total_deallocations += 1;
        Freed {
            device_id: dev.arena.backend().device_id().to_string(),
            bytes: record.size,
        }
    }

    /// Frees every client allocation on a device; persistent ones only with `force`.
    pub fn clear(&mut self, device: usize, force: bool) -> Cleared {
        let mut cleared = Cleared::default();
        let mut victims = Vec::new();
        for r in self.records.iter() {
            if r.device as usize != device || r.owner != Owner::Client || r.busy {
                continue;
            }
            if r.persistent && !force {
                cleared.kept_persistent += 1;
            } else {
                victims.push(r.id);
            }
        }
        for id in victims {
            if let Some(f) = self.free_id(&id) {
                cleared.count += 1;
                cleared.bytes += f.bytes;
            }
        }
        cleared
    }

    /// Frees client allocations of the given types, oldest first and type by type, until the
    /// device's budget usage is at most `target_percentage`. Persistent allocations and those
    /// in `preserve` are never freed unless `include_persistent`.
    pub fn reclaim(
        &mut self,
        device: usize,
        kinds: &[MemoryAllocationType],
        target_percentage: f64,
        include_persistent: bool,
        preserve: &[Uuid],
    ) -> Cleared {
        let mut cleared = Cleared::default();
        for kind in kinds {
            if self.devices[device].utilization() <= target_percentage {
                break;
            }
            let mut candidates: Vec<(u64, Uuid)> = self
                .records
                .iter()
                .filter(|r| {
                    r.device as usize == device
                        && r.owner == Owner::Client
                        && r.kind == *kind
                        && (include_persistent || !r.persistent)
                        && !r.busy
                        && !preserve.contains(&r.id)
                })
                .map(|r| (r.seq, r.id))
                .collect();
            candidates.sort_unstable();
            for (_, id) in candidates {
                if self.devices[device].utilization() <= target_percentage {
                    break;
                }
                if let Some(f) = self.free_id(&id) {
                    cleared.count += 1;
                    cleared.bytes += f.bytes;
                }
            }
        }
        cleared
    }

    /// A live allocation by its wire id, or ALLOCATION_NOT_FOUND.
    fn record(&self, allocation_id: &str) -> Result<(Uuid, &Record), EngineError> {
        let not_found = || EngineError::AllocationNotFound(allocation_id.to_string());
        let id = self.find(allocation_id).ok_or_else(not_found)?;
        let r = self.records.get(&id).ok_or_else(not_found)?;
        Ok((id, r))
    }

    fn placement(
        &self,
        allocation_id: &str,
        offset: u64,
        len: usize,
    ) -> Result<(usize, bool, Placement), EngineError> {
        let (_, r) = self.record(allocation_id)?;
        let p = r.placement.ok_or_else(|| {
            EngineError::OutOfRange(format!(
                "Allocation {allocation_id} is a Reservation and holds no bytes"
            ))
        })?;
        if offset
            .checked_add(len as u64)
            .is_none_or(|end| end > r.size)
        {
            return Err(EngineError::OutOfRange(format!(
                "bytes {offset}..{} are outside allocation {allocation_id} of {} bytes",
                offset.saturating_add(len as u64),
                r.size
            )));
        }
        Ok((r.device as usize, r.pool, p))
    }

    /// Copies bytes of an allocation, from `offset` within it, into `buf`.
    pub fn read(
        &self,
        allocation_id: &str,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), EngineError> {
        let (device, pool, p) = self.placement(allocation_id, offset, buf.len())?;
        Ok(self.devices[device].arena(pool).read(&p, offset, buf)?)
    }

    /// Copies `data` into an allocation, from `offset` within it.
    pub fn write(
        &mut self,
        allocation_id: &str,
        offset: u64,
        data: &[u8],
    ) -> Result<(), EngineError> {
        let (device, pool, p) = self.placement(allocation_id, offset, data.len())?;
        Ok(self.devices[device]
            .arena_mut(pool)
            .write(&p, offset, data)?)
    }

    /// Writes `len` bytes into an allocation, from `offset` within it, taken from `fill`
    /// ([`crate::backends::Backend::write_with`]: a file is read straight into the device's
    /// memory or its pinned staging). A failure of `fill` is
    /// `EngineError::Backend(BackendError::Source(_))`.
    pub fn write_with(
        &mut self,
        allocation_id: &str,
        offset: u64,
        len: u64,
        fill: crate::backends::Fill<'_>,
    ) -> Result<(), EngineError> {
        let (device, pool, p) = self.placement(allocation_id, offset, len as usize)?;
        Ok(self.devices[device]
            .arena_mut(pool)
            .write_with(&p, offset, len, fill)?)
    }
}

#[cfg(test)]
mod tests;
