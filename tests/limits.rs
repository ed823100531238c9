//! Bounds that refuse with a clear error instead of queueing without end: live allocations
//! per device, requests waiting for memory per device, requests in flight per stdio session and
//! per HTTP client. In process (the stdio transport over a pipe pair, the HTTP server on a
//! port-0 listener), but for a bound refused at start (a process's exit).
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use common::inproc::{InProcessServer, InProcessWorker, settings};
use common::{Allocate, Deallocate, Defragment, ErrorCode, Requests, Transfer, typed};
use memcoord::service::MemoryService;
use memcoord::transport::server::ServeOptions;
use memcoord::transport::stdio::WorkerOptions;
use serde_json::json;
use std::time::{Duration, Instant};

#[test]
fn allocations_per_device_are_bounded() {
    let mut w =
        InProcessWorker::on_clock_of_the_machine("64MiB", "64MiB", |s| s.with_max_allocations(3));
    for _ in 0..3 {
        w.allocate("cpu", 4096);
    }
    let e = w
        .send::<Allocate>(json!({"device_id": "cpu", "size_bytes": 4096}))
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::OutOfMemory);
    assert!(
        e.message.contains("--max-allocations") && e.message.contains("cpu"),
        "{}",
        e.message
    );
    // Another device has its own count.
    w.allocate("shm", 4096);
    assert_eq!(
        w.stats("cpu").allocation_count,
        3,
        "the refusal changed nothing"
    );
}

#[test]
fn requests_waiting_for_memory_are_bounded() {
    let mut w =
        InProcessWorker::on_clock_of_the_machine("8MiB", "64MiB", |s| s.with_max_waiting(1));
    let big = w.allocate("cpu", 6 << 20);
    let first = w.submit(
        "memory.allocate",
        json!({"device_id": "cpu", "size_bytes": 4 << 20, "timeout_seconds": 30}),
    );
    w.until_waiting("cpu", 1);
    let started = Instant::now();
    let e = w
        .send::<Allocate>(json!({"device_id": "cpu", "size_bytes": 4 << 20, "timeout_seconds": 30}))
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::OutOfMemory);
    assert!(e.message.contains("--max-waiting"), "{}", e.message);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "refused at once"
    );
    w.send::<Deallocate>(json!({"allocation_id": big})).unwrap();
    typed::<Allocate>(w.wait_for(&first, Duration::from_secs(20))).unwrap();
}

#[test]
fn max_allocations_zero_is_refused_at_start() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_memcoord"))
        .args(["worker", "--no-gpu", "--max-allocations", "0"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--max-allocations"), "{err}");
}

#[test]
fn requests_in_flight_per_stdio_session_are_bounded() {
    let mut w = InProcessWorker::over_with(
        MemoryService::new(settings("8MiB", "64MiB").devices().unwrap()),
        WorkerOptions {
            max_in_flight: 2,
            ..Default::default()
        },
    );
    let big = w.allocate("cpu", 6 << 20);
    let wait = json!({"device_id": "cpu", "size_bytes": 4 << 20, "timeout_seconds": 30});
    let first = w.submit("memory.allocate", wait.clone());
    let second = w.submit("memory.allocate", wait.clone());
    w.until_waiting("cpu", 2);
    let before = w.stats("cpu");
    // A third request that would wait, and a transfer (work that runs after its answer), are
    // refused at once; requests answered at once still are.
    let started = Instant::now();
    let e = w.send::<Allocate>(wait.clone()).unwrap_err();
    assert_eq!(e.code, ErrorCode::TooManyRequests);
    assert!(
        e.message.contains("--max-in-flight") && e.message.contains('2'),
        "{}",
        e.message
    );
    let small = w.allocate("shm", 4096);
    let e = w
        .send::<Transfer>(
            json!({"allocation_id": small, "source_device_id": "shm", "destination_device_id": "cpu",
                   "mode": "copy"}),
        )
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::TooManyRequests);
    let e = w
        .send::<Defragment>(json!({"device_id": "shm"}))
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::TooManyRequests);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "refused at once"
    );
    let after = w.stats("cpu");
    assert_eq!(after.allocated_bytes, before.allocated_bytes);
    assert_eq!(after.allocation_count, before.allocation_count);
    assert_eq!(
        w.stats("shm").allocation_count,
        1,
        "nothing was transferred"
    );
    // Freeing lets both waiting requests through (one, then, once it is freed, the other),
    // and their places are given back.
    w.send::<Deallocate>(json!({"allocation_id": big})).unwrap();
    let a = typed::<Allocate>(w.wait_for(&first, Duration::from_secs(20))).unwrap();
    w.send::<Deallocate>(json!({"allocation_id": a.allocation.allocation_id}))
        .unwrap();
    typed::<Allocate>(w.wait_for(&second, Duration::from_secs(20))).unwrap();
    let v = w.send::<Defragment>(json!({"device_id": "shm"})).unwrap();
    assert_eq!(v.device_id, "shm");
}

#[test]
fn requests_in_flight_per_http_client_are_bounded() {
    let server = InProcessServer::start(
        "8MiB",
        "64MiB",
        |s| s,
        ServeOptions {
            max_in_flight: 1,
            ..Default::default()
        },
    );
    let big = server.post(
        "/v1/allocations",
        &json!({"device_id": "cpu", "size_bytes": 6 << 20}),
    );
    assert_eq!(big.status, 200, "{}", big.body);
    let big_id = big.json()["data"]["allocation"]["allocation_id"]
        .as_str()
        .unwrap()
        .to_string();
    let port = server.port;
    let waiting = std::thread::spawn(move || {
        common::http_request(
            port,
            "POST",
            "/v1/allocations",
            &[],
            Some(
                &json!({"device_id": "cpu", "size_bytes": 4 << 20, "timeout_seconds": 30})
                    .to_string(),
            ),
        )
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.get("/v1/pressure?device_id=cpu").json()["data"]["devices"][0]["waiting_requests"]
        != 1
    {
        assert!(Instant::now() < deadline, "the first allocate never waited");
        std::thread::sleep(Duration::from_millis(20));
    }
    let refused = server.post(
        "/v1/command",
        &json!({"request_id": "second", "action": "memory.allocate",
                "data": {"device_id": "cpu", "size_bytes": 4 << 20, "timeout_seconds": 30}}),
    );
    assert_eq!(refused.status, 429, "{}", refused.body);
    let v = refused.json();
    assert_eq!(v["error_code"], "TOO_MANY_REQUESTS");
    assert_eq!(v["status_code"], 429);
    assert_eq!(v["request_id"], "second");
    // Requests answered at once are not held back.
    assert_eq!(server.get("/v1/devices/cpu/usage").status, 200);
    let freed = server.request("DELETE", &format!("/v1/allocations/{big_id}"), &[], None);
    assert_eq!(freed.status, 200, "{}", freed.body);
    let first = waiting.join().unwrap();
    assert_eq!(first.status, 200, "{}", first.body);
    // The place was given back.
    let id = first.json()["data"]["allocation"]["allocation_id"]
        .as_str()
        .unwrap()
        .to_string();
    let v = server.post("/v1/devices/shm/defragment", &json!({}));
    assert_eq!(v.status, 200, "{}", v.body);
    let freed = server.request("DELETE", &format!("/v1/allocations/{id}"), &[], None);
    assert_eq!(freed.status, 200);
}
