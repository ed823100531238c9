//! Bounds that refuse with a clear error instead of queueing without end: live allocations
//! per device, requests waiting for memory per device.

mod common;

use common::Worker;
use serde_json::json;
use std::time::{Duration, Instant};

#[test]
fn allocations_per_device_are_bounded() {
    let mut w = Worker::spawn(&[
        "--no-gpu",
        "--budget",
        "cpu=64MiB",
        "--budget",
        "shm=64MiB",
        "--max-allocations",
        "3",
    ]);
    for _ in 0..3 {
        w.allocate("cpu", 4096);
    }
    let (code, msg) = w.err(
        "memory.allocate",
        json!({"device_id": "cpu", "size_bytes": 4096}),
    );
    assert_eq!(code, "OUT_OF_MEMORY");
    assert!(
        msg.contains("--max-allocations") && msg.contains("cpu"),
        "{msg}"
    );
    // Another device has its own count.
    w.allocate("shm", 4096);
    assert_eq!(
        w.usage("cpu")["allocation_count"],
        3,
        "the refusal changed nothing"
    );
}

#[test]
fn requests_waiting_for_memory_are_bounded() {
    let mut w = Worker::spawn(&[
        "--no-gpu",
        "--budget",
        "cpu=8MiB",
        "--budget",
        "shm=64MiB",
        "--max-waiting",
        "1",
    ]);
    let big = w.allocate("cpu", 6 << 20);
    let first = w.submit(
        "memory.allocate",
        json!({"device_id": "cpu", "size_bytes": 4 << 20, "timeout_seconds": 30}),
    );
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let (code, msg) = w.err(
        "memory.allocate",
        json!({"device_id": "cpu", "size_bytes": 4 << 20, "timeout_seconds": 30}),
    );
    assert_eq!(code, "OUT_OF_MEMORY");
    assert!(msg.contains("--max-waiting"), "{msg}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "refused at once"
    );
    w.ok("memory.deallocate", json!({"allocation_id": big}));
    let v = w.wait_for(&first, Duration::from_secs(20));
    assert_eq!(v["success"], true, "{v}");
}
