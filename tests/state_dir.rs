//! `--state-dir`: persistent `shm` allocations survive the worker, killed (SIGKILL) or stopped;
//! the next worker with the same directory adopts them with the same ids, bytes and handles,
//! and nothing else of the earlier one is left in /dev/shm.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use common::{Allocate, Requests, Worker, filled_shm, map, pattern};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::Duration;

const MIB: u64 = 1 << 20;

fn worker(dir: &std::path::Path) -> Worker {
    common::state_dir_worker(dir, &[])
}

fn shm_allocations(w: &mut Worker) -> BTreeMap<String, Value> {
    let d = w.ok("memory.get_allocations", json!({"device_id": "shm"}));
    d["allocations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["allocation_id"].as_str().unwrap().to_string(), a.clone()))
        .collect()
}

fn verify(path: &str, offset: u64, size: u64, seed: u64) {
    let m = map(path);
    assert!(
        m[offset as usize..(offset + size) as usize] == pattern(seed, size as usize)[..],
        "bytes at {offset} of {path} changed"
    );
}

fn stale_files(pids: &[u32]) -> Vec<String> {
    std::fs::read_dir("/dev/shm")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|n| {
            pids.iter()
                .any(|p| n.starts_with(&format!("memcoord-{p}-")))
        })
        .collect()
}

#[test]
fn persistent_shm_allocations_survive_sigkill_and_restart() {
    let dir = std::env::temp_dir().join(format!("memcoord-state-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut w = worker(&dir);
    let (a, path, a_off) = filled_shm(&mut w, MIB, true, 1);
    let (_b, _, _) = filled_shm(&mut w, 2 * MIB, false, 2);
    let (d, _, d_off) = filled_shm(&mut w, 3 * MIB + 100, true, 3);
    w.ok(
        "memory.allocate",
        json!({"device_id": "cpu", "size_bytes": MIB, "persistent": true}),
    );
    let before = shm_allocations(&mut w);
    let first_pid = w.pid();
    w.kill();

    // Adopted: same ids, sizes, handles, bytes; the non-persistent one and cpu's are gone.
    let mut w = worker(&dir);
    let after = shm_allocations(&mut w);
    assert_eq!(after.keys().collect::<Vec<_>>(), {
        let mut k = vec![&a, &d];
        k.sort();
        k
    });
    for id in [&a, &d] {
        for field in [
            "size_bytes",
            "handle",
            "allocation_type",
            "purpose",
            "persistent",
            "created_at",
        ] {
            assert_eq!(after[id][field], before[id][field], "{id} {field}");
        }
    }
    verify(&path, a_off, MIB, 1);
    verify(&path, d_off, 3 * MIB + 100, 3);
    assert_eq!(w.stats("shm").allocated_bytes, 4 * MIB + 100);
    assert_eq!(w.stats("cpu").allocation_count, 0);
    assert!(
        stale_files(&[first_pid]).is_empty(),
        "{:?}",
        stale_files(&[first_pid])
    );
    // New allocations get new ids beside the adopted ones, and work.
    let (e, _, e_off) = filled_shm(&mut w, MIB, false, 5);
    assert!(e != a && e != d);
    verify(&path, e_off, MIB, 5);
    verify(&path, a_off, MIB, 1);

    // A graceful stop keeps them too; a deallocation is recorded.
    w.ok("memory.deallocate", json!({"allocation_id": a}));
    assert!(w.close(Duration::from_secs(10)).success());
    let mut w = worker(&dir);
    let after = shm_allocations(&mut w);
    assert_eq!(after.keys().collect::<Vec<_>>(), vec![&d]);
    verify(&path, d_off, 3 * MIB + 100, 3);
    // Freed with force by a clear: recorded before the answer, so a kill right after keeps
    // nothing.
    w.ok("memory.clear", json!({"device_id": "shm", "force": true}));
    let pid = w.pid();
    w.kill();
    let mut w = worker(&dir);
    assert!(shm_allocations(&mut w).is_empty());
    assert!(stale_files(&[first_pid, pid]).is_empty());
    assert!(w.close(Duration::from_secs(10)).success());
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn without_a_state_dir_nothing_outlives_the_worker() {
    let mut w = Worker::small();
    let path = w
        .send::<Allocate>(json!({"device_id": "shm", "size_bytes": MIB, "persistent": true}))
        .unwrap()
        .allocation
        .handle
        .unwrap()
        .path;
    assert!(w.close(Duration::from_secs(10)).success());
    assert!(!std::path::Path::new(&path).exists(), "{path} left behind");
}

#[test]
fn one_worker_per_state_dir() {
    let dir = std::env::temp_dir().join(format!("memcoord-state-lock-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut first = worker(&dir);
    let (id, path, off) = filled_shm(&mut first, MIB, true, 9);
    let out = std::process::Command::new(common::BIN)
        .args([
            "worker",
            "--no-gpu",
            "--budget",
            "cpu=64MiB",
            "--budget",
            "shm=64MiB",
            "--state-dir",
        ])
        .arg(&dir)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use by another worker"), "{err}");
    // The first worker's allocation is untouched.
    verify(&path, off, MIB, 9);
    assert!(shm_allocations(&mut first).contains_key(&id));
    first.kill();
    // Killed: the lock went with it.
    let mut again = worker(&dir);
    assert!(shm_allocations(&mut again).contains_key(&id));
    again.ok("memory.clear", json!({"device_id": "shm", "force": true}));
    assert!(again.close(Duration::from_secs(10)).success());
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_dir_all(&dir);
}
