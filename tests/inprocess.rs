//! The transports driven in process (issue 13's seams): stdio over a pipe pair (concurrent
//! requests answered exactly once, out of order where one waits, and EOF answering what is in
//! flight and releasing everything) and the HTTP server on a port-0 listener (its shutdown
//! future answering what waits and shutting the service down), checked on the service's own
//! books.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use common::inproc::{InProcessServer, InProcessWorker};
use memcoord::api::DeviceRequest;
use memcoord::transport::server::ServeOptions;
use serde_json::json;
use std::collections::HashMap;

const MIB: u64 = 1 << 20;

#[test]
fn requests_over_an_in_memory_pipe_are_answered_once_and_eof_releases_everything() {
    let mut w = InProcessWorker::start("64MiB", "64MiB");
    // Fill cpu, then ask for more with a timeout: that one waits while the others go by.
    // (Under 16 MiB each: larger ones fault their pages in off the reading thread, and would
    // race the waiting one.)
    let mut ids = Vec::new();
    for size in [15, 15, 15, 15, 4] {
        ids.push(w.submit(
            "memory.allocate",
            json!({"device_id": "cpu", "size_bytes": size * MIB}),
        ));
    }
    let waiting = w.submit(
        "memory.allocate",
        json!({"device_id": "cpu", "size_bytes": 8 * MIB, "timeout_seconds": 30}),
    );
    for _ in 0..200 {
        ids.push(w.submit("memory.get_usage", json!({"device_id": "shm"})));
    }
    let mut answers: HashMap<String, serde_json::Value> = HashMap::new();
    let mut allocated = Vec::new();
    while answers.len() < ids.len() {
        let a = w.next_answer();
        let id = a["request_id"].as_str().unwrap().to_string();
        assert_ne!(
            id, waiting,
            "the waiting allocate is not answered before room is made: {a}"
        );
        if let Some(aid) = a["data"]["allocation"]["allocation_id"].as_str() {
            allocated.push(aid.to_string());
        }
        assert!(answers.insert(id, a).is_none(), "answered twice");
    }
    assert!(ids.iter().all(|id| answers[id]["success"] == true));
    // Room made: the waiting one is answered.
    w.submit("memory.deallocate", json!({"allocation_id": allocated[0]}));
    let mut got = Vec::new();
    while got.len() < 2 {
        got.push(w.next_answer());
    }
    let late = got
        .iter()
        .find(|a| a["request_id"] == waiting.as_str())
        .unwrap();
    assert_eq!(late["success"], true, "{late}");
    // EOF: everything answered, then every allocation released and every device unmapped, as
    // `memcoord worker` does before it exits.
    let before = w
        .service
        .get_usage(&DeviceRequest {
            device_id: "cpu".into(),
        })
        .unwrap();
    assert_eq!(
        before.allocated_bytes,
        60 * MIB + 4 * MIB - 15 * MIB + 8 * MIB
    );
    let rest = w.close();
    assert!(rest.is_empty(), "{rest:?}");
    assert!(w.service.list_devices().devices.is_empty());
}

#[test]
fn the_http_server_stops_on_its_shutdown_future_answering_what_waits() {
    let mut s = InProcessServer::start("8MiB", "64MiB", |s| s, ServeOptions::default());
    let big = s.post(
        "/v1/allocations",
        &json!({"device_id": "cpu", "size_bytes": 6 * MIB}),
    );
    assert_eq!(big.status, 200, "{}", big.body);
    let port = s.port;
    let waiting = std::thread::spawn(move || {
        common::http_request(
            port,
            "POST",
            "/v1/allocations",
            &[],
            Some(
                &json!({"device_id": "cpu", "size_bytes": 4 * MIB, "timeout_seconds": 30})
                    .to_string(),
            ),
        )
    });
    let pressure = memcoord::api::OptionalDeviceRequest {
        device_id: Some("cpu".into()),
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while s.service.get_pressure(&pressure).unwrap().devices[0].waiting_requests != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the allocate never waited"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // What a signal does to `memcoord serve`, without a process.
    s.stop();
    let answer = waiting.join().unwrap();
    assert_eq!(
        answer.json()["error_code"],
        "SHUTTING_DOWN",
        "{}",
        answer.body
    );
    assert!(s.service.is_shutting_down());
    assert!(
        s.service.list_devices().devices.is_empty(),
        "the service was shut down: every device unmapped"
    );
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "no longer listening"
    );
}
