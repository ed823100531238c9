//! Issue 19, items 1 and 2: the worker never dies of SIGBUS in its `shm` memory, whether a tmpfs
//! runs full under concurrent large allocations and copies, or a client truncates the `shm` file
//! through its handle path. A page taken away is an error for the request that touched it.
//!
//! These tests spawn the worker (a SIGBUS kills a process, and only a process shows it). The
//! full-tmpfs one mounts a small tmpfs of its own (root only); where it cannot, it prints a
//! `SKIPPED:` line.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use common::{Allocate, GetAllocations, Requests, Transfer, Worker, map, pattern};
use memcoord::protocol::{ErrorCode, TransferStatus};
use serde_json::{Value, json};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

/// A tmpfs of `size` mounted for one test, unmounted when dropped.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    fn mount(name: &str, size: &str) -> Result<Tmpfs, String> {
        let dir = std::env::temp_dir().join(format!("memcoord-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .output()
            .map_err(|e| format!("mount: {e}"))?;
        if !out.status.success() {
            let _ = std::fs::remove_dir(&dir);
            return Err(format!(
                "cannot mount a tmpfs (needs root): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Tmpfs { dir })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.dir)
            .status();
        let _ = std::fs::remove_dir(&self.dir);
    }
}

fn config(dir: &Path, shm_dir: &Path, budgets: &str) -> PathBuf {
    let path = dir.join("memcoord.toml");
    std::fs::write(
        &path,
        format!(
            "shm_dir = \"{}\"\n[budgets]\n{budgets}\n",
            shm_dir.display()
        ),
    )
    .unwrap();
    path
}

fn died_of_signal(w: &mut Worker) -> Option<i32> {
    std::thread::sleep(Duration::from_millis(50));
    match w.wait_exit_now() {
        Some(status) => status.signal(),
        None => None,
    }
}

fn id_of(v: &Value) -> Option<String> {
    v["data"]["allocation"]["allocation_id"]
        .as_str()
        .map(str::to_string)
}

/// A client truncates the `shm` file (through the handle path it was given) under live
/// allocations; the worker then reads and writes them (a move to `cpu`, a copy back, a
/// defragment). Each request that touched a page past the cut fails with the contract's
/// code and says why; the worker stays up, gives the file its length back and keeps serving.
#[test]
fn a_client_truncating_the_shm_file_is_an_error_not_a_signal() {
    let mut w = Worker::spawn(&["--no-gpu", "--budget", "cpu=64MiB", "--budget", "shm=64MiB"]);
    let a = w
        .send::<Allocate>(json!({"device_id": "shm", "size_bytes": 8 * MIB, "purpose": "victim"}))
        .unwrap()
        .allocation;
    let id = a.allocation_id;
    let handle = a.handle.unwrap();
    let (path, offset) = (handle.path, handle.offset);
    {
        let mut m = map(&path);
        m[offset as usize..(offset + 8 * MIB) as usize]
            .copy_from_slice(&pattern(7, (8 * MIB) as usize));
    }
    let len = std::fs::metadata(&path).unwrap().len();
    // The client's mistake (or malice): cut the file to nothing.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(0)
        .unwrap();

    let e = w
        .send::<Transfer>(
            json!({"allocation_id": id, "source_device_id": "shm", "destination_device_id": "cpu",
                   "mode": "copy", "wait_for_completion": true}),
        )
        .unwrap_err();
    let message = e.message;
    assert_eq!(e.code, ErrorCode::TransferFailed, "{message}");
    assert!(
        message.contains("truncated") && message.contains("source is intact"),
        "the message says what happened: {message}"
    );
    assert_eq!(died_of_signal(&mut w), None, "the worker is alive");
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        len,
        "the worker gave its file its length back"
    );

    // It keeps serving, shm included: a new allocation is written and read back exactly.
    let cpu = w.allocate("cpu", 4 * MIB);
    let moved = w
        .send::<Transfer>(
            json!({"allocation_id": cpu, "source_device_id": "cpu", "destination_device_id": "shm",
                   "wait_for_completion": true}),
        )
        .unwrap();
    assert_eq!(moved.status, TransferStatus::Completed);
    let listed = w
        .send::<GetAllocations>(json!({"device_id": "shm"}))
        .unwrap();
    let a = listed
        .allocations
        .into_iter()
        .find(|a| a.allocation_id == cpu)
        .unwrap();
    let at = a.handle.unwrap().offset as usize;
    {
        let mut m = map(&path);
        m[at..at + (4 * MIB) as usize].copy_from_slice(&pattern(9, (4 * MIB) as usize));
        assert!(m[at..at + (4 * MIB) as usize] == pattern(9, (4 * MIB) as usize)[..]);
    }
    // Cut it again, this time to the middle of the live allocations, then defragment and free:
    // no signal, and every request is answered.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(offset + 4096)
        .unwrap();
    let r = w.request("memory.defragment", json!({"device_id": "shm"}));
    assert!(r["status_code"].is_u64(), "{r}");
    w.ok("memory.deallocate", json!({"allocation_id": id}));
    w.ok("memory.deallocate", json!({"allocation_id": cpu}));
    assert_eq!(died_of_signal(&mut w), None, "the worker is alive");
    assert!(w.close(Duration::from_secs(10)).success());
}

/// The probe's scenario (issue 19, item 1): the shm budget above the tmpfs's size, and
/// pipelined bursts of large shm allocates (16–40 MiB plus odd bytes, `timeout_seconds: 0`),
/// small cpu→shm copies, deallocates and defragments. Before the fix, 9 of 150 workers died of
/// SIGBUS (a large allocation's boundary page marked backed before another thread backed it).
/// Now every request is answered, with OUT_OF_MEMORY where the tmpfs is full, and no worker dies.
#[test]
fn a_full_tmpfs_under_concurrent_large_allocations_never_kills_the_worker() {
    let tmpfs = match Tmpfs::mount("tmpfs64", "64m") {
        Ok(t) => t,
        Err(why) => {
            println!("SKIPPED: a_full_tmpfs_under_concurrent_large_allocations: {why}");
            return;
        }
    };
    let scratch = std::env::temp_dir().join(format!("memcoord-fullshm-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    let cfg = config(&scratch, &tmpfs.dir, "cpu = \"256MiB\"\nshm = \"128MiB\"");
    let (mut workers, mut requests, mut out_of_memory) = (0, 0u64, 0u64);
    let started = Instant::now();
    let mut seed = 0x5eed_u64;
    let mut rnd = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    // `MEMCOORD_STRESS_WORKERS=150` repeats the probe's run (docs/reliability.md).
    let (max_workers, max_time) = match std::env::var("MEMCOORD_STRESS_WORKERS") {
        Ok(n) => (n.parse().unwrap_or(12), Duration::from_secs(3600)),
        Err(_) => (12, Duration::from_secs(20)),
    };
    while workers < max_workers && started.elapsed() < max_time {
        workers += 1;
        let mut w = Worker::spawn(&["--no-gpu", "--config", cfg.to_str().unwrap()]);
        let mut live_shm: Vec<String> = Vec::new();
        let mut live_cpu: Vec<String> = Vec::new();
        for _round in 0..8 {
            let mut ids = Vec::new();
            for _ in 0..24 {
                let id = match rnd(10) {
                    0..=3 => w.submit(
                        "memory.allocate",
                        json!({"device_id": "shm", "size_bytes": (16 + rnd(25)) * MIB + rnd(4096) + 1,
                               "timeout_seconds": 0}),
                    ),
                    4 => w.submit(
                        "memory.allocate",
                        json!({"device_id": "cpu", "size_bytes": 64 * 1024 + rnd(4096),
                               "timeout_seconds": 0}),
                    ),
                    5 | 6 if !live_cpu.is_empty() => {
                        let src = &live_cpu[rnd(live_cpu.len() as u64) as usize];
                        w.submit(
                            "memory.transfer",
                            json!({"allocation_id": src, "source_device_id": "cpu",
                                   "destination_device_id": "shm", "mode": "copy",
                                   "wait_for_completion": true}),
                        )
                    }
                    7 if !live_shm.is_empty() => {
                        let victim = live_shm.swap_remove(rnd(live_shm.len() as u64) as usize);
                        w.submit("memory.deallocate", json!({"allocation_id": victim}))
                    }
                    8 => w.submit("memory.defragment", json!({"device_id": "shm"})),
                    _ => w.submit("memory.get_usage", json!({"device_id": "shm"})),
                };
                ids.push(id);
            }
            for id in ids {
                let v = w.wait_for(&id, Duration::from_secs(60));
                requests += 1;
                if v["error_code"] == "OUT_OF_MEMORY" {
                    out_of_memory += 1;
                }
                if let Some(a) = id_of(&v) {
                    match v["data"]["device_id"].as_str() {
                        Some("shm") => live_shm.push(a),
                        _ => live_cpu.push(a),
                    }
                } else if v["data"]["destination_allocation_id"].is_string()
                    && v["data"]["status"] == "Completed"
                    && let Some(a) = v["data"]["destination_allocation_id"].as_str()
                {
                    live_shm.push(a.to_string());
                }
            }
            assert_eq!(
                died_of_signal(&mut w),
                None,
                "worker {workers} died after {requests} requests"
            );
        }
        assert!(w.close(Duration::from_secs(20)).success());
    }
    println!(
        "full tmpfs: {workers} workers, {requests} requests ({out_of_memory} OUT_OF_MEMORY), \
         deaths: 0"
    );
    let _ = std::fs::remove_dir_all(&scratch);
}
