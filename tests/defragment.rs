//! memory.defragment and memory.optimize through the stdio transport (in process); an `shm`
//! defragment is verified byte for byte through the allocations' handles.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use common::inproc::InProcessWorker;
use common::{
    Allocate, Deallocate, Defragment, GetAllocations, GetStatus, Optimize, Requests, map, pattern,
};
use memcoord::protocol::{MemoryAllocation, MemoryOptimizationType};
use serde_json::json;

const MIB: u64 = 1 << 20;

fn handle(a: &MemoryAllocation) -> (String, usize, usize) {
    let h = a.handle.as_ref().unwrap();
    (h.path.clone(), h.offset as usize, a.size_bytes as usize)
}

#[test]
fn shm_defragment_keeps_every_byte_as_another_process_sees_it() {
    let mut w = InProcessWorker::small();
    let mut live = Vec::new();
    for i in 0..60u64 {
        let size = 100_000 + i * 3_001;
        let persistent = i == 31;
        let d = w
            .send::<Allocate>(
                json!({"device_id": "shm", "size_bytes": size, "persistent": persistent}),
            )
            .unwrap();
        live.push((i, d.allocation));
    }
    let (path, _, _) = handle(&live[0].1);
    {
        let mut m = map(&path);
        for (i, a) in &live {
            let (_, off, len) = handle(a);
            m[off..off + len].copy_from_slice(&pattern(*i, len));
        }
    }
    // Free every other allocation: holes everywhere.
    let mut kept = Vec::new();
    for (i, a) in live {
        if i % 2 == 0 {
            w.send::<Deallocate>(json!({"allocation_id": a.allocation_id}))
                .unwrap();
        } else {
            kept.push((i, a));
        }
    }
    let frag = w
        .send::<GetStatus>(json!({"device_id": "shm", "include_fragmentation": true}))
        .unwrap();
    let before = frag.fragmentation.unwrap().fragmentation_percentage;
    let usage_before = w.stats("shm");

    let r = w.send::<Defragment>(json!({"device_id": "shm"})).unwrap();
    assert_eq!(r.device_id, "shm");
    assert!(r.moved_count > 0, "{r:?}");
    assert!(r.moved_bytes > 0);
    assert_eq!(r.skipped_count, 1, "the persistent allocation is pinned");
    assert!((r.fragmentation_before - before).abs() < 1e-9);
    assert!(r.fragmentation_after <= before);
    assert!(r.duration_ms >= 0.0);
    // (released_bytes: an unsigned integer, or the answer would not read.)

    // Ids unchanged, handles re-read, every byte intact.
    let now = w
        .send::<GetAllocations>(json!({"device_id": "shm"}))
        .unwrap()
        .allocations;
    assert_eq!(now.len(), kept.len());
    let m = map(&path);
    let mut moved = 0;
    for ((i, old), new) in kept.iter().zip(&now) {
        assert_eq!(old.allocation_id, new.allocation_id);
        let (_, old_off, _) = handle(old);
        let (p, off, len) = handle(new);
        assert_eq!(p, path);
        if off != old_off {
            moved += 1;
        }
        if *i == 31 {
            assert_eq!(off, old_off, "persistent allocations never move");
        }
        assert!(
            m[off..off + len] == pattern(*i, len)[..],
            "allocation {i} corrupted"
        );
    }
    assert_eq!(moved as u64, r.moved_count);
    let usage_after = w.stats("shm");
    assert_eq!(usage_after.allocated_bytes, usage_before.allocated_bytes);
    assert!(usage_after.reserved_bytes <= usage_before.reserved_bytes);
}

#[test]
fn optimize_clear_cache_reduce_to_target_and_background() {
    let mut w = InProcessWorker::small();
    let mut ids = Vec::new();
    for kind in ["Cache", "Cache", "Temporary", "General", "Temporary"] {
        let d = w
            .send::<Allocate>(
                json!({"device_id": "cpu", "size_bytes": 8 * MIB, "allocation_type": kind}),
            )
            .unwrap();
        ids.push(d.allocation.allocation_id);
    }
    let pinned = w
        .send::<Allocate>(
            json!({"device_id": "cpu", "size_bytes": 8 * MIB, "allocation_type": "Cache", "persistent": true}),
        )
        .unwrap()
        .allocation
        .allocation_id;
    // 48 of 64 MiB = 75%. Down to 40%: Cache first (oldest first), then Temporary; the first
    // Temporary is preserved.
    let r = w
        .send::<Optimize>(
            json!({"device_id": "cpu", "optimization_type": "ReduceToTarget", "target_usage_percentage": 40.0,
                   "preserve_allocations": [ids[2]]}),
        )
        .unwrap();
    assert_eq!(r.optimization_type, MemoryOptimizationType::ReduceToTarget);
    assert_eq!(r.usage_before, 75.0);
    assert_eq!(r.freed_bytes, 24 * MIB, "{r:?}");
    assert_eq!(r.usage_after, 37.5);
    let left: Vec<String> = w
        .send::<GetAllocations>(json!({"device_id": "cpu"}))
        .unwrap()
        .allocations
        .into_iter()
        .map(|a| a.allocation_id)
        .collect();
    assert_eq!(left, vec![ids[2].clone(), ids[3].clone(), pinned.clone()]);

    // Without force, General and persistent ones stay even if the target is not met.
    let r = w
        .send::<Optimize>(
            json!({"device_id": "cpu", "optimization_type": 3, "target_usage_percentage": 0}),
        )
        .unwrap();
    assert_eq!(r.freed_bytes, 8 * MIB, "only the Temporary: {r:?}");
    let r = w
        .send::<Optimize>(
            json!({"device_id": "cpu", "optimization_type": "reducetotarget", "target_usage_percentage": 0, "force": true}),
        )
        .unwrap();
    assert_eq!(
        r.freed_bytes,
        16 * MIB,
        "General and the persistent Cache: {r:?}"
    );
    assert_eq!(w.stats("cpu").allocated_bytes, 0);

    // ClearCache gives back cached pages.
    for _ in 0..8 {
        let id = w.allocate("cpu", 4096);
        w.send::<Deallocate>(json!({"allocation_id": id})).unwrap();
    }
    let r = w
        .send::<Optimize>(json!({"device_id": "cpu", "optimization_type": "ClearCache"}))
        .unwrap();
    assert!(r.actions[0].starts_with("ClearCache"));
    assert_eq!(w.stats("cpu").reserved_bytes, 0);

    // Full, in the background: answered at once, done soon after.
    w.allocate("cpu", MIB);
    let r = w
        .send::<Optimize>(
            json!({"device_id": "cpu", "optimization_type": "Full", "wait_for_completion": false}),
        )
        .unwrap();
    assert_eq!(r.actions, ["scheduled"]);
    let r = w
        .send::<Optimize>(json!({"device_id": "cpu", "optimization_type": 4}))
        .unwrap();
    let actions = &r.actions;
    assert!(
        actions.iter().any(|a| a.starts_with("EvictIdleModels")),
        "{actions:?}"
    );
    assert!(
        actions.iter().any(|a| a.starts_with("Defragment")),
        "{actions:?}"
    );
    assert!(
        actions.iter().any(|a| a.starts_with("ClearCache")),
        "{actions:?}"
    );
}
