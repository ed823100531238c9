//! Allocation traces (the format of assets/traces/README.md) replayed through the engine: how fast it serves
//! them and how much it holds compared with what is live.
//!
//! It takes parsed operations ([`TraceOp`]); `protocol::trace` reads them from a file's lines.

use super::allocations::{AllocationEngine, AllocationSpec};
pub use crate::domain::TraceOp;
use rustc_hash::FxHashMap;
use serde::Serialize;
use std::time::{Instant, SystemTime};
use uuid::Uuid;

/// What a replay measured.
#[derive(Debug, Clone, Serialize)]
pub struct ReplayReport {
    /// Operations replayed.
    pub ops: u64,
    /// Operations per second (allocations and frees, defragmentation included).
    pub ops_per_second: f64,
    /// The most bytes live at once.
    pub peak_allocated_bytes: u64,
    /// The most bytes of pages held at once.
    pub peak_reserved_bytes: u64,
    /// `peak_reserved_bytes / peak_allocated_bytes`.
    pub reserved_over_allocated: f64,
    /// `fragmentation_percentage` when allocated bytes peaked.
    pub fragmentation_percentage_at_peak: f64,
    /// Defragmentations run.
    pub defragmentations: u64,
    /// Allocations that failed (out of memory).
    pub failed_allocations: u64,
}

/// Replays `ops` on `device`, scaling every size by `scale` (at least 1 byte), defragmenting
/// every `defragment_every` operations when given. Everything the trace left live is freed at
/// the end.
pub fn replay(
    engine: &mut AllocationEngine,
    device: usize,
    ops: &[TraceOp],
    scale: f64,
    defragment_every: Option<u64>,
) -> ReplayReport {
    let mut live: FxHashMap<u64, Uuid> = FxHashMap::default();
    let mut report = ReplayReport {
        ops: 0,
        ops_per_second: 0.0,
        peak_allocated_bytes: 0,
        peak_reserved_bytes: 0,
        reserved_over_allocated: 0.0,
        fragmentation_percentage_at_peak: 0.0,
        defragmentations: 0,
        failed_allocations: 0,
    };
    let mut spec = AllocationSpec::general(0);
    let now = SystemTime::now();
    let started = Instant::now();
    for (i, op) in ops.iter().enumerate() {
        match *op {
            TraceOp::Alloc { id, size } => {
                spec.size = ((size as f64 * scale).round() as u64).max(1);
                match engine.try_allocate(device, &spec, now) {
                    Ok(uuid) => {
                        live.insert(id, uuid);
                    }
                    Err(_) => report.failed_allocations += 1,
                }
                let usage = engine.usage_counters(device);
                if usage.0 > report.peak_allocated_bytes {
                    report.peak_allocated_bytes = usage.0;
                    report.fragmentation_percentage_at_peak =
                        engine.fragmentation(device).fragmentation_percentage;
                }
                report.peak_reserved_bytes = report.peak_reserved_bytes.max(usage.1);
            }
            TraceOp::Free { id } => {
                if let Some(uuid) = live.remove(&id) {
                    engine.free_id(&uuid);
                }
            }
        }
        report.ops += 1;
        if let Some(n) = defragment_every
            && n > 0
            && (i as u64 + 1).is_multiple_of(n)
        {
            while engine
                .defragment_pass(device, u64::MAX, &[])
                .compaction
                .deferred_count
                > 0
            {}
            report.defragmentations += 1;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    for (_, uuid) in live.drain() {
        engine.free_id(&uuid);
    }
    report.ops_per_second = report.ops as f64 / elapsed.max(1e-9);
    report.reserved_over_allocated = if report.peak_allocated_bytes == 0 {
        0.0
    } else {
        report.peak_reserved_bytes as f64 / report.peak_allocated_bytes as f64
    };
    report
}
