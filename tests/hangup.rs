//! A stdio host that goes away (EOF) in the middle of a transfer, a model load and a lease:
//! the worker finishes and answers what was in flight, then releases everything (the lease
//! ends with the session), removes its shm file and exits 0.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use common::{
    GetAllocations, ModelAcquire, ModelLoad, Requests, Transfer, Worker, typed, write_model,
};
use serde_json::json;
use std::time::Duration;

const MIB: u64 = 1 << 20;

#[test]
fn eof_mid_transfer_and_load_finishes_them_then_releases_everything() {
    let root = std::env::temp_dir().join(format!("memcoord-eof-{}", std::process::id()));
    std::fs::create_dir_all(&root).unwrap();
    write_model(
        &root.join("m.safetensors"),
        &[("a", 8 * MIB as usize), ("b", 8 * MIB as usize)],
    );
    let mut w = Worker::spawn(&[
        "--no-gpu",
        "--budget",
        "cpu=256MiB",
        "--budget",
        "shm=256MiB",
        "--model-root",
        root.to_str().unwrap(),
    ]);
    w.ok(
        "memory.model_load",
        json!({"model_name": "vae", "path": "m.safetensors", "device_id": "shm"}),
    );
    let lease = w
        .send::<ModelAcquire>(json!({"model_name": "vae"}))
        .unwrap();
    assert!(!lease.lease_id.is_empty());
    let big = w.allocate("cpu", 96 * MIB);
    let shm_file = w
        .send::<GetAllocations>(json!({"device_id": "shm"}))
        .unwrap()
        .allocations[0]
        .handle
        .clone()
        .unwrap()
        .path;
    // In flight when stdin closes: a 96 MiB move and a second load.
    let t = w.submit(
        "memory.transfer",
        json!({"allocation_id": big, "source_device_id": "cpu", "destination_device_id": "shm", "wait_for_completion": true}),
    );
    let l = w.submit(
        "memory.model_load",
        json!({"model_name": "unet", "path": "m.safetensors", "device_id": "cpu"}),
    );
    let status = w.close(Duration::from_secs(30));
    let answers = w.remaining();
    let answer = |id: &str| {
        answers
            .iter()
            .find(|a| a.get("request_id") == Some(&json!(id)))
            .unwrap_or_else(|| panic!("{id} not answered: {answers:?}"))
            .clone()
    };
    typed::<Transfer>(answer(&t)).unwrap();
    typed::<ModelLoad>(answer(&l)).unwrap();
    assert!(status.success(), "{status:?}");
    assert!(
        !std::path::Path::new(&shm_file).exists(),
        "{shm_file} left behind"
    );
    let _ = std::fs::remove_dir_all(&root);
}
