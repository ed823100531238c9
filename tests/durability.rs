//! Issue 19, items 3, 4 and 7: "persistent" means durable, and no file or page outlives its
//! purpose.
//!
//! - A transfer onto `shm` is on disk once it reads Completed, waited for or not.
//! - The state file is written before the memory it no longer lists is given back: a crash
//!   between the two (injected there, `MEMCOORD_TEST_FAILPOINT`) loses nothing the worker
//!   reported, and never serves a listed allocation as zeros.
//! - A state that lists allocations whose `shm` file is gone drops them instead of serving zeros.
//! - A clean exit keeps only persistent pages (and no file at all when none is left); a state
//!   directory's file goes once the directory is gone; a failed model load keeps no cache.
//!
//! They spawn the worker: SIGKILL and restarts are what only a process shows.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use common::inproc::InProcessWorker;
use common::{
    Allocate, BIN, GetAllocations, GetTransfer, Requests, Transfer, Worker, filled_shm, map,
    pattern,
};
use memcoord::protocol::{MemoryAllocation, MemoryTransfer, TransferStatus};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

fn state_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("memcoord-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn worker(dir: &Path) -> Worker {
    common::state_dir_worker(dir, &[])
}

/// A worker that kills itself (SIGKILL) right after its `n`th state file write (the child's
/// own environment: tests run in threads, and set_var would race them).
fn worker_crashing_after_state_write(dir: &Path, n: u64) -> Worker {
    common::state_dir_worker(
        dir,
        &[("MEMCOORD_TEST_FAILPOINT", &format!("state-written:{n}"))],
    )
}

fn listed(w: &mut Worker, device: &str) -> Vec<MemoryAllocation> {
    w.send::<GetAllocations>(json!({"device_id": device}))
        .unwrap()
        .allocations
}

fn find(w: &mut Worker, device: &str, id: &str) -> Option<MemoryAllocation> {
    listed(w, device)
        .into_iter()
        .find(|a| a.allocation_id == id)
}

fn bytes_at(path: &str, offset: u64, size: u64) -> Vec<u8> {
    map(path)[offset as usize..(offset + size) as usize].to_vec()
}

fn wait_completed(w: &mut Worker, transfer_id: &str) -> MemoryTransfer {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let t = w
            .send::<GetTransfer>(json!({"transfer_id": transfer_id}))
            .unwrap();
        if t.status != TransferStatus::Running && t.status != TransferStatus::Queued {
            return t;
        }
        assert!(Instant::now() < deadline, "transfer still running: {t:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Item 3: a persistent allocation moved shm→cpu and back cpu→shm without waiting, and a
/// persistent cpu allocation copied onto shm without waiting: once `get_transfer` says
/// Completed, a SIGKILL keeps both, with their bytes.
#[test]
fn transfers_onto_shm_without_waiting_are_durable_once_completed() {
    let dir = state_dir("durable-transfer");
    let mut w = worker(&dir);
    let size = 3 * MIB + 123;
    let (x, path, _) = filled_shm(&mut w, size, true, 31);
    for (from, to) in [("shm", "cpu"), ("cpu", "shm")] {
        let t = w
            .send::<Transfer>(
                json!({"allocation_id": x, "source_device_id": from, "destination_device_id": to}),
            )
            .unwrap();
        let done = wait_completed(&mut w, &t.transfer_id);
        assert_eq!(done.status, TransferStatus::Completed, "{done:?}");
    }
    let y = w
        .send::<Allocate>(json!({"device_id": "cpu", "size_bytes": MIB, "persistent": true}))
        .unwrap()
        .allocation
        .allocation_id;
    let t = w
        .send::<Transfer>(
            json!({"allocation_id": y, "source_device_id": "cpu", "destination_device_id": "shm",
                   "mode": "copy"}),
        )
        .unwrap();
    let done = wait_completed(&mut w, &t.transfer_id);
    assert_eq!(done.status, TransferStatus::Completed, "{done:?}");
    let y_copy = done.destination_allocation_id.unwrap();
    let x_now = find(&mut w, "shm", &x).expect("moved back onto shm");
    let x_off = x_now.handle.as_ref().unwrap().offset;
    assert_eq!(bytes_at(&path, x_off, size), pattern(31, size as usize));
    w.kill();

    let mut w = worker(&dir);
    let x_after = find(&mut w, "shm", &x).expect("the moved allocation survived the SIGKILL");
    assert_eq!(x_after.handle, x_now.handle);
    assert_eq!(bytes_at(&path, x_off, size), pattern(31, size as usize));
    assert!(
        find(&mut w, "shm", &y_copy).is_some(),
        "the copy survived the SIGKILL"
    );
    w.ok("memory.clear", json!({"device_id": "shm", "force": true}));
    assert!(w.close(Duration::from_secs(10)).success());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Item 4: the worker is killed exactly between writing the state file and giving back the
/// memory it no longer lists, once after a deallocate and once after a move off shm. Nothing
/// it reported is lost: at the crash the freed allocation's pages still hold their bytes (they
/// went back only after the state), the next worker does not list it (no zeros served under a
/// live id), and the allocation that was not touched is adopted with every byte.
#[test]
fn a_crash_between_the_state_write_and_the_page_release_serves_no_zeros() {
    let dir = state_dir("durable-torn");
    let mut w = worker(&dir);
    let (x, path, x_off) = filled_shm(&mut w, 2 * MIB + 77, true, 41);
    let (y, _, y_off) = filled_shm(&mut w, MIB, true, 42);
    let (z, _, z_off) = filled_shm(&mut w, 5 * MIB, true, 43);
    w.kill();

    for (victim, off, size, seed, request) in [
        (
            &x,
            x_off,
            2 * MIB + 77,
            41,
            json!({"action": "memory.deallocate", "data": {"allocation_id": x}}),
        ),
        (
            &z,
            z_off,
            5 * MIB,
            43,
            json!({"action": "memory.transfer", "data": {"allocation_id": z,
                   "source_device_id": "shm", "destination_device_id": "cpu",
                   "wait_for_completion": true}}),
        ),
    ] {
        // The first state write after adoption is this request's.
        let mut w = worker_crashing_after_state_write(&dir, 1);
        assert!(find(&mut w, "shm", victim).is_some());
        let id = w.submit(request["action"].as_str().unwrap(), request["data"].clone());
        let status = w.wait_exit(Duration::from_secs(10));
        assert!(!status.success(), "killed at the failpoint (request {id})");
        // At the crash: the state no longer lists the victim, and its pages were not given
        // back before that.
        let state = std::fs::read_to_string(dir.join("state.json")).unwrap();
        assert!(!state.contains(victim.as_str()), "{state}");
        assert_eq!(
            bytes_at(&path, off, size),
            pattern(seed, size as usize),
            "pages went back before the state file said so"
        );
        let mut w = worker(&dir);
        assert!(
            find(&mut w, "shm", victim).is_none(),
            "a dropped allocation is not served again"
        );
        let kept = find(&mut w, "shm", &y).expect("the untouched allocation is adopted");
        assert_eq!(kept.handle.unwrap().offset, y_off);
        assert_eq!(bytes_at(&path, y_off, MIB), pattern(42, MIB as usize));
        w.kill();
    }
    let mut w = worker(&dir);
    w.ok("memory.clear", json!({"device_id": "shm", "force": true}));
    assert!(w.close(Duration::from_secs(10)).success());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Item 4: the state lists allocations, but their `shm` file is gone (a reboot clears
/// /dev/shm). They are dropped, and the state rewritten without them; nothing is served as
/// zeros under their ids.
#[test]
fn a_state_whose_shm_file_is_gone_drops_its_allocations() {
    let dir = state_dir("durable-gone");
    let mut w = worker(&dir);
    let (x, path, _) = filled_shm(&mut w, MIB, true, 51);
    w.kill();
    std::fs::remove_file(&path).unwrap();
    let mut w = worker(&dir);
    assert!(
        find(&mut w, "shm", &x).is_none(),
        "an allocation whose bytes are gone is not adopted"
    );
    assert_eq!(w.stats("shm").allocated_bytes, 0);
    let state = std::fs::read_to_string(dir.join("state.json")).unwrap();
    assert!(!state.contains(x.as_str()), "{state}");
    assert!(w.close(Duration::from_secs(10)).success());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Item 7: a clean exit keeps only the pages of persistent allocations in the state
/// directory's file, and removes the file once none is left; a later worker removes the file of
/// a state directory that is gone.
#[test]
fn state_files_hold_only_what_persists() {
    let dir = state_dir("durable-files");
    let mut w = worker(&dir);
    let (p, path, _) = filled_shm(&mut w, MIB, true, 61);
    for seed in 0..4 {
        filled_shm(&mut w, 8 * MIB, false, 70 + seed);
    }
    assert!(w.close(Duration::from_secs(10)).success());
    let held = file_bytes(&path);
    assert!(
        held <= MIB + 64 * 1024,
        "the file holds {held} bytes with 1 MiB persistent"
    );
    // The last persistent allocation goes: so does the file.
    let mut w = worker(&dir);
    w.ok("memory.deallocate", json!({"allocation_id": p}));
    assert!(w.close(Duration::from_secs(10)).success());
    assert!(
        !Path::new(&path).exists(),
        "{path} outlived its last allocation"
    );
    assert!(!Path::new(&format!("{path}.dir")).exists());

    // A state directory removed by hand: the next worker on the machine removes its file.
    let mut w = worker(&dir);
    let (_, path, _) = filled_shm(&mut w, MIB, true, 62);
    w.kill();
    assert!(Path::new(&path).exists());
    std::fs::remove_dir_all(&dir).unwrap();
    let out = Command::new(BIN)
        .args(["status", "--no-gpu", "--json"])
        .stdout(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(
        !Path::new(&path).exists(),
        "{path} outlived its state directory"
    );
    assert!(!Path::new(&format!("{path}.dir")).exists());
}

/// Bytes the file holds on its tmpfs.
fn file_bytes(path: &str) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// Item 7: a model load that fails after copying some tensors gives their pages back; the
/// device holds what it held before.
#[test]
fn a_failed_model_load_keeps_no_cache() {
    let root = state_dir("durable-model");
    std::fs::create_dir_all(&root).unwrap();
    // Three F32 tensors of 3, 3 and 5 MiB; the last cannot be placed in the holes left below.
    let elements = |mib: u64| (mib * MIB / 4) as usize;
    common::write_model(
        &root.join("m.safetensors"),
        &[("a", elements(3)), ("b", elements(3)), ("c", elements(5))],
    );
    // In process: no state directory, no crash; nothing here that only a process shows.
    let model_root = root.clone();
    let mut w = InProcessWorker::on_clock_of_the_machine("64MiB", "64MiB", |s| {
        s.with_model_root(model_root)
    });
    // Fill the budget with 4 MiB blocks, free every other one: 4 MiB holes only. A blocker
    // takes the rest of the arena's range.
    let ids: Vec<String> = (0..16).map(|_| w.allocate("shm", 4 * MIB)).collect();
    for id in ids.iter().step_by(2) {
        w.ok("memory.deallocate", json!({"allocation_id": id}));
    }
    w.ok(
        "memory.allocate",
        json!({"device_id": "shm", "size_bytes": 15 * MIB}),
    );
    w.ok(
        "memory.optimize",
        json!({"device_id": "shm", "optimization_type": "ClearCache"}),
    );
    let before = w.stats("shm");
    let (code, message) = w.err(
        "memory.model_load",
        json!({"model_name": "m", "path": "m.safetensors", "device_id": "shm",
               "timeout_seconds": 0}),
    );
    assert_eq!(code, "OUT_OF_MEMORY", "{message}");
    assert!(
        message.contains("so far"),
        "the load failed after copying some tensors: {message}"
    );
    let after = w.stats("shm");
    assert_eq!(after.allocated_bytes, before.allocated_bytes);
    assert!(
        after.reserved_bytes <= before.reserved_bytes,
        "the failed load's pages stay held: {} before, {} after",
        before.reserved_bytes,
        after.reserved_bytes
    );
    drop(w);
    let _ = std::fs::remove_dir_all(&root);
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Item 9: shm files, the state file and the state directory are the owner's only by default
/// (they were 0644: every local user could read client data); `--shm-mode` widens the shm file
/// on purpose, within 0600..0664 (never world-writable).
#[test]
fn state_and_shm_files_are_private() {
    let dir = state_dir("durable-modes");
    let mut w = worker(&dir);
    let (_, state_shm, _) = filled_shm(&mut w, MIB, true, 81);
    assert_eq!(mode(Path::new(&state_shm)), 0o600, "{state_shm}");
    assert_eq!(mode(&dir.join("state.json")), 0o600);
    assert_eq!(mode(&dir.join("lock")), 0o600);
    assert_eq!(mode(&dir), 0o700);
    w.ok("memory.clear", json!({"device_id": "shm", "force": true}));
    assert!(w.close(Duration::from_secs(10)).success());
    let _ = std::fs::remove_dir_all(&dir);

    let mut w = Worker::small();
    let (_, path, _) = filled_shm(&mut w, MIB, false, 82);
    assert_eq!(mode(Path::new(&path)), 0o600, "{path}");
    drop(w);
    let mut w = Worker::spawn(&["--no-gpu", "--budget", "shm=8MiB", "--shm-mode", "0660"]);
    let (_, path, _) = filled_shm(&mut w, MIB, false, 83);
    assert_eq!(mode(Path::new(&path)), 0o660, "{path}");
    drop(w);
    // Execute bits and world-writable modes are refused before anything starts.
    for (refused, why) in [("0777", "execute"), ("0666", "world-writable")] {
        let out = Command::new(BIN)
            .args(["worker", "--no-gpu", "--shm-mode", refused])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{refused}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("--shm-mode") && err.contains(why) && err.contains("0660"),
            "{err}"
        );
    }
}
