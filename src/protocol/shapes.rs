//! Response shapes of the wire contract (its section 5; documented in docs/protocol.md), as plain
//! serialisable data.
//!
//! Field names are the wire names; every field is always written (nullable ones as `null`).

use super::enums::{MemoryAllocationType, MemoryHealthStatus, MemoryType};
use serde::{Deserialize, Serialize, Serializer};
use std::time::SystemTime;

/// A point in time, written as an RFC 3339 UTC string with milliseconds
/// (`2026-11-29T18:00:00.123Z`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timestamp(pub SystemTime);

impl Timestamp {
    /// The current time.
    pub fn now() -> Self {
        Timestamp(SystemTime::now())
    }
}

impl Timestamp {
    /// The RFC 3339 text (`2026-11-29T18:00:00.123Z`) into a fixed buffer. Written by hand
    /// rather than through humantime's `Display`: an analytics answer carries up to 3,600 of
    /// these, and this is about ten times faster. Times before 1970 are written as 1970.
    pub fn rfc3339_millis(&self) -> [u8; 24] {
        let ms = self
            .0
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let (secs, millis) = (ms / 1000, ms % 1000);
        let (days, rem) = (secs / 86_400, secs % 86_400);
        // Days to civil date (Howard Hinnant's algorithm, for days ≥ 0).
        let z = days + 719_468;
        let era = z / 146_097;
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = (yoe + era * 400 + u64::from(month <= 2)).min(9999);
        let mut b = *b"0000-00-00T00:00:00.000Z";
        let mut put = |at: usize, width: usize, mut v: u64| {
            for i in (0..width).rev() {
                b[at + i] = b'0' + (v % 10) as u8;
                v /= 10;
            }
        };
        put(0, 4, year);
        put(5, 2, month);
        put(8, 2, day);
        put(11, 2, rem / 3600);
        put(14, 2, rem % 3600 / 60);
        put(17, 2, rem % 60);
        put(20, 3, millis);
        b
    }
}

impl schemars::JsonSchema for Timestamp {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Timestamp".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "format": "date-time",
            "description": "RFC 3339 UTC with milliseconds, e.g. 2026-11-29T18:00:00.123Z"
        })
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let b = self.rfc3339_millis();
        // The buffer holds ASCII digits and separators only.
        serializer.serialize_str(std::str::from_utf8(&b).unwrap_or("1970-01-01T00:00:00.000Z"))
    }
}

/// Live bytes by allocation type, written as a JSON object of the non-zero ones.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TypeBytes(pub [u64; 7]);

impl schemars::JsonSchema for TypeBytes {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "TypeBytes".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        let names: Vec<&str> = MemoryAllocationType::ALL.iter().map(|k| k.name()).collect();
        schemars::json_schema!({
            "type": "object",
            "description": "bytes by allocation type (non-zero ones only)",
            "propertyNames": {"enum": names},
            "additionalProperties": {"type": "integer", "minimum": 0}
        })
    }
}

impl Serialize for TypeBytes {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let nonzero = self.0.iter().filter(|b| **b > 0).count();
        let mut map = serializer.serialize_map(Some(nonzero))?;
        for kind in MemoryAllocationType::ALL {
            let bytes = self.0[kind.value() as usize % 7];
            if bytes > 0 {
                map.serialize_entry(kind.name(), &bytes)?;
            }
        }
        map.end()
    }
}

/// One bucket of a dashboard memory map.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct MapBucket {
    /// Bytes of the bucket under no allocation.
    pub free: u64,
    /// Bytes of live allocations by type.
    pub types: TypeBytes,
}

/// A device's arena in equal buckets, in address order (dashboard; not part of the contract).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct MemoryMapView {
    /// Bytes of the arena's address range.
    pub arena_bytes: u64,
    /// Bytes per bucket.
    pub bucket_bytes: u64,
    /// The buckets.
    pub buckets: Vec<MapBucket>,
}

/// One device on the dashboard.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct DashboardDevice {
    /// As `memory.list_devices`.
    pub info: MemoryInfo,
    /// As `memory.get_usage`.
    pub usage: MemoryUsageStats,
    /// As `memory.get_pressure`.
    pub pressure: MemoryPressure,
    /// The memory map.
    pub map: MemoryMapView,
    /// The 20 largest live allocations.
    pub largest_allocations: Vec<MemoryAllocation>,
    /// The last 300 seconds' samples, oldest first.
    pub samples: Vec<AnalyticsSample>,
}

/// A model on the dashboard: ModelInfo and its lease count.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct DashboardModel {
    /// As `memory.model_status`.
    #[serde(flatten)]
    pub info: ModelInfo,
    /// Active leases.
    pub leases: u64,
}

/// Everything the dashboard shows (`GET /v1/dashboard/state`; not part of the contract).
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct DashboardState {
    /// When it was gathered.
    pub generated_at: Timestamp,
    /// Every device.
    pub devices: Vec<DashboardDevice>,
    /// Every model.
    pub models: Vec<DashboardModel>,
    /// Running transfers and the most recent finished ones.
    pub transfers: Vec<MemoryTransfer>,
}

#[cfg(test)]
mod timestamp_tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn matches_humantime_across_the_calendar() {
        // Leap days, month and year ends, the epoch, a far date; steps of about 7.3 days.
        let mut t = 0u64;
        while t < 4_102_444_800_000 {
            let at = UNIX_EPOCH + Duration::from_millis(t);
            let ours = Timestamp(at).rfc3339_millis();
            let theirs = humantime::format_rfc3339_millis(at).to_string();
            assert_eq!(std::str::from_utf8(&ours).unwrap(), theirs, "{t}");
            t += 631_151_237;
        }
        for t in [951_782_400_000u64, 951_868_799_999, 1_709_164_800_123] {
            let at = UNIX_EPOCH + Duration::from_millis(t);
            assert_eq!(
                std::str::from_utf8(&Timestamp(at).rfc3339_millis()).unwrap(),
                humantime::format_rfc3339_millis(at).to_string()
            );
        }
    }
}

/// A device as `memory.list_devices` and `memory.get_status` describe it.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct MemoryInfo {
    /// `cpu`, `shm`, `cuda:N`.
    pub device_id: String,
    /// A name for people.
    pub name: String,
    /// The kind of memory.
    #[serde(rename = "type")]
    pub memory_type: MemoryType,
    /// The device's capacity in bytes.
    pub total_memory: u64,
    /// What a `memory.allocate` here could obtain now, in bytes.
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
    pub last_updated: Timestamp,
}

/// Counters of one device, as `memory.get_usage` reports them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct MemoryUsageStats {
    /// The device.
    pub device_id: String,
    /// Sizes of live allocations that hold memory (Reservations excluded).
    pub allocated_bytes: u64,
    /// Memory this service holds from the device now (≥ allocated).
    pub reserved_bytes: u64,
    /// The highest `allocated_bytes` seen.
    pub peak_allocated_bytes: u64,
    /// The highest `reserved_bytes` seen.
    pub peak_reserved_bytes: u64,
    /// Sizes of live Reservations.
    pub reservation_bytes: u64,
    /// Bytes held by models on the device.
    pub model_bytes: u64,
    /// The service's budget for the device.
    pub budget_bytes: u64,
    /// Live allocations (Reservations included).
    pub allocation_count: u64,
    /// Allocations made since start.
    pub total_allocations: u64,
    /// Deallocations (including clears) since start.
    pub total_deallocations: u64,
    /// Allocations that ended in OUT_OF_MEMORY.
    pub failed_allocations: u64,
    /// Mean time from request to allocation, waiting included, in milliseconds.
    pub average_allocation_time_ms: f64,
    /// v1.1 (section 8.2): bytes each tenant holds on the device (its allocations,
    /// Reservations included, and the models it loaded); a tenant holding nothing is left out.
    #[serde(default)]
    pub tenant_bytes: std::collections::BTreeMap<String, u64>,
}

/// Where another process finds an `shm` allocation's bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct MemoryHandle {
    /// The file to map.
    pub path: String,
    /// The byte offset of the allocation in that file.
    pub offset: u64,
}

/// One live allocation.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct MemoryAllocation {
    /// Lowercase hyphenated UUID v4.
    pub allocation_id: String,
    /// The device it lives on.
    pub device_id: String,
    /// Its size in bytes, as requested.
    pub size_bytes: u64,
    /// The alignment of its first byte, in bytes.
    pub alignment: u64,
    /// What it is for.
    pub allocation_type: MemoryAllocationType,
    /// The caller's free-form label.
    pub purpose: String,
    /// Whether `memory.clear` without `force` keeps it, and defragment leaves it in place.
    pub persistent: bool,
    /// `client`, or `model:<name>`.
    pub owner: String,
    /// The tenant of the request that made it (`default` without tenants).
    #[serde(default)]
    pub tenant: String,
    /// The process that asked for it: the peer's pid on a Unix socket, the parent's on stdio;
    /// null over HTTP and for a model's allocations.
    pub client_pid: Option<u32>,
    /// When it was made.
    pub created_at: Timestamp,
    /// `shm` only: where another process maps it.
    pub handle: Option<MemoryHandle>,
}

/// How the free memory of a device is split up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct MemoryFragmentation {
    /// The device.
    pub device_id: String,
    /// `(1 − largest_free_block_bytes / free_bytes) × 100`, 0 when nothing is free.
    pub fragmentation_percentage: f64,
    /// Equal to `available_memory`.
    pub free_bytes: u64,
    /// The largest single allocation that would succeed right now.
    pub largest_free_block_bytes: u64,
    /// The free gaps in the device's arena.
    pub free_block_count: u64,
}

/// `memory.get_status`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct GetMemoryStatusResponse {
    /// The device.
    pub device_id: String,
    /// Its figures.
    pub memory_info: MemoryInfo,
    /// Its counters, when asked.
    pub usage_stats: Option<MemoryUsageStats>,
    /// Its allocations, when asked (else empty).
    pub allocations: Vec<MemoryAllocation>,
    /// Its fragmentation, when asked.
    pub fragmentation: Option<MemoryFragmentation>,
    /// 0..100, from usage and fragmentation.
    pub health_score: f64,
    /// When these figures were taken.
    pub last_updated: Timestamp,
}

/// `memory.allocate`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct AllocateMemoryResponse {
    /// The device.
    pub device_id: String,
    /// The new allocation.
    pub allocation: MemoryAllocation,
    /// Always true in a successful response.
    pub success: bool,
    /// From request to allocation, waiting included.
    pub allocation_time_ms: f64,
    /// `available_memory` after the allocation.
    pub available_memory_bytes: u64,
    /// (allocated + reservation) / budget × 100 after the allocation.
    pub utilization_percentage: f64,
    /// A line for people.
    pub message: String,
    /// When it was made.
    pub allocated_at: Timestamp,
}

/// `memory.list_devices`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ListDevicesResponse {
    /// Every device, host devices first.
    pub devices: Vec<MemoryInfo>,
}

/// `memory.get_allocations`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct GetAllocationsResponse {
    /// The device.
    pub device_id: String,
    /// How many allocations match the filters (before paging).
    pub total_count: u64,
    /// The page asked for, oldest first.
    pub allocations: Vec<MemoryAllocation>,
}

/// `memory.deallocate`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct DeallocateResponse {
    /// The allocation freed.
    pub allocation_id: String,
    /// Its device.
    pub device_id: String,
    /// Its size.
    pub freed_bytes: u64,
}

/// `memory.clear`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ClearResponse {
    /// The device.
    pub device_id: String,
    /// Allocations freed.
    pub cleared_count: u64,
    /// Their bytes.
    pub freed_bytes: u64,
    /// Persistent allocations kept (0 with `force`).
    pub kept_persistent_count: u64,
}

/// `memory.defragment`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct DefragmentResponse {
    /// The device.
    pub device_id: String,
    /// Allocations moved.
    pub moved_count: u64,
    /// Their bytes.
    pub moved_bytes: u64,
    /// Allocations that may not move (persistent, in use) and were left in place.
    pub skipped_count: u64,
    /// `fragmentation_percentage` before.
    pub fragmentation_before: f64,
    /// `fragmentation_percentage` after.
    pub fragmentation_after: f64,
    /// Bytes of pages given back to the system.
    pub released_bytes: u64,
    /// Wall time.
    pub duration_ms: f64,
}

/// `memory.optimize`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct OptimizeResponse {
    /// The device.
    pub device_id: String,
    /// What was asked.
    pub optimization_type: super::enums::MemoryOptimizationType,
    /// Bytes of allocations freed plus bytes of pages given back.
    pub freed_bytes: u64,
    /// What was done, for people (`["scheduled"]` when running in the background).
    pub actions: Vec<String>,
    /// Budget usage (allocations + reservations) / budget × 100, before.
    pub usage_before: f64,
    /// The same, after.
    pub usage_after: f64,
    /// Wall time.
    pub duration_ms: f64,
}

/// A transfer of an allocation between devices (`memory.transfer`, `memory.get_transfer`).
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct MemoryTransfer {
    /// Lowercase hyphenated UUID v4.
    pub transfer_id: String,
    /// The allocation transferred.
    pub allocation_id: String,
    /// The allocation on the destination: the same id for a move, a new one for a copy.
    pub destination_allocation_id: Option<String>,
    /// Where the bytes come from.
    pub source_device_id: String,
    /// Where they go.
    pub destination_device_id: String,
    /// `move` or `copy`.
    pub mode: String,
    /// Where it stands.
    pub status: super::enums::TransferStatus,
    /// Bytes to copy.
    pub total_bytes: u64,
    /// Bytes copied so far.
    pub bytes_transferred: u64,
    /// `bytes_transferred / total_bytes × 100`.
    pub progress_percentage: f64,
    /// Bytes copied per second of the transfer so far.
    pub bandwidth_bytes_per_second: f64,
    /// When it started.
    pub started_at: Timestamp,
    /// When it ended (completed, failed or cancelled).
    pub completed_at: Option<Timestamp>,
    /// Why it failed.
    pub error_message: Option<String>,
}

/// A model as `memory.model_*` report it.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ModelInfo {
    /// The host's name for it.
    pub model_name: String,
    /// Its home device.
    pub device_id: String,
    /// Where its bytes are now (the home device, or `cpu` while Offloaded).
    pub resident_device_id: String,
    /// Loading, Loaded, Offloaded, Unloading.
    pub state: super::enums::ModelState,
    /// Bytes of its tensors.
    pub size_bytes: u64,
    /// Tensors in its file.
    pub tensor_count: u64,
    /// The file it was loaded from.
    pub path: String,
    /// When it was loaded.
    pub loaded_at: Timestamp,
    /// When it was last loaded, acquired or released.
    pub last_used_at: Timestamp,
    /// Idle seconds before it may be unloaded; null = until evicted.
    pub keep_alive_seconds: Option<f64>,
    /// How long the load took.
    pub load_time_ms: f64,
    /// Its live leases, oldest first (v1.1).
    #[serde(default)]
    pub leases: Vec<LeaseInfo>,
}

/// One lease of a model (v1.1, contract section 8.5).
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct LeaseInfo {
    /// The lease.
    pub lease_id: String,
    /// When it was taken.
    pub acquired_at: Timestamp,
    /// When it ends unless renewed; null: when released.
    pub expires_at: Option<Timestamp>,
}

/// `memory.model_unload`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ModelUnloadResponse {
    /// The model.
    pub model_name: String,
    /// Bytes given back.
    pub freed_bytes: u64,
}

/// `memory.model_acquire`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ModelAcquireResponse {
    /// The lease, to release later.
    pub lease_id: String,
    /// When the lease ends unless renewed (`memory.model_renew`); null: when released (v1.1).
    #[serde(default)]
    pub expires_at: Option<Timestamp>,
    /// The model.
    pub model: ModelInfo,
}

/// `memory.model_renew` (v1.1).
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ModelRenewResponse {
    /// The lease renewed.
    pub lease_id: String,
    /// When it ends now unless renewed again.
    pub expires_at: Timestamp,
}

/// `memory.model_release`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ModelReleaseResponse {
    /// The lease ended.
    pub lease_id: String,
    /// Its model.
    pub model_name: String,
}

/// `memory.model_status`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ModelStatusResponse {
    /// The models asked about.
    pub models: Vec<ModelInfo>,
    /// Their bytes.
    pub model_bytes: u64,
    /// The model budget of the device asked about (every device's, summed, when none was).
    pub model_budget_bytes: u64,
}

/// `memory.model_optimize`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ModelOptimizeResponse {
    /// Models unloaded.
    pub unloaded: Vec<String>,
    /// Models offloaded to `cpu`.
    pub offloaded: Vec<String>,
    /// Bytes taken off the devices.
    pub freed_bytes: u64,
}

/// How hard a device is pressed for memory (`memory.get_pressure`).
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct MemoryPressure {
    /// The device.
    pub device_id: String,
    /// The level (rises at once, falls after a hold period).
    pub level: super::enums::PressureLevel,
    /// (allocated + reservation bytes) / budget × 100.
    pub usage_percentage: f64,
    /// What an allocate could obtain now.
    pub available_memory: u64,
    /// Requests waiting for memory now.
    pub waiting_requests: u64,
    /// Milliseconds of the last 10 s during which a request waited for memory (as in PSI).
    pub stall_ms_10s: f64,
    /// The same over 60 s.
    pub stall_ms_60s: f64,
    /// OUT_OF_MEMORY answers in the last 60 s.
    pub failed_allocations_60s: u64,
    /// Change of (allocated + reservation) bytes per second over the last 10 s.
    pub trend_bytes_per_second: f64,
}

/// `memory.get_pressure`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct GetPressureResponse {
    /// One reading per device asked about.
    pub devices: Vec<MemoryPressure>,
}

/// One second of a device's history (`memory.analytics`).
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct AnalyticsSample {
    /// The second.
    pub at: Timestamp,
    /// In use on the device, by every process.
    pub used_memory: u64,
    /// Bytes of live allocations.
    pub allocated_bytes: u64,
    /// Bytes this service held from the device.
    pub reserved_bytes: u64,
}

/// One cumulative bucket of the allocation size histogram.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
pub struct SizeBucket {
    /// Upper bound in bytes (9223372036854775807 = +Inf).
    pub le_bytes: u64,
    /// Allocations of at most `le_bytes` in the window.
    pub count: u64,
}

/// Allocation latency percentiles, in milliseconds.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct LatencySummary {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Slowest.
    pub max: f64,
}

/// Live bytes by purpose, written as a JSON object, largest first.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PurposeBytes(pub Vec<(String, u64)>);

impl schemars::JsonSchema for PurposeBytes {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "PurposeBytes".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "object",
            "description": "live bytes by purpose, largest first",
            "additionalProperties": {"type": "integer", "minimum": 0}
        })
    }
}

impl Serialize for PurposeBytes {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

/// A device's analytics over a window (`memory.analytics`).
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct MemoryAnalytics {
    /// The device.
    pub device_id: String,
    /// The window, 1 to 3600 seconds.
    pub window_seconds: u64,
    /// One sample per second of the window that was sampled, oldest first.
    pub samples: Vec<AnalyticsSample>,
    /// Cumulative counts of allocations by size in the window; the last bucket is +Inf.
    pub allocation_size_histogram: Vec<SizeBucket>,
    /// `memory.allocate` latency in the window.
    pub allocation_latency_ms: LatencySummary,
    /// Allocations per second over the window (or since the start, if shorter).
    pub allocations_per_second: f64,
    /// The most bytes allocated at once in the window.
    pub peak_allocated_bytes: u64,
    /// Live bytes by purpose (the 1,000 largest; the rest under `"(other purposes)"`).
    pub bytes_by_purpose: PurposeBytes,
    /// Allocations in the window (an extension: the +Inf bucket's count).
    pub allocation_count: u64,
}

/// `memory.analytics`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct GetAnalyticsResponse {
    /// One per device asked about.
    pub devices: Vec<MemoryAnalytics>,
}

/// The request that applies a recommendation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct RecommendedRequest {
    /// The action.
    pub action: String,
    /// Its `data`.
    pub data: serde_json::Value,
}

/// One piece of advice (`memory.optimization_recs`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct Recommendation {
    /// Stable for the same advice: `<device>/<kind>` (`/<allocation id>` for ReviewPersistent).
    pub id: String,
    /// The device it is about.
    pub device_id: String,
    /// What it advises.
    pub kind: super::enums::RecommendationKind,
    /// 1 = most urgent.
    pub priority: u32,
    /// For people: what was seen and what the request will do.
    pub description: String,
    /// Bytes the request is expected to free (RaiseBudget: bytes the budget lacks).
    pub estimated_savings_bytes: u64,
    /// The exact request that applies it; null when no request can (RaiseBudget).
    pub request: Option<RecommendedRequest>,
}

/// `memory.optimization_recs`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct OptimizationRecsResponse {
    /// Most urgent first.
    pub recommendations: Vec<Recommendation>,
}
