//! Models through the stdio transport in process (and, for a file cut short mid-load, the real
//! binary): safetensors files made here, loaded onto `shm` and verified byte for byte through
//! the handles; leases, unload, status, and every
//! way a load can fail without leaving anything allocated.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report
#![allow(unsafe_code)] // test code: libc calls and memory maps of its own

mod common;

use common::inproc::InProcessWorker;
use common::{
    Allocate, Deallocate, ErrorCode, GetAllocations, ModelAcquire, ModelLoad, ModelOptimize,
    ModelRelease, ModelStatus, Optimize, Requests, Worker, typed, write_model,
};
use memcoord::protocol::{MemoryAllocation, MemoryAllocationType, ModelState};
use serde_json::json;
use std::collections::HashMap;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};

const MIB: u64 = 1 << 20;

struct Root(PathBuf);

impl Root {
    fn new(tag: &str) -> Root {
        let dir =
            std::env::temp_dir().join(format!("memcoord-models-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Root(dir)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A worker in process over `cpu` and `shm` of `budget` each, loading models from `root`.
fn worker(root: &Root, budget: &str) -> InProcessWorker {
    let dir = root.path().to_path_buf();
    InProcessWorker::on_clock_of_the_machine(budget, budget, |s| s.with_model_root(dir))
}

/// [`worker`] as a process of its own (for what must never take the test down with it).
fn spawned_worker(root: &Root, budget: &str) -> Worker {
    Worker::spawn(&[
        "--budget",
        &format!("cpu={budget}"),
        "--budget",
        &format!("shm={budget}"),
        "--model-root",
        root.path().to_str().unwrap(),
    ])
}

fn model_allocations(w: &mut impl Requests, device: &str, model: &str) -> Vec<MemoryAllocation> {
    w.send::<GetAllocations>(json!({"device_id": device, "owner": format!("model:{model}")}))
        .unwrap()
        .allocations
}

#[test]
fn a_model_loads_byte_for_byte_and_unloads() {
    let root = Root::new("load");
    let tensors = [
        ("unet.conv.weight", 300_000),
        ("unet.conv.bias", 17),
        ("vae.decoder", 1_000_000),
    ];
    let bytes = write_model(&root.path().join("sdxl.safetensors"), &tensors);
    let mut w = worker(&root, "64MiB");

    let m = w
        .send::<ModelLoad>(
            json!({"model_name": "sdxl", "path": "sdxl.safetensors", "device_id": "shm", "keep_alive_seconds": 600}),
        )
        .unwrap();
    assert_eq!(m.model_name, "sdxl");
    assert_eq!(m.device_id, "shm");
    assert_eq!(m.resident_device_id, "shm");
    assert_eq!(m.state, ModelState::Loaded);
    assert_eq!(m.tensor_count, 3);
    assert_eq!(m.size_bytes, (300_000 + 17 + 1_000_000) * 4);
    assert_eq!(m.keep_alive_seconds, Some(600.0));
    assert!(m.path.ends_with("sdxl.safetensors"));

    // Every tensor, byte for byte, through the shm handles.
    let allocs = model_allocations(&mut w, "shm", "sdxl");
    assert_eq!(allocs.len(), 3);
    for a in &allocs {
        assert_eq!(a.allocation_type, MemoryAllocationType::ModelWeights);
        assert_eq!(a.owner, "model:sdxl");
    }
    verify_on_shm(&mut w, "sdxl", &bytes);
    assert_eq!(w.stats("shm").model_bytes, m.size_bytes);

    // Status, leases, unload.
    let st = w.send::<ModelStatus>(json!({"device_id": "shm"})).unwrap();
    assert_eq!(st.models[0].model_name, "sdxl");
    assert_eq!(st.model_bytes, m.size_bytes);
    assert_eq!(st.model_budget_bytes, 64 * MIB);
    let lease = w
        .send::<ModelAcquire>(json!({"model_name": "sdxl"}))
        .unwrap();
    let lease_id = lease.lease_id;
    assert_eq!(lease.model.model_name, "sdxl");
    let (code, _) = w.err("memory.model_unload", json!({"model_name": "sdxl"}));
    assert_eq!(code, "MODEL_IN_USE");
    // A model's allocation cannot be freed or transferred by a client.
    let a0 = allocs[0].allocation_id.clone();
    assert_eq!(
        w.err("memory.deallocate", json!({"allocation_id": a0})).0,
        "ALLOCATION_IN_USE"
    );
    assert_eq!(
        w.err(
            "memory.transfer",
            json!({"allocation_id": a0, "source_device_id": "shm", "destination_device_id": "cpu"})
        )
        .0,
        "ALLOCATION_IN_USE"
    );
    // Loading again from the same file is a use; from another file is refused.
    let again = w
        .send::<ModelLoad>(
            json!({"model_name": "sdxl", "path": "sdxl.safetensors", "device_id": "shm"}),
        )
        .unwrap();
    assert_eq!(again.state, ModelState::Loaded);
    write_model(&root.path().join("other.safetensors"), &[("x", 4)]);
    let (code, msg) = w.err(
        "memory.model_load",
        json!({"model_name": "sdxl", "path": "other.safetensors", "device_id": "shm"}),
    );
    assert_eq!(code, "INVALID_PARAMETER", "{msg}");

    let r = w.ok("memory.model_release", json!({"lease_id": lease_id}));
    assert_eq!(r, json!({"lease_id": lease_id, "model_name": "sdxl"}));
    assert_eq!(
        w.err("memory.model_release", json!({"lease_id": lease_id}))
            .0,
        "LEASE_NOT_FOUND"
    );
    let u = w.ok("memory.model_unload", json!({"model_name": "sdxl"}));
    assert_eq!(
        u,
        json!({"model_name": "sdxl", "freed_bytes": m.size_bytes}),
        "the whole answer"
    );
    assert!(model_allocations(&mut w, "shm", "sdxl").is_empty());
    assert_eq!(w.stats("shm").allocated_bytes, 0);
    assert_eq!(
        w.err("memory.model_status", json!({"model_name": "sdxl"}))
            .0,
        "MODEL_NOT_FOUND"
    );
    assert_eq!(
        w.err("memory.model_unload", json!({"model_name": "sdxl"}))
            .0,
        "MODEL_NOT_FOUND"
    );
    assert_eq!(
        w.err("memory.model_acquire", json!({"model_name": "sdxl"}))
            .0,
        "MODEL_NOT_FOUND"
    );

    // Force unloads a leased model.
    w.ok(
        "memory.model_load",
        json!({"model_name": "small", "path": "other.safetensors", "device_id": "cpu"}),
    );
    w.ok("memory.model_acquire", json!({"model_name": "small"}));
    w.ok(
        "memory.model_unload",
        json!({"model_name": "small", "force": true}),
    );
    assert_eq!(w.stats("cpu").allocated_bytes, 0);
}

#[test]
fn failed_loads_leave_nothing_allocated() {
    let root = Root::new("fail");
    let bytes = std::fs::read({
        write_model(
            &root.path().join("good.safetensors"),
            &[("a", 1000), ("b", 3_000_000)],
        );
        root.path().join("good.safetensors")
    })
    .unwrap();
    // Corrupt header, truncated data, not safetensors at all.
    let mut corrupt = bytes.clone();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    corrupt[8..8 + header_len].fill(b'#'); // the JSON header, garbled
    std::fs::write(root.path().join("corrupt.safetensors"), &corrupt).unwrap();
    std::fs::write(
        root.path().join("truncated.safetensors"),
        &bytes[..bytes.len() / 2],
    )
    .unwrap();
    std::fs::write(root.path().join("text.safetensors"), b"hello").unwrap();
    // A file outside the root, and a symlink to it inside.
    let outside = Root::new("outside");
    write_model(&outside.path().join("secret.safetensors"), &[("s", 10)]);
    std::os::unix::fs::symlink(
        outside.path().join("secret.safetensors"),
        root.path().join("link.safetensors"),
    )
    .unwrap();

    let mut w = worker(&root, "8MiB");
    let before = w.stats("cpu");
    let cases = [
        ("corrupt.safetensors", "MODEL_LOAD_FAILED"),
        ("truncated.safetensors", "MODEL_LOAD_FAILED"),
        ("text.safetensors", "MODEL_LOAD_FAILED"),
        ("missing.safetensors", "MODEL_LOAD_FAILED"),
        (
            "../memcoord-models-outside-x/secret.safetensors",
            "MODEL_LOAD_FAILED",
        ),
        ("link.safetensors", "MODEL_LOAD_FAILED"),
        ("/etc/passwd", "MODEL_LOAD_FAILED"),
        (
            "good.safetensors\u{0}/../../etc/passwd",
            "MODEL_LOAD_FAILED",
        ),
        ("good\u{0}.safetensors", "MODEL_LOAD_FAILED"),
        ("", "INVALID_PARAMETER"),
        // 12 MB of tensors on an 8 MiB budget: the first tensor fits, the second does not.
        ("good.safetensors", "OUT_OF_MEMORY"),
    ];
    for (path, code) in cases {
        let (got, msg) = w.err(
            "memory.model_load",
            json!({"model_name": "m", "path": path, "device_id": "cpu"}),
        );
        assert_eq!(got, code, "{path}: {msg}");
        let after = w.stats("cpu");
        assert_eq!(
            after.allocated_bytes, before.allocated_bytes,
            "{path} left bytes allocated"
        );
        assert_eq!(after.allocation_count, before.allocation_count, "{path}");
        assert_eq!(
            w.err("memory.model_status", json!({"model_name": "m"})).0,
            "MODEL_NOT_FOUND",
            "{path}"
        );
    }
    let traversal = format!(
        "../{}/secret.safetensors",
        outside.path().file_name().unwrap().to_str().unwrap()
    );
    let (got, _) = w.err(
        "memory.model_load",
        json!({"model_name": "m", "path": traversal, "device_id": "cpu"}),
    );
    assert_eq!(got, "MODEL_LOAD_FAILED");
    assert_eq!(
        w.err(
            "memory.model_load",
            json!({"model_name": "m", "path": "good.safetensors", "device_id": "nope"})
        )
        .0,
        "INVALID_DEVICE"
    );
    assert_eq!(
        w.err(
            "memory.model_load",
            json!({"path": "good.safetensors", "device_id": "cpu"})
        )
        .0,
        "INVALID_PARAMETER"
    );
}

fn state_of(w: &mut impl Requests, name: &str) -> (String, String) {
    let st = w.send::<ModelStatus>(json!({"model_name": name})).unwrap();
    let m = &st.models[0];
    (m.state.name().to_string(), m.resident_device_id.clone())
}

fn verify_on_shm(w: &mut impl Requests, name: &str, bytes: &HashMap<String, Vec<u8>>) {
    for a in model_allocations(w, "shm", name) {
        let want = &bytes[&a.purpose];
        let h = a.handle.as_ref().unwrap();
        let off = h.offset as usize;
        let f = OpenOptions::new().read(true).open(&h.path).unwrap();
        let map = unsafe { memmap2::Mmap::map(&f).unwrap() };
        assert!(
            map[off..off + want.len()] == want[..],
            "{name}: tensor {} differs",
            a.purpose
        );
    }
}

#[test]
fn idle_models_are_offloaded_lru_and_restored_byte_for_byte() {
    let root = Root::new("evict");
    // Three 3 MiB models; shm holds 8 MiB of models, cpu has room for offloads.
    let a = write_model(&root.path().join("a.safetensors"), &[("a.w", 786_432)]);
    let b = write_model(
        &root.path().join("b.safetensors"),
        &[("b.w", 700_000), ("b.b", 86_432)],
    );
    write_model(&root.path().join("c.safetensors"), &[("c.w", 786_432)]);
    let dir = root.path().to_path_buf();
    let mut w = InProcessWorker::on_clock_of_the_machine("64MiB", "64MiB", |s| {
        s.with_model_root(dir).with_model_budget("shm", 8 * MIB)
    });
    let load = |w: &mut InProcessWorker, name: &str| {
        w.ok(
            "memory.model_load",
            json!({"model_name": name, "path": format!("{name}.safetensors"), "device_id": "shm"}),
        )
    };
    load(&mut w, "a");
    load(&mut w, "b");
    // a is used after b: b is now the least recently used.
    let lease = w.send::<ModelAcquire>(json!({"model_name": "a"})).unwrap();
    w.send::<ModelRelease>(json!({"lease_id": lease.lease_id}))
        .unwrap();
    load(&mut w, "c");
    assert_eq!(
        state_of(&mut w, "b"),
        ("Offloaded".into(), "cpu".into()),
        "LRU b offloaded"
    );
    assert_eq!(state_of(&mut w, "a").0, "Loaded");
    assert_eq!(model_allocations(&mut w, "cpu", "b").len(), 2);

    // Acquire brings b back (offloading the next LRU, a), without touching the file.
    std::fs::remove_file(root.path().join("b.safetensors")).unwrap();
    let got = w.send::<ModelAcquire>(json!({"model_name": "b"})).unwrap();
    assert_eq!(got.model.state, ModelState::Loaded);
    assert_eq!(got.model.resident_device_id, "shm");
    verify_on_shm(&mut w, "b", &b);
    assert_eq!(state_of(&mut w, "a"), ("Offloaded".into(), "cpu".into()));

    // Leased models are never evicted: with b leased and c the only other model on shm,
    // bringing a back evicts c.
    let a_back = w.send::<ModelAcquire>(json!({"model_name": "a"})).unwrap();
    assert_eq!(a_back.model.state, ModelState::Loaded);
    verify_on_shm(&mut w, "a", &a);
    assert_eq!(state_of(&mut w, "b").0, "Loaded", "leased b stayed");
    assert_eq!(state_of(&mut w, "c"), ("Offloaded".into(), "cpu".into()));

    // With a and b leased, nothing can make room for another model: OUT_OF_MEMORY naming holders.
    write_model(&root.path().join("d.safetensors"), &[("d.w", 786_432)]);
    let (code, msg) = w.err(
        "memory.model_load",
        json!({"model_name": "d", "path": "d.safetensors", "device_id": "shm", "timeout_seconds": 0.3}),
    );
    assert_eq!(code, "OUT_OF_MEMORY", "{msg}");
    assert!(msg.contains("model a") && msg.contains("leased"), "{msg}");

    // A load that waits gets its room when a lease ends meanwhile.
    let waiting = w.submit(
        "memory.model_load",
        json!({"model_name": "d", "path": "d.safetensors", "device_id": "shm", "timeout_seconds": 20}),
    );
    assert!(
        !w.answered_within(&waiting, std::time::Duration::from_millis(300)),
        "the load waits"
    );
    w.send::<ModelRelease>(json!({"lease_id": a_back.lease_id}))
        .unwrap();
    typed::<ModelLoad>(w.wait_for(&waiting, std::time::Duration::from_secs(20))).unwrap();
    assert_eq!(
        state_of(&mut w, "a"),
        ("Offloaded".into(), "cpu".into()),
        "a made room once released"
    );
}

#[test]
fn keep_alive_expiry_model_optimize_and_allocations_that_make_room() {
    let root = Root::new("keepalive");
    write_model(&root.path().join("m.safetensors"), &[("w", 1_048_576)]); // 4 MiB
    // In process, on a clock the test moves: no waiting for the keep-alive.
    let dir = root.path().to_path_buf();
    let (mut w, clock) =
        InProcessWorker::on_manual_clock("12MiB", "12MiB", |s| s.with_model_root(dir));
    w.ok("memory.model_load", json!({"model_name": "brief", "path": "m.safetensors", "device_id": "cpu", "keep_alive_seconds": 0.5}));
    assert!(w.service.sweep_keep_alive().is_empty(), "not expired yet");
    clock.advance(std::time::Duration::from_millis(600));
    // What the sweeper does once a second.
    assert_eq!(w.service.sweep_keep_alive(), vec!["brief".to_string()]);
    assert!(
        w.send::<ModelStatus>(json!({"model_name": "brief"}))
            .is_err()
    );
    assert_eq!(w.stats("cpu").allocated_bytes, 0);

    // An allocation that does not fit makes room by evicting an idle model (cpu: unloaded).
    w.ok(
        "memory.model_load",
        json!({"model_name": "idle", "path": "m.safetensors", "device_id": "cpu"}),
    );
    // One that would not fit even then evicts nothing: a failed request changes nothing.
    let held = w.allocate("cpu", 2 * MIB);
    let (code, _) = w.err(
        "memory.allocate",
        json!({"device_id": "cpu", "size_bytes": 11 * MIB, "timeout_seconds": 0}),
    );
    assert_eq!(code, "OUT_OF_MEMORY");
    assert_eq!(state_of(&mut w, "idle").0, "Loaded");
    assert_eq!(w.stats("cpu").allocated_bytes, 6 * MIB);
    w.ok("memory.deallocate", json!({"allocation_id": held}));
    let d = w
        .send::<Allocate>(json!({"device_id": "cpu", "size_bytes": 10 * MIB, "timeout_seconds": 0}))
        .unwrap();
    assert!(d.message.contains("unloaded model idle"), "{d:?}");
    w.ok("memory.clear", json!({"device_id": "cpu"}));

    // model_optimize.
    for name in ["x", "y"] {
        w.ok(
            "memory.model_load",
            json!({"model_name": name, "path": "m.safetensors", "device_id": "shm"}),
        );
    }
    let lease = w.send::<ModelAcquire>(json!({"model_name": "y"})).unwrap();
    let r = w
        .send::<ModelOptimize>(
            json!({"device_id": "shm", "strategy": "OffloadIdle", "idle_seconds": 0}),
        )
        .unwrap();
    assert_eq!(r.offloaded, ["x"], "{r:?}");
    assert_eq!(r.freed_bytes, 4 * MIB);
    w.send::<ModelRelease>(json!({"lease_id": lease.lease_id}))
        .unwrap();
    let r = w
        .send::<ModelOptimize>(json!({"strategy": "UnloadIdle", "idle_seconds": 3600}))
        .unwrap();
    assert!(r.unloaded.is_empty(), "nothing idle for an hour: {r:?}");
    let r = w
        .send::<ModelOptimize>(
            json!({"device_id": "shm", "strategy": "FitBudget", "target_bytes": 0}),
        )
        .unwrap();
    assert_eq!(r.offloaded.len() + r.unloaded.len(), 1, "{r:?}");
    assert_eq!(
        w.err("memory.model_optimize", json!({"strategy": "Shrink"}))
            .0,
        "INVALID_PARAMETER"
    );
    // EvictIdleModels through memory.optimize.
    let o = w
        .send::<Optimize>(json!({"device_id": "cpu", "optimization_type": "EvictIdleModels"}))
        .unwrap();
    assert!(o.actions[0].starts_with("EvictIdleModels"), "{o:?}");
}

/// Found by the dispatch fuzzer: a load that was waiting for room when its model was unloaded
/// with force, and loaded again by another request, must not take the new entry over.
#[test]
fn a_load_unloaded_with_force_does_not_take_over_a_reload() {
    let root = Root::new("reload-race");
    write_model(&root.path().join("a.safetensors"), &[("a", MIB as usize)]);
    write_model(
        &root.path().join("b.safetensors"),
        &[("b1", 128 << 10), ("b2", 128 << 10)],
    );
    let mut w = worker(&root, "8MiB");
    let fill = w.allocate("shm", 7 * MIB);
    let first = w.submit(
        "memory.model_load",
        json!({"model_name": "m", "path": "a.safetensors", "device_id": "shm", "timeout_seconds": 20}),
    );
    std::thread::sleep(std::time::Duration::from_millis(300));
    w.ok(
        "memory.model_unload",
        json!({"model_name": "m", "force": true}),
    );
    let second = w.submit(
        "memory.model_load",
        json!({"model_name": "m", "path": "b.safetensors", "device_id": "shm", "timeout_seconds": 20}),
    );
    // The second (small) load fits at once; leased, the first cannot evict it for room.
    typed::<ModelLoad>(w.wait_for(&second, std::time::Duration::from_secs(20))).unwrap();
    let lease = w.send::<ModelAcquire>(json!({"model_name": "m"})).unwrap();
    w.send::<Deallocate>(json!({"allocation_id": fill}))
        .unwrap();
    let a = typed::<ModelLoad>(w.wait_for(&first, std::time::Duration::from_secs(20)));
    assert_eq!(
        a.as_ref().unwrap_err().code,
        ErrorCode::ModelNotFound,
        "{a:?}"
    );
    let st = w.send::<ModelStatus>(json!({"model_name": "m"})).unwrap();
    let m = &st.models[0];
    assert!(m.path.ends_with("b.safetensors"), "{m:?}");
    assert_eq!(m.size_bytes, 2 * 4 * (128 << 10));
    let u = w.stats("shm");
    assert_eq!(
        u.allocated_bytes, m.size_bytes,
        "no orphaned tensors: {u:?}"
    );
    assert_eq!(u.allocation_count, 2);
    w.send::<ModelRelease>(json!({"lease_id": lease.lease_id}))
        .unwrap();
    w.ok("memory.model_unload", json!({"model_name": "m"}));
    assert_eq!(w.stats("shm").allocation_count, 0);
}

/// A load (or an acquire) that cannot fit even with every idle model evicted evicts nothing: a
/// failed request changes nothing.
#[test]
fn a_load_that_cannot_fit_evicts_nothing() {
    let root = Root::new("evict-nothing");
    write_model(&root.path().join("m.safetensors"), &[("w", 1_048_576)]); // 4 MiB
    write_model(&root.path().join("big.safetensors"), &[("w", 7 * 262_144)]); // 7 MiB
    let mut w = worker(&root, "12MiB");
    w.ok(
        "memory.model_load",
        json!({"model_name": "idle", "path": "m.safetensors", "device_id": "cpu"}),
    );
    let held = w.allocate("cpu", 6 * MIB);
    // 2 MiB free + 4 MiB of idle model < 7 MiB.
    let (code, _) = w.err(
        "memory.model_load",
        json!({"model_name": "big", "path": "big.safetensors", "device_id": "cpu", "timeout_seconds": 0}),
    );
    assert_eq!(code, "OUT_OF_MEMORY");
    assert_eq!(
        state_of(&mut w, "idle").0,
        "Loaded",
        "the idle model stayed"
    );
    assert_eq!(w.stats("cpu").allocated_bytes, 10 * MIB);
    // Once it would fit, the idle model makes room as before.
    w.ok("memory.deallocate", json!({"allocation_id": held}));
    w.allocate("cpu", 3 * MIB);
    let m = w
        .send::<ModelLoad>(
            json!({"model_name": "big", "path": "big.safetensors", "device_id": "cpu", "timeout_seconds": 0}),
        )
        .unwrap();
    assert_eq!(m.state, ModelState::Loaded);
    assert_eq!(
        w.send::<ModelStatus>(json!({"model_name": "idle"}))
            .unwrap_err()
            .code,
        ErrorCode::ModelNotFound,
        "unloaded to make room (cpu has nowhere to offload to)"
    );
}

/// Issue 19 item 2: a model file cut short (`truncate`) or rewritten in place with a shorter
/// file (`cp other victim`) while the worker reads it. Before, the file was mapped and the
/// worker died of SIGBUS on the first page past the new end; now each load either finishes
/// (the change came after it, or before it opened the file: then byte for byte the file it
/// read) or fails with `MODEL_LOAD_FAILED` saying what happened, and leaves nothing allocated.
/// The change comes 0 to 100 ms into each load, so the trials land at different points of it
/// (tests/model_files.rs hits the read past the new end deterministically, in process).
#[test]
fn a_model_file_cut_short_while_it_loads_never_kills_the_worker() {
    let root = Root::new("changed");
    let victim = root.path().join("victim.safetensors");
    let small = root.path().join("small.safetensors");
    let small_bytes = write_model(&small, &[("s", 1000)]);
    // 64 MiB: 8 tensors of 8 MiB, written once and copied over the victim for each trial.
    let pristine = root.path().join("pristine.safetensors");
    let tensors: Vec<(String, usize)> = (0..8).map(|i| (format!("layer.{i}"), 2 << 20)).collect();
    let tensors: Vec<(&str, usize)> = tensors.iter().map(|(n, s)| (n.as_str(), *s)).collect();
    let bytes = write_model(&pristine, &tensors);
    let len = std::fs::metadata(&pristine).unwrap().len();
    let mut w = spawned_worker(&root, "128MiB");
    let mut outcomes: HashMap<String, u32> = HashMap::new();
    for how in ["truncate", "rewrite"] {
        for delay_ms in [0u64, 1, 3, 10, 30, 100] {
            std::fs::copy(&pristine, &victim).unwrap();
            let id = w.submit(
                "memory.model_load",
                json!({"model_name": "m", "path": "victim.safetensors", "device_id": "shm"}),
            );
            std::thread::sleep(std::time::Duration::from_millis(delay_ms));
            if how == "truncate" {
                OpenOptions::new()
                    .write(true)
                    .open(&victim)
                    .unwrap()
                    .set_len(len / 2)
                    .unwrap();
            } else {
                std::fs::copy(&small, &victim).unwrap(); // opens with O_TRUNC, as cp does
            }
            let r = typed::<ModelLoad>(w.wait_for(&id, std::time::Duration::from_secs(60)));
            let outcome = if let Ok(m) = &r {
                if m.size_bytes == 8 * 4 * (2 << 20) {
                    verify_on_shm(&mut w, "m", &bytes);
                    "loaded before the change"
                } else {
                    assert_eq!(how, "rewrite", "{r:?}");
                    assert_eq!(m.size_bytes, 4000, "{r:?}");
                    verify_on_shm(&mut w, "m", &small_bytes);
                    "loaded the new file"
                }
            } else {
                let e = r.as_ref().unwrap_err();
                assert_eq!(e.code, ErrorCode::ModelLoadFailed, "{r:?}");
                let msg = e.message.as_str();
                if msg.contains("victim.safetensors changed while loading") {
                    assert!(msg.ends_with("load it again once it is written"), "{msg}");
                    "failed: changed while loading"
                } else {
                    assert!(
                        msg.contains("victim.safetensors is not a valid safetensors file"),
                        "{msg}"
                    );
                    "failed: cut short before it was opened"
                }
            };
            *outcomes.entry(format!("{how}: {outcome}")).or_default() += 1;
            if r.is_ok() {
                w.ok("memory.model_unload", json!({"model_name": "m"}));
            }
            let u = w.stats("shm");
            assert_eq!(u.allocated_bytes, 0, "{how} after {delay_ms} ms: {u:?}");
            assert_eq!(u.allocation_count, 0, "{how} after {delay_ms} ms: {u:?}");
        }
    }
    eprintln!("12 loads of a 64 MiB model changed 0-100 ms in: {outcomes:?}; worker deaths: 0");
    // Still alive and serving.
    std::fs::copy(&pristine, &victim).unwrap();
    w.ok(
        "memory.model_load",
        json!({"model_name": "m", "path": "victim.safetensors", "device_id": "shm"}),
    );
}

/// Issue 19 item 8: a folder swapped for a symlink out of the root (and back, atomically, by
/// RENAME_EXCHANGE) while loads resolve a path through it. Before, the path was checked, then
/// opened by name, and the swap in between loaded the file outside; now the kernel resolves
/// the path beneath the root's descriptor on every step, so no load ever reads the outside
/// file, whatever the timing.
#[test]
fn swapping_a_folder_for_a_symlink_never_loads_a_file_outside_the_root() {
    let root = Root::new("swap");
    let outside = Root::new("swap-outside");
    std::fs::create_dir_all(root.path().join("d")).unwrap();
    write_model(&root.path().join("d/m.safetensors"), &[("inside", 16)]);
    write_model(&outside.path().join("m.safetensors"), &[("outside", 32)]);
    std::os::unix::fs::symlink(outside.path(), root.path().join("alt")).unwrap();
    let mut w = worker(&root, "8MiB");

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flips = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let flipper = {
        let (stop, flips) = (stop.clone(), flips.clone());
        let d = std::ffi::CString::new(root.path().join("d").to_str().unwrap()).unwrap();
        let alt = std::ffi::CString::new(root.path().join("alt").to_str().unwrap()).unwrap();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // SAFETY: two NUL-terminated paths alive for the call.
                let rc = unsafe {
                    libc::renameat2(
                        libc::AT_FDCWD,
                        d.as_ptr(),
                        libc::AT_FDCWD,
                        alt.as_ptr(),
                        libc::RENAME_EXCHANGE,
                    )
                };
                assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
                flips.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        })
    };
    let tries = 2000;
    let (mut inside, mut refused_outside, mut other) = (0, 0, 0);
    for _ in 0..tries {
        let r = w.send::<ModelLoad>(
            json!({"model_name": "m", "path": "d/m.safetensors", "device_id": "cpu"}),
        );
        if let Ok(m) = &r {
            assert_eq!(m.size_bytes, 64, "loaded the file outside the root: {r:?}");
            inside += 1;
            w.ok("memory.model_unload", json!({"model_name": "m"}));
        } else {
            let e = r.as_ref().unwrap_err();
            assert_eq!(e.code, ErrorCode::ModelLoadFailed, "{r:?}");
            let msg = e.message.as_str();
            if msg.contains("d/m.safetensors resolves outside the model root") {
                refused_outside += 1;
            } else {
                other += 1;
            }
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    flipper.join().unwrap();
    eprintln!(
        "{tries} loads while the folder was swapped {} times: {inside} loaded the file inside, \
         {refused_outside} refused as outside the root, {other} other failures, 0 loaded the \
         file outside",
        flips.load(std::sync::atomic::Ordering::Relaxed)
    );
    assert_eq!(inside + refused_outside + other, tries);
    assert_eq!(w.stats("cpu").allocated_bytes, 0);
}

/// Paths beneath the model root, one of each kind: what stays inside loads (through a symlink
/// that stays inside too, as a Hugging Face cache's snapshots/ link into blobs/); what leaves
/// the root, or is not a regular file, is `MODEL_LOAD_FAILED` with nothing allocated, and a
/// FIFO does not stall the worker.
#[test]
fn paths_beneath_the_model_root() {
    let root = Root::new("paths");
    let outside = Root::new("paths-outside");
    let hf = root.path().join("models--org--name");
    std::fs::create_dir_all(hf.join("blobs")).unwrap();
    std::fs::create_dir_all(hf.join("snapshots/abc123")).unwrap();
    let bytes = write_model(&hf.join("blobs/0f1e2d"), &[("w", 1000), ("b", 10)]);
    std::os::unix::fs::symlink(
        "../../blobs/0f1e2d",
        hf.join("snapshots/abc123/model.safetensors"),
    )
    .unwrap();
    write_model(&outside.path().join("x.safetensors"), &[("x", 10)]);
    std::os::unix::fs::symlink(outside.path(), root.path().join("out")).unwrap();
    // An absolute link, even to a file inside the root, is refused (RESOLVE_BENEATH).
    std::os::unix::fs::symlink(hf.join("blobs/0f1e2d"), root.path().join("abs.safetensors"))
        .unwrap();
    let fifo = std::ffi::CString::new(root.path().join("fifo").to_str().unwrap()).unwrap();
    // SAFETY: a NUL-terminated path alive for the call.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    let mut w = worker(&root, "8MiB");

    // Through the relative link inside the root, and by an absolute path inside it.
    let absolute = hf.join("snapshots/abc123/model.safetensors");
    for (name, path) in [
        ("hf", "models--org--name/snapshots/abc123/model.safetensors"),
        ("abs", absolute.to_str().unwrap()),
    ] {
        let m = w
            .send::<ModelLoad>(json!({"model_name": name, "path": path, "device_id": "shm"}))
            .unwrap();
        assert_eq!(m.tensor_count, 2);
        assert!(
            m.path.ends_with("models--org--name/blobs/0f1e2d"),
            "the real path: {m:?}"
        );
        verify_on_shm(&mut w, name, &bytes);
        w.ok("memory.model_unload", json!({"model_name": name}));
    }

    let outside_name = outside.path().file_name().unwrap().to_str().unwrap();
    let outside_abs = outside.path().join("x.safetensors");
    for (path, says) in [
        ("../x".to_string(), "resolves outside the model root"),
        (
            format!("../{outside_name}/x.safetensors"),
            "resolves outside the model root",
        ),
        (
            "models--org--name/../../x".to_string(),
            "resolves outside the model root",
        ),
        (
            outside_abs.to_str().unwrap().to_string(),
            "resolves outside the model root",
        ),
        ("/etc/passwd".to_string(), "resolves outside the model root"),
        (
            "out/x.safetensors".to_string(),
            "resolves outside the model root",
        ),
        (
            "abs.safetensors".to_string(),
            "resolves outside the model root",
        ),
        ("fifo".to_string(), "is not a file"),
        ("models--org--name".to_string(), "is not a file"),
        (".".to_string(), "is not a file"),
        ("nope.safetensors".to_string(), "No such file or directory"),
    ] {
        let (code, msg) = w.err(
            "memory.model_load",
            json!({"model_name": "m", "path": path, "device_id": "cpu"}),
        );
        assert_eq!(code, "MODEL_LOAD_FAILED", "{path}: {msg}");
        assert!(msg.contains(says), "{path}: {msg}");
        assert!(msg.contains(&path), "names the path asked for: {msg}");
    }
    assert_eq!(w.stats("cpu").allocation_count, 0);
    assert_eq!(w.stats("shm").allocation_count, 0);
}

/// A safetensors file with the given header (JSON) and `data` bytes of tensor data.
fn raw_model(path: &Path, header: &str, data: usize) {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend(std::iter::repeat_n(7u8, data));
    std::fs::write(path, bytes).unwrap();
}

/// Issue 19 item 9: a tensor name that appears twice was accepted (the last one won); it is
/// refused, naming the name. And every header check says what is wrong, naming the tensor.
#[test]
fn duplicate_tensor_names_and_inconsistent_headers_are_refused() {
    let root = Root::new("headers");
    let t = |name: &str, dtype: &str, shape: &str, s: u64, e: u64| {
        format!(r#""{name}":{{"dtype":"{dtype}","shape":{shape},"data_offsets":[{s},{e}]}}"#)
    };
    let cases: Vec<(&str, String, usize, &str)> = vec![
        (
            "dup-same.safetensors",
            format!(
                "{{{},{}}}",
                t("w", "F32", "[1]", 0, 4),
                t("w", "F32", "[1]", 0, 4)
            ),
            4,
            "the name `w` appears twice",
        ),
        (
            "dup.safetensors",
            format!(
                "{{{},{},{}}}",
                t("a", "F32", "[1]", 0, 4),
                t("b", "F32", "[1]", 4, 8),
                t("a", "F32", "[1]", 8, 12)
            ),
            12,
            "the name `a` appears twice",
        ),
        (
            "dup-metadata.safetensors",
            format!(
                r#"{{"__metadata__":{{"format":"pt"}},{},"__metadata__":{{}}}}"#,
                t("a", "F32", "[1]", 0, 4)
            ),
            4,
            "the name `__metadata__` appears twice",
        ),
        (
            "gap.safetensors",
            format!(
                "{{{},{}}}",
                t("a", "F32", "[1]", 0, 4),
                t("b", "F32", "[1]", 8, 12)
            ),
            12,
            "tensor `b` starts at byte 8 of the data, where 4 was expected",
        ),
        (
            "shape.safetensors",
            format!("{{{}}}", t("a", "F16", "[3, 2]", 0, 16)),
            16,
            "tensor `a` is F16 with shape [3, 2], which is 12 bytes, but its data_offsets [0, 16] hold 16",
        ),
        (
            "extra.safetensors",
            format!("{{{}}}", t("a", "F32", "[1]", 0, 4)),
            5,
            "its header describes",
        ),
        (
            "short.safetensors",
            format!("{{{}}}", t("a", "F32", "[4]", 0, 16)),
            15,
            "(cut short?)",
        ),
        (
            "dtype.safetensors",
            format!("{{{}}}", t("a", "F99", "[1]", 0, 4)),
            4,
            "invalid header: unknown variant `F99`",
        ),
    ];
    for (file, header, data, _) in &cases {
        raw_model(&root.path().join(file), header, *data);
    }
    // A header length past the end of the file.
    std::fs::write(
        root.path().join("long.safetensors"),
        [&1000u64.to_le_bytes()[..], b"{}"].concat(),
    )
    .unwrap();
    let mut w = worker(&root, "8MiB");
    let long = (
        "long.safetensors",
        String::new(),
        0,
        "its header length is 1000 bytes, but the file is only 10 bytes",
    );
    for (file, _, _, says) in cases.iter().chain(std::iter::once(&long)) {
        let (code, msg) = w.err(
            "memory.model_load",
            json!({"model_name": "m", "path": file, "device_id": "cpu"}),
        );
        assert_eq!(code, "MODEL_LOAD_FAILED", "{file}: {msg}");
        assert!(
            msg.contains(&format!("{file} is not a valid safetensors file")) && msg.contains(says),
            "{file}: {msg}"
        );
    }
    assert_eq!(w.stats("cpu").allocation_count, 0);
    // The same tensors with names of their own load.
    raw_model(
        &root.path().join("ok.safetensors"),
        &format!(
            "{{{},{}}}",
            t("a", "F32", "[1]", 0, 4),
            t("b", "F32", "[1]", 4, 8)
        ),
        8,
    );
    let m = w
        .send::<ModelLoad>(json!({"model_name": "m", "path": "ok.safetensors", "device_id": "cpu"}))
        .unwrap();
    assert_eq!(m.tensor_count, 2);
}
