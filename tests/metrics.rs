//! `--metrics-addr`: the worker's /metrics (in process: the stdio transport and the metrics
//! endpoint on a port-0 listener) parsed as OpenMetrics, its figures checked against the
//! operations performed, and the Prometheus text checked by `promtool check metrics` where
//! promtool is installed. (tests/metrics_addr.rs starts it through the binary's flags.)
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use common::inproc::InProcessWorker;
use common::{Requests, write_model};
use openmetrics_parser::{MetricsExposition, OpenMetricsType, OpenMetricsValue};
use serde_json::json;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

const MIB: u64 = 1 << 20;

/// GET `path` with an Accept header; returns (content type, body).
fn get(port: u16, path: &str, accept: &str) -> (String, String) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut stream = loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => break s,
            Err(e) if std::time::Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("metrics endpoint not listening: {e}"),
        }
    };
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let content_type = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type: ")
                .map(str::to_string)
        })
        .unwrap_or_default();
    (content_type, body.to_string())
}

type Exposition = MetricsExposition<OpenMetricsType, OpenMetricsValue>;

/// The value of the one sample of `family` whose labels include `labels`.
fn value(m: &Exposition, family: &str, labels: &[(&str, &str)]) -> f64 {
    let f = m
        .families
        .get(family)
        .unwrap_or_else(|| panic!("no family {family}"));
    let mut found = Vec::new();
    for s in f.iter_samples() {
        let set = s.get_labelset().unwrap();
        if labels
            .iter()
            .all(|(k, v)| set.get_label_value(k) == Some(*v))
        {
            found.push(match &s.value {
                OpenMetricsValue::Gauge(n) | OpenMetricsValue::Unknown(n) => n.as_f64(),
                OpenMetricsValue::Counter(c) => c.value.as_f64(),
                OpenMetricsValue::Histogram(h) => h.count.unwrap_or(0) as f64,
                other => panic!("{family}: unexpected {other:?}"),
            });
        }
    }
    assert_eq!(
        found.len(),
        1,
        "{family} {labels:?}: {} samples",
        found.len()
    );
    found[0]
}

#[test]
fn metrics_parse_as_openmetrics_and_follow_the_operations() {
    let root = std::env::temp_dir().join(format!("memcoord-metrics-{}", std::process::id()));
    std::fs::create_dir_all(&root).unwrap();
    write_model(&root.join("m.safetensors"), &[("w", MIB as usize)]);
    let dir = root.clone();
    let mut w =
        InProcessWorker::on_clock_of_the_machine("64MiB", "64MiB", |s| s.with_model_root(dir));
    let port = w.serve_metrics();
    // 3 MiB of Cache and 1 MiB General on cpu; one refusal; 2 MiB moved cpu -> shm; a 4 MiB
    // model on shm, leased once.
    for _ in 0..3 {
        w.ok(
            "memory.allocate",
            json!({"device_id": "cpu", "size_bytes": MIB, "allocation_type": "Cache"}),
        );
    }
    w.allocate("cpu", MIB);
    let (code, _) = w.err(
        "memory.allocate",
        json!({"device_id": "cpu", "size_bytes": 1u64 << 40, "timeout_seconds": 0}),
    );
    assert_eq!(code, "OUT_OF_MEMORY");
    let moved = w.allocate("cpu", 2 * MIB);
    w.ok(
        "memory.transfer",
        json!({"allocation_id": moved, "source_device_id": "cpu",
               "destination_device_id": "shm", "wait_for_completion": true}),
    );
    w.ok(
        "memory.model_load",
        json!({"model_name": "unet", "path": "m.safetensors", "device_id": "shm"}),
    );
    w.ok("memory.model_acquire", json!({"model_name": "unet"}));

    let (content_type, text) = get(
        port,
        "/metrics",
        "application/openmetrics-text; version=1.0.0",
    );
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    assert!(text.ends_with("# EOF\n"));
    let m = openmetrics_parser::openmetrics::parse_openmetrics(&text)
        .unwrap_or_else(|e| panic!("not OpenMetrics: {e:?}\n{text}"));

    let cpu = [("device", "cpu")];
    let shm = [("device", "shm")];
    assert_eq!(
        value(
            &m,
            "memcoord_allocated_bytes",
            &[("device", "cpu"), ("type", "Cache")]
        ),
        (3 * MIB) as f64
    );
    assert_eq!(
        value(
            &m,
            "memcoord_allocated_bytes",
            &[("device", "cpu"), ("type", "General")]
        ),
        MIB as f64
    );
    assert_eq!(value(&m, "memcoord_budget_bytes", &cpu), (64 * MIB) as f64);
    assert_eq!(
        value(
            &m,
            "memcoord_allocations",
            &[("device", "cpu"), ("type", "General")]
        ),
        2.0
    );
    assert_eq!(value(&m, "memcoord_allocation_failures", &cpu), 1.0);
    assert_eq!(
        value(
            &m,
            "memcoord_transfer_bytes",
            &[("device", "shm"), ("direction", "in")]
        ),
        (2 * MIB) as f64
    );
    assert_eq!(
        value(
            &m,
            "memcoord_transfer_bytes",
            &[("device", "cpu"), ("direction", "out")]
        ),
        (2 * MIB) as f64
    );
    assert_eq!(
        value(&m, "memcoord_transfers", &[("status", "Completed")]),
        1.0
    );
    assert_eq!(
        value(&m, "memcoord_model_resident_bytes", &[("model", "unet")]),
        (4 * MIB) as f64
    );
    assert_eq!(
        value(&m, "memcoord_model_leases", &[("model", "unet")]),
        1.0
    );
    assert_eq!(
        value(
            &m,
            "memcoord_model_state",
            &[("model", "unet"), ("state", "Loaded")]
        ),
        1.0
    );
    assert_eq!(value(&m, "memcoord_model_bytes", &shm), (4 * MIB) as f64);
    assert_eq!(value(&m, "memcoord_allocation_duration_seconds", &cpu), 5.0);
    let usage = value(&m, "memcoord_budget_usage_ratio", &cpu);
    assert!((usage - 4.0 / 64.0).abs() < 1e-9, "{usage}");
    let frag = value(&m, "memcoord_fragmentation_ratio", &cpu);
    assert!((0.0..=1.0).contains(&frag));
    // Moderate: a refusal in the last minute.
    assert_eq!(value(&m, "memcoord_pressure_level", &cpu), 2.0);
    assert_eq!(value(&m, "memcoord_build_info", &[]), 1.0);
    for f in [
        "memcoord_device_memory_capacity_bytes",
        "memcoord_reserved_bytes",
        "memcoord_pressure_stall_seconds",
    ] {
        assert!(value(&m, f, &cpu) >= 0.0);
    }
    // Per tenant (section 8.2): without tenants every allocation is `default`'s.
    assert!(
        value(
            &m,
            "memcoord_tenant_allocated_bytes",
            &[("tenant", "default"), ("device", "cpu")]
        ) > 0.0
    );
    // Bounded labels only: never an id (tenants are the config file's, a bounded set).
    for f in m.families.values() {
        for label in f.get_label_names() {
            assert!(
                [
                    "device",
                    "type",
                    "model",
                    "state",
                    "direction",
                    "status",
                    "version",
                    "tenant",
                    "le"
                ]
                .contains(&label.as_str()),
                "{}: label {label}",
                f.family_name
            );
        }
        assert!(f.family_name.starts_with("memcoord_"), "{}", f.family_name);
    }

    // Without asking for OpenMetrics: Prometheus' text format, which promtool checks.
    let (content_type, plain) = get(port, "/metrics", "*/*");
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    assert!(plain.contains("# TYPE memcoord_allocations_total counter"));
    openmetrics_parser::prometheus::parse_prometheus(&plain)
        .unwrap_or_else(|e| panic!("not Prometheus text: {e:?}"));
    let promtool = std::env::var("PROMTOOL").unwrap_or_else(|_| "promtool".to_string());
    match std::process::Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        Ok(mut child) => {
            child
                .stdin
                .take()
                .unwrap()
                .write_all(plain.as_bytes())
                .unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "promtool check metrics: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Err(_) => eprintln!("promtool not found ({promtool}): skipping `promtool check metrics`"),
    }
    let (_, health) = get(port, "/healthz", "*/*");
    assert_eq!(health, "ok\n");
    w.close();
    let _ = std::fs::remove_dir_all(&root);
}
