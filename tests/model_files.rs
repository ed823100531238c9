//! Model files changed while they load, in process: a hook between two tensors of the load
//! (`MemoryService::with_model_load_hook`) cuts the file short or rewrites it in place, every
//! time at the same point, so the read past the new end is hit on every run, not by timing
//! luck. The load must fail with `MODEL_LOAD_FAILED` naming the change (never a signal), leave
//! nothing allocated, and the same file, whole again, must then load byte for byte. Both ways
//! a device takes a file's bytes are covered: `cpu` (read straight into the mapping) and a
//! device whose memory the CPU cannot address (read into a bounce buffer, then written, as a
//! GPU without its pinned staging would).
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use common::faulty::FaultyBackend;
use common::write_model;
use memcoord::api::{
    DeviceRequest, GetAllocationsRequest, ModelLoadRequest, ModelRequest, ModelStatusRequest,
};
use memcoord::backends::CpuBackend;
use memcoord::managers::DeviceSetup;
use memcoord::protocol::ErrorCode;
use memcoord::service::MemoryService;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

const MIB: u64 = 1 << 20;

struct Root(PathBuf);

impl Root {
    fn new(tag: &str) -> Root {
        let dir =
            std::env::temp_dir().join(format!("memcoord-model-files-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Root(dir)
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What the hook does to the file after the first tensor.
#[derive(Clone, Copy, Debug)]
enum Change {
    /// `truncate -s <half>`.
    Truncate,
    /// `cp small.safetensors victim.safetensors`: truncated, then a shorter model written.
    RewriteShorter,
    /// Other bytes written over the tensors, the size unchanged: seen by the modification time
    /// (moved a second on, so that no timestamp granularity can hide it).
    RewriteSameSize,
}

fn service(
    root: &Path,
    hook_armed: Arc<AtomicBool>,
    victim: PathBuf,
    change: Arc<std::sync::Mutex<Change>>,
) -> MemoryService {
    let small = root.join("small.safetensors");
    MemoryService::new(vec![
        DeviceSetup {
            backend: Box::new(CpuBackend::new(80 * MIB).unwrap()),
            budget: 64 * MIB,
            pinned: None,
        },
        DeviceSetup {
            backend: Box::new(FaultyBackend::opaque("opaque", 80 * MIB).0),
            budget: 64 * MIB,
            pinned: None,
        },
    ])
    .with_model_root(root)
    .with_model_load_hook(Arc::new(move |_tensor: &str| {
        if !hook_armed.swap(false, Ordering::SeqCst) {
            return;
        }
        match *change.lock().unwrap() {
            Change::Truncate => {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&victim)
                    .unwrap();
                let len = f.metadata().unwrap().len();
                f.set_len(len / 2).unwrap();
            }
            Change::RewriteShorter => {
                // As cp does: open with O_TRUNC, then write.
                let bytes = std::fs::read(&small).unwrap();
                std::fs::write(&victim, bytes).unwrap();
            }
            Change::RewriteSameSize => {
                use std::os::unix::fs::FileExt;
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&victim)
                    .unwrap();
                let len = f.metadata().unwrap().len();
                let was = f.metadata().unwrap().modified().unwrap();
                f.write_all_at(&vec![0xAB; 1 << 20], len - (1 << 20))
                    .unwrap();
                f.set_modified(was + std::time::Duration::from_secs(1))
                    .unwrap();
            }
        }
    }))
}

fn load(name: &str, path: &str, device: &str) -> ModelLoadRequest {
    ModelLoadRequest {
        model_name: name.into(),
        path: path.into(),
        device_id: device.into(),
        keep_alive_seconds: None,
        timeout_seconds: 0.0,
        holder: memcoord::domain::Caller::anonymous(),
    }
}

fn usage(s: &MemoryService, device: &str) -> (u64, u64) {
    let u = s
        .get_usage(&DeviceRequest {
            device_id: device.into(),
        })
        .unwrap();
    (u.allocated_bytes, u.allocation_count)
}

/// Every tensor of model `name` on `device`, read back, equals the file's.
fn verify(s: &MemoryService, device: &str, name: &str, want: &HashMap<String, Vec<u8>>) {
    let allocs = s
        .get_allocations(&GetAllocationsRequest {
            device_id: device.into(),
            allocation_type: None,
            purpose: None,
            owner: Some(format!("model:{name}")),
            tenant: None,
            client_pid: None,
            offset: 0,
            limit: 1000,
        })
        .unwrap()
        .allocations;
    assert_eq!(allocs.len(), want.len());
    for a in allocs {
        let want = &want[&a.purpose];
        let mut got = vec![0u8; want.len()];
        s.read(&a.allocation_id, 0, &mut got).unwrap();
        assert!(got == *want, "{name}: tensor {} differs", a.purpose);
    }
}

#[test]
fn a_file_cut_short_or_rewritten_while_it_loads_fails_and_frees_everything() {
    let root = Root::new("changed");
    let victim = root.0.join("victim.safetensors");
    // Four tensors of 6 MiB (filled in parallel parts) and one of 17 bytes.
    let tensors = [
        ("a", 1_572_864),
        ("b", 1_572_864),
        ("odd", 17),
        ("c", 1_572_864),
        ("d", 1_572_864),
    ];
    write_model(&root.0.join("small.safetensors"), &[("s", 1000)]);
    let armed = Arc::new(AtomicBool::new(false));
    let change = Arc::new(std::sync::Mutex::new(Change::Truncate));
    let svc = service(&root.0, armed.clone(), victim.clone(), change.clone());
    let mut failures = 0;
    for device in ["cpu", "opaque"] {
        for how in [
            Change::Truncate,
            Change::RewriteShorter,
            Change::RewriteSameSize,
        ] {
            let want = write_model(&victim, &tensors);
            let len = std::fs::metadata(&victim).unwrap().len();
            let before = usage(&svc, device);
            *change.lock().unwrap() = how;
            armed.store(true, Ordering::SeqCst);
            let e = svc
                .model_load(&load("m", "victim.safetensors", device))
                .expect_err("the file changed after its first tensor");
            assert!(!armed.load(Ordering::SeqCst), "the hook ran");
            assert_eq!(
                e.code,
                ErrorCode::ModelLoadFailed,
                "{device} {how:?}: {e:?}"
            );
            let now = std::fs::metadata(&victim).unwrap().len();
            let how_changed = match how {
                Change::RewriteSameSize => "it was written to while it was read".to_string(),
                _ => format!("it is {now} bytes now"),
            };
            assert!(
                e.message
                    .contains("victim.safetensors changed while loading")
                    && e.message.contains(&how_changed)
                    && e.message.contains("load it again once it is written"),
                "{device} {how:?}: {}",
                e.message
            );
            if matches!(how, Change::Truncate) {
                assert_eq!(now, len / 2);
                assert!(
                    e.message.contains(&format!("the header needs {len}")),
                    "{}",
                    e.message
                );
            }
            failures += 1;
            assert_eq!(
                usage(&svc, device),
                before,
                "{device} {how:?}: nothing stays"
            );
            assert_eq!(
                svc.model_status(&ModelStatusRequest {
                    device_id: None,
                    model_name: Some("m".into()),
                })
                .unwrap_err()
                .code,
                ErrorCode::ModelNotFound
            );

            // Whole again, it loads, byte for byte.
            assert_eq!(write_model(&victim, &tensors), want);
            let m = svc
                .model_load(&load("m", "victim.safetensors", device))
                .unwrap();
            assert_eq!(m.tensor_count, 5);
            assert_eq!(m.size_bytes, 4 * 6 * MIB + 17 * 4);
            verify(&svc, device, "m", &want);
            svc.model_unload(&ModelRequest {
                model_name: "m".into(),
                force: false,
                timeout_seconds: 0.0,
            })
            .unwrap();
            assert_eq!(usage(&svc, device), before);
        }
    }
    assert_eq!(failures, 6);
    eprintln!("changed mid-load (after the first tensor): {failures} of 6 loads failed cleanly");
}
