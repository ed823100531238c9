//! The service's inputs: one checked request per action that takes one, plain data that the
//! [`MemoryService`](super::MemoryService) methods take. They are defined here, below the api,
//! so that the service imports nothing from above it.
//!
//! Each is built from the wire in its action's file (`api/actions/<action>.rs`): the wire
//! struct, its JSON Schema and `parse` (the checks and their messages) live there and produce
//! these; `api` re-exports them (`memcoord::api::AllocateRequest`, …). A library caller builds
//! them directly. `Serialize` writes one back as the action's `data` (the typed client).
//! An action that needs a new input adds its type here, or reuses one.

use crate::domain::{Caller, MemoryAllocationType, MemoryOptimizationType, TransferMode};
use serde::Serialize;
use std::sync::Arc;

/// What `memory.allocate` takes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AllocateRequest {
    /// The device.
    pub device_id: String,
    /// Bytes, at least 1.
    pub size_bytes: u64,
    /// What it is for (default General).
    pub allocation_type: MemoryAllocationType,
    /// 0 = device default, else a power of two up to 1 GiB.
    pub alignment: u64,
    /// A label.
    pub purpose: String,
    /// Survives `clear` without `force`; never moved.
    pub persistent: bool,
    /// How long to wait for room, 0..3600 seconds (default 30).
    pub timeout_seconds: f64,
    /// Who asks (set by the action from its context; not part of `data`).
    #[serde(skip)]
    pub holder: Arc<Caller>,
}

impl AllocateRequest {
    /// A request with the contract's defaults: General, device alignment, no purpose, not
    /// persistent, 30 s timeout (for library callers; change fields as needed).
    pub fn new(device_id: impl Into<String>, size_bytes: u64) -> Self {
        AllocateRequest {
            device_id: device_id.into(),
            size_bytes,
            allocation_type: MemoryAllocationType::General,
            alignment: 0,
            purpose: String::new(),
            persistent: false,
            timeout_seconds: 30.0,
            holder: Caller::anonymous(),
        }
    }
}

/// What `memory.deallocate` takes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeallocateRequest {
    /// The allocation.
    pub allocation_id: String,
    /// Where the caller thinks it is; checked when given.
    pub device_id: Option<String>,
}

/// What `memory.clear` takes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClearRequest {
    /// The device.
    pub device_id: String,
    /// Clear persistent allocations too.
    pub force: bool,
}

/// What `memory.get_status` takes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GetStatusRequest {
    /// The device.
    pub device_id: String,
    /// List the device's allocations (default true).
    pub include_allocations: bool,
    /// Include `usage_stats` (default true).
    pub include_usage_stats: bool,
    /// Include `fragmentation` (default false).
    pub include_fragmentation: bool,
}

/// A request whose only field is `device_id` (`memory.get_usage`, `memory.defragment`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceRequest {
    /// The device.
    pub device_id: String,
}

/// What `memory.get_allocations` takes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GetAllocationsRequest {
    /// The device.
    pub device_id: String,
    /// Only allocations of this type.
    pub allocation_type: Option<MemoryAllocationType>,
    /// Only allocations with exactly this purpose.
    pub purpose: Option<String>,
    /// Only allocations with exactly this owner.
    pub owner: Option<String>,
    /// Only allocations of this tenant.
    pub tenant: Option<String>,
    /// Only allocations asked for by this process.
    pub client_pid: Option<u32>,
    /// Skip this many (oldest first).
    pub offset: u64,
    /// Return at most this many.
    pub limit: u64,
}

/// A request with an optional `device_id` (absent: every device): `memory.get_pressure`,
/// `memory.optimization_recs`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OptionalDeviceRequest {
    /// The device, or every device.
    pub device_id: Option<String>,
}

/// What `memory.analytics` takes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AnalyticsRequest {
    /// The device, or every device.
    pub device_id: Option<String>,
    /// Seconds of history, 1 to 3600 (default 3600); a fraction counts as a whole second.
    pub window_seconds: u64,
}

/// What `memory.optimize` takes (the seed's OptimizeMemoryRequest).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OptimizeRequest {
    /// The device.
    pub device_id: String,
    /// What to do.
    pub optimization_type: MemoryOptimizationType,
    /// Also reclaim General and persistent allocations (ReduceToTarget).
    pub force: bool,
    /// ReduceToTarget: the budget usage to get under, 0..100.
    pub target_usage_percentage: Option<f64>,
    /// Allocation ids never moved or freed.
    pub preserve_allocations: Vec<String>,
    /// Answer when done (true) or at once, running in the background (false).
    pub wait_for_completion: bool,
}

/// What `memory.transfer` takes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TransferRequest {
    /// The allocation to move or copy.
    pub allocation_id: String,
    /// Where it is.
    pub source_device_id: String,
    /// Where it goes.
    pub destination_device_id: String,
    /// Move (default) or copy.
    pub mode: TransferMode,
    /// Answer when done (true) or at once (false, the default).
    pub wait_for_completion: bool,
}

/// What `memory.get_transfer` takes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TransferIdRequest {
    /// The transfer.
    pub transfer_id: String,
}

/// What `memory.model_load` takes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelLoadRequest {
    /// The host's name for the model.
    pub model_name: String,
    /// A .safetensors file under the model root.
    pub path: String,
    /// Where to load it.
    pub device_id: String,
    /// Idle seconds before it may be unloaded; `None` = until evicted.
    pub keep_alive_seconds: Option<f64>,
    /// How long to wait for room (0..3600, default 30).
    pub timeout_seconds: f64,
    /// Who asks: the model's bytes count against its tenant's quota (set by the action from
    /// its context; not part of `data`).
    #[serde(skip)]
    pub holder: Arc<Caller>,
}

/// What `memory.model_unload` takes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelRequest {
    /// The model.
    pub model_name: String,
    /// Unload even if leased or loading.
    pub force: bool,
    /// Acquire: how long to wait for room to bring it back (0..3600, default 30).
    pub timeout_seconds: f64,
}

/// What `memory.model_acquire` takes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelAcquireRequest {
    /// The model.
    pub model_name: String,
    /// How long to wait for room to bring it back (0..3600, default 30).
    pub timeout_seconds: f64,
    /// The lease's time limit in seconds; `None`: until released. The api fills in the
    /// transport's default (HTTP: 300) when the request gives none.
    pub ttl_seconds: Option<f64>,
}

/// What `memory.model_renew` takes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RenewRequest {
    /// The lease.
    pub lease_id: String,
    /// Its new time limit in seconds, from now; `None`: the limit it was last given (else
    /// the transport's default, filled in by the api; else INVALID_PARAMETER).
    pub ttl_seconds: Option<f64>,
}

/// What `memory.model_release` takes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LeaseRequest {
    /// The lease.
    pub lease_id: String,
}

/// What `memory.model_status` takes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelStatusRequest {
    /// Only models whose home is this device.
    pub device_id: Option<String>,
    /// Only this model (unknown: MODEL_NOT_FOUND).
    pub model_name: Option<String>,
}

/// `memory.model_optimize` strategies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ModelStrategy {
    /// Offload models idle for `idle_seconds` to `cpu` (unload where `cpu` has no room).
    OffloadIdle,
    /// Unload models idle for `idle_seconds`.
    UnloadIdle,
    /// Evict idle models until the device's model bytes fit `target_bytes` (or its budget).
    FitBudget,
}

/// What `memory.model_optimize` takes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelOptimizeRequest {
    /// Only this device (else every device).
    pub device_id: Option<String>,
    /// What to do.
    pub strategy: ModelStrategy,
    /// Idle time that makes a model idle (default 300).
    pub idle_seconds: f64,
    /// FitBudget's target.
    pub target_bytes: Option<u64>,
}

/// What `memory.export` takes: an allocation, or a model under a lease.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExportRequest {
    /// The allocation to export (exclusive with `model_name`).
    pub allocation_id: Option<String>,
    /// The model to export (with `lease_id`).
    pub model_name: Option<String>,
    /// The lease the model export is made under; the export ends with it.
    pub lease_id: Option<String>,
    /// How long the secret may be claimed, in seconds (default 60).
    pub claim_seconds: f64,
}

/// A request whose only field is `export_id` (`memory.unexport`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExportIdRequest {
    /// The export.
    pub export_id: String,
}

/// What `memory.hello` takes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HelloRequest {
    /// A tenant's token, or the operator's.
    pub token: String,
}
