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
    AllocationView, Caller, DeviceInfo, Fragmentation, MemoryAllocationType, PressureView, Tenants,
    UsageStats,
};
use crate::units::format_bytes;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use uuid::Uuid;

mod books;
mod compaction;
mod persistence;
mod placement;
mod telemetry;
mod transfer;
mod types;
mod views;
pub use views::Shared;

use books::{Device, Record};
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
    /// Tenants and their quotas (none by default).
    tenants: Arc<Tenants>,
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
                    tenant_bytes: Default::default(),
                })
                .collect(),
            records: RecordTable::new(),
            next_seq: 0,
            max_allocations: DEFAULT_MAX_ALLOCATIONS,
            room: Arc::default(),
            clock,
            tenants: Arc::default(),
        }
    }

    /// The signal the engine raises whenever bytes go back: wait on it for room.
    pub fn room(&self) -> Arc<RoomSignal> {
        Arc::clone(&self.room)
    }

    /// Sets the tenants whose quotas every allocation is checked against.
    pub fn set_tenants(&mut self, tenants: Arc<Tenants>) {
        self.tenants = tenants;
    }

    /// Bytes each tenant holds on a device (allocations, Reservations, models it loaded).
    pub fn tenant_bytes(&self, device: usize) -> Vec<(Arc<str>, u64)> {
        let mut v: Vec<(Arc<str>, u64)> = self.devices[device]
            .tenant_bytes
            .iter()
            .map(|(t, b)| (Arc::clone(t), *b))
            .collect();
        v.sort();
        v
    }

    /// The tenant an allocation belongs to, if it is live and listed.
    pub fn tenant_of(&self, allocation_id: &str) -> Option<Arc<str>> {
        let id = self.find(allocation_id)?;
        let r = self.records.get(&id)?;
        (!r.hidden).then(|| Arc::clone(&r.holder.tenant))
    }

    /// Refuses `size` more bytes for `tenant` on `device` when they would take it past its
    /// quota there (QuotaExceeded); nothing to check without a quota.
    pub fn check_quota(&self, device: usize, tenant: &str, size: u64) -> Result<(), EngineError> {
        let dev = &self.devices[device];
        let device_id = dev.arena.backend().device_id();
        let Some(quota) = self.tenants.quota(tenant, device_id) else {
            return Ok(());
        };
        let used = dev.tenant_bytes.get(tenant).copied().unwrap_or(0);
        if used.checked_add(size).is_none_or(|total| total > quota) {
            return Err(EngineError::QuotaExceeded {
                tenant: tenant.to_string(),
                device: device_id.to_string(),
                quota,
                used,
                requested: size,
            });
        }
        Ok(())
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
        self.clear_of(device, force, None)
    }

    /// [`AllocationEngine::clear`] of one tenant's allocations only (`None`: everyone's).
    pub fn clear_of(&mut self, device: usize, force: bool, tenant: Option<&str>) -> Cleared {
        let mut cleared = Cleared::default();
        let mut victims = Vec::new();
        for r in self.records.iter() {
            if r.device as usize != device || r.owner != Owner::Client || r.busy {
                continue;
            }
            if tenant.is_some_and(|t| *r.holder.tenant != *t) {
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
