//! Plain-data views and reports the engine and the managers build: an allocation, a device's
//! figures, counters, fragmentation, pressure, a model, a transfer. Field names follow the
//! contract's; times are [`SystemTime`] and ids are typed. `protocol` turns each into
//! its wire shape.

use super::kinds::{
    AllocationId, DeviceId, MemoryAllocationType, MemoryHealthStatus, MemoryType, ModelState,
    PressureLevel, TransferMode, TransferStatus,
};
use std::time::SystemTime;

/// Where another process finds a shareable allocation's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handle {
    /// The file to map.
    pub path: String,
    /// The byte offset of the allocation in that file.
    pub offset: u64,
}

/// One live allocation.
#[derive(Debug, Clone, PartialEq)]
pub struct AllocationView {
    /// Its id.
    pub allocation_id: AllocationId,
    /// The device it lives on.
    pub device_id: DeviceId,
    /// Its size in bytes, as requested.
    pub size_bytes: u64,
    /// The alignment of its first byte, in bytes.
    pub alignment: u64,
    /// What it is for.
    pub allocation_type: MemoryAllocationType,
    /// The caller's free-form label.
    pub purpose: String,
    /// Whether a clear without `force` keeps it, and defragment leaves it in place.
    pub persistent: bool,
    /// `client`, or `model:<name>`.
    pub owner: String,
    /// The tenant of the request that made it.
    pub tenant: String,
    /// The process that asked for it, when known (Unix socket, stdio).
    pub client_pid: Option<u32>,
    /// When it was made.
    pub created_at: SystemTime,
    /// Shareable memory only: where another process maps it.
    pub handle: Option<Handle>,
}

/// A device's figures.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceInfo {
    /// `cpu`, `shm`, `cuda:N`.
    pub device_id: DeviceId,
    /// A name for people.
    pub name: String,
    /// The kind of memory.
    pub memory_type: MemoryType,
    /// The device's capacity in bytes.
    pub total_memory: u64,
    /// What an allocate here could obtain now, in bytes.
    pub available_memory: u64,
    /// In use on the device as the device reports it, by every process, in bytes.
    pub used_memory: u64,
    /// `used_memory / total_memory × 100`.
    pub usage_percentage: f64,
    /// Health from usage and fragmentation.
    pub health: MemoryHealthStatus,
    /// The share of free memory one request cannot get.
    pub fragmentation_percentage: f64,
    /// When these figures were taken.
    pub last_updated: SystemTime,
}

/// A device's counters.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageStats {
    /// The device.
    pub device_id: DeviceId,
    /// Sizes of live allocations that hold memory (Reservations excluded).
    pub allocated_bytes: u64,
    /// Memory held from the device now (≥ allocated).
    pub reserved_bytes: u64,
    /// The highest `allocated_bytes` seen.
    pub peak_allocated_bytes: u64,
    /// The highest `reserved_bytes` seen.
    pub peak_reserved_bytes: u64,
    /// Sizes of live Reservations.
    pub reservation_bytes: u64,
    /// Bytes held by models on the device.
    pub model_bytes: u64,
    /// The budget for the device.
    pub budget_bytes: u64,
    /// Live allocations (Reservations included).
    pub allocation_count: u64,
    /// Allocations made since start.
    pub total_allocations: u64,
    /// Deallocations (including clears) since start.
    pub total_deallocations: u64,
    /// Allocations refused for want of memory.
    pub failed_allocations: u64,
    /// Mean time from request to allocation, waiting included, in milliseconds.
    pub average_allocation_time_ms: f64,
    /// Bytes each tenant holds on the device, by tenant (none holding nothing).
    pub tenant_bytes: std::collections::BTreeMap<String, u64>,
}

/// How the free memory of a device is split up.
#[derive(Debug, Clone, PartialEq)]
pub struct Fragmentation {
    /// The device.
    pub device_id: DeviceId,
    /// `(1 − largest_free_block_bytes / free_bytes) × 100`, 0 when nothing is free.
    pub fragmentation_percentage: f64,
    /// What an allocate could obtain now.
    pub free_bytes: u64,
    /// The largest single allocation that would succeed right now.
    pub largest_free_block_bytes: u64,
    /// The free gaps in the device's arena.
    pub free_block_count: u64,
}

/// How hard a device is pressed for memory.
#[derive(Debug, Clone, PartialEq)]
pub struct PressureView {
    /// The device.
    pub device_id: DeviceId,
    /// The level (rises at once, falls after a hold period).
    pub level: PressureLevel,
    /// (allocated + reservation bytes) / budget × 100.
    pub usage_percentage: f64,
    /// What an allocate could obtain now.
    pub available_memory: u64,
    /// Requests waiting for memory now.
    pub waiting_requests: u64,
    /// Milliseconds of the last 10 s during which a request waited for memory.
    pub stall_ms_10s: f64,
    /// The same over 60 s.
    pub stall_ms_60s: f64,
    /// Refusals for want of memory in the last 60 s.
    pub failed_allocations_60s: u64,
    /// Change of (allocated + reservation) bytes per second over the last 10 s.
    pub trend_bytes_per_second: f64,
}

/// A model as the model table reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelView {
    /// The host's name for it.
    pub model_name: String,
    /// Its home device.
    pub device_id: DeviceId,
    /// Where its bytes are now (the home device, or `cpu` while Offloaded).
    pub resident_device_id: DeviceId,
    /// Loading, Loaded, Offloaded, Unloading.
    pub state: ModelState,
    /// Bytes of its tensors.
    pub size_bytes: u64,
    /// Tensors in its file.
    pub tensor_count: u64,
    /// The file it was loaded from.
    pub path: String,
    /// When it was loaded.
    pub loaded_at: SystemTime,
    /// When it was last loaded, acquired or released.
    pub last_used_at: SystemTime,
    /// Idle seconds before it may be unloaded; `None` = until evicted.
    pub keep_alive_seconds: Option<f64>,
    /// How long the load took.
    pub load_time_ms: f64,
    /// Its live leases, oldest first.
    pub leases: Vec<LeaseView>,
}

/// One lease of a model, as the model table reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct LeaseView {
    /// Its id.
    pub lease_id: uuid::Uuid,
    /// When it was taken.
    pub acquired_at: SystemTime,
    /// When it ends unless renewed (`None`: when released).
    pub expires_at: Option<SystemTime>,
}

/// A transfer of an allocation between devices, as it stands.
#[derive(Debug, Clone, PartialEq)]
pub struct TransferRecord {
    /// Its id.
    pub transfer_id: uuid::Uuid,
    /// The allocation transferred.
    pub allocation_id: AllocationId,
    /// The allocation on the destination: the same id for a move, a new one for a copy.
    pub destination_allocation_id: Option<AllocationId>,
    /// Where the bytes come from.
    pub source_device_id: DeviceId,
    /// Where they go.
    pub destination_device_id: DeviceId,
    /// Move or copy.
    pub mode: TransferMode,
    /// Where it stands.
    pub status: TransferStatus,
    /// Bytes to copy.
    pub total_bytes: u64,
    /// Bytes copied so far.
    pub bytes_transferred: u64,
    /// `bytes_transferred / total_bytes × 100`.
    pub progress_percentage: f64,
    /// Bytes copied per second of the transfer so far.
    pub bandwidth_bytes_per_second: f64,
    /// When it started.
    pub started_at: SystemTime,
    /// When it ended (completed, failed or cancelled).
    pub completed_at: Option<SystemTime>,
    /// Why it failed.
    pub error_message: Option<String>,
}
