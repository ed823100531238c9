//! The allocation engine: every device's arena and budget, every live allocation, and the
//! counters the protocol reports. Callers serialise access (the service holds it in a mutex).

use super::analytics::{DurationHistogram, History, HistoryReport, Sample};
use super::arena::{Arena, ArenaError, Compaction, Placement};
use super::health;
use super::pressure::PressureTracker;
use super::records::{HasId, RecordTable};
use super::tally::{Entry, TYPE_COUNT, Tally};
use crate::backends::coarse_millis;
use crate::backends::{Backend, BackendError};
use crate::protocol::MemoryPressure;
use crate::protocol::{
    MemoryAllocation, MemoryAllocationType, MemoryFragmentation, MemoryInfo, MemoryUsageStats,
    Timestamp,
};
use crate::units::format_bytes;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use uuid::Uuid;

/// `" aligned to N"` for an alignment large enough to be why a request does not fit (a page
/// or more), else nothing.
pub fn aligned_note(alignment: u64) -> String {
    if alignment >= 4096 {
        format!(" aligned to {}", format_bytes(alignment))
    } else {
        String::new()
    }
}

/// What the engine refuses, in terms the service turns into protocol errors.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// No device with this id.
    #[error("Device {0} not found")]
    UnknownDevice(String),
    /// No live allocation with this id (on this device, if one was named).
    #[error("Allocation {0} not found")]
    AllocationNotFound(String),
    /// Not enough room now; freeing memory could make room.
    #[error("{device}: requested {}{}, {} available{}", format_bytes(*requested), aligned_note(*alignment), format_bytes(*available),
        match largest {
            Some(l) => format!(", but the largest free block is {} (fragmented: memory.defragment may help)", format_bytes(*l)),
            None => String::new(),
        })]
    NoRoom {
        /// The device.
        device: String,
        /// Bytes asked for.
        requested: u64,
        /// The alignment asked for (0: the device's default).
        alignment: u64,
        /// Bytes available now.
        available: u64,
        /// When the bytes are there but not in one piece: the largest piece.
        largest: Option<u64>,
    },
    /// More than the device's budget: it can never fit.
    #[error("{device}: requested {}, more than the device's budget of {}", format_bytes(*requested), format_bytes(*budget))]
    OverBudget {
        /// The device.
        device: String,
        /// Bytes asked for.
        requested: u64,
        /// The budget.
        budget: u64,
    },
    /// The device holds as many allocations as it may.
    #[error(
        "{device}: {limit} live allocations, the most a device may hold (--max-allocations); free some first"
    )]
    TooMany {
        /// The device.
        device: String,
        /// The limit.
        limit: u64,
    },
    /// The allocation holds no bytes (a Reservation) or the range is outside it.
    #[error("{0}")]
    OutOfRange(String),
    /// A transfer that cannot be: same device, wrong source, nothing to move.
    #[error("{0}")]
    InvalidTransfer(String),
    /// The allocation belongs to a model or is being transferred.
    #[error("{0}")]
    InUse(String),
    /// The backend failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// Who holds an allocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// A protocol client.
    Client,
    /// A model, by name.
    Model(Arc<str>),
}

impl Owner {
    /// `client` or `model:<name>`.
    pub fn wire(&self) -> String {
        match self {
            Owner::Client => "client".to_string(),
            Owner::Model(name) => format!("model:{name}"),
        }
    }

    fn matches(&self, wire: &str) -> bool {
        match self {
            Owner::Client => wire == "client",
            Owner::Model(name) => wire.strip_prefix("model:") == Some(name),
        }
    }
}

/// A device to create: its backend and budget.
pub struct DeviceSetup {
    /// The memory behind the device; its length should be at least the budget.
    pub backend: Box<dyn Backend>,
    /// The most bytes (allocations plus reservations) the service may hold on it.
    pub budget: u64,
    /// Page-locked host memory serving this (host) device's `Staging` allocations, so their
    /// transfers to and from GPUs need no staging copy.
    pub pinned: Option<Box<dyn Backend>>,
}

/// What to allocate.
#[derive(Debug, Clone)]
pub struct AllocationSpec {
    /// Bytes, at least 1.
    pub size: u64,
    /// 0 = device default, else a power of two.
    pub alignment: u64,
    /// What it is for.
    pub kind: MemoryAllocationType,
    /// A label.
    pub purpose: String,
    /// Kept by `clear` without force; never moved.
    pub persistent: bool,
    /// Who holds it.
    pub owner: Owner,
}

impl AllocationSpec {
    /// `size` bytes of a client's General allocation, default alignment, no purpose.
    pub fn general(size: u64) -> Self {
        AllocationSpec {
            size,
            alignment: 0,
            kind: MemoryAllocationType::General,
            purpose: String::new(),
            persistent: false,
            owner: Owner::Client,
        }
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
        self.pressure.on_charged_fast(charged, coarse_millis);
    }

    fn note_peaks(&mut self) {
        self.peak_allocated = self.peak_allocated.max(self.allocated);
        self.peak_reserved = self.peak_reserved.max(self.reserved());
    }

    /// Takes an allocation's bytes off the device's books (freed, or moved elsewhere).
    fn unaccount(&mut self, r: &Record) {
        let now = coarse_millis();
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

/// Pages of a new allocation still to be committed, and what commits them.
pub struct DeferredCommit {
    /// Byte ranges to back.
    pub runs: Vec<(u64, u64)>,
    /// Backs them without the engine.
    pub committer: std::sync::Arc<dyn crate::backends::Committer>,
}

impl DeferredCommit {
    /// Backs every range.
    pub fn commit(&self) -> Result<(), BackendError> {
        self.runs
            .iter()
            .try_for_each(|&(offset, len)| self.committer.commit(offset, len))
    }
}

/// A freed allocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Freed {
    /// Its device id.
    pub device_id: String,
    /// Its size.
    pub bytes: u64,
}

/// What `clear` or a reclaim did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cleared {
    /// Allocations freed.
    pub count: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Persistent allocations kept.
    pub kept_persistent: u64,
}

/// Filters for listing allocations.
#[derive(Debug, Clone, Default)]
pub struct AllocationFilter {
    /// Only this type.
    pub kind: Option<MemoryAllocationType>,
    /// Only this purpose.
    pub purpose: Option<String>,
    /// Only this owner (`client`, `model:<name>`).
    pub owner: Option<String>,
}

/// What one defragmentation pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DefragmentPass {
    /// The arena's report.
    pub compaction: Compaction,
    /// Allocations that may not move (persistent, in use).
    pub fixed_count: u64,
}

/// A device's figures for metrics and advice: plain data, gathered from running totals.
#[derive(Debug, Clone)]
pub struct DeviceTelemetry {
    /// The device.
    pub device_id: String,
    /// RAM, SharedMemory or VRAM.
    pub memory_type: crate::protocol::MemoryType,
    /// The device's capacity.
    pub capacity_bytes: u64,
    /// In use on the device, by every process.
    pub used_bytes: u64,
    /// The service's budget for it.
    pub budget_bytes: u64,
    /// Bytes of live allocations holding memory.
    pub allocated_bytes: u64,
    /// Bytes of live Reservations.
    pub reservation_bytes: u64,
    /// Bytes held from the device.
    pub reserved_bytes: u64,
    /// Bytes of model weights resident here.
    pub model_bytes: u64,
    /// The most bytes allocated at once since the start.
    pub peak_allocated_bytes: u64,
    /// How the free memory is split up.
    pub fragmentation: MemoryFragmentation,
    /// The pressure reading.
    pub pressure: MemoryPressure,
    /// Seconds during which a request waited for memory, since the start.
    pub stall_seconds_total: f64,
    /// The most budget a request refused in the last 60 s would have needed.
    pub max_failed_demand_60s: Option<u64>,
    /// Live allocations.
    pub live_allocations: u64,
    /// Allocations since the start.
    pub allocations_total: u64,
    /// Deallocations since the start.
    pub deallocations_total: u64,
    /// OUT_OF_MEMORY answers since the start.
    pub failures_total: u64,
    /// Live bytes by type (index = the type's value).
    pub bytes_by_type: [u64; TYPE_COUNT],
    /// Live allocations by type.
    pub live_by_type: [u64; TYPE_COUNT],
    /// Allocations since the start, by type.
    pub total_by_type: [u64; TYPE_COUNT],
    /// Live bytes of non-persistent client allocations, by type.
    pub reclaimable_client_bytes: [u64; TYPE_COUNT],
    /// Live persistent client allocations.
    pub persistent_client_count: u64,
    /// Bytes transferred onto the device since the start.
    pub transferred_in_bytes: u64,
    /// Bytes transferred off the device since the start.
    pub transferred_out_bytes: u64,
    /// `memory.allocate` durations since the start.
    pub durations: DurationHistogram,
}

/// A persistent allocation of an earlier worker, to adopt (or as saved for that).
#[derive(Debug, Clone)]
pub struct Adopted {
    /// Its id (kept).
    pub id: Uuid,
    /// Its byte offset in the device's memory (kept).
    pub offset: u64,
    /// Size, alignment, type, purpose (persistent, client).
    pub spec: AllocationSpec,
    /// When it was made, microseconds since the Unix epoch.
    pub created_us: u64,
}

/// A device's arena in equal buckets (the dashboard's memory map).
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryMap {
    /// Bytes of the arena's address range.
    pub arena_bytes: u64,
    /// Bytes per bucket (the last may be shorter).
    pub bucket_bytes: u64,
    /// Per bucket, in address order: bytes of live allocations by type (index = type value).
    pub buckets: Vec<[u64; TYPE_COUNT]>,
}

/// Every device and every live allocation.
pub struct AllocationEngine {
    devices: Vec<Device>,
    records: RecordTable<Record>,
    next_seq: u64,
    max_allocations: u64,
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
                    history: History::new(coarse_millis()),
                    persistent_changes: 0,
                    durable: false,
                    held: Vec::new(),
                })
                .collect(),
            records: RecordTable::new(),
            next_seq: 0,
            max_allocations: DEFAULT_MAX_ALLOCATIONS,
        }
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
            dev.history.undo_allocation(record.size, coarse_millis());
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
        let now_ms = coarse_millis();
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

    /// Adds the time an allocation took (waiting included) to the device's average and its
    /// latency figures.
    pub fn record_allocation_time(&mut self, device: usize, ms: f64) {
        let d = &mut self.devices[device];
        d.allocation_time_ms_sum += ms;
        d.history.on_latency(ms, coarse_millis());
    }

    /// Counts an allocation of `requested` bytes that ended in OUT_OF_MEMORY.
    pub fn record_failure(&mut self, device: usize, requested: u64) {
        let d = &mut self.devices[device];
        d.failed_allocations += 1;
        let demand = d.charged().saturating_add(requested);
        d.pressure.on_failure(demand, coarse_millis());
    }

    /// Takes each device's usage sample for this second (`memory.analytics`' time series).
    pub fn sample_history(&mut self) {
        let now = coarse_millis();
        for d in &mut self.devices {
            let used = d.arena.backend_mut().capacity().used();
            let sample = Sample {
                used_memory: used,
                allocated_bytes: d.allocated,
                reserved_bytes: d.reserved(),
            };
            d.history.sample(sample, now);
        }
    }

    /// A device's history over the last `window_seconds` (this second sampled first), and the
    /// monotonic millisecond it was read at. Never walks the allocations.
    pub fn history(&mut self, device: usize, window_seconds: u64) -> (HistoryReport, u64) {
        let now = coarse_millis();
        let d = &mut self.devices[device];
        let used = d.arena.backend_mut().capacity().used();
        let sample = Sample {
            used_memory: used,
            allocated_bytes: d.allocated,
            reserved_bytes: d.reserved(),
        };
        d.history.sample(sample, now);
        (d.history.report(window_seconds, d.allocated, now), now)
    }

    /// A device's live bytes by purpose: the `limit` largest, the rest summed under
    /// `rest_label`.
    pub fn bytes_by_purpose(
        &self,
        device: usize,
        limit: usize,
        rest_label: &str,
    ) -> Vec<(String, u64)> {
        self.devices[device]
            .tally
            .bytes_by_purpose(limit, rest_label)
    }

    /// Everything metrics and advice need of a device, from running totals (never walking the
    /// allocations). Reads the pressure level as `memory.get_pressure` does.
    pub fn telemetry(&mut self, device: usize, hold_ms: u64) -> DeviceTelemetry {
        let pressure = self.pressure(device, hold_ms);
        let fragmentation = self.fragmentation(device);
        let now = coarse_millis();
        let d = &mut self.devices[device];
        let capacity = d.arena.backend_mut().capacity();
        let backend = d.arena.backend();
        DeviceTelemetry {
            device_id: backend.device_id().to_string(),
            memory_type: backend.memory_type(),
            capacity_bytes: capacity.total,
            used_bytes: capacity.used(),
            budget_bytes: d.budget,
            allocated_bytes: d.allocated,
            reservation_bytes: d.reservation,
            reserved_bytes: d.reserved(),
            model_bytes: d.model_bytes,
            peak_allocated_bytes: d.peak_allocated,
            fragmentation,
            pressure,
            stall_seconds_total: d.pressure.stall_total_ms(now) as f64 / 1000.0,
            max_failed_demand_60s: d.pressure.max_failed_demand(now),
            live_allocations: d.live,
            allocations_total: d.total_allocations,
            deallocations_total: d.total_deallocations,
            failures_total: d.failed_allocations,
            bytes_by_type: d.tally.bytes_by_type,
            live_by_type: d.tally.live_by_type,
            total_by_type: d.tally.total_by_type,
            reclaimable_client_bytes: d.tally.reclaimable_client_bytes,
            persistent_client_count: d.tally.persistent_client_count,
            transferred_in_bytes: d.tally.transferred_in_bytes,
            transferred_out_bytes: d.tally.transferred_out_bytes,
            durations: d.history.durations().clone(),
        }
    }

    /// Counts a request starting (`+1`) or ending (`-1`) a wait for memory.
    pub fn record_waiting(&mut self, device: usize, delta: i64) {
        let d = &mut self.devices[device];
        d.waiting = d.waiting.saturating_add_signed(delta);
        d.pressure.on_waiting(d.waiting, coarse_millis());
    }

    /// A device's memory pressure now; a lower level shows only after `hold_ms`.
    pub fn pressure(&mut self, device: usize, hold_ms: u64) -> MemoryPressure {
        let available = self.available(device);
        let d = &mut self.devices[device];
        let usage = d.utilization();
        let reading = d
            .pressure
            .read(usage, d.waiting, d.charged(), coarse_millis(), hold_ms);
        MemoryPressure {
            device_id: d.arena.backend().device_id().to_string(),
            level: reading.level,
            usage_percentage: usage,
            available_memory: available,
            waiting_requests: d.waiting,
            stall_ms_10s: reading.stall_ms_10s,
            stall_ms_60s: reading.stall_ms_60s,
            failed_allocations_60s: reading.failed_allocations_60s,
            trend_bytes_per_second: reading.trend_bytes_per_second,
        }
    }

    /// Requests waiting for memory on a device now.
    pub fn waiting(&self, device: usize) -> u64 {
        self.devices[device].waiting
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
        for (_, p) in held.iter_mut() {
            placements.push((p, false));
        }
        let dev = &mut self.devices[device];
        let compaction = dev.arena.compact(&mut placements, max_bytes);
        dev.held = held;
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

    /// A device's persistent client allocations made before `before`, largest first, at most
    /// `limit`: (id, bytes, made at). Walks the allocations only when the device has some.
    pub fn persistent_allocations(
        &self,
        device: usize,
        before: SystemTime,
        limit: usize,
    ) -> Vec<(Uuid, u64, SystemTime)> {
        if self.devices[device].tally.persistent_client_count == 0 {
            return Vec::new();
        }
        let cut = micros(before);
        let mut v: Vec<(Uuid, u64, SystemTime)> = self
            .records
            .iter()
            .filter(|r| r.persistent_client_on(device) && !r.busy && r.created_us < cut)
            .map(|r| {
                (
                    r.id,
                    r.size,
                    UNIX_EPOCH + Duration::from_micros(r.created_us),
                )
            })
            .collect();
        v.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.2.cmp(&b.2)));
        v.truncate(limit);
        v
    }

    /// Gives back the device's cached pages; returns the bytes.
    pub fn trim(&mut self, device: usize) -> u64 {
        self.devices[device].arena.trim()
    }

    /// Starts a transfer of `allocation_id` from `src` to `dst`: checks the rules, allocates
    /// the destination (same size, alignment, type, purpose and persistence; no waiting) and
    /// marks both ends busy. Returns the source and destination ids and the size.
    pub fn begin_transfer(
        &mut self,
        allocation_id: &str,
        src: usize,
        dst: usize,
        now: SystemTime,
    ) -> Result<(Uuid, Uuid, u64, Option<DeferredCommit>), EngineError> {
        if src == dst {
            return Err(EngineError::InvalidTransfer(
                "Source and destination cannot be the same".into(),
            ));
        }
        let id = self
            .find(allocation_id)
            .ok_or_else(|| EngineError::AllocationNotFound(allocation_id.to_string()))?;
        let r = self
            .records
            .get(&id)
            .ok_or_else(|| EngineError::AllocationNotFound(allocation_id.to_string()))?;
        if r.hidden {
            return Err(EngineError::AllocationNotFound(allocation_id.to_string()));
        }
        if r.device as usize != src {
            return Err(EngineError::InvalidTransfer(format!(
                "Allocation {allocation_id} is on {}, not on {}",
                self.device_id(r.device as usize),
                self.device_id(src)
            )));
        }
        if r.placement.is_none() {
            return Err(EngineError::InvalidTransfer(format!(
                "Allocation {allocation_id} is a Reservation: it holds no bytes to transfer"
            )));
        }
        if let Some(e) = r.in_use(allocation_id, "is already being transferred", "") {
            return Err(e);
        }
        let spec = r.twin_spec();
        let size = r.size;
        let defer = self.devices[dst].arena.committer().is_some();
        let (dst_id, pending) = self.place(dst, &spec, now, defer)?;
        if let Some(d) = self.records.get_mut(&dst_id) {
            d.busy = true;
            d.hidden = true;
        }
        if let Some(s) = self.records.get_mut(&id) {
            s.busy = true;
        }
        Ok((id, dst_id, size, pending))
    }

    /// Undoes [`AllocationEngine::begin_transfer`] whose destination pages could not be
    /// committed.
    pub fn abandon_transfer(&mut self, src_id: &Uuid, dst_id: &Uuid, pending: &DeferredCommit) {
        self.finish_deferred(dst_id, pending, false);
        if let Some(s) = self.records.get_mut(src_id) {
            s.busy = false;
        }
    }

    /// Copies `len` bytes at `offset` of a transfer's source into its destination.
    pub fn transfer_chunk(
        &mut self,
        src_id: &Uuid,
        dst_id: &Uuid,
        offset: u64,
        len: u64,
    ) -> Result<(), EngineError> {
        let gone = || EngineError::AllocationNotFound(src_id.to_string());
        let s = self.records.get(src_id).ok_or_else(gone)?;
        let d = self.records.get(dst_id).ok_or_else(gone)?;
        let (sd, dd) = (s.device as usize, d.device as usize);
        let (s_pool, d_pool) = (s.pool, d.pool);
        let (sp, dp) = (s.placement.ok_or_else(gone)?, d.placement.ok_or_else(gone)?);
        if sd == dd || offset + len > s.size {
            return Err(EngineError::InvalidTransfer("bad transfer chunk".into()));
        }
        let (so, doff) = (sp.offset() + offset, dp.offset() + offset);
        // Two devices of one Vec: borrow them apart.
        let (src_dev, dst_dev) = if sd < dd {
            let (a, b) = self.devices.split_at_mut(dd);
            (&a[sd], &mut b[0])
        } else {
            let (a, b) = self.devices.split_at_mut(sd);
            (&b[0], &mut a[dd])
        };
        let src_backend = src_dev.arena(s_pool).backend();
        let dst_backend = dst_dev.arena_mut(d_pool).backend_mut();
        // One side copies straight from or into the other's memory: both are guarded against
        // memory another process takes away meanwhile (an error then, never a signal).
        let (src_token, dst_token) = (src_backend.begin_access(), dst_backend.begin_access());
        let copied = if let Some(bytes) = src_backend.host_slice(so, len) {
            dst_backend.write(doff, bytes)
        } else if let Some(bytes) = dst_backend.host_slice_mut(doff, len) {
            src_backend.read(so, bytes)
        } else {
            let mut staging = vec![0u8; len as usize];
            src_backend
                .read(so, &mut staging)
                .and_then(|()| dst_backend.write(doff, &staging))
        };
        let src_ok = src_backend.end_access(src_token);
        let dst_ok = dst_backend.end_access(dst_token);
        copied.and(src_ok).and(dst_ok)?;
        Ok(())
    }

    /// Ends a transfer whose bytes are all copied. A move gives the source's id the
    /// destination's memory and frees the source's; a copy publishes the destination. Returns
    /// the destination's id.
    pub fn finish_transfer(
        &mut self,
        src_id: &Uuid,
        dst_id: &Uuid,
        copy: bool,
    ) -> Result<Uuid, EngineError> {
        let gone = || EngineError::AllocationNotFound(src_id.to_string());
        if copy {
            let d = self.records.get_mut(dst_id).ok_or_else(gone)?;
            d.busy = false;
            d.hidden = false;
            let (size, dst_device) = (d.size, d.device as usize);
            // Listed from now on: a state file written while it was hidden lacks it.
            if d.persistent && d.owner == Owner::Client {
                self.devices[dst_device].persistent_changes += 1;
            }
            if let Some(s) = self.records.get_mut(src_id) {
                s.busy = false;
                self.devices[s.device as usize].tally.transferred_out_bytes += size;
            }
            self.devices[dst_device].tally.transferred_in_bytes += size;
            return Ok(*dst_id);
        }
        let dst = self.records.remove(dst_id).ok_or_else(gone)?;
        let Some(src) = self.records.get_mut(src_id) else {
            // The source vanished (shutdown): give the destination back.
            self.release(dst);
            return Err(gone());
        };
        let old_device = src.device as usize;
        let old_placement = src.placement;
        let old_pool = src.pool;
        let recorded = src.persistent_client_on(old_device);
        // The destination device keeps its accounting (the memory stays); the source device
        // gives its bytes back as a deallocation, books as they were before the move.
        let dev = &mut self.devices[old_device];
        dev.unaccount(src);
        if let Some(p) = old_placement {
            dev.free_placement(&p, old_pool, recorded);
        }
        dev.total_deallocations += 1;
        dev.tally.transferred_out_bytes += src.size;
        self.devices[dst.device as usize].tally.transferred_in_bytes += src.size;
        src.device = dst.device;
        src.placement = dst.placement;
        src.pool = dst.pool;
        src.purpose_slot = dst.purpose_slot;
        src.busy = false;
        // Listed on its new device from now on.
        if src.persistent && src.owner == Owner::Client {
            self.devices[dst.device as usize].persistent_changes += 1;
        }
        Ok(*src_id)
    }

    /// Moves an allocation (a model's too) to another device, keeping its id: the engine's own
    /// move, for offloading and restoring models. Copies under the caller's hold of the engine;
    /// on failure the allocation stays where it was.
    pub fn relocate(&mut self, id: &Uuid, dst: usize, now: SystemTime) -> Result<(), EngineError> {
        let gone = || EngineError::AllocationNotFound(id.to_string());
        let r = self.records.get(id).ok_or_else(gone)?;
        if r.device as usize == dst {
            return Ok(());
        }
        let spec = r.twin_spec();
        let size = r.size;
        let (dst_id, _) = self.place(dst, &spec, now, false)?;
        if let Some(d) = self.records.get_mut(&dst_id) {
            d.busy = true;
            d.hidden = true;
        }
        let mut done = 0;
        while done < size {
            let len = (256u64 << 20).min(size - done);
            if let Err(e) = self.transfer_chunk(id, &dst_id, done, len) {
                self.free_id(&dst_id);
                return Err(e);
            }
            done += len;
        }
        self.finish_transfer(id, &dst_id, false).map(|_| ())
    }

    /// Abandons a transfer: frees the destination, leaves the source as it was.
    pub fn abort_transfer(&mut self, src_id: &Uuid, dst_id: &Uuid) {
        if let Some(dst) = self.records.remove(dst_id) {
            self.release(dst);
        }
        if let Some(s) = self.records.get_mut(src_id) {
            s.busy = false;
        }
    }

    /// The key that turns record slots into ids (saved with persistent state, so a later
    /// worker can adopt the same ids).
    pub fn id_key(&self) -> u32 {
        self.records.key()
    }

    /// Sets the id key; only before any allocation exists.
    pub fn set_id_key(&mut self, key: u32) -> bool {
        self.records.set_key(key)
    }

    /// How many times a persistent client allocation came or went on a device.
    pub fn persistent_changes(&self, device: usize) -> u64 {
        self.devices[device].persistent_changes
    }

    /// The file another process maps a device's memory through, if it has one.
    pub fn handle_path(&self, device: usize) -> Option<std::path::PathBuf> {
        self.devices[device]
            .arena
            .backend()
            .handle(0)
            .map(|h| std::path::PathBuf::from(h.path))
    }

    /// Records a device's persistent allocations in a state file from now on: the memory of
    /// one that is freed or moved away is held until [`AllocationEngine::release_held`] says
    /// a state file without it is written.
    pub fn set_durable(&mut self, device: usize) {
        self.devices[device].durable = true;
    }

    /// A state file of `generation` (a [`AllocationEngine::persistent_changes`] figure) is
    /// written: gives back the memory of the persistent allocations it no longer lists.
    /// Returns the bytes.
    pub fn release_held(&mut self, device: usize, generation: u64) -> u64 {
        let dev = &mut self.devices[device];
        let mut released = 0;
        let mut kept = Vec::new();
        for (g, p) in std::mem::take(&mut dev.held) {
            if g <= generation {
                released += p.block_bytes();
                dev.arena.free(&p);
            } else {
                kept.push((g, p));
            }
        }
        dev.held = kept;
        released
    }

    /// A device's persistent client allocations as they would be adopted later.
    pub fn persistent_state(&self, device: usize) -> Vec<Adopted> {
        let mut v: Vec<Adopted> = self
            .records
            .iter()
            .filter(|r| r.persistent_client_on(device) && !r.pool)
            .filter_map(|r| {
                r.placement.map(|p| Adopted {
                    id: r.id,
                    offset: p.offset(),
                    spec: r.twin_spec(),
                    created_us: r.created_us,
                })
            })
            .collect();
        v.sort_by_key(|a| a.offset);
        v
    }

    /// Takes over persistent allocations an earlier worker left on a device (which must have
    /// none yet): same ids, offsets and bytes. Everything else in the device's memory is given
    /// back. A failure adopts nothing.
    pub fn adopt(&mut self, device: usize, items: Vec<Adopted>) -> Result<usize, EngineError> {
        let dev = &mut self.devices[device];
        if dev.live > 0 {
            return Err(EngineError::OutOfRange(
                "adopting allocations needs an empty device".into(),
            ));
        }
        let total: u64 = items.iter().map(|a| a.spec.size).sum();
        if total > dev.budget {
            return Err(EngineError::OverBudget {
                device: dev.arena.backend().device_id().to_string(),
                requested: total,
                budget: dev.budget,
            });
        }
        let ranges: Vec<(u64, u64, u64)> = items
            .iter()
            .map(|a| (a.offset, a.spec.size, a.spec.alignment))
            .collect();
        let placements = dev.arena.adopt(&ranges).map_err(EngineError::OutOfRange)?;
        let n = items.len();
        for (a, placement) in items.into_iter().zip(placements) {
            let dev = &mut self.devices[device];
            dev.allocated += a.spec.size;
            dev.live += 1;
            dev.total_allocations += 1;
            dev.note_peaks();
            let purpose_slot = dev.tally.add(Entry {
                size: a.spec.size,
                kind: a.spec.kind,
                purpose: &a.spec.purpose,
                persistent: true,
                client: true,
            });
            let record = Record {
                id: a.id,
                size: a.spec.size,
                seq: self.next_seq,
                created_us: a.created_us,
                placement: Some(placement),
                purpose: a.spec.purpose.as_str().into(),
                owner: Owner::Client,
                device: device as u16,
                kind: a.spec.kind,
                persistent: true,
                reservation_align_log2: 0,
                busy: false,
                hidden: false,
                pool: false,
                purpose_slot,
            };
            self.next_seq += 1;
            if self.records.adopt(record).is_err() {
                return Err(EngineError::OutOfRange(format!(
                    "allocation id {} cannot be adopted (its slot is taken)",
                    a.id
                )));
            }
        }
        self.devices[device].note_charged();
        Ok(n)
    }

    /// Frees every allocation except the persistent client ones of `keep` (a device whose
    /// persistent allocations outlive the worker).
    pub fn release_all_but_persistent(&mut self, keep: usize) -> u64 {
        let ids: Vec<Uuid> = self
            .records
            .iter()
            .filter(|r| {
                !(r.device as usize == keep && r.persistent && r.owner == Owner::Client && !r.busy)
            })
            .map(|r| r.id)
            .collect();
        let n = ids.len() as u64;
        for id in ids {
            self.free_id(&id);
        }
        n
    }

    /// Frees every allocation on every device (shutdown).
    pub fn release_all(&mut self) -> u64 {
        let records: Vec<Record> = self.records.drain();
        let n = records.len() as u64;
        for r in records {
            self.release(r);
        }
        n
    }

    /// Like [`AllocationEngine::close`], but the persistent client allocations of `keep` are
    /// left in its memory untouched (their pages are not given back) for a later worker.
    /// Every other page of `keep` is given back first (the file holds only what a later worker
    /// adopts), and with no persistent allocation left the file itself goes.
    pub fn close_keeping_persistent(&mut self, keep: usize) {
        self.release_all_but_persistent(keep);
        let dev = &mut self.devices[keep];
        if dev.held.is_empty() {
            dev.arena.trim();
            if dev.live == 0 {
                dev.arena.backend_mut().keep_file(false);
            }
        }
        self.records.drain();
        self.devices.clear();
    }

    /// Frees everything and drops every device (unmapping it, removing files).
    pub fn close(&mut self) {
        self.release_all();
        self.devices.clear();
    }

    fn wire(&self, r: &Record) -> MemoryAllocation {
        let dev = &self.devices[r.device as usize];
        MemoryAllocation {
            allocation_id: r.id.hyphenated().to_string(),
            device_id: dev.arena.backend().device_id().to_string(),
            size_bytes: r.size,
            alignment: r.alignment(),
            allocation_type: r.kind,
            purpose: r.purpose.to_string(),
            persistent: r.persistent,
            owner: r.owner.wire(),
            created_at: Timestamp(UNIX_EPOCH + Duration::from_micros(r.created_us)),
            handle: r
                .placement
                .as_ref()
                .and_then(|p| dev.arena(r.pool).backend().handle(p.offset())),
        }
    }

    /// One allocation as the protocol shows it.
    pub fn allocation(&self, allocation_id: &str) -> Result<MemoryAllocation, EngineError> {
        let id = self
            .find(allocation_id)
            .ok_or_else(|| EngineError::AllocationNotFound(allocation_id.to_string()))?;
        let r = self
            .records
            .get(&id)
            .ok_or_else(|| EngineError::AllocationNotFound(allocation_id.to_string()))?;
        Ok(self.wire(r))
    }

    /// One allocation by id as the protocol shows it.
    pub fn allocation_by_id(&self, id: &Uuid) -> Option<MemoryAllocation> {
        self.records.get(id).map(|r| self.wire(r))
    }

    /// A device's allocations matching `filter`, oldest first: the total count and one page.
    pub fn allocations(
        &self,
        device: usize,
        filter: &AllocationFilter,
        offset: u64,
        limit: u64,
    ) -> (u64, Vec<MemoryAllocation>) {
        let mut matching: Vec<&Record> = self
            .records
            .iter()
            .filter(|r| {
                r.device as usize == device
                    && !r.hidden
                    && filter.kind.is_none_or(|k| k == r.kind)
                    && filter.purpose.as_deref().is_none_or(|p| p == &*r.purpose)
                    && filter.owner.as_deref().is_none_or(|o| r.owner.matches(o))
            })
            .collect();
        matching.sort_unstable_by_key(|r| r.seq);
        let total = matching.len() as u64;
        let page = matching
            .into_iter()
            .skip(offset.min(total) as usize)
            .take(limit as usize)
            .map(|r| self.wire(r))
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
    pub fn largest_allocations(&self, device: usize, limit: usize) -> Vec<MemoryAllocation> {
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
        v.into_iter().map(|r| self.wire(r)).collect()
    }

    /// A device's counters.
    pub fn usage(&self, device: usize) -> MemoryUsageStats {
        let d = &self.devices[device];
        MemoryUsageStats {
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
    pub fn fragmentation(&mut self, device: usize) -> MemoryFragmentation {
        let free = self.available(device);
        let d = &self.devices[device];
        let largest = d.arena.largest_free_block().min(free);
        MemoryFragmentation {
            device_id: self.device_id(device).to_string(),
            fragmentation_percentage: health::fragmentation_percentage(free, largest),
            free_bytes: free,
            largest_free_block_bytes: largest,
            free_block_count: d.arena.free_regions(),
        }
    }

    /// A device's figures.
    pub fn info(&mut self, device: usize) -> MemoryInfo {
        let frag = self.fragmentation(device);
        let usage = self.utilization(device);
        let d = &mut self.devices[device];
        let cap = d.arena.backend_mut().capacity();
        let backend = d.arena.backend();
        MemoryInfo {
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
            last_updated: Timestamp::now(),
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

    fn placement(
        &self,
        allocation_id: &str,
        offset: u64,
        len: usize,
    ) -> Result<(usize, bool, Placement), EngineError> {
        let id = self
            .find(allocation_id)
            .ok_or_else(|| EngineError::AllocationNotFound(allocation_id.to_string()))?;
        let r = self
            .records
            .get(&id)
            .ok_or_else(|| EngineError::AllocationNotFound(allocation_id.to_string()))?;
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
mod tests {
    use super::*;
    use crate::backends::CpuBackend;
    use crate::units::MIB;

    fn engine(budget: u64) -> AllocationEngine {
        AllocationEngine::new(vec![DeviceSetup {
            backend: Box::new(CpuBackend::new(budget + budget / 4).unwrap()),
            budget,
            pinned: None,
        }])
    }

    fn spec(size: u64, kind: MemoryAllocationType) -> AllocationSpec {
        AllocationSpec {
            size,
            alignment: 0,
            kind,
            purpose: String::new(),
            persistent: false,
            owner: Owner::Client,
        }
    }

    fn alloc(e: &mut AllocationEngine, size: u64, kind: MemoryAllocationType) -> Uuid {
        e.try_allocate(0, &spec(size, kind), SystemTime::now())
            .unwrap()
    }

    #[test]
    fn accounting_is_exact() {
        let mut e = engine(16 * MIB);
        let a = alloc(&mut e, 1000, MemoryAllocationType::General);
        let r = alloc(&mut e, MIB, MemoryAllocationType::Reservation);
        assert!(e.allocation_by_id(&r).unwrap().handle.is_none());
        let u = e.usage(0);
        assert_eq!(
            (u.allocated_bytes, u.reservation_bytes, u.allocation_count),
            (1000, MIB, 2)
        );
        assert!(
            u.reserved_bytes >= 1000 && u.reserved_bytes < MIB,
            "reservations hold no memory"
        );
        e.deallocate(&a.to_string(), None).unwrap();
        let u = e.usage(0);
        assert_eq!(u.allocated_bytes, 0);
        assert!(
            u.reserved_bytes <= 16 * 4096,
            "at most a small page cache stays"
        );
    }

    #[test]
    fn budget_limits_and_over_budget() {
        let mut e = engine(MIB);
        assert!(matches!(
            e.try_allocate(
                0,
                &spec(2 * MIB, MemoryAllocationType::General),
                SystemTime::now()
            ),
            Err(EngineError::OverBudget { .. })
        ));
        alloc(&mut e, MIB / 2, MemoryAllocationType::Reservation);
        let before = e.usage(0);
        assert!(matches!(
            e.try_allocate(
                0,
                &spec(MIB / 2 + 1, MemoryAllocationType::General),
                SystemTime::now()
            ),
            Err(EngineError::NoRoom { .. })
        ));
        assert_eq!(e.usage(0), before, "a failure changes nothing");
        // The whole budget is allocatable in one piece.
        let mut e = engine(MIB);
        alloc(&mut e, MIB, MemoryAllocationType::General);
    }

    #[test]
    fn bytes_round_trip_and_bounds() {
        let mut e = engine(MIB);
        let id = alloc(&mut e, 10, MemoryAllocationType::General).to_string();
        e.write(&id, 2, b"abc").unwrap();
        let mut buf = [0u8; 3];
        e.read(&id, 2, &mut buf).unwrap();
        assert_eq!(&buf, b"abc");
        assert!(e.write(&id, 8, b"abc").is_err());
    }

    #[test]
    fn reclaim_takes_cache_then_temporary_oldest_first() {
        let mut e = engine(10 * MIB);
        let g = alloc(&mut e, 2 * MIB, MemoryAllocationType::General);
        let t1 = alloc(&mut e, 2 * MIB, MemoryAllocationType::Temporary);
        let c1 = alloc(&mut e, 2 * MIB, MemoryAllocationType::Cache);
        let c2 = alloc(&mut e, 2 * MIB, MemoryAllocationType::Cache);
        // 80% used; down to 45%: frees c1, c2 (40%), stop.
        let r = e.reclaim(
            0,
            &[MemoryAllocationType::Cache, MemoryAllocationType::Temporary],
            45.0,
            false,
            &[],
        );
        assert_eq!(r.count, 2);
        assert!(e.allocation_by_id(&c1).is_none() && e.allocation_by_id(&c2).is_none());
        assert!(e.allocation_by_id(&t1).is_some() && e.allocation_by_id(&g).is_some());
        let r = e.reclaim(0, &[MemoryAllocationType::Temporary], 0.0, false, &[t1]);
        assert_eq!(r.count, 0, "preserved");
    }

    #[test]
    fn model_owner_matches_its_wire_name() {
        let o = Owner::Model("sdxl".into());
        assert!(o.matches("model:sdxl"));
        assert!(!o.matches("client"));
        assert_eq!(o.wire(), "model:sdxl");
    }
}
