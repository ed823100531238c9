//! memory.optimization_recs through the stdio transport (in process, on a clock the test
//! moves instead of sleeping), one test per rule: produce the situation, take the
//! recommendation, send its `request` as is, and check that the promised saving happened.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use common::inproc::InProcessWorker;
use common::{
    Allocate, Deallocate, ErrorCode, GetAllocations, GetStatus, ModelAcquire, ModelLoad,
    ModelRelease, OptimizationRecs, Requests, typed, write_model,
};
use memcoord::api::{Action, Response};
use memcoord::managers::advisor::Rules;
use memcoord::managers::clock::ManualClock;
use memcoord::protocol::{Recommendation, RecommendationKind};
use memcoord::service::MemoryService;
use serde_json::json;
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

/// The recommendations for `device`, each written with every field (`request` null where
/// there is none), read typed.
fn recs(w: &mut Worker, device: &str) -> Vec<Recommendation> {
    let v = w.request("memory.optimization_recs", json!({"device_id": device}));
    for rec in v["data"]["recommendations"].as_array().unwrap() {
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
    }
    typed::<OptimizationRecs>(v).unwrap().recommendations
}

fn find(recs: &[Recommendation], kind: RecommendationKind) -> Option<&Recommendation> {
    recs.iter().find(|r| r.kind == kind)
}

/// Checks a recommendation and sends its request as is; returns the typed answer.
fn apply(w: &mut Worker, rec: &Recommendation) -> Response {
    assert!((1..=5).contains(&rec.priority), "{rec:?}");
    assert!(!rec.description.is_empty());
    let req = rec.request.as_ref().unwrap();
    let action = Action::from_name(&req.action).unwrap();
    let data = w.ok(&req.action, req.data.clone());
    Response::parse(action, &data.to_string()).unwrap()
}

fn savings(rec: &Recommendation) -> u64 {
    rec.estimated_savings_bytes
}

fn allocate(w: &mut Worker, device: &str, size: u64, kind: &str, persistent: bool) -> String {
    w.send::<Allocate>(
        json!({"device_id": device, "size_bytes": size, "allocation_type": kind,
           "persistent": persistent}),
    )
    .unwrap()
    .allocation
    .allocation_id
}

fn allocated(w: &mut Worker, device: &str) -> u64 {
    w.stats(device).allocated_bytes
}

fn largest_free(w: &mut Worker, device: &str) -> u64 {
    let s = w
        .send::<GetStatus>(
            json!({"device_id": device, "include_allocations": false, "include_fragmentation": true}),
        )
        .unwrap();
    s.fragmentation.unwrap().largest_free_block_bytes
}

#[test]
fn nothing_to_advise_on_a_quiet_worker() {
    let mut w = small();
    allocate(&mut w, "cpu", MIB, "General", false);
    let all = w.send::<OptimizationRecs>(json!({})).unwrap();
    assert!(all.recommendations.is_empty(), "{all:?}");
    let e = w
        .send::<OptimizationRecs>(json!({"device_id": "nope"}))
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidDevice);
}

#[test]
fn defragment_grows_the_largest_free_block_as_promised() {
    let mut w = on_clock("40MiB", |s| s).0;
    let ids: Vec<String> = (0..32)
        .map(|_| allocate(&mut w, "cpu", MIB, "General", false))
        .collect();
    for id in ids.iter().step_by(2) {
        w.send::<Deallocate>(json!({"allocation_id": id})).unwrap();
    }
    let r = recs(&mut w, "cpu");
    let rec = find(&r, RecommendationKind::Defragment).unwrap_or_else(|| panic!("{r:?}"));
    assert_eq!(rec.id, "cpu/Defragment");
    assert_eq!(rec.request.as_ref().unwrap().action, "memory.defragment");
    let before = largest_free(&mut w, "cpu");
    let promised = savings(rec);
    // Nothing is pinned: every free byte (24 MiB of budget) ends up in one block.
    assert_eq!(promised, 24 * MIB - before, "largest free block {before}");
    let Response::Defragment(d) = apply(&mut w, rec) else {
        panic!("not a defragment answer")
    };
    assert_eq!(d.moved_count, 16);
    let after = largest_free(&mut w, "cpu");
    assert!(
        after - before >= promised,
        "{before} -> {after}, promised {promised}"
    );
    assert!(
        find(&recs(&mut w, "cpu"), RecommendationKind::Defragment).is_none(),
        "done"
    );
}

#[test]
fn defragment_promise_holds_around_a_persistent_allocation() {
    let mut w = on_clock("40MiB", |s| s).0;
    let ids: Vec<String> = (0..32)
        .map(|i| allocate(&mut w, "cpu", MIB, "General", i == 15))
        .collect();
    for id in ids.iter().step_by(2) {
        w.send::<Deallocate>(json!({"allocation_id": id})).unwrap();
    }
    let r = recs(&mut w, "cpu");
    let rec = find(&r, RecommendationKind::Defragment).unwrap_or_else(|| panic!("{r:?}"));
    let before = largest_free(&mut w, "cpu");
    let Response::Defragment(d) = apply(&mut w, rec) else {
        panic!("not a defragment answer")
    };
    assert_eq!(d.skipped_count, 1, "the persistent one stays: {d:?}");
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
    let rec = find(&r, RecommendationKind::ClearCache).unwrap_or_else(|| panic!("{r:?}"));
    assert_eq!(savings(rec), 10 * MIB, "the persistent one is not counted");
    assert!(
        find(&r, RecommendationKind::ReduceToTarget).is_none(),
        "only from High"
    );
    let before = allocated(&mut w, "cpu");
    let Response::Optimize(d) = apply(&mut w, rec) else {
        panic!("not an optimize answer")
    };
    assert!(d.freed_bytes >= savings(rec), "{d:?}");
    assert_eq!(before - allocated(&mut w, "cpu"), 10 * MIB);
    // The persistent Cache allocation is still there.
    let a = w
        .send::<GetAllocations>(json!({"device_id": "cpu", "allocation_type": "Cache"}))
        .unwrap();
    assert_eq!(a.total_count, 1);
    assert_eq!(a.allocations[0].allocation_id, kept);
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
    let rec = find(&r, RecommendationKind::ReduceToTarget).unwrap_or_else(|| panic!("{r:?}"));
    assert_eq!(savings(rec), 8 * MIB);
    assert_eq!(rec.priority, 2, "High");
    let before = allocated(&mut w, "cpu");
    let Response::Optimize(d) = apply(&mut w, rec) else {
        panic!("not an optimize answer")
    };
    assert!(d.freed_bytes >= savings(rec), "{d:?}");
    assert!(before - allocated(&mut w, "cpu") >= savings(rec));
    assert!(allocated(&mut w, "cpu") <= 48 * MIB);
}

#[test]
fn raise_budget_when_a_refused_request_needed_more_than_the_budget() {
    let mut w = on_clock("8MiB", |s| s).0;
    allocate(&mut w, "cpu", 6 * MIB, "General", false);
    let e = w
        .send::<Allocate>(json!({"device_id": "cpu", "size_bytes": 4 * MIB, "timeout_seconds": 0}))
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::OutOfMemory);
    let r = recs(&mut w, "cpu");
    let rec = find(&r, RecommendationKind::RaiseBudget).unwrap_or_else(|| panic!("{r:?}"));
    assert_eq!(savings(rec), 2 * MIB, "10 MiB needed, 8 MiB budget");
    assert!(rec.request.is_none(), "no request raises a budget");
    assert!(rec.description.contains("--budget"));
    assert_eq!(
        r[0].kind,
        RecommendationKind::RaiseBudget,
        "the most urgent: {r:?}"
    );
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
        find(&recs(&mut w, "cpu"), RecommendationKind::ReviewPersistent).is_none(),
        "too young"
    );
    clock.advance(Duration::from_millis(1300));
    let r = recs(&mut w, "cpu");
    let rec = find(&r, RecommendationKind::ReviewPersistent).unwrap_or_else(|| panic!("{r:?}"));
    assert_eq!(rec.id, format!("cpu/ReviewPersistent/{id}"));
    assert_eq!(savings(rec), 3 * MIB);
    let Response::Deallocate(d) = apply(&mut w, rec) else {
        panic!("not a deallocate answer")
    };
    assert_eq!(d.allocation_id, id);
    assert_eq!(d.freed_bytes, 3 * MIB);
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
    w.send::<ModelLoad>(
        json!({"model_name": "unet", "path": "m.safetensors", "device_id": device}),
    )
    .unwrap();
    allocate(w, device, 45 * MIB, "General", false);
}

#[test]
fn offload_idle_models_moves_them_to_cpu() {
    let root = Root::new("offload");
    let (mut w, clock) = model_worker(&root, "64MiB");
    idle_model_under_pressure(&mut w, "shm");
    assert!(
        find(&recs(&mut w, "shm"), RecommendationKind::OffloadIdleModels).is_none(),
        "used less than a second ago"
    );
    // A leased model is never advised away.
    let lease = w
        .send::<ModelAcquire>(json!({"model_name": "unet"}))
        .unwrap();
    clock.advance(Duration::from_millis(1300));
    assert!(
        find(&recs(&mut w, "shm"), RecommendationKind::OffloadIdleModels).is_none(),
        "leased"
    );
    w.send::<ModelRelease>(json!({"lease_id": lease.lease_id}))
        .unwrap();
    clock.advance(Duration::from_millis(1300));
    let r = recs(&mut w, "shm");
    let rec = find(&r, RecommendationKind::OffloadIdleModels).unwrap_or_else(|| panic!("{r:?}"));
    assert_eq!(savings(rec), 8 * MIB);
    // (the request's data is the wire's JSON, as the host is to send it)
    assert_eq!(
        rec.request.as_ref().unwrap().data.get("strategy"),
        Some(&json!("OffloadIdle"))
    );
    let before = allocated(&mut w, "shm");
    let Response::ModelOptimize(d) = apply(&mut w, rec) else {
        panic!("not a model_optimize answer")
    };
    assert_eq!(d.offloaded, ["unet"], "{d:?}");
    assert!(d.freed_bytes >= savings(rec));
    assert_eq!(before - allocated(&mut w, "shm"), 8 * MIB);
}

#[test]
fn unload_idle_models_when_cpu_has_no_room() {
    let root = Root::new("unload");
    let (mut w, clock) = model_worker(&root, "4MiB");
    idle_model_under_pressure(&mut w, "shm");
    clock.advance(Duration::from_millis(1300));
    let r = recs(&mut w, "shm");
    let rec = find(&r, RecommendationKind::UnloadIdleModels).unwrap_or_else(|| panic!("{r:?}"));
    assert!(find(&r, RecommendationKind::OffloadIdleModels).is_none());
    assert_eq!(savings(rec), 8 * MIB);
    let before = allocated(&mut w, "shm");
    let Response::ModelOptimize(d) = apply(&mut w, rec) else {
        panic!("not a model_optimize answer")
    };
    assert_eq!(d.unloaded, ["unet"], "{d:?}");
    assert_eq!(before - allocated(&mut w, "shm"), 8 * MIB);
}
