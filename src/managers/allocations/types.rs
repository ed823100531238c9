//! The engine's plain-data types: what it is asked for and what it reports.

use super::*;

/// What the engine refuses, in terms the service turns into the contract's errors.
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
    /// The tenant's quota on the device would be passed: refused before anything changed.
    #[error(
        "tenant `{tenant}` has a quota of {} ({quota} bytes) on {device} and holds {} ({used} bytes) \
         there; {} ({requested} bytes) more would pass it (free some of its allocations or unload models it loaded, or ask the operator for a \
         larger quota)",
        format_bytes(*quota), format_bytes(*used), format_bytes(*requested)
    )]
    QuotaExceeded {
        /// The tenant.
        tenant: String,
        /// The device.
        device: String,
        /// Its quota there, bytes.
        quota: u64,
        /// What it holds there now, bytes.
        used: u64,
        /// Bytes asked for.
        requested: u64,
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

    pub(super) fn matches(&self, wire: &str) -> bool {
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
    /// Who asked for it: its session, process and tenant.
    pub holder: Arc<Caller>,
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
            holder: Caller::anonymous(),
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
    /// Only this tenant's.
    pub tenant: Option<String>,
    /// Only those asked for by this process.
    pub client_pid: Option<u32>,
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
    pub memory_type: crate::domain::MemoryType,
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
    pub fragmentation: Fragmentation,
    /// The pressure reading.
    pub pressure: PressureView,
    /// Seconds during which a request waited for memory, since the start.
    pub stall_seconds_total: f64,
    /// The most budget a request refused in the last 60 s would have needed.
    pub max_failed_demand_60s: Option<u64>,
    /// Live allocations.
    pub live_allocations: u64,
    /// Bytes each tenant holds here (section 8.2), by tenant; none holding nothing.
    pub tenant_bytes: Vec<(String, u64)>,
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
