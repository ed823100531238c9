//! memory.get_pressure through the real binary: levels from usage, waiting and failures; a
//! lower level shows only after the hold period.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use common::Worker;
use serde_json::{Value, json};
use std::time::Duration;

const MIB: u64 = 1 << 20;

fn pressure(w: &mut Worker, device: &str) -> Value {
    let d = w.ok("memory.get_pressure", json!({"device_id": device}));
    assert_eq!(d["devices"].as_array().unwrap().len(), 1);
    d["devices"][0].clone()
}

fn worker() -> Worker {
    Worker::spawn(&[
        "--budget",
        "cpu=64MiB",
        "--budget",
        "shm=64MiB",
        "--pressure-hold-seconds",
        "1",
    ])
}

#[test]
fn levels_follow_usage_and_fall_only_after_the_hold() {
    let mut w = worker();
    let p = pressure(&mut w, "cpu");
    assert_eq!(p["level"], "None");
    for field in [
        "usage_percentage",
        "available_memory",
        "waiting_requests",
        "stall_ms_10s",
        "stall_ms_60s",
        "failed_allocations_60s",
        "trend_bytes_per_second",
    ] {
        assert!(p.get(field).is_some(), "{field}");
    }
    let all = w.ok("memory.get_pressure", json!({}));
    assert_eq!(
        all["devices"].as_array().unwrap().len(),
        2,
        "every device without device_id"
    );

    let mut ids = Vec::new();
    for (mib, level) in [(40, "Low"), (10, "Moderate"), (8, "High"), (4, "Critical")] {
        ids.push(w.allocate("cpu", mib * MIB));
        let p = pressure(&mut w, "cpu");
        assert_eq!(p["level"], level, "{p}");
    }
    let p = pressure(&mut w, "cpu");
    assert_eq!(p["usage_percentage"], 62.0 / 64.0 * 100.0, "{p}");
    assert!(
        p["trend_bytes_per_second"].as_f64().unwrap() > 0.0,
        "memory is growing: {p}"
    );
    for id in ids {
        w.ok("memory.deallocate", json!({"allocation_id": id}));
    }
    assert_eq!(pressure(&mut w, "cpu")["level"], "Critical", "held");
    std::thread::sleep(Duration::from_millis(1300));
    assert_eq!(
        pressure(&mut w, "cpu")["level"],
        "None",
        "fallen after the hold"
    );
    assert_eq!(
        w.err("memory.get_pressure", json!({"device_id": "nope"})).0,
        "INVALID_DEVICE"
    );
}

#[test]
fn waiting_requests_stall_time_and_failures_raise_the_level() {
    let mut w = worker();
    let big = w.allocate("shm", 20 * MIB); // 31%: None by usage
    let waiting = w.submit(
        "memory.allocate",
        json!({"device_id": "shm", "size_bytes": 50 * MIB, "timeout_seconds": 10}),
    );
    std::thread::sleep(Duration::from_millis(300));
    let p = pressure(&mut w, "shm");
    assert_eq!(p["waiting_requests"], 1, "{p}");
    assert_eq!(p["level"], "High", "a request waits: {p}");
    assert!(p["stall_ms_10s"].as_f64().unwrap() >= 200.0, "{p}");
    w.ok("memory.deallocate", json!({"allocation_id": big}));
    assert_eq!(
        w.wait_for(&waiting, Duration::from_secs(10))["success"],
        true
    );
    let p = pressure(&mut w, "shm");
    assert_eq!(p["waiting_requests"], 0);
    assert!(p["stall_ms_60s"].as_f64().unwrap() >= 200.0, "{p}");
    // A failure counts for a minute.
    let (code, _) = w.err(
        "memory.allocate",
        json!({"device_id": "cpu", "size_bytes": 65 * MIB}),
    );
    assert_eq!(code, "OUT_OF_MEMORY");
    let p = pressure(&mut w, "cpu");
    assert_eq!(p["failed_allocations_60s"], 1);
    assert_eq!(p["level"], "Moderate", "{p}");
}
