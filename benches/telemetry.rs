//! Read-outs with 1,000,000 live allocations (issue 6): `memory.get_pressure`,
//! `memory.analytics` and a `/metrics` scrape must each answer in at most 1 ms, because none
//! of them walks the allocations. Baseline in the same run: `memory.get_allocations` with
//! `limit: 1`, which does walk them (to count and filter).
//!
//! Every figure is the whole protocol path (request line in, response line out) or the whole
//! scrape (snapshot + OpenMetrics text), p50 / p99 / max over the runs.
//!
//! Run: `cargo bench --bench telemetry` (add `-- --quick` for a short run).
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use memcoord::backends::CpuBackend;
use memcoord::dispatch::Dispatcher;
use memcoord::managers::DeviceSetup;
use memcoord::managers::analytics::{History, Sample};
use memcoord::protocol::{AnalyticsSample, Timestamp};
use memcoord::service::MemoryService;
use memcoord::transport::lines::handle_line;
use std::sync::Arc;
use std::time::Instant;

const LIVE: u64 = 1_000_000;

fn stats(mut ns: Vec<f64>) -> (f64, f64, f64) {
    ns.sort_by(f64::total_cmp);
    let at = |q: f64| ns[((ns.len() - 1) as f64 * q) as usize];
    (at(0.5), at(0.99), ns[ns.len() - 1])
}

fn time(runs: usize, mut f: impl FnMut()) -> (f64, f64, f64) {
    f();
    let ns = (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_nanos() as f64
        })
        .collect();
    stats(ns)
}

fn line(d: &Dispatcher, text: &str) -> usize {
    let mut out = Vec::with_capacity(1 << 16);
    let pending = handle_line(d, text.as_bytes(), &mut out, None);
    assert!(pending.is_none(), "answered inline");
    assert!(
        out.windows(14).any(|w| w == b"\"success\":true"),
        "{}",
        String::from_utf8_lossy(&out)
    );
    out.len()
}

fn report(name: &str, (p50, p99, max): (f64, f64, f64), bytes: usize) {
    println!(
        "{name:<46} p50 {:>8.1} µs   p99 {:>8.1} µs   max {:>8.1} µs   ({bytes} B out)",
        p50 / 1e3,
        p99 / 1e3,
        max / 1e3
    );
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let runs = if quick { 50 } else { 500 };
    let budget = 1u64 << 30;
    let service = Arc::new(MemoryService::new(vec![DeviceSetup {
        backend: Box::new(CpuBackend::new(budget + budget / 4).expect("reserve address space")),
        budget,
        pinned: None,
    }]));
    let d = Dispatcher::new(Arc::clone(&service));
    let started = Instant::now();
    for i in 0..LIVE {
        let kind = ["General", "Cache", "Temporary", "Activations"][(i % 4) as usize];
        line(
            &d,
            &format!(
                r#"{{"request_id":"a{i}","action":"memory.allocate","data":{{"device_id":"cpu","size_bytes":64,"allocation_type":"{kind}","purpose":"layer{}"}}}}"#,
                i % 100
            ),
        );
    }
    println!(
        "== {LIVE} live allocations on cpu (made in {:.1} s through the protocol) ==",
        started.elapsed().as_secs_f64()
    );

    let mut out_bytes = 0;
    let t = time(runs, || {
        out_bytes = line(&d, r#"{"request_id":"p","action":"memory.get_pressure"}"#);
    });
    report("memory.get_pressure (every device)", t, out_bytes);
    let t = time(runs, || {
        out_bytes = line(
            &d,
            r#"{"request_id":"a","action":"memory.analytics","data":{"device_id":"cpu","window_seconds":3600}}"#,
        );
    });
    report("memory.analytics (window 3600 s)", t, out_bytes);
    let t = time(runs, || {
        let text = memcoord::metrics::render(service.telemetry());
        out_bytes = text.len();
    });
    report(
        "/metrics scrape (snapshot + OpenMetrics text)",
        t,
        out_bytes,
    );
    let walk = time(runs.min(50), || {
        out_bytes = line(
            &d,
            r#"{"request_id":"g","action":"memory.get_allocations","data":{"device_id":"cpu","limit":1,"purpose":"layer7"}}"#,
        );
    });
    report("baseline: memory.get_allocations limit 1", walk, out_bytes);

    // A full hour of history: 3,600 sampled seconds with allocations and latencies in each.
    println!("== history with every slot full (3,600 samples, 60 latency minutes) ==");
    let mut h = History::new(0);
    for sec in 0..3600u64 {
        let now = sec * 1000 + 500;
        for k in 0..20 {
            h.on_allocation(64 << (k % 20), now);
            h.on_latency(0.01 * f64::from(k + 1), now);
        }
        h.sample(
            Sample {
                used_memory: sec,
                allocated_bytes: sec,
                reserved_bytes: sec,
            },
            now,
        );
    }
    let now = 3_599_900;
    let t = time(runs, || {
        let r = h.report(3600, 0, now);
        assert_eq!(r.samples.len(), 3600);
    });
    report("History::report(3600 s), full ring", t, 0);
    let t = time(runs, || {
        let r = h.report(60, 0, now);
        assert_eq!(r.samples.len(), 60);
    });
    report("History::report(60 s), full ring", t, 0);
    // What the answer then carries: 3,600 samples as JSON.
    let wall = std::time::SystemTime::now();
    let samples: Vec<AnalyticsSample> = h
        .report(3600, 0, now)
        .samples
        .iter()
        .map(|(ms, s)| AnalyticsSample {
            at: Timestamp(wall - std::time::Duration::from_millis(now - ms)),
            used_memory: s.used_memory,
            allocated_bytes: s.allocated_bytes,
            reserved_bytes: s.reserved_bytes,
        })
        .collect();
    let t = time(runs, || {
        out_bytes = serde_json::to_vec(&samples).map_or(0, |v| v.len());
    });
    report("3,600 samples to JSON", t, out_bytes);
}
