//! Protocol tests: every action of this version, every applicable error row, waiting, clear,
//! the line limit and large allocations through the stdio transport in process; shutdown (EOF,
//! SIGTERM) against the real binary.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report
#![allow(unsafe_code)] // test code: libc calls and memory maps of its own

mod common;

use common::inproc::{InProcessWorker, settings};
use common::{Requests, Worker};
use memcoord::service::MemoryService;
use memcoord::transport::stdio::WorkerOptions;
use serde_json::{Value, json};
use std::time::Duration;

const MIB: u64 = 1 << 20;

/// The parts of `get_usage` that a failed request must leave exactly as they were.
fn usage_state(u: &Value) -> Value {
    json!({
        "allocated_bytes": u["allocated_bytes"],
        "reserved_bytes": u["reserved_bytes"],
        "reservation_bytes": u["reservation_bytes"],
        "allocation_count": u["allocation_count"],
        "total_allocations": u["total_allocations"],
        "total_deallocations": u["total_deallocations"],
        "peak_allocated_bytes": u["peak_allocated_bytes"],
    })
}

#[test]
fn list_devices_reports_host_devices() {
    let mut w = InProcessWorker::small();
    let d = w.ok("memory.list_devices", Value::Null);
    let devices = d["devices"].as_array().unwrap();
    let by_id = |id: &str| {
        devices
            .iter()
            .find(|d| d["device_id"] == id)
            .unwrap()
            .clone()
    };
    let cpu = by_id("cpu");
    assert_eq!(cpu["type"], "RAM");
    assert_eq!(by_id("shm")["type"], "SharedMemory");
    for dev in devices {
        for field in [
            "device_id",
            "name",
            "type",
            "total_memory",
            "available_memory",
            "used_memory",
            "usage_percentage",
            "health",
            "fragmentation_percentage",
            "last_updated",
        ] {
            assert!(dev.get(field).is_some(), "{field} missing in {dev}");
        }
        assert!(dev["total_memory"].as_u64().unwrap() > 0);
        assert!(
            dev["available_memory"].as_u64().unwrap() <= 64 * MIB,
            "budget caps available"
        );
        assert_eq!(dev["health"], "Healthy");
        assert!(dev["last_updated"].as_str().unwrap().ends_with('Z'));
    }
    // `data` may be omitted, null or {} alike.
    w.ok("memory.list_devices", json!({}));
    w.send_raw(b"{\"request_id\":\"no-data\",\"action\":\"memory.list_devices\"}\n");
    let v = w.wait_for("no-data", Duration::from_secs(10));
    assert_eq!(v["success"], true);
}

#[test]
fn get_status_honours_its_include_flags() {
    let mut w = InProcessWorker::small();
    let id = w.allocate("cpu", 4096);
    let s = w.ok("memory.get_status", json!({"device_id": "cpu"}));
    assert_eq!(s["device_id"], "cpu");
    assert_eq!(s["memory_info"]["device_id"], "cpu");
    assert_eq!(s["allocations"][0]["allocation_id"], json!(id));
    assert_eq!(s["usage_stats"]["allocated_bytes"], 4096);
    assert!(s["fragmentation"].is_null());
    let score = s["health_score"].as_f64().unwrap();
    assert!((0.0..=100.0).contains(&score));

    let s = w.ok(
        "memory.get_status",
        json!({"device_id": "cpu", "include_allocations": false, "include_usage_stats": false, "include_fragmentation": true}),
    );
    assert_eq!(s["allocations"], json!([]));
    assert!(s["usage_stats"].is_null());
    let f = &s["fragmentation"];
    assert_eq!(f["device_id"], "cpu");
    assert_eq!(f["free_bytes"], s["memory_info"]["available_memory"]);
    assert!(f["largest_free_block_bytes"].as_u64().unwrap() <= f["free_bytes"].as_u64().unwrap());
    assert!(f["free_block_count"].as_u64().unwrap() >= 1);
    let pct = f["fragmentation_percentage"].as_f64().unwrap();
    assert!((0.0..=100.0).contains(&pct));
    // Optional fields sent as null take their defaults.
    let s = w.ok(
        "memory.get_status",
        json!({"device_id": "cpu", "include_allocations": null, "include_usage_stats": null, "include_fragmentation": null}),
    );
    assert_eq!(s["allocations"].as_array().unwrap().len(), 1);
    assert!(s["usage_stats"].is_object());
}

#[test]
fn allocate_and_deallocate_keep_exact_accounting() {
    let mut w = InProcessWorker::small();
    let before = w.usage("cpu");
    let d = w.ok(
        "memory.allocate",
        json!({"device_id": "cpu", "size_bytes": 10_000, "purpose": "unet", "allocation_type": "Activations"}),
    );
    let a = &d["allocation"];
    let id = a["allocation_id"].as_str().unwrap().to_string();
    assert_eq!(id.len(), 36);
    assert_eq!(id, id.to_lowercase());
    assert_eq!(uuid_version(&id), '4');
    assert_eq!(a["size_bytes"], 10_000);
    assert_eq!(a["allocation_type"], "Activations");
    assert_eq!(a["purpose"], "unet");
    assert_eq!(a["owner"], "client");
    assert_eq!(a["persistent"], false);
    assert!(a["handle"].is_null(), "cpu memory has no handle");
    assert_eq!(d["success"], true);
    assert!(d["allocation_time_ms"].as_f64().unwrap() >= 0.0);
    assert!(d["available_memory_bytes"].as_u64().unwrap() <= 64 * MIB - 10_000);

    let u = w.usage("cpu");
    assert_eq!(
        u["allocated_bytes"].as_u64().unwrap(),
        before["allocated_bytes"].as_u64().unwrap() + 10_000
    );
    assert!(u["reserved_bytes"].as_u64().unwrap() >= 10_000);
    assert_eq!(u["allocation_count"], 1);
    assert_eq!(u["budget_bytes"], 64 * MIB);

    let f = w.ok(
        "memory.deallocate",
        json!({"allocation_id": id, "device_id": "cpu"}),
    );
    assert_eq!(
        f,
        json!({"allocation_id": id, "device_id": "cpu", "freed_bytes": 10_000})
    );
    let u = w.usage("cpu");
    assert_eq!(u["allocated_bytes"], 0);
    assert!(
        u["reserved_bytes"].as_u64().unwrap() <= 64 * 1024,
        "freed pages go back, but for a small cache"
    );
    assert_eq!(u["allocation_count"], 0);
    assert_eq!(u["total_allocations"], 1);
    assert_eq!(u["total_deallocations"], 1);
    assert_eq!(u["peak_allocated_bytes"], 10_000);

    let (code, msg) = w.err("memory.deallocate", json!({"allocation_id": id}));
    assert_eq!(code, "ALLOCATION_NOT_FOUND");
    assert!(msg.contains(&id));
}

fn uuid_version(id: &str) -> char {
    id.chars().nth(14).unwrap()
}

#[test]
fn alignment_is_honoured_and_reported() {
    let mut w = InProcessWorker::small();
    w.allocate("shm", 100);
    let d = w.ok(
        "memory.allocate",
        json!({"device_id": "shm", "size_bytes": 100, "alignment": 4096}),
    );
    assert_eq!(d["allocation"]["alignment"], 4096);
    assert_eq!(
        d["allocation"]["handle"]["offset"].as_u64().unwrap() % 4096,
        0
    );
    let d = w.ok(
        "memory.allocate",
        json!({"device_id": "cpu", "size_bytes": 100}),
    );
    assert!(
        d["allocation"]["alignment"]
            .as_u64()
            .unwrap()
            .is_power_of_two()
    );
}

#[test]
fn reservations_are_charged_but_hold_no_memory() {
    let mut w = InProcessWorker::small();
    let d = w.ok(
        "memory.allocate",
        json!({"device_id": "cpu", "size_bytes": 40 * MIB, "allocation_type": "Reservation"}),
    );
    assert!(d["allocation"]["handle"].is_null());
    let u = w.usage("cpu");
    assert_eq!(u["reservation_bytes"], 40 * MIB);
    assert_eq!(u["allocated_bytes"], 0);
    assert_eq!(u["reserved_bytes"], 0);
    // The budget is charged: 30 MiB more does not fit now.
    let (code, _) = w.err(
        "memory.allocate",
        json!({"device_id": "cpu", "size_bytes": 30 * MIB, "timeout_seconds": 0}),
    );
    assert_eq!(code, "OUT_OF_MEMORY");
}

#[test]
fn enums_by_name_in_any_case_and_by_integer() {
    let mut w = InProcessWorker::small();
    for (value, expected) in [
        (json!("cache"), "Cache"),
        (json!("TEMPORARY"), "Temporary"),
        (json!("ModelWeights"), "ModelWeights"),
        (json!(4), "Staging"),
        (json!(0), "General"),
        (json!(6), "Reservation"),
    ] {
        let d = w.ok(
            "memory.allocate",
            json!({"device_id": "cpu", "size_bytes": 64, "allocation_type": value}),
        );
        assert_eq!(d["allocation"]["allocation_type"], expected, "{value}");
    }
    let r = w.ok(
        "memory.get_allocations",
        json!({"device_id": "cpu", "allocation_type": 3}),
    );
    assert_eq!(r["total_count"], 1);
    let r = w.ok(
        "memory.get_allocations",
        json!({"device_id": "cpu", "allocation_type": "sTaGiNg"}),
    );
    assert_eq!(r["total_count"], 1);
    for bad in [json!(7), json!("Weights"), json!(-1), json!(1.5)] {
        let (code, msg) = w.err(
            "memory.allocate",
            json!({"device_id": "cpu", "size_bytes": 64, "allocation_type": bad}),
        );
        assert_eq!(code, "INVALID_PARAMETER");
        assert!(msg.contains("allocation_type"), "{msg}");
    }
}

#[test]
fn get_allocations_filters_and_pages_oldest_first() {
    let mut w = InProcessWorker::small();
    let mut ids = Vec::new();
    for i in 0..10u64 {
        let purpose = if i % 2 == 0 { "even" } else { "odd" };
        let kind = if i < 5 { "Cache" } else { "General" };
        let d = w.ok(
            "memory.allocate",
            json!({"device_id": "cpu", "size_bytes": 1000 + i, "purpose": purpose, "allocation_type": kind}),
        );
        ids.push(
            d["allocation"]["allocation_id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    w.allocate("shm", 100);
    let all = w.ok("memory.get_allocations", json!({"device_id": "cpu"}));
    assert_eq!(all["device_id"], "cpu");
    assert_eq!(all["total_count"], 10);
    let got: Vec<&str> = all["allocations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["allocation_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        got,
        ids.iter().map(String::as_str).collect::<Vec<_>>(),
        "oldest first"
    );

    let page = w.ok(
        "memory.get_allocations",
        json!({"device_id": "cpu", "offset": 3, "limit": 4}),
    );
    assert_eq!(page["total_count"], 10);
    let got: Vec<&str> = page["allocations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["allocation_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        got,
        ids[3..7].iter().map(String::as_str).collect::<Vec<_>>()
    );

    let even = w.ok(
        "memory.get_allocations",
        json!({"device_id": "cpu", "purpose": "even"}),
    );
    assert_eq!(even["total_count"], 5);
    let cache_odd = w.ok(
        "memory.get_allocations",
        json!({"device_id": "cpu", "purpose": "odd", "allocation_type": "Cache", "owner": "client"}),
    );
    assert_eq!(cache_odd["total_count"], 2);
    let none = w.ok(
        "memory.get_allocations",
        json!({"device_id": "cpu", "owner": "model:sdxl"}),
    );
    assert_eq!(none["total_count"], 0);
    let past = w.ok(
        "memory.get_allocations",
        json!({"device_id": "cpu", "offset": 50}),
    );
    assert_eq!(past["allocations"], json!([]));
    for bad in [
        json!({"device_id": "cpu", "limit": 100_001}),
        json!({"device_id": "cpu", "offset": -1}),
        json!({"device_id": "cpu", "limit": "10"}),
    ] {
        assert_eq!(w.err("memory.get_allocations", bad).0, "INVALID_PARAMETER");
    }
}

#[test]
fn every_error_row_leaves_usage_unchanged() {
    let mut w = InProcessWorker::small();
    let keep = w.allocate("cpu", 5000);
    let before = usage_state(&w.usage("cpu"));

    // Lines the envelope rejects: answered with a null id.
    for line in [
        "{not json",
        "[1,2,3]",
        "42",
        "\"memory.get_usage\"",
        "{\"action\":\"memory.get_usage\"}",
        "{\"request_id\":7,\"action\":\"memory.get_usage\"}",
    ] {
        w.send_raw(format!("{line}\n").as_bytes());
        let v = w.wait_for("", Duration::from_secs(10));
        assert_eq!(v["error_code"], "INVALID_REQUEST", "{line}");
        assert_eq!(v["status_code"], 400);
        assert!(v["request_id"].is_null());
    }
    // Envelope errors where the id could be read echo it.
    w.send_raw(b"{\"request_id\":\"bad-data\",\"action\":\"memory.get_usage\",\"data\":[1]}\n");
    let v = w.wait_for("bad-data", Duration::from_secs(10));
    assert_eq!(v["error_code"], "INVALID_REQUEST");
    w.send_raw(b"{\"request_id\":\"no-action\",\"data\":{}}\n");
    assert_eq!(
        w.wait_for("no-action", Duration::from_secs(10))["error_code"],
        "INVALID_REQUEST"
    );

    let cases: Vec<(&str, Value, &str, &str)> = vec![
        (
            "memory.allocate",
            json!({"device_id": "cpu"}),
            "INVALID_PARAMETER",
            "size_bytes",
        ),
        (
            "memory.allocate",
            json!({"device_id": "cpu", "size_bytes": -4096}),
            "INVALID_PARAMETER",
            "size_bytes",
        ),
        (
            "memory.allocate",
            json!({"device_id": "cpu", "size_bytes": 0}),
            "INVALID_PARAMETER",
            "size_bytes",
        ),
        (
            "memory.allocate",
            json!({"device_id": "cpu", "size_bytes": 4096.5}),
            "INVALID_PARAMETER",
            "size_bytes",
        ),
        (
            "memory.allocate",
            json!({"device_id": "cpu", "size_bytes": 4096.0}),
            "INVALID_PARAMETER",
            "size_bytes",
        ),
        (
            "memory.allocate",
            json!({"device_id": "cpu", "size_bytes": "4096"}),
            "INVALID_PARAMETER",
            "size_bytes",
        ),
        (
            "memory.allocate",
            json!({"device_id": "cpu", "size_bytes": 4096, "alignment": 3}),
            "INVALID_PARAMETER",
            "alignment",
        ),
        (
            "memory.allocate",
            json!({"device_id": "cpu", "size_bytes": 4096, "alignment": -8}),
            "INVALID_PARAMETER",
            "alignment",
        ),
        (
            "memory.allocate",
            json!({"device_id": "cpu", "size_bytes": 4096, "alignment": 2_147_483_648u64}),
            "INVALID_PARAMETER",
            "alignment",
        ),
        (
            "memory.allocate",
            json!({"device_id": "cpu", "size_bytes": 4096, "timeout_seconds": 5000}),
            "INVALID_PARAMETER",
            "timeout_seconds",
        ),
        (
            "memory.allocate",
            json!({"device_id": "cpu", "size_bytes": 4096, "persistent": "yes"}),
            "INVALID_PARAMETER",
            "persistent",
        ),
        (
            "memory.allocate",
            json!({"size_bytes": 4096}),
            "INVALID_PARAMETER",
            "device_id",
        ),
        (
            "memory.allocate",
            json!({"device_id": "cuda:7", "size_bytes": 4096}),
            "INVALID_DEVICE",
            "cuda:7",
        ),
        (
            "memory.allocate",
            json!({"device_id": "cpu", "size_bytes": 65 * MIB}),
            "OUT_OF_MEMORY",
            "cpu",
        ),
        (
            "memory.get_usage",
            json!({"device_id": "nope"}),
            "INVALID_DEVICE",
            "nope",
        ),
        (
            "memory.get_status",
            json!({}),
            "INVALID_PARAMETER",
            "device_id",
        ),
        (
            "memory.get_status",
            json!({"device_id": "cpu", "include_allocations": 1}),
            "INVALID_PARAMETER",
            "include_allocations",
        ),
        (
            "memory.deallocate",
            json!({"allocation_id": "6f1c2a4e-0000-4000-8000-000000000000"}),
            "ALLOCATION_NOT_FOUND",
            "6f1c2a4e",
        ),
        (
            "memory.deallocate",
            json!({"allocation_id": "not-a-uuid"}),
            "ALLOCATION_NOT_FOUND",
            "not-a-uuid",
        ),
        (
            "memory.deallocate",
            json!({"allocation_id": keep, "device_id": "shm"}),
            "ALLOCATION_NOT_FOUND",
            "not found",
        ),
        (
            "memory.deallocate",
            json!({"allocation_id": keep, "device_id": "gpu"}),
            "INVALID_DEVICE",
            "gpu",
        ),
        (
            "memory.deallocate",
            json!({}),
            "INVALID_PARAMETER",
            "allocation_id",
        ),
        (
            "memory.clear",
            json!({"device_id": "nope"}),
            "INVALID_DEVICE",
            "nope",
        ),
        (
            "memory.launch_rockets",
            json!({}),
            "UNKNOWN_ACTION",
            "memory.launch_rockets",
        ),
        (
            "memory.analytics",
            json!({"device_id": "cpu", "window_seconds": 0}),
            "INVALID_PARAMETER",
            "window_seconds",
        ),
        (
            "memory.defragment",
            json!({"device_id": "nope"}),
            "INVALID_DEVICE",
            "nope",
        ),
        (
            "memory.optimize",
            json!({"device_id": "cpu", "optimization_type": "Shrink"}),
            "INVALID_PARAMETER",
            "optimization_type",
        ),
        (
            "memory.optimize",
            json!({"device_id": "cpu", "optimization_type": "ReduceToTarget"}),
            "INVALID_PARAMETER",
            "target_usage_percentage",
        ),
    ];
    for (action, data, code, mentions) in cases {
        let v = w.request(action, data.clone());
        assert_eq!(v["success"], false, "{action} {data} should fail");
        assert_eq!(v["error_code"], code, "{action} {data}: {v}");
        let msg = v["error_message"].as_str().unwrap();
        assert!(
            msg.contains(mentions),
            "{action} {data}: message `{msg}` should mention `{mentions}`"
        );
        let expected_status = match code {
            "INVALID_PARAMETER" => 400,
            "INVALID_DEVICE" | "ALLOCATION_NOT_FOUND" | "UNKNOWN_ACTION" => 404,
            "OUT_OF_MEMORY" => 503,
            _ => unreachable!(),
        };
        assert_eq!(v["status_code"], expected_status, "{action} {data}");
        assert_eq!(
            usage_state(&w.usage("cpu")),
            before,
            "{action} {data} changed usage"
        );
    }
    // The over-budget message is for people: human units.
    let (_, msg) = w.err(
        "memory.allocate",
        json!({"device_id": "cpu", "size_bytes": 65 * MIB}),
    );
    assert!(msg.contains("MiB"), "{msg}");
    // The worker is still serving, and `keep` is intact.
    w.ok("memory.deallocate", json!({"allocation_id": keep}));
}

#[test]
fn oversize_lines_are_discarded_and_answered() {
    let mut w = InProcessWorker::over_with(
        MemoryService::new(settings("64MiB", "64MiB").devices().unwrap()),
        WorkerOptions {
            max_line_bytes: 4096,
            ..Default::default()
        },
    );
    let big = format!(
        "{{\"request_id\":\"big\",\"action\":\"memory.get_usage\",\"data\":{{\"device_id\":\"cpu\",\"pad\":\"{}\"}}}}\n",
        "x".repeat(100_000)
    );
    w.send_raw(big.as_bytes());
    let v = w.wait_for("", Duration::from_secs(10));
    assert_eq!(v["error_code"], "REQUEST_TOO_LARGE");
    assert_eq!(v["status_code"], 413);
    assert!(v["request_id"].is_null());
    w.usage("cpu");
}

#[test]
fn default_line_limit_is_one_mebibyte() {
    let mut w = InProcessWorker::small();
    let pad = "x".repeat(900_000);
    let d = w.ok("memory.get_usage", json!({"device_id": "cpu", "pad": pad}));
    assert_eq!(d["device_id"], "cpu");
    let big = format!(
        "{{\"request_id\":\"big\",\"pad\":\"{}\"}}\n",
        "y".repeat(1_100_000)
    );
    w.send_raw(big.as_bytes());
    assert_eq!(
        w.wait_for("", Duration::from_secs(10))["error_code"],
        "REQUEST_TOO_LARGE"
    );
}

#[test]
fn crlf_lines_are_accepted() {
    let mut w = InProcessWorker::small();
    w.send_raw(b"{\"request_id\":\"crlf\",\"action\":\"memory.get_usage\",\"data\":{\"device_id\":\"cpu\"}}\r\n");
    let v = w.wait_for("crlf", Duration::from_secs(10));
    assert_eq!(v["success"], true);
}

#[test]
fn clear_keeps_persistent_unless_forced() {
    let mut w = InProcessWorker::small();
    w.allocate("cpu", 1000);
    w.ok(
        "memory.allocate",
        json!({"device_id": "cpu", "size_bytes": 2000, "allocation_type": "Reservation"}),
    );
    let p = w.ok(
        "memory.allocate",
        json!({"device_id": "cpu", "size_bytes": 3000, "persistent": true}),
    );
    assert_eq!(p["allocation"]["persistent"], true);
    let shm = w.allocate("shm", 500);

    let c = w.ok("memory.clear", json!({"device_id": "cpu"}));
    assert_eq!(
        c,
        json!({"device_id": "cpu", "cleared_count": 2, "freed_bytes": 3000, "kept_persistent_count": 1})
    );
    let u = w.usage("cpu");
    assert_eq!(u["allocated_bytes"], 3000);
    assert_eq!(u["reservation_bytes"], 0);

    let c = w.ok("memory.clear", json!({"device_id": "cpu", "force": true}));
    assert_eq!(
        c,
        json!({"device_id": "cpu", "cleared_count": 1, "freed_bytes": 3000, "kept_persistent_count": 0})
    );
    let u = w.usage("cpu");
    assert_eq!(
        (u["allocated_bytes"].clone(), u["allocation_count"].clone()),
        (json!(0), json!(0))
    );
    // Other devices are untouched.
    let a = w.ok("memory.get_allocations", json!({"device_id": "shm"}));
    assert_eq!(a["allocations"][0]["allocation_id"], json!(shm));
}

#[test]
fn a_waiting_allocate_succeeds_when_memory_is_freed_and_others_keep_being_answered() {
    let mut w = InProcessWorker::small();
    let big = w.allocate("cpu", 40 * MIB);
    let waiting = w.submit(
        "memory.allocate",
        json!({"device_id": "cpu", "size_bytes": 40 * MIB, "timeout_seconds": 20}),
    );
    // While it waits, other requests are answered.
    for _ in 0..20 {
        w.usage("cpu");
    }
    w.ok("memory.get_status", json!({"device_id": "shm"}));
    assert!(
        !w.answered_within(&waiting, Duration::from_millis(300)),
        "the allocate must wait"
    );
    w.ok("memory.deallocate", json!({"allocation_id": big}));
    let v = w.wait_for(&waiting, Duration::from_secs(10));
    assert_eq!(v["success"], true, "{v}");
    let t = v["data"]["allocation_time_ms"].as_f64().unwrap();
    assert!(t >= 300.0, "allocation_time_ms counts the wait: {t}");
    assert_eq!(w.usage("cpu")["allocated_bytes"], 40 * MIB);
}

#[test]
fn a_waiting_allocate_times_out_with_out_of_memory() {
    let mut w = InProcessWorker::small();
    w.allocate("cpu", 40 * MIB);
    let before = usage_state(&w.usage("cpu"));
    let v = w.request(
        "memory.allocate",
        json!({"device_id": "cpu", "size_bytes": 40 * MIB, "timeout_seconds": 0.5}),
    );
    assert_eq!(v["error_code"], "OUT_OF_MEMORY", "{v}");
    assert_eq!(v["status_code"], 503);
    let msg = v["error_message"].as_str().unwrap();
    assert!(msg.contains("cpu") && msg.contains("MiB"), "{msg}");
    let u = w.usage("cpu");
    assert_eq!(usage_state(&u), before);
    assert_eq!(u["failed_allocations"], 1);
}

#[test]
fn a_size_over_the_budget_fails_at_once() {
    let mut w = InProcessWorker::small();
    let started = std::time::Instant::now();
    let (code, _) = w.err(
        "memory.allocate",
        json!({"device_id": "shm", "size_bytes": 65 * MIB, "timeout_seconds": 30}),
    );
    assert_eq!(code, "OUT_OF_MEMORY");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "no waiting for the impossible"
    );
}

#[test]
fn every_action_of_the_contract_is_known() {
    let mut w = InProcessWorker::small();
    let actions = [
        "memory.list_devices",
        "memory.get_status",
        "memory.get_usage",
        "memory.get_allocations",
        "memory.allocate",
        "memory.deallocate",
        "memory.clear",
        "memory.defragment",
        "memory.transfer",
        "memory.get_transfer",
        "memory.optimize",
        "memory.model_load",
        "memory.model_unload",
        "memory.model_acquire",
        "memory.model_release",
        "memory.model_status",
        "memory.model_optimize",
        "memory.get_pressure",
        "memory.analytics",
        "memory.optimization_recs",
    ];
    for action in actions {
        // Empty data: a success, or a missing field, never an unknown action.
        let v = w.request(action, json!({}));
        assert_ne!(v["error_code"], "UNKNOWN_ACTION", "{action}: {v}");
    }
    let v = w.request("memory.compact", json!({}));
    assert_eq!(v["error_code"], "UNKNOWN_ACTION");
    assert_eq!(v["status_code"], 404);
}

#[test]
fn eof_answers_everything_releases_memory_and_exits_zero() {
    let mut w = Worker::small();
    w.allocate("shm", 4096);
    let shm_files = |pid: u32| -> Vec<String> {
        std::fs::read_dir("/dev/shm")
            .unwrap()
            .filter_map(std::result::Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(&format!("memcoord-{pid}-")))
            .collect()
    };
    let pid = w.pid();
    assert_eq!(shm_files(pid).len(), 1);
    w.allocate("cpu", 40 * MIB);
    let waiting = w.submit(
        "memory.allocate",
        json!({"device_id": "cpu", "size_bytes": 40 * MIB, "timeout_seconds": 60}),
    );
    let quick = w.submit("memory.get_usage", json!({"device_id": "cpu"}));
    let status = w.close(Duration::from_secs(20));
    assert!(status.success(), "exit status {status:?}");
    let rest = w.remaining();
    let find = |id: &str| {
        rest.iter()
            .find(|v| v["request_id"] == id)
            .unwrap_or_else(|| panic!("{id} unanswered"))
            .clone()
    };
    assert_eq!(find(&quick)["success"], true);
    assert_eq!(find(&waiting)["error_code"], "SHUTTING_DOWN");
    assert_eq!(find(&waiting)["status_code"], 503);
    assert!(shm_files(pid).is_empty(), "the shm file is removed on exit");
}

#[test]
fn sigterm_drains_and_exits_zero() {
    let mut w = Worker::small();
    w.allocate("shm", 4096);
    let hold = w.submit(
        "memory.allocate",
        json!({"device_id": "shm", "size_bytes": 60 * MIB}),
    );
    let _ = w.wait_for(&hold, Duration::from_secs(10));
    let waiting = w.submit(
        "memory.allocate",
        json!({"device_id": "shm", "size_bytes": 10 * MIB, "timeout_seconds": 60}),
    );
    assert!(!w.answered_within(&waiting, Duration::from_millis(200)));
    let rc = unsafe { libc_kill(w.pid() as i32, 15) };
    assert_eq!(rc, 0);
    let status = w.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "exit status {status:?}");
    let rest = w.remaining();
    let v = rest
        .iter()
        .find(|v| v["request_id"] == waiting)
        .expect("waiting request answered");
    assert_eq!(v["error_code"], "SHUTTING_DOWN");
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

#[test]
fn a_large_allocation_faulting_pages_in_does_not_hold_up_other_requests() {
    let mut w = InProcessWorker::start("3GiB", "64MiB");
    // 2 GiB of pages take hundreds of milliseconds to fault in; a get_usage sent right after
    // is answered first.
    let lines = format!(
        "{}\n{}\n",
        json!({"request_id": "big", "action": "memory.allocate", "data": {"device_id": "cpu", "size_bytes": 2u64 << 30}}),
        json!({"request_id": "quick", "action": "memory.get_usage", "data": {"device_id": "shm"}})
    );
    w.send_raw(lines.as_bytes());
    // The worker writes its answers in the order it gives them: the quick one comes first (when
    // the test thread gets to look is beside the point: on a busy machine it may be late).
    let first = w.next_answer();
    assert_eq!(
        first["request_id"], "quick",
        "the get_usage should be answered while the 2 GiB allocation faults its pages in: {first}"
    );
    assert_eq!(first["success"], true);
    let big = w.wait_for("big", Duration::from_secs(60));
    assert_eq!(big["success"], true, "{big}");
    assert_eq!(w.usage("cpu")["allocated_bytes"], 2u64 << 30);
}

/// An allocate kept out by its alignment alone (the free memory is there, but not at such an
/// offset) says so, instead of blaming fragmentation.
#[test]
fn an_allocate_kept_out_by_its_alignment_says_so() {
    let mut w = InProcessWorker::small();
    w.allocate("cpu", 10);
    let (code, msg) = w.err(
        "memory.allocate",
        json!({"device_id": "cpu", "size_bytes": 10, "alignment": 1u64 << 30, "timeout_seconds": 0}),
    );
    assert_eq!(code, "OUT_OF_MEMORY");
    assert!(msg.contains("aligned to 1.00 GiB"), "{msg}");
    assert!(!msg.contains("fragmented"), "{msg}");
}
