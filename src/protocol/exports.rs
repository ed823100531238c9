//! The shapes of exports (the contract's section 8.3): `memory.export`, `memory.unexport`,
//! `memory.list_exports`, and the lines of a claim on the claim socket.

use super::shapes::Timestamp;
use serde::{Deserialize, Serialize};

/// An allocation of an export and where it is in the export's byte range.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ExportedAllocationInfo {
    /// The allocation.
    pub allocation_id: String,
    /// Its first byte in the export's byte range.
    pub offset: u64,
    /// Its bytes.
    pub size_bytes: u64,
}

/// One tensor of an exported model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct TensorInfo {
    /// Its name in the file.
    pub name: String,
    /// As the safetensors header writes it: `F16`, `BF16`, `F32`, …
    pub dtype: String,
    /// Its dimensions, from the header.
    pub shape: Vec<u64>,
    /// The allocation holding it; null for a tensor of no bytes.
    pub allocation_id: Option<String>,
    /// Its first byte in the export's byte range.
    pub offset: u64,
    /// Its bytes.
    pub size_bytes: u64,
}

/// `memory.export`: what a client needs to claim and read the memory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ExportInfo {
    /// The export.
    pub export_id: String,
    /// The device its memory is on.
    pub device_id: String,
    /// The GPU's UUID (`GPU-…`); null for host memory.
    pub device_uuid: Option<String>,
    /// The length of the export's byte range (whole pages).
    pub size_bytes: u64,
    /// The Unix stream socket to claim it on.
    pub socket_path: String,
    /// Good for one claim.
    pub secret: String,
    /// A claim after this is refused.
    pub expires_at: Timestamp,
    /// Its allocations, where they are in the byte range.
    pub allocations: Vec<ExportedAllocationInfo>,
    /// A model export's tensors, in file order; empty for an allocation.
    pub tensors: Vec<TensorInfo>,
}

/// `memory.unexport`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct UnexportResponse {
    /// The export ended.
    pub export_id: String,
    /// How many allocations it held.
    pub allocation_count: u64,
}

/// One live export, without its secret.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ExportSummary {
    /// The export.
    pub export_id: String,
    /// The device its memory is on.
    pub device_id: String,
    /// The length of its byte range.
    pub size_bytes: u64,
    /// Its tenant: `default` until tenants exist.
    pub tenant: String,
    /// The pid of the client that made it: null until sessions exist.
    pub client_pid: Option<u32>,
    /// Whether its secret was used.
    pub claimed: bool,
    /// When it was made.
    pub created_at: Timestamp,
    /// Until when it may be claimed.
    pub expires_at: Timestamp,
}

/// `memory.list_exports`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ListExportsResponse {
    /// Every live export, oldest first.
    pub exports: Vec<ExportSummary>,
}

/// The line a client sends on the claim socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimRequest {
    /// The export.
    pub export_id: String,
    /// Its secret.
    pub secret: String,
}

/// One segment of a claim's answer: one descriptor goes with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimSegment {
    /// Where it is mapped in the export's byte range.
    pub offset: u64,
    /// Its length (whole pages).
    pub size_bytes: u64,
    /// Where it starts in the descriptor's file.
    pub file_offset: u64,
}

/// The line memcoord answers a good claim with (the descriptors travel on its bytes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimAnswer {
    /// The export.
    pub export_id: String,
    /// The device its memory is on.
    pub device_id: String,
    /// The length of its byte range.
    pub size_bytes: u64,
    /// Its segments, in order: one descriptor each.
    pub segments: Vec<ClaimSegment>,
}

/// The line memcoord answers a refused claim with (no descriptor).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimRefusal {
    /// `EXPORT_NOT_FOUND` (or `INVALID_PARAMETER` for a line that is not a claim).
    pub error_code: String,
    /// Why, for people.
    pub error_message: String,
}
