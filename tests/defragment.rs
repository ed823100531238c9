//! memory.defragment and memory.optimize through the stdio transport (in process); an `shm`
//! defragment is verified byte for byte through the allocations' handles.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use common::inproc::InProcessWorker;
use common::{Requests, map, pattern};
use serde_json::{Value, json};

const MIB: u64 = 1 << 20;

fn handle(a: &Value) -> (String, usize, usize) {
    (
        a["handle"]["path"].as_str().unwrap().to_string(),
        a["handle"]["offset"].as_u64().unwrap() as usize,
        a["size_bytes"].as_u64().unwrap() as usize,
    )
}

#[test]
fn shm_defragment_keeps_every_byte_as_another_process_sees_it() {
    let mut w = InProcessWorker::small();
    let mut live = Vec::new();
    for i in 0..60u64 {
        let size = 100_000 + i * 3_001;
        let persistent = i == 31;
        let d = w.ok(
            "memory.allocate",
            json!({"device_id": "shm", "size_bytes": size, "persistent": persistent}),
        );
        live.push((i, d["allocation"].clone()));
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
            w.ok(
                "memory.deallocate",
                json!({"allocation_id": a["allocation_id"]}),
            );
        } else {
            kept.push((i, a));
        }
    }
    let frag = w.ok(
        "memory.get_status",
        json!({"device_id": "shm", "include_fragmentation": true}),
    );
    let before = frag["fragmentation"]["fragmentation_percentage"]
        .as_f64()
        .unwrap();
    let usage_before = w.usage("shm");

    let r = w.ok("memory.defragment", json!({"device_id": "shm"}));
    assert_eq!(r["device_id"], "shm");
    assert!(r["moved_count"].as_u64().unwrap() > 0, "{r}");
    assert!(r["moved_bytes"].as_u64().unwrap() > 0);
    assert_eq!(r["skipped_count"], 1, "the persistent allocation is pinned");
    assert!((r["fragmentation_before"].as_f64().unwrap() - before).abs() < 1e-9);
    assert!(r["fragmentation_after"].as_f64().unwrap() <= before);
    assert!(r["duration_ms"].as_f64().unwrap() >= 0.0);
    assert!(r["released_bytes"].is_u64());

    // Ids unchanged, handles re-read, every byte intact.
    let list = w.ok("memory.get_allocations", json!({"device_id": "shm"}));
    let now: Vec<Value> = list["allocations"].as_array().unwrap().clone();
    assert_eq!(now.len(), kept.len());
    let m = map(&path);
    let mut moved = 0;
    for ((i, old), new) in kept.iter().zip(&now) {
        assert_eq!(old["allocation_id"], new["allocation_id"]);
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
    assert_eq!(moved as u64, r["moved_count"].as_u64().unwrap());
    let usage_after = w.usage("shm");
    assert_eq!(
        usage_after["allocated_bytes"],
        usage_before["allocated_bytes"]
    );
    assert!(usage_after["reserved_bytes"].as_u64() <= usage_before["reserved_bytes"].as_u64());
}

#[test]
fn optimize_clear_cache_reduce_to_target_and_background() {
    let mut w = InProcessWorker::small();
    let mut ids = Vec::new();
    for kind in ["Cache", "Cache", "Temporary", "General", "Temporary"] {
        let d = w.ok(
            "memory.allocate",
            json!({"device_id": "cpu", "size_bytes": 8 * MIB, "allocation_type": kind}),
        );
        ids.push(
            d["allocation"]["allocation_id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    let pinned = w.ok(
        "memory.allocate",
        json!({"device_id": "cpu", "size_bytes": 8 * MIB, "allocation_type": "Cache", "persistent": true}),
    );
    let pinned = pinned["allocation"]["allocation_id"]
        .as_str()
        .unwrap()
        .to_string();
    // 48 of 64 MiB = 75%. Down to 40%: Cache first (oldest first), then Temporary; the first
    // Temporary is preserved.
    let r = w.ok(
        "memory.optimize",
        json!({"device_id": "cpu", "optimization_type": "ReduceToTarget", "target_usage_percentage": 40.0,
               "preserve_allocations": [ids[2]]}),
    );
    assert_eq!(r["optimization_type"], "ReduceToTarget");
    assert_eq!(r["usage_before"], 75.0);
    assert_eq!(r["freed_bytes"], 24 * MIB, "{r}");
    assert_eq!(r["usage_after"], 37.5);
    let left: Vec<String> =
        w.ok("memory.get_allocations", json!({"device_id": "cpu"}))["allocations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["allocation_id"].as_str().unwrap().to_string())
            .collect();
    assert_eq!(left, vec![ids[2].clone(), ids[3].clone(), pinned.clone()]);

    // Without force, General and persistent ones stay even if the target is not met.
    let r = w.ok(
        "memory.optimize",
        json!({"device_id": "cpu", "optimization_type": 3, "target_usage_percentage": 0}),
    );
    assert_eq!(r["freed_bytes"], 8 * MIB, "only the Temporary: {r}");
    let r = w.ok(
        "memory.optimize",
        json!({"device_id": "cpu", "optimization_type": "reducetotarget", "target_usage_percentage": 0, "force": true}),
    );
    assert_eq!(
        r["freed_bytes"],
        16 * MIB,
        "General and the persistent Cache: {r}"
    );
    assert_eq!(w.usage("cpu")["allocated_bytes"], 0);

    // ClearCache gives back cached pages.
    for _ in 0..8 {
        let id = w.allocate("cpu", 4096);
        w.ok("memory.deallocate", json!({"allocation_id": id}));
    }
    let r = w.ok(
        "memory.optimize",
        json!({"device_id": "cpu", "optimization_type": "ClearCache"}),
    );
    assert!(r["actions"][0].as_str().unwrap().starts_with("ClearCache"));
    assert_eq!(w.usage("cpu")["reserved_bytes"], 0);

    // Full, in the background: answered at once, done soon after.
    w.allocate("cpu", MIB);
    let r = w.ok(
        "memory.optimize",
        json!({"device_id": "cpu", "optimization_type": "Full", "wait_for_completion": false}),
    );
    assert_eq!(r["actions"], json!(["scheduled"]));
    let r = w.ok(
        "memory.optimize",
        json!({"device_id": "cpu", "optimization_type": 4}),
    );
    let actions: Vec<&str> = r["actions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
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
