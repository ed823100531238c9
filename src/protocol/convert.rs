//! The engine's types ([`crate::domain`]) into the wire shapes: ids as lowercase hyphenated
//! strings, times as [`Timestamp`], suggested requests as an action and its `data`.

use super::shapes::{
    LeaseInfo, MemoryAllocation, MemoryFragmentation, MemoryHandle, MemoryInfo, MemoryPressure,
    MemoryTransfer, MemoryUsageStats, ModelInfo, Recommendation, RecommendedRequest, Timestamp,
};
use crate::domain::{
    Advice, AllocationView, DeviceInfo, Fragmentation, Handle, LeaseView, ModelView, PressureView,
    SuggestedRequest, TransferRecord, UsageStats,
};
use serde_json::json;

impl From<Handle> for MemoryHandle {
    fn from(h: Handle) -> Self {
        MemoryHandle {
            path: h.path,
            offset: h.offset,
        }
    }
}

impl From<AllocationView> for MemoryAllocation {
    fn from(a: AllocationView) -> Self {
        MemoryAllocation {
            allocation_id: a.allocation_id.hyphenated().to_string(),
            device_id: a.device_id,
            size_bytes: a.size_bytes,
            alignment: a.alignment,
            allocation_type: a.allocation_type,
            purpose: a.purpose,
            persistent: a.persistent,
            owner: a.owner,
            tenant: a.tenant,
            client_pid: a.client_pid,
            created_at: Timestamp(a.created_at),
            handle: a.handle.map(MemoryHandle::from),
        }
    }
}

impl From<DeviceInfo> for MemoryInfo {
    fn from(d: DeviceInfo) -> Self {
        MemoryInfo {
            device_id: d.device_id,
            name: d.name,
            memory_type: d.memory_type,
            total_memory: d.total_memory,
            available_memory: d.available_memory,
            used_memory: d.used_memory,
            usage_percentage: d.usage_percentage,
            health: d.health,
            fragmentation_percentage: d.fragmentation_percentage,
            last_updated: Timestamp(d.last_updated),
        }
    }
}

impl From<UsageStats> for MemoryUsageStats {
    fn from(u: UsageStats) -> Self {
        MemoryUsageStats {
            device_id: u.device_id,
            allocated_bytes: u.allocated_bytes,
            reserved_bytes: u.reserved_bytes,
            peak_allocated_bytes: u.peak_allocated_bytes,
            peak_reserved_bytes: u.peak_reserved_bytes,
            reservation_bytes: u.reservation_bytes,
            model_bytes: u.model_bytes,
            budget_bytes: u.budget_bytes,
            allocation_count: u.allocation_count,
            total_allocations: u.total_allocations,
            total_deallocations: u.total_deallocations,
            failed_allocations: u.failed_allocations,
            average_allocation_time_ms: u.average_allocation_time_ms,
            tenant_bytes: u.tenant_bytes,
        }
    }
}

impl From<Fragmentation> for MemoryFragmentation {
    fn from(f: Fragmentation) -> Self {
        MemoryFragmentation {
            device_id: f.device_id,
            fragmentation_percentage: f.fragmentation_percentage,
            free_bytes: f.free_bytes,
            largest_free_block_bytes: f.largest_free_block_bytes,
            free_block_count: f.free_block_count,
        }
    }
}

impl From<PressureView> for MemoryPressure {
    fn from(p: PressureView) -> Self {
        MemoryPressure {
            device_id: p.device_id,
            level: p.level,
            usage_percentage: p.usage_percentage,
            available_memory: p.available_memory,
            waiting_requests: p.waiting_requests,
            stall_ms_10s: p.stall_ms_10s,
            stall_ms_60s: p.stall_ms_60s,
            failed_allocations_60s: p.failed_allocations_60s,
            trend_bytes_per_second: p.trend_bytes_per_second,
        }
    }
}

impl From<ModelView> for ModelInfo {
    fn from(m: ModelView) -> Self {
        ModelInfo {
            model_name: m.model_name,
            device_id: m.device_id,
            resident_device_id: m.resident_device_id,
            state: m.state,
            size_bytes: m.size_bytes,
            tensor_count: m.tensor_count,
            path: m.path,
            loaded_at: Timestamp(m.loaded_at),
            last_used_at: Timestamp(m.last_used_at),
            keep_alive_seconds: m.keep_alive_seconds,
            load_time_ms: m.load_time_ms,
            leases: m.leases.into_iter().map(Into::into).collect(),
        }
    }
}

impl From<LeaseView> for LeaseInfo {
    fn from(l: LeaseView) -> Self {
        LeaseInfo {
            lease_id: l.lease_id.hyphenated().to_string(),
            acquired_at: Timestamp(l.acquired_at),
            expires_at: l.expires_at.map(Timestamp),
        }
    }
}

impl From<TransferRecord> for MemoryTransfer {
    fn from(t: TransferRecord) -> Self {
        MemoryTransfer {
            transfer_id: t.transfer_id.hyphenated().to_string(),
            allocation_id: t.allocation_id.hyphenated().to_string(),
            destination_allocation_id: t
                .destination_allocation_id
                .map(|id| id.hyphenated().to_string()),
            source_device_id: t.source_device_id,
            destination_device_id: t.destination_device_id,
            mode: t.mode.name().to_string(),
            status: t.status,
            total_bytes: t.total_bytes,
            bytes_transferred: t.bytes_transferred,
            progress_percentage: t.progress_percentage,
            bandwidth_bytes_per_second: t.bandwidth_bytes_per_second,
            started_at: Timestamp(t.started_at),
            completed_at: t.completed_at.map(Timestamp),
            error_message: t.error_message,
        }
    }
}

impl From<SuggestedRequest> for RecommendedRequest {
    fn from(r: SuggestedRequest) -> Self {
        let (action, data) = match r {
            SuggestedRequest::Defragment { device_id } => {
                ("memory.defragment", json!({ "device_id": device_id }))
            }
            SuggestedRequest::ClearCache { device_id } => (
                "memory.optimize",
                json!({ "device_id": device_id, "optimization_type": "ClearCache" }),
            ),
            SuggestedRequest::ReduceToTarget {
                device_id,
                target_usage_percentage,
            } => (
                "memory.optimize",
                json!({
                    "device_id": device_id,
                    "optimization_type": "ReduceToTarget",
                    "target_usage_percentage": target_usage_percentage,
                }),
            ),
            SuggestedRequest::OffloadIdleModels {
                device_id,
                idle_seconds,
            } => (
                "memory.model_optimize",
                json!({
                    "device_id": device_id,
                    "strategy": "OffloadIdle",
                    "idle_seconds": idle_seconds,
                }),
            ),
            SuggestedRequest::UnloadIdleModels {
                device_id,
                idle_seconds,
            } => (
                "memory.model_optimize",
                json!({
                    "device_id": device_id,
                    "strategy": "UnloadIdle",
                    "idle_seconds": idle_seconds,
                }),
            ),
            SuggestedRequest::Deallocate {
                allocation_id,
                device_id,
            } => (
                "memory.deallocate",
                json!({ "allocation_id": allocation_id, "device_id": device_id }),
            ),
        };
        RecommendedRequest {
            action: action.to_string(),
            data,
        }
    }
}

impl From<Advice> for Recommendation {
    fn from(a: Advice) -> Self {
        Recommendation {
            id: a.id,
            device_id: a.device_id,
            kind: a.kind,
            priority: a.priority,
            description: a.description,
            estimated_savings_bytes: a.estimated_savings_bytes,
            request: a.request.map(RecommendedRequest::from),
        }
    }
}

impl From<crate::domain::ExportedAllocation> for super::exports::ExportedAllocationInfo {
    fn from(a: crate::domain::ExportedAllocation) -> Self {
        super::exports::ExportedAllocationInfo {
            allocation_id: a.allocation_id.hyphenated().to_string(),
            offset: a.offset,
            size_bytes: a.size_bytes,
        }
    }
}

impl From<crate::domain::TensorView> for super::exports::TensorInfo {
    fn from(t: crate::domain::TensorView) -> Self {
        super::exports::TensorInfo {
            name: t.name,
            dtype: t.dtype,
            shape: t.shape,
            allocation_id: t.allocation_id.map(|id| id.hyphenated().to_string()),
            offset: t.offset,
            size_bytes: t.size_bytes,
        }
    }
}

impl From<crate::domain::Segment> for super::exports::ClaimSegment {
    fn from(s: crate::domain::Segment) -> Self {
        super::exports::ClaimSegment {
            offset: s.offset,
            size_bytes: s.size_bytes,
            file_offset: s.file_offset,
        }
    }
}

impl From<crate::domain::ExportView> for super::exports::ExportSummary {
    /// Tenants and sessions come later (issue 15): every export is the `default` tenant's, of
    /// no known client process.
    fn from(x: crate::domain::ExportView) -> Self {
        super::exports::ExportSummary {
            export_id: x.export_id.hyphenated().to_string(),
            device_id: x.device_id,
            size_bytes: x.size_bytes,
            tenant: "default".to_string(),
            client_pid: None,
            claimed: x.claimed,
            created_at: Timestamp(x.created_at),
            expires_at: Timestamp(x.expires_at),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggested_requests_are_written_as_before() {
        let dev = "cpu".to_string();
        let cases = [
            (
                SuggestedRequest::Defragment {
                    device_id: dev.clone(),
                },
                r#"{"action":"memory.defragment","data":{"device_id":"cpu"}}"#,
            ),
            (
                SuggestedRequest::ClearCache {
                    device_id: dev.clone(),
                },
                r#"{"action":"memory.optimize","data":{"device_id":"cpu","optimization_type":"ClearCache"}}"#,
            ),
            (
                SuggestedRequest::ReduceToTarget {
                    device_id: dev.clone(),
                    target_usage_percentage: 75.0,
                },
                r#"{"action":"memory.optimize","data":{"device_id":"cpu","optimization_type":"ReduceToTarget","target_usage_percentage":75.0}}"#,
            ),
            (
                SuggestedRequest::OffloadIdleModels {
                    device_id: dev.clone(),
                    idle_seconds: 60.0,
                },
                r#"{"action":"memory.model_optimize","data":{"device_id":"cpu","idle_seconds":60.0,"strategy":"OffloadIdle"}}"#,
            ),
            (
                SuggestedRequest::UnloadIdleModels {
                    device_id: dev.clone(),
                    idle_seconds: 60.0,
                },
                r#"{"action":"memory.model_optimize","data":{"device_id":"cpu","idle_seconds":60.0,"strategy":"UnloadIdle"}}"#,
            ),
            (
                SuggestedRequest::Deallocate {
                    allocation_id: "a".into(),
                    device_id: dev,
                },
                r#"{"action":"memory.deallocate","data":{"allocation_id":"a","device_id":"cpu"}}"#,
            ),
        ];
        for (request, text) in cases {
            let wire = RecommendedRequest::from(request);
            assert_eq!(serde_json::to_string(&wire).unwrap(), text);
        }
    }
}
