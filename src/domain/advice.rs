//! Advice the advisor gives (`memory.optimization_recs`): what it recommends and the request
//! that applies it, as typed data; `protocol` writes the request as an action and its
//! `data`.

use super::kinds::{DeviceId, RecommendationKind};

/// The request that applies a recommendation.
#[derive(Debug, Clone, PartialEq)]
pub enum SuggestedRequest {
    /// `memory.defragment` of a device.
    Defragment {
        /// The device.
        device_id: DeviceId,
    },
    /// `memory.optimize` with ClearCache.
    ClearCache {
        /// The device.
        device_id: DeviceId,
    },
    /// `memory.optimize` with ReduceToTarget.
    ReduceToTarget {
        /// The device.
        device_id: DeviceId,
        /// The usage (%) to reach.
        target_usage_percentage: f64,
    },
    /// `memory.model_optimize` with OffloadIdle.
    OffloadIdleModels {
        /// The device.
        device_id: DeviceId,
        /// Unused for this long, a model is idle.
        idle_seconds: f64,
    },
    /// `memory.model_optimize` with UnloadIdle.
    UnloadIdleModels {
        /// The device.
        device_id: DeviceId,
        /// Unused for this long, a model is idle.
        idle_seconds: f64,
    },
    /// `memory.deallocate` of one allocation.
    Deallocate {
        /// The allocation (as the contract writes it).
        allocation_id: String,
        /// Its device.
        device_id: DeviceId,
    },
}

/// One piece of advice.
#[derive(Debug, Clone, PartialEq)]
pub struct Advice {
    /// Stable for the same advice: `<device>/<kind>` (`/<allocation id>` for ReviewPersistent).
    pub id: String,
    /// The device it is about.
    pub device_id: DeviceId,
    /// What it advises.
    pub kind: RecommendationKind,
    /// 1 = most urgent.
    pub priority: u32,
    /// For people: what was seen and what the request will do.
    pub description: String,
    /// Bytes the request is expected to free (RaiseBudget: bytes the budget lacks).
    pub estimated_savings_bytes: u64,
    /// The request that applies it; `None` when no request can (RaiseBudget).
    pub request: Option<SuggestedRequest>,
}
