//! memory.get_pressure: levels from usage (on a clock the test moves), waiting and failures
//! (through the stdio transport), all in process; a lower level shows only after the hold
//! period.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use common::inproc::InProcessWorker;
use common::{Allocate, Deallocate, GetPressure, Requests, typed};
use memcoord::api::{AllocateRequest, DeallocateRequest, OptionalDeviceRequest};
use memcoord::config::Settings;
use memcoord::managers::clock::ManualClock;
use memcoord::protocol::{ErrorCode, MemoryPressure, PressureLevel};
use memcoord::service::MemoryService;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

const MIB: u64 = 1 << 20;

fn pressure(w: &mut impl Requests, device: &str) -> MemoryPressure {
    let mut d = w.send::<GetPressure>(json!({"device_id": device})).unwrap();
    assert_eq!(d.devices.len(), 1);
    d.devices.remove(0)
}

fn worker() -> (InProcessWorker, Arc<ManualClock>) {
    InProcessWorker::on_manual_clock("64MiB", "64MiB", |s| {
        s.with_pressure_hold(Duration::from_secs(1))
    })
}

/// In process, on a clock the test moves: no sleeping for the hold.
#[test]
fn levels_follow_usage_and_fall_only_after_the_hold() {
    let clock = Arc::new(ManualClock::new(1_000_000));
    let mut settings = Settings {
        no_gpu: true,
        ..Default::default()
    };
    settings.set_budget("cpu=64MiB").unwrap();
    settings.set_budget("shm=64MiB").unwrap();
    let svc = MemoryService::with_clock(settings.devices().unwrap(), clock.clone())
        .with_pressure_hold(Duration::from_secs(1));
    let cpu = || OptionalDeviceRequest {
        device_id: Some("cpu".into()),
    };
    let level = |svc: &MemoryService| svc.get_pressure(&cpu()).unwrap().devices[0].clone();
    assert_eq!(level(&svc).level, PressureLevel::None);
    assert_eq!(
        svc.get_pressure(&OptionalDeviceRequest { device_id: None })
            .unwrap()
            .devices
            .len(),
        2,
        "every device without device_id"
    );
    let mut ids = Vec::new();
    for (mib, want) in [
        (40, PressureLevel::Low),
        (10, PressureLevel::Moderate),
        (8, PressureLevel::High),
        (4, PressureLevel::Critical),
    ] {
        clock.advance(Duration::from_millis(100));
        let a = svc
            .allocate_now(AllocateRequest::new("cpu", mib * MIB))
            .unwrap();
        ids.push(a.allocation.allocation_id);
        assert_eq!(level(&svc).level, want);
    }
    let p = level(&svc);
    assert_eq!(p.usage_percentage, 62.0 / 64.0 * 100.0);
    assert!(p.trend_bytes_per_second > 0.0, "memory is growing: {p:?}");
    for id in ids {
        svc.deallocate(&DeallocateRequest {
            allocation_id: id,
            device_id: None,
        })
        .unwrap();
    }
    assert_eq!(level(&svc).level, PressureLevel::Critical, "held");
    clock.advance(Duration::from_millis(900));
    assert_eq!(
        level(&svc).level,
        PressureLevel::Critical,
        "still held at 0.9 s"
    );
    clock.advance(Duration::from_millis(200));
    assert_eq!(
        level(&svc).level,
        PressureLevel::None,
        "fallen after the hold"
    );
    let err = svc
        .get_pressure(&OptionalDeviceRequest {
            device_id: Some("nope".into()),
        })
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidDevice);
}

#[test]
fn waiting_requests_stall_time_and_failures_raise_the_level() {
    let (mut w, clock) = worker();
    let big = w.allocate("shm", 20 * MIB); // 31%: None by usage
    let waiting = w.submit(
        "memory.allocate",
        json!({"device_id": "shm", "size_bytes": 50 * MIB, "timeout_seconds": 10}),
    );
    w.until_waiting("shm", 1);
    clock.advance(Duration::from_millis(300));
    let p = pressure(&mut w, "shm");
    assert_eq!(p.waiting_requests, 1, "{p:?}");
    assert_eq!(p.level, PressureLevel::High, "a request waits: {p:?}");
    assert!(p.stall_ms_10s >= 200.0, "{p:?}");
    w.send::<Deallocate>(json!({"allocation_id": big})).unwrap();
    typed::<Allocate>(w.wait_for(&waiting, Duration::from_secs(10))).unwrap();
    let p = pressure(&mut w, "shm");
    assert_eq!(p.waiting_requests, 0);
    assert!(p.stall_ms_60s >= 200.0, "{p:?}");
    // A failure counts for a minute.
    let e = w
        .send::<Allocate>(json!({"device_id": "cpu", "size_bytes": 65 * MIB}))
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::OutOfMemory);
    let p = pressure(&mut w, "cpu");
    assert_eq!(p.failed_allocations_60s, 1);
    assert_eq!(p.level, PressureLevel::Moderate, "{p:?}");
}
