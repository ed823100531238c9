//! Request `data` objects of PROTOCOL.md section 4, parsed and checked.
//!
//! Every field is read as optional (an optional field sent as `null` counts as missing), then
//! checked: a field missing, of the wrong type or out of range is `INVALID_PARAMETER` with a
//! message that names it. Unknown fields are ignored.

use super::enums::{MemoryAllocationType, MemoryOptimizationType};
use super::error::ProtocolError;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;

/// The most bytes one `alignment` may ask for.
pub const MAX_ALIGNMENT: u64 = 1 << 30;
/// The longest `timeout_seconds`.
pub const MAX_TIMEOUT_SECONDS: f64 = 3600.0;
/// The largest page `memory.get_allocations` returns.
pub const MAX_PAGE: u64 = 100_000;

/// Parses a request's `data` (absent or `null` = `{}`) into `T`, naming the field at fault.
pub fn parse_data<T: DeserializeOwned>(data: Option<&RawValue>) -> Result<T, ProtocolError> {
    let text = data.map(RawValue::get).unwrap_or("{}");
    let mut de = serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        // serde_json appends " at line 1 column N"; people want the field, not the column.
        let text = inner.to_string();
        let text = text.split(" at line ").next().unwrap_or(&text).to_string();
        if path == "." || path.is_empty() {
            ProtocolError::invalid_parameter(text)
        } else {
            ProtocolError::invalid_parameter(format!("field `{path}`: {text}"))
        }
    })
}

fn required<T>(value: Option<T>, field: &str) -> Result<T, ProtocolError> {
    value.ok_or_else(|| ProtocolError::invalid_parameter(format!("field `{field}` is required")))
}

fn non_empty(value: Option<String>, field: &str) -> Result<String, ProtocolError> {
    let v = required(value, field)?;
    if v.is_empty() {
        return Err(ProtocolError::invalid_parameter(format!(
            "field `{field}` must not be empty"
        )));
    }
    Ok(v)
}

/// Checks a size field: an integer number of bytes, at least 1.
pub fn check_size(value: i64, field: &str) -> Result<u64, ProtocolError> {
    if value < 1 {
        return Err(ProtocolError::invalid_parameter(format!(
            "field `{field}` must be an integer number of bytes ≥ 1, got {value}"
        )));
    }
    Ok(value as u64)
}

fn check_timeout(value: Option<f64>, default: f64) -> Result<f64, ProtocolError> {
    let v = value.unwrap_or(default);
    if !(0.0..=MAX_TIMEOUT_SECONDS).contains(&v) {
        return Err(ProtocolError::invalid_parameter(format!(
            "field `timeout_seconds` must be a number from 0 to 3600, got {v}"
        )));
    }
    Ok(v)
}

/// Wire form of `memory.get_status`'s data.
#[derive(Deserialize, schemars::JsonSchema)]
#[schemars(rename = "GetStatusRequest")]
pub(crate) struct GetStatusWire {
    #[schemars(required)]
    #[schemars(length(min = 1))]
    device_id: Option<String>,
    include_allocations: Option<bool>,
    include_usage_stats: Option<bool>,
    include_fragmentation: Option<bool>,
}

/// `memory.get_status`.
#[derive(Debug, Clone, PartialEq)]
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

impl GetStatusRequest {
    /// Parses and checks `data`.
    pub fn parse(data: Option<&RawValue>) -> Result<Self, ProtocolError> {
        let w: GetStatusWire = parse_data(data)?;
        Ok(GetStatusRequest {
            device_id: non_empty(w.device_id, "device_id")?,
            include_allocations: w.include_allocations.unwrap_or(true),
            include_usage_stats: w.include_usage_stats.unwrap_or(true),
            include_fragmentation: w.include_fragmentation.unwrap_or(false),
        })
    }
}

/// Wire form of data that names one device.
#[derive(Deserialize, schemars::JsonSchema)]
#[schemars(rename = "DeviceRequest")]
pub(crate) struct DeviceWire {
    #[schemars(required)]
    #[schemars(length(min = 1))]
    device_id: Option<String>,
}

/// A request whose only field is `device_id` (`memory.get_usage`).
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceRequest {
    /// The device.
    pub device_id: String,
}

impl DeviceRequest {
    /// Parses and checks `data`.
    pub fn parse(data: Option<&RawValue>) -> Result<Self, ProtocolError> {
        let w: DeviceWire = parse_data(data)?;
        Ok(DeviceRequest {
            device_id: non_empty(w.device_id, "device_id")?,
        })
    }
}

#[derive(Deserialize, schemars::JsonSchema)]
#[schemars(rename = "GetAllocationsRequest")]
pub(crate) struct GetAllocationsWire {
    #[schemars(required)]
    #[schemars(length(min = 1))]
    device_id: Option<String>,
    allocation_type: Option<MemoryAllocationType>,
    purpose: Option<String>,
    owner: Option<String>,
    #[schemars(range(min = 0))]
    offset: Option<i64>,
    #[schemars(range(min = 0, max = 100000))]
    limit: Option<i64>,
}

/// `memory.get_allocations`.
#[derive(Debug, Clone, PartialEq)]
pub struct GetAllocationsRequest {
    /// The device.
    pub device_id: String,
    /// Only allocations of this type.
    pub allocation_type: Option<MemoryAllocationType>,
    /// Only allocations with exactly this purpose.
    pub purpose: Option<String>,
    /// Only allocations with exactly this owner.
    pub owner: Option<String>,
    /// Skip this many (oldest first).
    pub offset: u64,
    /// Return at most this many.
    pub limit: u64,
}

impl GetAllocationsRequest {
    /// Parses and checks `data`.
    pub fn parse(data: Option<&RawValue>) -> Result<Self, ProtocolError> {
        let w: GetAllocationsWire = parse_data(data)?;
        let offset = w.offset.unwrap_or(0);
        if offset < 0 {
            return Err(ProtocolError::invalid_parameter(format!(
                "field `offset` must be ≥ 0, got {offset}"
            )));
        }
        let limit = w.limit.unwrap_or(1000);
        if !(0..=MAX_PAGE as i64).contains(&limit) {
            return Err(ProtocolError::invalid_parameter(format!(
                "field `limit` must be from 0 to {MAX_PAGE}, got {limit}"
            )));
        }
        Ok(GetAllocationsRequest {
            device_id: non_empty(w.device_id, "device_id")?,
            allocation_type: w.allocation_type,
            purpose: w.purpose,
            owner: w.owner,
            offset: offset as u64,
            limit: limit as u64,
        })
    }
}

#[derive(Deserialize, schemars::JsonSchema)]
#[schemars(rename = "AllocateRequest")]
pub(crate) struct AllocateWire {
    #[schemars(required)]
    #[schemars(length(min = 1))]
    device_id: Option<String>,
    #[schemars(required)]
    #[schemars(range(min = 1))]
    size_bytes: Option<i64>,
    allocation_type: Option<MemoryAllocationType>,
    #[schemars(extend("enum" = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072, 262144, 524288, 1048576, 2097152, 4194304, 8388608, 16777216, 33554432, 67108864, 134217728, 268435456, 536870912, 1073741824, null]))]
    alignment: Option<i64>,
    purpose: Option<String>,
    persistent: Option<bool>,
    #[schemars(range(min = 0, max = 3600))]
    timeout_seconds: Option<f64>,
}

/// `memory.allocate`.
#[derive(Debug, Clone, PartialEq)]
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
        }
    }

    /// Parses and checks `data`.
    pub fn parse(data: Option<&RawValue>) -> Result<Self, ProtocolError> {
        let w: AllocateWire = parse_data(data)?;
        let device_id = non_empty(w.device_id, "device_id")?;
        let size_bytes = check_size(required(w.size_bytes, "size_bytes")?, "size_bytes")?;
        let alignment = w.alignment.unwrap_or(0);
        if alignment < 0
            || alignment as u64 > MAX_ALIGNMENT
            || (alignment != 0 && !(alignment as u64).is_power_of_two())
        {
            return Err(ProtocolError::invalid_parameter(format!(
                "field `alignment` must be 0 (device default) or a power of two up to 1 GiB, got {alignment}"
            )));
        }
        Ok(AllocateRequest {
            device_id,
            size_bytes,
            allocation_type: w.allocation_type.unwrap_or(MemoryAllocationType::General),
            alignment: alignment as u64,
            purpose: w.purpose.unwrap_or_default(),
            persistent: w.persistent.unwrap_or(false),
            timeout_seconds: check_timeout(w.timeout_seconds, 30.0)?,
        })
    }
}

#[derive(Deserialize, schemars::JsonSchema)]
#[schemars(rename = "DeallocateRequest")]
pub(crate) struct DeallocateWire {
    #[schemars(required)]
    #[schemars(length(min = 1))]
    allocation_id: Option<String>,
    #[schemars(length(min = 1))]
    device_id: Option<String>,
}

/// `memory.deallocate`.
#[derive(Debug, Clone, PartialEq)]
pub struct DeallocateRequest {
    /// The allocation.
    pub allocation_id: String,
    /// Where the caller thinks it is; checked when given.
    pub device_id: Option<String>,
}

impl DeallocateRequest {
    /// Parses and checks `data`.
    pub fn parse(data: Option<&RawValue>) -> Result<Self, ProtocolError> {
        let w: DeallocateWire = parse_data(data)?;
        Ok(DeallocateRequest {
            allocation_id: non_empty(w.allocation_id, "allocation_id")?,
            device_id: w.device_id,
        })
    }
}

#[derive(Deserialize, schemars::JsonSchema)]
#[schemars(rename = "ClearRequest")]
pub(crate) struct ClearWire {
    #[schemars(required)]
    #[schemars(length(min = 1))]
    device_id: Option<String>,
    force: Option<bool>,
}

/// `memory.clear`.
#[derive(Debug, Clone, PartialEq)]
pub struct ClearRequest {
    /// The device.
    pub device_id: String,
    /// Clear persistent allocations too.
    pub force: bool,
}

impl ClearRequest {
    /// Parses and checks `data`.
    pub fn parse(data: Option<&RawValue>) -> Result<Self, ProtocolError> {
        let w: ClearWire = parse_data(data)?;
        Ok(ClearRequest {
            device_id: non_empty(w.device_id, "device_id")?,
            force: w.force.unwrap_or(false),
        })
    }
}

#[derive(Deserialize, schemars::JsonSchema)]
#[schemars(rename = "OptimizeRequest")]
pub(crate) struct OptimizeWire {
    #[schemars(required)]
    #[schemars(length(min = 1))]
    device_id: Option<String>,
    #[schemars(required)]
    optimization_type: Option<MemoryOptimizationType>,
    force: Option<bool>,
    #[schemars(range(min = 0, max = 100))]
    target_usage_percentage: Option<f64>,
    preserve_allocations: Option<Vec<String>>,
    wait_for_completion: Option<bool>,
}

/// `memory.optimize` (the seed's OptimizeMemoryRequest).
#[derive(Debug, Clone, PartialEq)]
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

impl OptimizeRequest {
    /// Parses and checks `data`.
    pub fn parse(data: Option<&RawValue>) -> Result<Self, ProtocolError> {
        let w: OptimizeWire = parse_data(data)?;
        let device_id = non_empty(w.device_id, "device_id")?;
        let optimization_type = required(w.optimization_type, "optimization_type")?;
        if let Some(t) = w.target_usage_percentage
            && !(0.0..=100.0).contains(&t)
        {
            return Err(ProtocolError::invalid_parameter(format!(
                "field `target_usage_percentage` must be from 0 to 100, got {t}"
            )));
        }
        if optimization_type == MemoryOptimizationType::ReduceToTarget
            && w.target_usage_percentage.is_none()
        {
            return Err(ProtocolError::invalid_parameter(
                "field `target_usage_percentage` is required for ReduceToTarget",
            ));
        }
        Ok(OptimizeRequest {
            device_id,
            optimization_type,
            force: w.force.unwrap_or(false),
            target_usage_percentage: w.target_usage_percentage,
            preserve_allocations: w.preserve_allocations.unwrap_or_default(),
            wait_for_completion: w.wait_for_completion.unwrap_or(true),
        })
    }
}

/// How a transfer treats its source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransferMode {
    /// The allocation keeps its id and changes device.
    Move,
    /// A new allocation on the destination; the source stays.
    Copy,
}

impl TransferMode {
    /// `move` or `copy`.
    pub fn name(self) -> &'static str {
        match self {
            TransferMode::Move => "move",
            TransferMode::Copy => "copy",
        }
    }
}

#[derive(Deserialize, schemars::JsonSchema)]
#[schemars(rename = "TransferRequest")]
pub(crate) struct TransferWire {
    #[schemars(required)]
    #[schemars(length(min = 1))]
    allocation_id: Option<String>,
    #[schemars(required)]
    #[schemars(length(min = 1))]
    source_device_id: Option<String>,
    #[schemars(required)]
    #[schemars(length(min = 1))]
    destination_device_id: Option<String>,
    #[schemars(extend("enum" = ["move", "copy", null]))]
    mode: Option<String>,
    wait_for_completion: Option<bool>,
}

/// `memory.transfer`.
#[derive(Debug, Clone, PartialEq)]
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

impl TransferRequest {
    /// Parses and checks `data`.
    pub fn parse(data: Option<&RawValue>) -> Result<Self, ProtocolError> {
        let w: TransferWire = parse_data(data)?;
        let mode = match w.mode.as_deref().map(str::to_ascii_lowercase).as_deref() {
            None | Some("move") => TransferMode::Move,
            Some("copy") => TransferMode::Copy,
            Some(other) => {
                return Err(ProtocolError::invalid_parameter(format!(
                    "field `mode` must be \"move\" or \"copy\", got \"{other}\""
                )));
            }
        };
        Ok(TransferRequest {
            allocation_id: non_empty(w.allocation_id, "allocation_id")?,
            source_device_id: non_empty(w.source_device_id, "source_device_id")?,
            destination_device_id: non_empty(w.destination_device_id, "destination_device_id")?,
            mode,
            wait_for_completion: w.wait_for_completion.unwrap_or(false),
        })
    }
}

#[derive(Deserialize, schemars::JsonSchema)]
#[schemars(rename = "TransferIdRequest")]
pub(crate) struct TransferIdWire {
    #[schemars(required)]
    #[schemars(length(min = 1))]
    transfer_id: Option<String>,
}

/// `memory.get_transfer`.
#[derive(Debug, Clone, PartialEq)]
pub struct TransferIdRequest {
    /// The transfer.
    pub transfer_id: String,
}

impl TransferIdRequest {
    /// Parses and checks `data`.
    pub fn parse(data: Option<&RawValue>) -> Result<Self, ProtocolError> {
        let w: TransferIdWire = parse_data(data)?;
        Ok(TransferIdRequest {
            transfer_id: non_empty(w.transfer_id, "transfer_id")?,
        })
    }
}

#[derive(Deserialize, schemars::JsonSchema)]
#[schemars(rename = "ModelLoadRequest")]
pub(crate) struct ModelLoadWire {
    #[schemars(required)]
    #[schemars(length(min = 1))]
    model_name: Option<String>,
    #[schemars(required)]
    #[schemars(length(min = 1))]
    path: Option<String>,
    #[schemars(required)]
    #[schemars(length(min = 1))]
    device_id: Option<String>,
    #[schemars(range(min = 0))]
    keep_alive_seconds: Option<f64>,
    #[schemars(range(min = 0, max = 3600))]
    timeout_seconds: Option<f64>,
}

/// `memory.model_load`.
#[derive(Debug, Clone, PartialEq)]
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
}

impl ModelLoadRequest {
    /// Parses and checks `data`.
    pub fn parse(data: Option<&RawValue>) -> Result<Self, ProtocolError> {
        let w: ModelLoadWire = parse_data(data)?;
        if let Some(k) = w.keep_alive_seconds
            && k < 0.0
        {
            return Err(ProtocolError::invalid_parameter(format!(
                "field `keep_alive_seconds` must be ≥ 0, got {k}"
            )));
        }
        Ok(ModelLoadRequest {
            model_name: non_empty(w.model_name, "model_name")?,
            path: non_empty(w.path, "path")?,
            device_id: non_empty(w.device_id, "device_id")?,
            keep_alive_seconds: w.keep_alive_seconds,
            timeout_seconds: check_timeout(w.timeout_seconds, 30.0)?,
        })
    }
}

#[derive(Deserialize, schemars::JsonSchema)]
#[schemars(rename = "ModelNameRequest")]
pub(crate) struct ModelNameWire {
    #[schemars(required)]
    #[schemars(length(min = 1))]
    model_name: Option<String>,
    force: Option<bool>,
    #[schemars(range(min = 0, max = 3600))]
    timeout_seconds: Option<f64>,
}

/// `memory.model_unload` and `memory.model_acquire`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelRequest {
    /// The model.
    pub model_name: String,
    /// Unload even if leased or loading.
    pub force: bool,
    /// Acquire: how long to wait for room to bring it back (0..3600, default 30).
    pub timeout_seconds: f64,
}

impl ModelRequest {
    /// Parses and checks `data`.
    pub fn parse(data: Option<&RawValue>) -> Result<Self, ProtocolError> {
        let w: ModelNameWire = parse_data(data)?;
        Ok(ModelRequest {
            model_name: non_empty(w.model_name, "model_name")?,
            force: w.force.unwrap_or(false),
            timeout_seconds: check_timeout(w.timeout_seconds, 30.0)?,
        })
    }
}

#[derive(Deserialize, schemars::JsonSchema)]
#[schemars(rename = "LeaseRequest")]
pub(crate) struct LeaseWire {
    #[schemars(required)]
    #[schemars(length(min = 1))]
    lease_id: Option<String>,
}

/// `memory.model_release`.
#[derive(Debug, Clone, PartialEq)]
pub struct LeaseRequest {
    /// The lease.
    pub lease_id: String,
}

impl LeaseRequest {
    /// Parses and checks `data`.
    pub fn parse(data: Option<&RawValue>) -> Result<Self, ProtocolError> {
        let w: LeaseWire = parse_data(data)?;
        Ok(LeaseRequest {
            lease_id: non_empty(w.lease_id, "lease_id")?,
        })
    }
}

#[derive(Deserialize, schemars::JsonSchema)]
#[schemars(rename = "ModelStatusRequest")]
pub(crate) struct ModelStatusWire {
    #[schemars(length(min = 1))]
    device_id: Option<String>,
    #[schemars(length(min = 1))]
    model_name: Option<String>,
}

/// `memory.model_status`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelStatusRequest {
    /// Only models whose home is this device.
    pub device_id: Option<String>,
    /// Only this model (unknown: MODEL_NOT_FOUND).
    pub model_name: Option<String>,
}

impl ModelStatusRequest {
    /// Parses and checks `data`.
    pub fn parse(data: Option<&RawValue>) -> Result<Self, ProtocolError> {
        let w: ModelStatusWire = parse_data(data)?;
        Ok(ModelStatusRequest {
            device_id: w.device_id,
            model_name: w.model_name,
        })
    }
}

/// `memory.model_optimize` strategies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelStrategy {
    /// Offload models idle for `idle_seconds` to `cpu` (unload where `cpu` has no room).
    OffloadIdle,
    /// Unload models idle for `idle_seconds`.
    UnloadIdle,
    /// Evict idle models until the device's model bytes fit `target_bytes` (or its budget).
    FitBudget,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[schemars(rename = "ModelOptimizeRequest")]
pub(crate) struct ModelOptimizeWire {
    #[schemars(length(min = 1))]
    device_id: Option<String>,
    #[schemars(required)]
    #[schemars(extend("enum" = ["OffloadIdle", "UnloadIdle", "FitBudget"]))]
    strategy: Option<String>,
    #[schemars(range(min = 0))]
    idle_seconds: Option<f64>,
    #[schemars(range(min = 0))]
    target_bytes: Option<i64>,
}

/// `memory.model_optimize`.
#[derive(Debug, Clone, PartialEq)]
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

impl ModelOptimizeRequest {
    /// Parses and checks `data`.
    pub fn parse(data: Option<&RawValue>) -> Result<Self, ProtocolError> {
        let w: ModelOptimizeWire = parse_data(data)?;
        let strategy = match w
            .strategy
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("offloadidle") => ModelStrategy::OffloadIdle,
            Some("unloadidle") => ModelStrategy::UnloadIdle,
            Some("fitbudget") => ModelStrategy::FitBudget,
            Some(other) => {
                return Err(ProtocolError::invalid_parameter(format!(
                    "field `strategy` must be OffloadIdle, UnloadIdle or FitBudget, got {other}"
                )));
            }
            None => {
                return Err(ProtocolError::invalid_parameter(
                    "field `strategy` is required",
                ));
            }
        };
        let idle_seconds = w.idle_seconds.unwrap_or(300.0);
        if idle_seconds < 0.0 {
            return Err(ProtocolError::invalid_parameter(format!(
                "field `idle_seconds` must be ≥ 0, got {idle_seconds}"
            )));
        }
        let target_bytes = match w.target_bytes {
            Some(t) if t < 0 => {
                return Err(ProtocolError::invalid_parameter(format!(
                    "field `target_bytes` must be ≥ 0, got {t}"
                )));
            }
            t => t.map(|t| t as u64),
        };
        Ok(ModelOptimizeRequest {
            device_id: w.device_id,
            strategy,
            idle_seconds,
            target_bytes,
        })
    }
}

#[derive(Deserialize, schemars::JsonSchema)]
#[schemars(rename = "OptionalDeviceRequest")]
pub(crate) struct OptionalDeviceWire {
    #[schemars(length(min = 1))]
    device_id: Option<String>,
}

/// A request with an optional `device_id` (absent: every device): `memory.get_pressure`.
#[derive(Debug, Clone, PartialEq)]
pub struct OptionalDeviceRequest {
    /// The device, or every device.
    pub device_id: Option<String>,
}

impl OptionalDeviceRequest {
    /// Parses and checks `data`.
    pub fn parse(data: Option<&RawValue>) -> Result<Self, ProtocolError> {
        let w: OptionalDeviceWire = parse_data(data)?;
        Ok(OptionalDeviceRequest {
            device_id: w.device_id,
        })
    }
}

#[derive(Deserialize, schemars::JsonSchema)]
#[schemars(rename = "AnalyticsRequest")]
pub(crate) struct AnalyticsWire {
    #[schemars(length(min = 1))]
    device_id: Option<String>,
    #[schemars(range(min = 1, max = 3600))]
    window_seconds: Option<f64>,
}

/// `memory.analytics`.
#[derive(Debug, Clone, PartialEq)]
pub struct AnalyticsRequest {
    /// The device, or every device.
    pub device_id: Option<String>,
    /// Seconds of history, 1 to 3600 (default 3600); a fraction counts as a whole second.
    pub window_seconds: u64,
}

impl AnalyticsRequest {
    /// Parses and checks `data`.
    pub fn parse(data: Option<&RawValue>) -> Result<Self, ProtocolError> {
        let w: AnalyticsWire = parse_data(data)?;
        let window = w.window_seconds.unwrap_or(3600.0);
        if !(1.0..=3600.0).contains(&window) {
            return Err(ProtocolError::invalid_parameter(format!(
                "field `window_seconds` must be from 1 to 3600, got {window}"
            )));
        }
        Ok(AnalyticsRequest {
            device_id: w.device_id,
            window_seconds: window.ceil() as u64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ErrorCode;

    fn raw(text: &str) -> Box<RawValue> {
        RawValue::from_string(text.to_string()).unwrap()
    }

    fn allocate(text: &str) -> Result<AllocateRequest, ProtocolError> {
        AllocateRequest::parse(Some(&raw(text)))
    }

    #[test]
    fn allocate_defaults() {
        let r = allocate(r#"{"device_id":"cpu","size_bytes":4096,"purpose":null}"#).unwrap();
        assert_eq!(r.allocation_type, MemoryAllocationType::General);
        assert_eq!(r.alignment, 0);
        assert_eq!(r.purpose, "");
        assert!(!r.persistent);
        assert_eq!(r.timeout_seconds, 30.0);
    }

    #[test]
    fn sizes_must_be_positive_integers() {
        for bad in [
            "-5",
            "0",
            "1.5",
            "\"4096\"",
            "1e3",
            "true",
            "99999999999999999999",
        ] {
            let e = allocate(&format!(r#"{{"device_id":"cpu","size_bytes":{bad}}}"#)).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidParameter, "{bad}");
            assert!(e.message.contains("size_bytes"), "{bad}: {}", e.message);
        }
        let e = allocate(r#"{"device_id":"cpu"}"#).unwrap_err();
        assert!(e.message.contains("size_bytes"));
    }

    #[test]
    fn alignment_is_zero_or_a_power_of_two() {
        for good in [0, 1, 64, 4096, 1 << 30] {
            let r = allocate(&format!(
                r#"{{"device_id":"cpu","size_bytes":1,"alignment":{good}}}"#
            ));
            assert!(r.is_ok(), "{good}");
        }
        for bad in [3, 100, -64, 1 << 31] {
            let e = allocate(&format!(
                r#"{{"device_id":"cpu","size_bytes":1,"alignment":{bad}}}"#
            ))
            .unwrap_err();
            assert!(e.message.contains("alignment"), "{bad}");
        }
    }

    #[test]
    fn enum_fields_take_names_and_integers() {
        let r =
            allocate(r#"{"device_id":"cpu","size_bytes":1,"allocation_type":"cACHE"}"#).unwrap();
        assert_eq!(r.allocation_type, MemoryAllocationType::Cache);
        let r = allocate(r#"{"device_id":"cpu","size_bytes":1,"allocation_type":6}"#).unwrap();
        assert_eq!(r.allocation_type, MemoryAllocationType::Reservation);
        let e = allocate(r#"{"device_id":"cpu","size_bytes":1,"allocation_type":9}"#).unwrap_err();
        assert!(e.message.contains("allocation_type"));
    }

    #[test]
    fn timeout_range() {
        assert!(allocate(r#"{"device_id":"cpu","size_bytes":1,"timeout_seconds":0.5}"#).is_ok());
        assert!(allocate(r#"{"device_id":"cpu","size_bytes":1,"timeout_seconds":3601}"#).is_err());
        assert!(allocate(r#"{"device_id":"cpu","size_bytes":1,"timeout_seconds":-1}"#).is_err());
    }

    #[test]
    fn optimize_needs_a_type_and_a_target_for_reduce() {
        let p = |t: &str| OptimizeRequest::parse(Some(&raw(t)));
        let r = p(r#"{"device_id":"cpu","optimization_type":"defragment"}"#).unwrap();
        assert!(r.wait_for_completion);
        assert_eq!(r.optimization_type, MemoryOptimizationType::Defragment);
        assert!(p(r#"{"device_id":"cpu"}"#).is_err());
        assert!(p(r#"{"device_id":"cpu","optimization_type":3}"#).is_err());
        assert!(
            p(r#"{"device_id":"cpu","optimization_type":3,"target_usage_percentage":101}"#)
                .is_err()
        );
        let r = p(r#"{"device_id":"cpu","optimization_type":3,"target_usage_percentage":50,"preserve_allocations":["a"]}"#).unwrap();
        assert_eq!(r.preserve_allocations, vec!["a".to_string()]);
    }

    #[test]
    fn paging_limits() {
        let p = |t: &str| GetAllocationsRequest::parse(Some(&raw(t)));
        assert_eq!(p(r#"{"device_id":"cpu"}"#).unwrap().limit, 1000);
        assert!(p(r#"{"device_id":"cpu","limit":100001}"#).is_err());
        assert!(p(r#"{"device_id":"cpu","offset":-1}"#).is_err());
    }
}
