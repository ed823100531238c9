//! memory.analytics through the stdio transport (in process): every field checked against the
//! operations performed, the window's bounds, and the per-second samples (on a clock the test
//! moves, not by sleeping).
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use common::inproc::InProcessWorker;
use common::{Allocate, Analytics, Deallocate, ErrorCode, GetUsage, Requests};
use memcoord::protocol::MemoryAnalytics;
use serde_json::json;
use std::time::Duration;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const INF: u64 = i64::MAX as u64;

fn analytics(w: &mut impl Requests, device: &str, window: u64) -> MemoryAnalytics {
    let mut d = w
        .send::<Analytics>(json!({"device_id": device, "window_seconds": window}))
        .unwrap();
    assert_eq!(d.devices.len(), 1, "{d:?}");
    d.devices.remove(0)
}

fn allocate(w: &mut impl Requests, size: u64, purpose: &str) -> String {
    w.send::<Allocate>(json!({"device_id": "cpu", "size_bytes": size, "purpose": purpose}))
        .unwrap()
        .allocation
        .allocation_id
}

fn bucket(a: &MemoryAnalytics, le: u64) -> u64 {
    a.allocation_size_histogram
        .iter()
        .find(|b| b.le_bytes == le)
        .unwrap_or_else(|| panic!("no bucket {le}: {a:?}"))
        .count
}

#[test]
fn every_field_follows_the_operations() {
    let mut w = InProcessWorker::start("64MiB", "64MiB");
    let fresh = analytics(&mut w, "cpu", 3600);
    assert_eq!(fresh.device_id, "cpu");
    assert_eq!(fresh.window_seconds, 3600);
    assert_eq!(fresh.allocations_per_second, 0.0);
    assert_eq!(fresh.peak_allocated_bytes, 0);
    assert!(fresh.bytes_by_purpose.0.is_empty());
    assert_eq!(bucket(&fresh, INF), 0);
    let lat = fresh.allocation_latency_ms;
    for p in [lat.p50, lat.p90, lat.p99, lat.max] {
        assert_eq!(p, 0.0, "{fresh:?}");
    }

    // 3 × 1 KiB, 2 × 100 KiB, 1 × 3 MiB, with purposes.
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(allocate(&mut w, KIB, "tokens"));
    }
    for _ in 0..2 {
        ids.push(allocate(&mut w, 100 * KIB, "latents"));
    }
    ids.push(allocate(&mut w, 3 * MIB, "vae"));
    let peak = 3 * KIB + 200 * KIB + 3 * MIB;
    // A failed allocation counts nowhere but in latency of nothing: it is no allocation.
    let e = w
        .send::<Allocate>(
            json!({"device_id": "cpu", "size_bytes": 1u64 << 40, "timeout_seconds": 0}),
        )
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::OutOfMemory);
    // Free the 3 MiB one: the peak stays, bytes_by_purpose drops it.
    w.send::<Deallocate>(json!({"allocation_id": ids.pop().unwrap()}))
        .unwrap();

    let a = analytics(&mut w, "cpu", 3600);
    assert_eq!(bucket(&a, KIB), 3, "{a:?}");
    assert_eq!(bucket(&a, 4 * KIB), 3);
    assert_eq!(bucket(&a, 64 * KIB), 3);
    assert_eq!(bucket(&a, 256 * KIB), 5);
    assert_eq!(bucket(&a, MIB), 5);
    assert_eq!(bucket(&a, 4 * MIB), 6);
    assert_eq!(bucket(&a, INF), 6);
    assert_eq!(a.allocation_count, 6);
    let buckets = &a.allocation_size_histogram;
    assert_eq!(buckets.last().unwrap().le_bytes, INF, "+Inf last");
    let counts: Vec<u64> = buckets.iter().map(|b| b.count).collect();
    assert!(counts.windows(2).all(|p| p[0] <= p[1]), "cumulative");

    assert_eq!(a.peak_allocated_bytes, peak);
    let mut by_purpose = a.bytes_by_purpose.0.clone();
    by_purpose.sort();
    assert_eq!(
        by_purpose,
        [
            ("latents".to_string(), 200 * KIB),
            ("tokens".to_string(), 3 * KIB)
        ],
        "live bytes only"
    );
    // 6 allocations since the worker started, a few seconds at most ago.
    let rate = a.allocations_per_second;
    assert!((6.0 / 10.0..=6.0).contains(&rate), "{rate}");

    let lat = a.allocation_latency_ms;
    let (p50, p90, p99, max) = (lat.p50, lat.p90, lat.p99, lat.max);
    assert!(
        0.0 < p50 && p50 <= p90 && p90 <= p99 && p99 <= max,
        "{lat:?}"
    );
    // Against the answers' own allocation_time_ms: the max is the slowest of the six.
    assert!(max < 1000.0, "{lat:?}");

    // The current second is sampled at the request: the last sample is now.
    assert!(!a.samples.is_empty());
    let last = a.samples.last().unwrap();
    let usage = w.send::<GetUsage>(json!({"device_id": "cpu"})).unwrap();
    assert_eq!(last.allocated_bytes, usage.allocated_bytes);
    assert_eq!(last.reserved_bytes, usage.reserved_bytes);
    assert!(last.used_memory > 0);
    // The time as written on the wire: UTC.
    let raw = w.ok(
        "memory.analytics",
        json!({"device_id": "cpu", "window_seconds": 3600}),
    );
    let at = raw["devices"][0]["samples"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()["at"]
        .clone();
    assert!(at.as_str().unwrap().ends_with('Z'), "{at}");

    // Every device without device_id.
    let all = w.send::<Analytics>(json!({})).unwrap();
    assert_eq!(all.devices.len(), 2);
    w.close();
}

#[test]
fn samples_come_once_a_second_and_the_window_bounds_them() {
    let (mut w, clock) = InProcessWorker::on_manual_clock("64MiB", "64MiB", |s| s);
    // The sampler's ticks: one as the worker starts, then one a second for 3.3 s.
    w.service.sample();
    let id = allocate(&mut w, MIB, "x");
    for _ in 0..3 {
        clock.advance(Duration::from_secs(1));
        w.service.sample();
    }
    clock.advance(Duration::from_millis(300));
    let a = analytics(&mut w, "cpu", 3600);
    let samples = &a.samples;
    assert!(
        (3..=6).contains(&samples.len()),
        "one a second: {}",
        samples.len()
    );
    let times: Vec<_> = samples.iter().map(|s| s.at.0).collect();
    assert!(times.windows(2).all(|p| p[0] < p[1]), "oldest first");
    // The first sample may be from before the allocation (the worker samples as it starts).
    assert!(
        samples[1..].iter().all(|s| s.allocated_bytes == MIB),
        "{samples:?}"
    );

    // A 1-second window holds at most 1 sample, no allocation made 3 s ago, but the peak
    // held through it.
    let a1 = analytics(&mut w, "cpu", 1);
    assert_eq!(a1.window_seconds, 1);
    assert!(a1.samples.len() <= 1);
    assert_eq!(bucket(&a1, INF), 0);
    assert_eq!(a1.allocations_per_second, 0.0);
    assert_eq!(a1.peak_allocated_bytes, MIB);
    assert_eq!(a1.allocation_latency_ms.max, 0.0);
    w.send::<Deallocate>(json!({"allocation_id": id})).unwrap();
    // (2 s: the free and this request may straddle a second.)
    let a2 = analytics(&mut w, "cpu", 2);
    assert_eq!(a2.peak_allocated_bytes, MIB, "freed within the window");

    // Bounds.
    for bad in [json!(0), json!(3601), json!(-1), json!("60")] {
        let e = w
            .send::<Analytics>(json!({"device_id": "cpu", "window_seconds": bad}))
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidParameter, "{bad}");
        assert!(e.message.contains("window_seconds"), "{}", e.message);
    }
    let e = w
        .send::<Analytics>(json!({"device_id": "cuda:99"}))
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidDevice);
    w.close();
}
