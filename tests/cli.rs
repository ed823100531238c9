//! The CLI views against a running server (`--url`; the server in this process, the CLI the
//! process under test) and in process: tables for people, JSON for scripts, `top` frames, shell
//! completions.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use common::inproc::InProcessServer;
use common::{Allocate, GetPressure, typed};
use memcoord::transport::server::ServeOptions;
use serde_json::{Value, json};
use std::process::Command;

fn memcoord(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(common::BIN).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn views_against_a_server_show_what_the_api_made() {
    let s = InProcessServer::start("64MiB", "64MiB", |svc| svc, ServeOptions::default());
    let url = format!("http://127.0.0.1:{}", s.port);
    let a = s.post(
        "/v1/allocations",
        &json!({"device_id": "shm", "size_bytes": 3 << 20, "allocation_type": "Activations", "purpose": "latents"}),
    );
    let id = typed::<Allocate>(a.json())
        .unwrap()
        .allocation
        .allocation_id;

    let (ok, out, err) = memcoord(&["allocs", "--url", &url, "--json"]);
    assert!(ok, "{err}");
    // The CLI's own JSON (allocations of every device: no `device_id`), read as written.
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["total_count"], 1);
    assert_eq!(v["allocations"][0]["allocation_id"], json!(id));
    let (ok, out, _) = memcoord(&["allocs", "--url", &url, "--device", "shm"]);
    assert!(ok);
    assert!(out.starts_with("ID"), "{out}");
    assert!(
        out.contains(&id) && out.contains("3.00 MiB") && out.contains("latents"),
        "{out}"
    );

    let (ok, out, _) = memcoord(&["devices", "--url", &url]);
    assert!(ok);
    assert!(out.contains("shm") && out.contains("64.00 MiB"), "{out}");
    let (ok, out, _) = memcoord(&["pressure", "--url", &url, "--json"]);
    assert!(ok);
    let v: <GetPressure as common::ActionSpec>::Response = serde_json::from_str(&out).unwrap();
    assert_eq!(v.devices.len(), 2);
    let (ok, out, _) = memcoord(&["models", "--url", &url]);
    assert!(ok && out.starts_with("MODEL"), "{out}");
    let (ok, out, _) = memcoord(&["status", "--url", &url]);
    assert!(ok && out.contains("LEVEL"), "{out}");
    let (ok, out, _) = memcoord(&[
        "top",
        "--url",
        &url,
        "--iterations",
        "2",
        "--interval",
        "0.1",
    ]);
    assert!(ok);
    assert_eq!(out.matches("memcoord top").count(), 2, "two frames: {out}");
    assert!(out.contains(&id));

    // A server that is not there: a clear error, exit 2.
    let (ok, _, err) = memcoord(&["devices", "--url", "http://127.0.0.1:9"]);
    assert!(!ok);
    assert!(err.contains("127.0.0.1:9"), "{err}");
}

#[test]
fn views_in_process_and_completions() {
    let (ok, out, err) = memcoord(&["devices", "--no-gpu", "--budget", "cpu=1GiB", "--json"]);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert!(
        v["devices"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["memory_info"]["device_id"] == "cpu"
                && d["usage_stats"]["budget_bytes"] == 1u64 << 30)
    );
    let (ok, out, _) = memcoord(&["status", "--no-gpu"]);
    assert!(ok && out.contains("DEVICE") && out.contains("cpu"), "{out}");
    let (ok, out, _) = memcoord(&["completions", "bash"]);
    assert!(
        ok && out.contains("memcoord") && out.contains("allocs"),
        "completions"
    );
}
