//! memory.optimization_recs through the stdio transport (in process, on a clock the test
//! moves instead of sleeping), one test per rule: produce the situation, take the
//! recommendation, send its `request` as is, and check that the promised saving happened.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use common::inproc::InProcessWorker;
use common::{Requests, write_model};
use memcoord::managers::advisor::Rules;
use memcoord::managers::clock::ManualClock;
use memcoord::service::MemoryService;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

type Worker = InProcessWorker;

/// A worker with a `cpu` budget (shm 64 MiB) on a manual clock, set up by `configure`.
fn on_clock(
    cpu: &str,
    configure: impl FnOnce(MemoryService) -> MemoryService,
) -> (Worker, Arc<ManualClock>) {
    InProcessWorker::on_manual_clock(cpu, "64MiB", configure)
}

/// A worker with small budgets (cpu 64 MiB, shm 64 MiB).
fn small() -> Worker {
    on_clock("64MiB", |s| s).0
}

const MIB: u64 = 1 << 20;

fn recs(w: &mut Worker, device: &str) -> Vec<Value> {
    let d = w.ok("memory.optimization_recs", json!({"device_id": device}));
    d["recommendations"].as_array().unwrap().clone()
}

fn find<'a>(recs: &'a [Value], kind: &str) -> Option<&'a Value> {
    recs.iter().find(|r| r["kind"] == kind)
}

/// Checks a recommendation's shape and sends its request as is; returns the answer's data.
fn apply(w: &mut Worker, rec: &Value) -> Value {
    for field in [
        "id",
        "device_id",
        "kind",
        "priority",
        "description",
        "estimated_savings_bytes",
        "request",
    ] {
        assert!(rec.get(field).is_some(), "{field} missing: {rec}");
    }
    let priority = rec["priority"].as_u64().unwrap();
    assert!((1..=5).contains(&priority), "{rec}");
    assert!(!rec["description"].as_str().unwrap().is_empty());
    let req = &rec["request"];
    w.ok(req["action"].as_str().unwrap(), req["data"].clone())
}

fn savings(rec: &Value) -> u64 {
    rec["estimated_savings_bytes"].as_u64().unwrap()
}

fn allocate(w: &mut Worker, device: &str, size: u64, kind: &str, persistent: bool) -> String {
    let d = w.ok(
        "memory.allocate",
        json!({"device_id": device, "size_bytes": size, "allocation_type": kind,
               "persistent": persistent}),
    );
    d["allocation"]["allocation_id"]
        .as_str()
        .unwrap()
        .to_string()
}

fn allocated(w: &mut Worker, device: &str) -> u64 {
    w.usage(device)["allocated_bytes"].as_u64().unwrap()
}

fn largest_free(w: &mut Worker, device: &str) -> u64 {
    let s = w.ok(
        "memory.get_status",
        json!({"device_id": device, "include_allocations": false, "include_fragmentation": true}),
    );
    s["fragmentation"]["largest_free_block_bytes"]
        .as_u64()
        .unwrap()
}

#[test]
fn nothing_to_advise_on_a_quiet_worker() {
    let mut w = small();
    allocate(&mut w, "cpu", MIB, "General", false);
    let all = w.ok("memory.optimization_recs", json!({}));
    assert_eq!(all["recommendations"], json!([]), "{all}");
    let (code, _) = w.err("memory.optimization_recs", json!({"device_id": "nope"}));
    assert_eq!(code, "INVALID_DEVICE");
}

#[test]
fn defragment_grows_the_largest_free_block_as_promised() {
    let mut w = on_clock("40MiB", |s| s).0;
    let ids: Vec<String> = (0..32)
        .map(|_| allocate(&mut w, "cpu", MIB, "General", false))
        .collect();
    for id in ids.iter().step_by(2) {
        w.ok("memory.deallocate", json!({"allocation_id": id}));
    }
    let r = recs(&mut w, "cpu");
    let rec = find(&r, "Defragment").unwrap_or_else(|| panic!("{r:?}"));
    assert_eq!(rec["id"], "cpu/Defragment");
    assert_eq!(rec["request"]["action"], "memory.defragment");
    let before = largest_free(&mut w, "cpu");
    let promised = savings(rec);
    // Nothing is pinned: every free byte (24 MiB of budget) ends up in one block.
    assert_eq!(promised, 24 * MIB - before, "largest free block {before}");
    let d = apply(&mut w, rec);
    assert_eq!(d["moved_count"], 16);
    let after = largest_free(&mut w, "cpu");
    assert!(
        after - before >= promised,
        "{before} -> {after}, promised {promised}"
    );
    assert!(find(&recs(&mut w, "cpu"), "Defragment").is_none(), "done");
}

#[test]
fn defragment_promise_holds_around_a_persistent_allocation() {
    let mut w = on_clock("40MiB", |s| s).0;
    let ids: Vec<String> = (0..32)
        .map(|i| allocate(&mut w, "cpu", MIB, "General", i == 15))
        .collect();
    for id in ids.iter().step_by(2) {
        w.ok("memory.deallocate", json!({"allocation_id": id}));
    }
    let r = recs(&mut w, "cpu");
    let rec = find(&r, "Defragment").unwrap_or_else(|| panic!("{r:?}"));
    let before = largest_free(&mut w, "cpu");
    let d = apply(&mut w, rec);
    assert_eq!(d["skipped_count"], 1, "the persistent one stays: {d}");
    let after = largest_free(&mut w, "cpu");
    assert!(
        after - before >= savings(rec),
        "{before} -> {after}, promised {}",
        savings(rec)
    );
}

#[test]
fn clear_cache_frees_the_cache_allocations_it_counted() {
    let mut w = small();
    allocate(&mut w, "cpu", 40 * MIB, "General", false);
    for _ in 0..5 {
        allocate(&mut w, "cpu", 2 * MIB, "Cache", false);
    }
    let kept = allocate(&mut w, "cpu", 2 * MIB, "Cache", true);
    // 52 of 64 MiB: Moderate.
    let r = recs(&mut w, "cpu");
    let rec = find(&r, "ClearCache").unwrap_or_else(|| panic!("{r:?}"));
    assert_eq!(savings(rec), 10 * MIB, "the persistent one is not counted");
    assert!(find(&r, "ReduceToTarget").is_none(), "only from High");
    let before = allocated(&mut w, "cpu");
    let d = apply(&mut w, rec);
    assert!(d["freed_bytes"].as_u64().unwrap() >= savings(rec), "{d}");
    assert_eq!(before - allocated(&mut w, "cpu"), 10 * MIB);
    // The persistent Cache allocation is still there.
    let a = w.ok(
        "memory.get_allocations",
        json!({"device_id": "cpu", "allocation_type": "Cache"}),
    );
    assert_eq!(a["total_count"], 1);
    assert_eq!(a["allocations"][0]["allocation_id"], json!(kept));
}

#[test]
fn reduce_to_target_frees_what_reaching_the_target_takes() {
    let mut w = small();
    allocate(&mut w, "cpu", 44 * MIB, "General", false);
    for _ in 0..12 {
        allocate(&mut w, "cpu", MIB, "Temporary", false);
    }
    // 56 of 64 MiB = 87.5%: High. 75% is 48 MiB: 8 MiB to free, 12 MiB could be.
    let r = recs(&mut w, "cpu");
    let rec = find(&r, "ReduceToTarget").unwrap_or_else(|| panic!("{r:?}"));
    assert_eq!(savings(rec), 8 * MIB);
    assert_eq!(rec["priority"], 2, "High");
    let before = allocated(&mut w, "cpu");
    let d = apply(&mut w, rec);
    assert!(d["freed_bytes"].as_u64().unwrap() >= savings(rec), "{d}");
    assert!(before - allocated(&mut w, "cpu") >= savings(rec));
    assert!(w.usage("cpu")["allocated_bytes"].as_u64().unwrap() <= 48 * MIB);
}

#[test]
fn raise_budget_when_a_refused_request_needed_more_than_the_budget() {
    let mut w = on_clock("8MiB", |s| s).0;
    allocate(&mut w, "cpu", 6 * MIB, "General", false);
    let (code, _) = w.err(
        "memory.allocate",
        json!({"device_id": "cpu", "size_bytes": 4 * MIB, "timeout_seconds": 0}),
    );
    assert_eq!(code, "OUT_OF_MEMORY");
    let r = recs(&mut w, "cpu");
    let rec = find(&r, "RaiseBudget").unwrap_or_else(|| panic!("{r:?}"));
    assert_eq!(savings(rec), 2 * MIB, "10 MiB needed, 8 MiB budget");
    assert!(rec["request"].is_null(), "no request raises a budget");
    assert!(rec["description"].as_str().unwrap().contains("--budget"));
    assert_eq!(r[0]["kind"], "RaiseBudget", "the most urgent: {r:?}");
}

#[test]
fn review_persistent_after_the_threshold_and_deallocate_frees_it() {
    let (mut w, clock) = on_clock("64MiB", |s| {
        s.with_advice_rules(Rules {
            review_persistent_seconds: 1.0,
            ..Default::default()
        })
    });
    let id = allocate(&mut w, "cpu", 3 * MIB, "General", true);
    allocate(&mut w, "cpu", MIB, "General", false);
    assert!(
        find(&recs(&mut w, "cpu"), "ReviewPersistent").is_none(),
        "too young"
    );
    clock.advance(Duration::from_millis(1300));
    let r = recs(&mut w, "cpu");
    let rec = find(&r, "ReviewPersistent").unwrap_or_else(|| panic!("{r:?}"));
    assert_eq!(rec["id"], format!("cpu/ReviewPersistent/{id}"));
    assert_eq!(savings(rec), 3 * MIB);
    let d = apply(&mut w, rec);
    assert_eq!(d["allocation_id"], json!(id));
    assert_eq!(d["freed_bytes"], 3 * MIB);
}

struct Root(PathBuf);

impl Root {
    fn new(tag: &str) -> Root {
        let dir = std::env::temp_dir().join(format!("memcoord-recs-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        write_model(
            &dir.join("m.safetensors"),
            &[("a", MIB as usize), ("b", MIB as usize)],
        );
        Root(dir)
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn model_worker(root: &Root, cpu_budget: &str) -> (Worker, Arc<ManualClock>) {
    let dir = root.0.clone();
    on_clock(cpu_budget, move |s| {
        s.with_model_root(dir).with_advice_rules(Rules {
            idle_model_seconds: 1.0,
            ..Default::default()
        })
    })
}

/// Loads the 8 MiB model onto `device`, then fills the device to 53 of 64 MiB (Moderate).
fn idle_model_under_pressure(w: &mut Worker, device: &str) {
    w.ok(
        "memory.model_load",
        json!({"model_name": "unet", "path": "m.safetensors", "device_id": device}),
    );
    allocate(w, device, 45 * MIB, "General", false);
}

#[test]
fn offload_idle_models_moves_them_to_cpu() {
    let root = Root::new("offload");
    let (mut w, clock) = model_worker(&root, "64MiB");
    idle_model_under_pressure(&mut w, "shm");
    assert!(
        find(&recs(&mut w, "shm"), "OffloadIdleModels").is_none(),
        "used less than a second ago"
    );
    // A leased model is never advised away.
    let lease = w.ok("memory.model_acquire", json!({"model_name": "unet"}));
    clock.advance(Duration::from_millis(1300));
    assert!(
        find(&recs(&mut w, "shm"), "OffloadIdleModels").is_none(),
        "leased"
    );
    w.ok(
        "memory.model_release",
        json!({"lease_id": lease["lease_id"]}),
    );
    clock.advance(Duration::from_millis(1300));
    let r = recs(&mut w, "shm");
    let rec = find(&r, "OffloadIdleModels").unwrap_or_else(|| panic!("{r:?}"));
    assert_eq!(savings(rec), 8 * MIB);
    assert_eq!(rec["request"]["data"]["strategy"], "OffloadIdle");
    let before = allocated(&mut w, "shm");
    let d = apply(&mut w, rec);
    assert_eq!(d["offloaded"], json!(["unet"]), "{d}");
    assert!(d["freed_bytes"].as_u64().unwrap() >= savings(rec));
    assert_eq!(before - allocated(&mut w, "shm"), 8 * MIB);
}

#[test]
fn unload_idle_models_when_cpu_has_no_room() {
    let root = Root::new("unload");
    let (mut w, clock) = model_worker(&root, "4MiB");
    idle_model_under_pressure(&mut w, "shm");
    clock.advance(Duration::from_millis(1300));
    let r = recs(&mut w, "shm");
    let rec = find(&r, "UnloadIdleModels").unwrap_or_else(|| panic!("{r:?}"));
    assert!(find(&r, "OffloadIdleModels").is_none());
    assert_eq!(savings(rec), 8 * MIB);
    let before = allocated(&mut w, "shm");
    let d = apply(&mut w, rec);
    assert_eq!(d["unloaded"], json!(["unet"]), "{d}");
    assert_eq!(before - allocated(&mut w, "shm"), 8 * MIB);
}
