//! Advice a host can act on (`memory.optimization_recs`): rules over what memcoord sees of a
//! device, each turned into a recommendation with the exact request that applies it and the
//! bytes that request is expected to free. Plain data in, plain data out.
//!
//! The rules (thresholds in [`Rules`]):
//! - **RaiseBudget**: a request refused in the last minute needed more budget than the device
//!   has. No request can fix that; the saving is the shortfall.
//! - **Defragment**: fragmentation at least `fragmentation_percentage`, and a full defragment
//!   would grow the largest free block by at least `min_savings_bytes` (worked out from the
//!   allocations' layout, persistent and leased ones staying where they are). The saving is
//!   that growth.
//! - **ClearCache**: pressure at least Moderate and non-persistent `Cache` allocations of at
//!   least `min_savings_bytes`. The saving is their bytes.
//! - **ReduceToTarget**: pressure at least High and usage above `reduce_target_percentage`
//!   with non-persistent `Cache`/`Temporary` allocations. The saving is what reaching the target
//!   frees, capped by their bytes.
//! - **OffloadIdleModels** / **UnloadIdleModels**: pressure at least Moderate and models resident
//!   on the device, not leased, unused for `idle_model_seconds`. Offload when `cpu` has room
//!   for them all (GPUs and `shm`), else unload. The saving is their bytes.
//! - **ReviewPersistent**: persistent allocations made more than `review_persistent_seconds`
//!   ago, the 10 largest per device; the request frees one. memcoord cannot see reads and
//!   writes of the bytes (a transfer keeps the allocation's creation time), so this is for a
//!   person to review.

use super::allocations::DeviceTelemetry;
use crate::domain::{
    Advice, MemoryAllocationType, PressureLevel, RecommendationKind, SuggestedRequest,
};
use crate::units::format_bytes;
use std::time::SystemTime;

/// Thresholds of the rules.
#[derive(Debug, Clone, PartialEq)]
pub struct Rules {
    /// Fragmentation (%) from which Defragment is advised.
    pub fragmentation_percentage: f64,
    /// Smallest saving worth advising (RaiseBudget and ReviewPersistent excepted).
    pub min_savings_bytes: u64,
    /// Usage (%) that ReduceToTarget aims for.
    pub reduce_target_percentage: f64,
    /// Unused for this long, an unleased model is idle.
    pub idle_model_seconds: f64,
    /// Untouched for this long, a persistent allocation is worth a review.
    pub review_persistent_seconds: f64,
}

impl Default for Rules {
    fn default() -> Self {
        Rules {
            fragmentation_percentage: 20.0,
            min_savings_bytes: 1 << 20,
            reduce_target_percentage: 75.0,
            idle_model_seconds: 60.0,
            review_persistent_seconds: 3600.0,
        }
    }
}

/// A model the rules may advise offloading or unloading.
#[derive(Debug, Clone, PartialEq)]
pub struct IdleModel {
    /// Its name.
    pub name: String,
    /// Its bytes on the device.
    pub bytes: u64,
}

/// A persistent allocation the rules may advise reviewing.
#[derive(Debug, Clone, PartialEq)]
pub struct OldPersistent {
    /// Its id.
    pub allocation_id: String,
    /// Its bytes.
    pub bytes: u64,
    /// When it was made.
    pub touched_at: SystemTime,
}

/// What the rules look at for one device.
#[derive(Debug, Clone)]
pub struct Situation {
    /// The device's figures.
    pub telemetry: DeviceTelemetry,
    /// The largest free block a full defragment would leave (when worked out).
    pub defragmented_largest_free: Option<u64>,
    /// Unleased models resident here and idle for `idle_model_seconds`.
    pub idle_models: Vec<IdleModel>,
    /// What `cpu` could take now (None when this is `cpu`, or there is none).
    pub cpu_available: Option<u64>,
    /// Persistent allocations untouched for `review_persistent_seconds`, largest first.
    pub old_persistent: Vec<OldPersistent>,
    /// Now.
    pub now: SystemTime,
}

fn urgency(level: PressureLevel) -> u32 {
    match level {
        PressureLevel::Critical => 1,
        PressureLevel::High => 2,
        PressureLevel::Moderate => 3,
        _ => 4,
    }
}

fn at_least(level: PressureLevel, floor: PressureLevel) -> bool {
    level.value() >= floor.value()
}

/// The recommendations for one device, most urgent first.
pub fn advise(s: &Situation, rules: &Rules) -> Vec<Advice> {
    let t = &s.telemetry;
    let dev = t.device_id.as_str();
    let level = t.pressure.level;
    let mut out = Vec::new();
    let rec = |kind: RecommendationKind,
               priority: u32,
               description: String,
               savings: u64,
               request: Option<SuggestedRequest>| Advice {
        id: format!("{dev}/{}", kind.name()),
        device_id: dev.to_string(),
        kind,
        priority,
        description,
        estimated_savings_bytes: savings,
        request,
    };

    let failed_for_budget = t.max_failed_demand_60s.filter(|&d| d > t.budget_bytes);
    if let Some(demand) = failed_for_budget {
        let short = demand - t.budget_bytes;
        let device_note = if demand > t.capacity_bytes {
            format!(
                "; the device itself has only {}, so part of the work must move elsewhere",
                format_bytes(t.capacity_bytes)
            )
        } else {
            String::new()
        };
        out.push(rec(
            RecommendationKind::RaiseBudget,
            urgency(level).min(2),
            format!(
                "{dev}: a request in the last minute needed {} of budget, but the budget is {}; \
                 raise it by at least {} (--budget {dev}=SIZE){device_note}",
                format_bytes(demand),
                format_bytes(t.budget_bytes),
                format_bytes(short)
            ),
            short,
            None,
        ));
    }

    let frag = &t.fragmentation;
    if let Some(after) = s.defragmented_largest_free {
        let gain = after.saturating_sub(frag.largest_free_block_bytes);
        if frag.fragmentation_percentage >= rules.fragmentation_percentage
            && gain >= rules.min_savings_bytes
        {
            // Refusals that the budget could have met were the fragmentation's doing.
            let failed_for_pieces =
                t.pressure.failed_allocations_60s > 0 && failed_for_budget.is_none();
            out.push(rec(
                RecommendationKind::Defragment,
                if failed_for_pieces { 1 } else { urgency(level) },
                format!(
                    "{dev}: {:.0}% of the free memory is in pieces (largest free block {} of {} \
                     free); defragmenting grows the largest block to {}",
                    frag.fragmentation_percentage,
                    format_bytes(frag.largest_free_block_bytes),
                    format_bytes(frag.free_bytes),
                    format_bytes(after)
                ),
                gain,
                Some(SuggestedRequest::Defragment {
                    device_id: dev.to_string(),
                }),
            ));
        }
    }

    let reclaimable_of = |k: MemoryAllocationType| t.reclaimable_client_bytes[k.value() as usize];
    let cache = reclaimable_of(MemoryAllocationType::Cache);
    if at_least(level, PressureLevel::Moderate) && cache >= rules.min_savings_bytes {
        out.push(rec(
            RecommendationKind::ClearCache,
            urgency(level),
            format!(
                "{dev}: pressure is {level} and {} is held in Cache allocations; clearing them \
                 (and the cached pages) frees it",
                format_bytes(cache)
            ),
            cache,
            Some(SuggestedRequest::ClearCache {
                device_id: dev.to_string(),
            }),
        ));
    }

    let reclaimable = cache + reclaimable_of(MemoryAllocationType::Temporary);
    let charged = t.allocated_bytes + t.reservation_bytes;
    let target_bytes = (t.budget_bytes as f64 * rules.reduce_target_percentage / 100.0) as u64;
    let needed = charged.saturating_sub(target_bytes);
    let reduce = needed.min(reclaimable);
    if at_least(level, PressureLevel::High)
        && reduce >= rules.min_savings_bytes.min(needed)
        && reduce > 0
    {
        out.push(rec(
            RecommendationKind::ReduceToTarget,
            urgency(level),
            format!(
                "{dev}: usage is {:.1}% with {} in Cache and Temporary allocations; freeing the \
                 oldest down to {:.0}% frees {}",
                t.pressure.usage_percentage,
                format_bytes(reclaimable),
                rules.reduce_target_percentage,
                format_bytes(reduce)
            ),
            reduce,
            Some(SuggestedRequest::ReduceToTarget {
                device_id: dev.to_string(),
                target_usage_percentage: rules.reduce_target_percentage,
            }),
        ));
    }

    let idle_bytes: u64 = s.idle_models.iter().map(|m| m.bytes).sum();
    if at_least(level, PressureLevel::Moderate)
        && !s.idle_models.is_empty()
        && idle_bytes >= rules.min_savings_bytes.min(idle_bytes)
    {
        let names: Vec<&str> = s.idle_models.iter().map(|m| m.name.as_str()).collect();
        let offload = s.cpu_available.is_some_and(|room| room >= idle_bytes);
        let (device_id, idle_seconds) = (dev.to_string(), rules.idle_model_seconds);
        let (kind, request, verb) = if offload {
            (
                RecommendationKind::OffloadIdleModels,
                SuggestedRequest::OffloadIdleModels {
                    device_id,
                    idle_seconds,
                },
                "offloading them to cpu",
            )
        } else {
            (
                RecommendationKind::UnloadIdleModels,
                SuggestedRequest::UnloadIdleModels {
                    device_id,
                    idle_seconds,
                },
                "unloading them",
            )
        };
        out.push(rec(
            kind,
            urgency(level),
            format!(
                "{dev}: pressure is {level}; {} ({}) {} {}, with no lease and unused for at least \
                 {} s; {verb} frees it",
                if names.len() == 1 { "model" } else { "models" },
                names.join(", "),
                if names.len() == 1 { "holds" } else { "hold" },
                format_bytes(idle_bytes),
                rules.idle_model_seconds
            ),
            idle_bytes,
            Some(request),
        ));
    }

    for p in &s.old_persistent {
        let age = s
            .now
            .duration_since(p.touched_at)
            .map_or(0.0, |d| d.as_secs_f64());
        let mut r = rec(
            RecommendationKind::ReviewPersistent,
            (urgency(level) + 1).min(5),
            format!(
                "{dev}: persistent allocation {} ({}) was made {:.0} s ago; memcoord cannot see \
                 whether it is still read or written: if nothing uses it, deallocating it frees \
                 its bytes",
                p.allocation_id,
                format_bytes(p.bytes),
                age
            ),
            p.bytes,
            Some(SuggestedRequest::Deallocate {
                allocation_id: p.allocation_id.clone(),
                device_id: dev.to_string(),
            }),
        );
        r.id = format!("{dev}/ReviewPersistent/{}", p.allocation_id);
        out.push(r);
    }
    out
}

/// Orders recommendations: most urgent first, then the largest saving.
pub fn rank(recs: &mut [Advice]) {
    recs.sort_by(|a, b| {
        a.priority
            .cmp(&b.priority)
            .then(b.estimated_savings_bytes.cmp(&a.estimated_savings_bytes))
            .then(a.id.cmp(&b.id))
    });
}
