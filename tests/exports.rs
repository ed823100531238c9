//! Exports (the contract's section 8.3) on `shm`, in process: `memory.export` of an allocation
//! and of a leased model, the claim over the claim socket as another process makes it
//! (`recvmsg` with SCM_RIGHTS, the segments mapped back to back: tests/common/claim.rs), every
//! byte checked both ways, the pins (defragment, deallocate, move), the secret's one use, its
//! expiry on the service's clock, and how an export ends (unexport, its lease, a forced unload,
//! the session). The claim socket's robustness and the processes' ends: tests/claim_socket.rs.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report
#![allow(unsafe_code)] // test code: recvmsg and memory maps of its own (tests/common/claim.rs)

mod common;
use common::Scratch;

use common::claim::{Claim, Mapped, claim, claim_export};
use common::inproc::InProcessWorker;
use common::{
    Allocate, Deallocate, Defragment, GetAllocations, ModelAcquire, ModelLoad, ModelRelease,
    ModelUnload, Optimize, Requests, Transfer, map, pattern,
};
use memcoord::api::actions::{export::Export, list_exports::ListExports, unexport::Unexport};
use memcoord::protocol::{ErrorCode, ExportInfo, MemoryAllocation};
use safetensors::tensor::{Dtype, TensorView};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

const MIB: u64 = 1 << 20;

fn allocation(w: &mut InProcessWorker, id: &str) -> MemoryAllocation {
    w.send::<GetAllocations>(json!({"device_id": "shm"}))
        .unwrap()
        .allocations
        .into_iter()
        .find(|a| a.allocation_id == id)
        .unwrap_or_else(|| panic!("allocation {id} is not on shm"))
}

/// Allocates `size` bytes on shm and fills them with `pattern(seed)` through the handle (as
/// the process that allocated them would); returns the allocation.
fn filled(w: &mut InProcessWorker, size: u64, seed: u64) -> MemoryAllocation {
    let a = w
        .send::<Allocate>(json!({"device_id": "shm", "size_bytes": size, "alignment": 64}))
        .unwrap()
        .allocation;
    let h = a.handle.clone().unwrap();
    map(&h.path)[h.offset as usize..(h.offset + size) as usize]
        .copy_from_slice(&pattern(seed, size as usize));
    a
}

fn export(w: &mut InProcessWorker, data: Value) -> ExportInfo {
    w.send::<Export>(data)
        .unwrap_or_else(|e| panic!("memory.export failed: {e}"))
}

fn refused(c: &Claim) {
    assert_eq!(c.error_code(), Some("EXPORT_NOT_FOUND"), "{}", c.line);
    assert!(c.fds.is_empty(), "a refusal passes no descriptor");
    assert!(!c.line["error_message"].as_str().unwrap().is_empty());
    assert!(c.line.get("segments").is_none());
}

/// The bytes of one allocation of a good claim, as the claimant sees them.
fn exported_bytes<'m>(m: &'m Mapped, info: &ExportInfo, allocation_id: &str) -> &'m [u8] {
    let a = info
        .allocations
        .iter()
        .find(|a| a.allocation_id == allocation_id)
        .unwrap();
    &m.bytes()[a.offset as usize..(a.offset + a.size_bytes) as usize]
}

#[test]
fn an_shm_allocation_is_claimed_mapped_and_shared_both_ways() {
    let mut w = InProcessWorker::small();
    // A neighbour in front, so the allocation does not start on a page.
    let neighbour = filled(&mut w, 100, 1);
    let size = 3 * MIB + 12_345;
    let a = filled(&mut w, size, 2);
    let offset_in_file = a.handle.as_ref().unwrap().offset;
    assert_ne!(
        offset_in_file % 4096,
        0,
        "the test wants an unaligned start"
    );

    let info = export(&mut w, json!({"allocation_id": a.allocation_id}));
    assert_eq!(info.device_id, "shm");
    assert_eq!(info.device_uuid, None);
    assert!(info.tensors.is_empty());
    assert_eq!(info.allocations.len(), 1);
    let placed = &info.allocations[0];
    assert_eq!(placed.allocation_id, a.allocation_id);
    assert_eq!(placed.size_bytes, size);
    assert!(info.size_bytes >= placed.offset + size);
    assert_eq!(info.size_bytes % 4096, 0, "whole pages");
    assert_eq!(info.secret.len(), 64);

    // The socket: 0600, in a directory only this user may enter.
    let socket = Path::new(&info.socket_path);
    let meta = std::fs::metadata(socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let dir = std::fs::metadata(socket.parent().unwrap()).unwrap();
    assert_eq!(dir.permissions().mode() & 0o777, 0o700);

    let c = claim_export(&info);
    assert_eq!(c.error_code(), None, "{}", c.line);
    assert_eq!(c.line["export_id"], json!(info.export_id));
    assert_eq!(c.line["device_id"], json!("shm"));
    assert_eq!(c.line["size_bytes"], json!(info.size_bytes));
    let keys: Vec<&str> = c
        .line
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(keys.len(), 4, "{keys:?}");
    let mut m = Mapped::new(&c);
    assert!(
        exported_bytes(&m, &info, &a.allocation_id) == pattern(2, size as usize),
        "the claimant sees every byte written through the handle"
    );
    // The neighbour shares the first page: the claimant sees it too (docs: security notes).

    // Written through the claimed mapping, read by memcoord: a copy to cpu and back to shm.
    let written = pattern(3, size as usize);
    let at = placed.offset as usize;
    m.bytes_mut()[at..at + size as usize].copy_from_slice(&written);
    let to_cpu = w
        .send::<Transfer>(
            json!({"allocation_id": a.allocation_id, "source_device_id": "shm",
            "destination_device_id": "cpu", "mode": "copy", "wait_for_completion": true}),
        )
        .unwrap();
    let on_cpu = to_cpu.destination_allocation_id.unwrap();
    let back = w
        .send::<Transfer>(json!({"allocation_id": on_cpu, "source_device_id": "cpu",
            "destination_device_id": "shm", "mode": "move", "wait_for_completion": true}))
        .unwrap();
    let copy = allocation(&mut w, &back.destination_allocation_id.unwrap());
    let h = copy.handle.unwrap();
    assert!(
        map(&h.path)[h.offset as usize..(h.offset + size) as usize] == written[..],
        "memcoord reads what the claimant wrote"
    );

    let gone = w
        .send::<Unexport>(json!({"export_id": info.export_id}))
        .unwrap();
    assert_eq!(gone.export_id, info.export_id);
    assert_eq!(gone.allocation_count, 1);
    assert!(w.send::<ListExports>(json!({})).unwrap().exports.is_empty());
    // Ended: its allocation may be freed again, and the export is gone for good.
    w.send::<Deallocate>(json!({"allocation_id": a.allocation_id}))
        .unwrap();
    let again = w
        .send::<Unexport>(json!({"export_id": info.export_id}))
        .unwrap_err();
    assert_eq!(again.code, ErrorCode::ExportNotFound);
    w.send::<Deallocate>(json!({"allocation_id": neighbour.allocation_id}))
        .unwrap();
}

/// Writes a safetensors file of several dtypes and shapes (a scalar and an empty tensor
/// among them); returns the file's bytes.
fn write_mixed_model(path: &Path) -> Vec<u8> {
    let specs: [(&str, Dtype, Vec<usize>, usize); 10] = [
        ("unet.conv_in.weight", Dtype::F16, vec![8, 4, 3, 3], 2),
        ("unet.conv_in.bias", Dtype::F32, vec![8], 4),
        ("text.embed", Dtype::BF16, vec![77, 33], 2),
        ("text.position_ids", Dtype::I64, vec![1, 77], 8),
        ("vae.scale", Dtype::F64, vec![], 8),
        ("vae.decoder.weight", Dtype::F32, vec![256, 1031], 4),
        ("tokenizer.bytes", Dtype::U8, vec![1001], 1),
        ("mask", Dtype::BOOL, vec![3, 5], 1),
        ("empty", Dtype::I32, vec![0, 4], 4),
        ("quant.idx", Dtype::I8, vec![2, 2, 5], 1),
    ];
    let data: Vec<Vec<u8>> = specs
        .iter()
        .enumerate()
        .map(|(i, (_, dtype, shape, width))| {
            let n = shape.iter().product::<usize>() * width;
            let mut b = pattern(100 + i as u64, n);
            if *dtype == Dtype::BOOL {
                b.iter_mut().for_each(|x| *x &= 1);
            }
            b
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = specs
        .iter()
        .zip(&data)
        .map(|((name, dtype, shape, _), bytes)| {
            (
                name.to_string(),
                TensorView::new(*dtype, shape.clone(), bytes).unwrap(),
            )
        })
        .collect();
    let file = safetensors::serialize(views, None).unwrap();
    std::fs::write(path, &file).unwrap();
    file
}

/// What the file's header says of a tensor: dtype, shape, and its bytes in the file.
struct HeaderTensor {
    dtype: String,
    shape: Vec<u64>,
    start: usize,
    end: usize,
}

/// Reads the header as the safetensors format defines it (8 bytes of length, then JSON).
fn read_header(file: &[u8]) -> HashMap<String, HeaderTensor> {
    let n = u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&file[8..8 + n]).unwrap();
    header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| {
            let offsets = v["data_offsets"].as_array().unwrap();
            let at = |i: usize| 8 + n + offsets[i].as_u64().unwrap() as usize;
            let t = HeaderTensor {
                dtype: v["dtype"].as_str().unwrap().to_string(),
                shape: v["shape"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_u64().unwrap())
                    .collect(),
                start: at(0),
                end: at(1),
            };
            (k.clone(), t)
        })
        .collect()
}

#[test]
fn a_model_on_shm_is_exported_with_its_tensors_and_ends_with_its_lease() {
    let root = Scratch::new("model");
    let file = write_mixed_model(&root.0.join("mixed.safetensors"));
    let header = read_header(&file);
    let dir = root.0.clone();
    let mut w =
        InProcessWorker::on_clock_of_the_machine("64MiB", "64MiB", |s| s.with_model_root(dir));
    w.send::<ModelLoad>(
        json!({"model_name": "mixed", "path": "mixed.safetensors", "device_id": "shm"}),
    )
    .unwrap();
    let lease = w
        .send::<ModelAcquire>(json!({"model_name": "mixed"}))
        .unwrap()
        .lease_id;

    // A model is exported under a lease, and only by its name.
    let no_lease = w
        .send::<Export>(json!({"model_name": "mixed"}))
        .unwrap_err();
    assert_eq!(no_lease.code, ErrorCode::InvalidParameter);
    let bad_lease = w
        .send::<Export>(
            json!({"model_name": "mixed", "lease_id": uuid::Uuid::new_v4().to_string()}),
        )
        .unwrap_err();
    assert_eq!(bad_lease.code, ErrorCode::LeaseNotFound);
    let unknown = w
        .send::<Export>(json!({"model_name": "nothing", "lease_id": lease}))
        .unwrap_err();
    assert_eq!(unknown.code, ErrorCode::ModelNotFound);
    let tensor = w
        .send::<GetAllocations>(json!({"device_id": "shm", "owner": "model:mixed"}))
        .unwrap()
        .allocations[0]
        .allocation_id
        .clone();
    let one_tensor = w
        .send::<Export>(json!({"allocation_id": tensor}))
        .unwrap_err();
    assert_eq!(one_tensor.code, ErrorCode::InvalidParameter);
    assert!(
        one_tensor.message.contains("mixed"),
        "{}",
        one_tensor.message
    );

    let info = export(&mut w, json!({"model_name": "mixed", "lease_id": lease}));
    let second = export(&mut w, json!({"model_name": "mixed", "lease_id": lease}));
    assert_eq!(info.device_id, "shm");
    assert_eq!(
        info.tensors.len(),
        header.len(),
        "every tensor, the empty one too"
    );
    assert_eq!(
        info.allocations.len(),
        header.len() - 1,
        "one per non-empty tensor"
    );
    // In file order.
    let starts: Vec<usize> = info.tensors.iter().map(|t| header[&t.name].start).collect();
    assert!(starts.is_sorted(), "{starts:?}");

    let c = claim_export(&info);
    let m = Mapped::new(&c);
    for t in &info.tensors {
        let h = &header[&t.name];
        assert_eq!(t.dtype, h.dtype, "{}", t.name);
        assert_eq!(t.shape, h.shape, "{}", t.name);
        assert_eq!(t.size_bytes as usize, h.end - h.start, "{}", t.name);
        if t.size_bytes == 0 {
            assert_eq!(t.allocation_id, None, "{}", t.name);
            continue;
        }
        let id = t.allocation_id.as_deref().unwrap();
        let a = info
            .allocations
            .iter()
            .find(|a| a.allocation_id == id)
            .unwrap();
        assert_eq!((a.offset, a.size_bytes), (t.offset, t.size_bytes));
        let at = t.offset as usize;
        assert!(
            m.bytes()[at..at + t.size_bytes as usize] == file[h.start..h.end],
            "tensor {} differs from the file",
            t.name
        );
    }
    assert_eq!(
        w.send::<ListExports>(json!({})).unwrap().exports.len(),
        2,
        "both exports live under the lease"
    );

    // Leased and exported: no unload without force, no eviction.
    let busy = w
        .send::<ModelUnload>(json!({"model_name": "mixed"}))
        .unwrap_err();
    assert_eq!(busy.code, ErrorCode::ModelInUse);

    // The lease ends: both exports end with it; the unclaimed secret is worth nothing.
    w.send::<ModelRelease>(json!({"lease_id": lease})).unwrap();
    assert!(w.send::<ListExports>(json!({})).unwrap().exports.is_empty());
    refused(&claim_export(&second));
    let ended = w
        .send::<Unexport>(json!({"export_id": info.export_id}))
        .unwrap_err();
    assert_eq!(ended.code, ErrorCode::ExportNotFound);
    drop(m);

    // A forced unload ends the exports of a leased model as well.
    let lease = w
        .send::<ModelAcquire>(json!({"model_name": "mixed"}))
        .unwrap()
        .lease_id;
    let third = export(&mut w, json!({"model_name": "mixed", "lease_id": lease}));
    w.send::<ModelUnload>(json!({"model_name": "mixed", "force": true}))
        .unwrap();
    assert!(w.send::<ListExports>(json!({})).unwrap().exports.is_empty());
    refused(&claim_export(&third));
}

#[test]
fn an_exported_allocation_stays_put_and_refuses_free_and_move() {
    let mut w = InProcessWorker::small();
    let made: Vec<(u64, MemoryAllocation)> = (0..24u64)
        .map(|i| (i, filled(&mut w, 150_000 + i * 4_099, 10 + i)))
        .collect();
    // Every other one freed: holes everywhere.
    let mut kept = Vec::new();
    for (i, a) in made {
        if i % 2 == 0 {
            w.send::<Deallocate>(json!({"allocation_id": a.allocation_id}))
                .unwrap();
        } else {
            kept.push((i, a));
        }
    }
    // The last one: a defragment would move it down into the holes.
    let (seed, exported) = kept.last().cloned().unwrap();
    let size = exported.size_bytes as usize;
    let info = export(&mut w, json!({"allocation_id": exported.allocation_id}));
    let m = Mapped::new(&claim_export(&info));

    let r = w.send::<Defragment>(json!({"device_id": "shm"})).unwrap();
    assert!(r.moved_count > 0, "the others move: {r:?}");
    assert!(r.skipped_count >= 1, "the export is pinned: {r:?}");
    let mut moved = 0;
    for (i, before) in &kept {
        let now = allocation(&mut w, &before.allocation_id);
        let (h0, h1) = (
            before.handle.as_ref().unwrap(),
            now.handle.as_ref().unwrap(),
        );
        if now.allocation_id == exported.allocation_id {
            assert_eq!(h1.offset, h0.offset, "an exported allocation never moves");
        } else if h1.offset != h0.offset {
            moved += 1;
        }
        let at = h1.offset as usize;
        assert!(
            map(&h1.path)[at..at + now.size_bytes as usize]
                == pattern(10 + i, now.size_bytes as usize)[..],
            "allocation {i} corrupted"
        );
    }
    assert_eq!(moved, r.moved_count);
    // An optimize (defragment and reclaim) leaves it too.
    w.send::<Optimize>(json!({"device_id": "shm", "optimization_type": "Full", "force": true}))
        .unwrap();
    assert_eq!(
        allocation(&mut w, &exported.allocation_id)
            .handle
            .unwrap()
            .offset,
        exported.handle.as_ref().unwrap().offset
    );
    assert!(
        exported_bytes(&m, &info, &exported.allocation_id) == pattern(seed + 10, size),
        "the claimant's view is intact"
    );

    // Neither freed nor moved away while exported: the message names the export.
    let free = w
        .send::<Deallocate>(json!({"allocation_id": exported.allocation_id}))
        .unwrap_err();
    assert_eq!(free.code, ErrorCode::AllocationInUse);
    assert!(free.message.contains(&info.export_id), "{}", free.message);
    let mv = w
        .send::<Transfer>(json!({"allocation_id": exported.allocation_id,
            "source_device_id": "shm", "destination_device_id": "cpu", "mode": "move"}))
        .unwrap_err();
    assert_eq!(mv.code, ErrorCode::AllocationInUse);
    assert!(mv.message.contains(&info.export_id), "{}", mv.message);
    // A copy only reads it.
    w.send::<Transfer>(json!({"allocation_id": exported.allocation_id,
        "source_device_id": "shm", "destination_device_id": "cpu", "mode": "copy",
        "wait_for_completion": true}))
        .unwrap();

    let n = w
        .send::<Unexport>(json!({"export_id": info.export_id}))
        .unwrap();
    assert_eq!(n.allocation_count, 1);
    w.send::<Deallocate>(json!({"allocation_id": exported.allocation_id}))
        .unwrap();
}

#[test]
fn a_secret_works_once_and_nothing_else_gets_a_descriptor() {
    let (mut w, clock) = InProcessWorker::on_manual_clock("64MiB", "64MiB", |s| s);
    let a = filled(&mut w, 10_000, 7);
    let info = export(&mut w, json!({"allocation_id": a.allocation_id}));

    // A wrong secret, an id that is not one, an unknown export: refused, and the wrong guess
    // does not spend the secret.
    refused(&claim(
        &info.socket_path,
        &info.export_id,
        "0123456789abcdef",
    ));
    refused(&claim(&info.socket_path, &info.export_id, ""));
    refused(&claim(&info.socket_path, "not-an-id", &info.secret));
    refused(&claim(
        &info.socket_path,
        &uuid::Uuid::new_v4().to_string(),
        &info.secret,
    ));
    let listed = w.send::<ListExports>(json!({})).unwrap().exports;
    assert!(!listed[0].claimed);

    let first = claim_export(&info);
    assert_eq!(first.error_code(), None, "{}", first.line);
    assert_eq!(
        first.fds.len(),
        first.line["segments"].as_array().unwrap().len()
    );
    refused(&claim_export(&info));
    let listed = w.send::<ListExports>(json!({})).unwrap().exports;
    assert!(listed[0].claimed);
    // A claimed export still pins until it ends.
    let free = w
        .send::<Deallocate>(json!({"allocation_id": a.allocation_id}))
        .unwrap_err();
    assert_eq!(free.code, ErrorCode::AllocationInUse);

    // Expiry, on the service's clock: good until expires_at, refused after it.
    let timed = export(
        &mut w,
        json!({"allocation_id": a.allocation_id, "claim_seconds": 10}),
    );
    let late = export(
        &mut w,
        json!({"allocation_id": a.allocation_id, "claim_seconds": 10}),
    );
    clock.advance(Duration::from_secs(9));
    assert_eq!(claim_export(&timed).error_code(), None);
    clock.advance(Duration::from_secs(2));
    refused(&claim_export(&late));
    // Expired unclaimed exports are listed until they end (they still pin).
    assert_eq!(w.send::<ListExports>(json!({})).unwrap().exports.len(), 3);

    // Ended: refused.
    let ended = export(&mut w, json!({"allocation_id": a.allocation_id}));
    w.send::<Unexport>(json!({"export_id": ended.export_id}))
        .unwrap();
    refused(&claim_export(&ended));
}

#[test]
fn what_cannot_be_exported_and_what_the_list_shows() {
    let mut w = InProcessWorker::small();
    let cpu = w.allocate("cpu", 4096);
    let e = w.send::<Export>(json!({"allocation_id": cpu})).unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidParameter);
    assert!(e.message.contains("allocate on shm"), "{}", e.message);
    let reservation = w
        .send::<Allocate>(
            json!({"device_id": "shm", "size_bytes": 4096, "allocation_type": "Reservation"}),
        )
        .unwrap()
        .allocation
        .allocation_id;
    let e = w
        .send::<Export>(json!({"allocation_id": reservation}))
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidParameter);
    let e = w
        .send::<Export>(json!({"allocation_id": uuid::Uuid::new_v4().to_string()}))
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::AllocationNotFound);
    for bad in [json!(0), json!(-1), json!(86_401), json!("60")] {
        let shm = w.allocate("shm", 4096);
        let e = w
            .send::<Export>(json!({"allocation_id": shm, "claim_seconds": bad}))
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidParameter, "claim_seconds {bad}");
    }
    let e = w
        .send::<Unexport>(json!({"export_id": uuid::Uuid::new_v4().to_string()}))
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::ExportNotFound);
    assert!(w.send::<ListExports>(json!({})).unwrap().exports.is_empty());

    let shm = filled(&mut w, 5_000, 9);
    let info = export(&mut w, json!({"allocation_id": shm.allocation_id}));
    let v = w.ok("memory.list_exports", json!({}));
    let text = v.to_string();
    assert!(!text.contains(&info.secret), "no secrets: {text}");
    assert!(!text.contains("secret"), "{text}");
    let listed = v["exports"].as_array().unwrap();
    assert_eq!(listed.len(), 1);
    let x = listed[0].as_object().unwrap();
    let mut keys: Vec<&str> = x.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "claimed",
            "client_pid",
            "created_at",
            "device_id",
            "expires_at",
            "export_id",
            "size_bytes",
            "tenant"
        ]
    );
    assert_eq!(x["export_id"], json!(info.export_id));
    assert_eq!(x["device_id"], json!("shm"));
    assert_eq!(x["size_bytes"], json!(info.size_bytes));
    assert_eq!(x["tenant"], json!("default"));
    assert_eq!(x["claimed"], json!(false));
    assert_eq!(
        x["expires_at"],
        serde_json::to_value(info.expires_at).unwrap()
    );
}

#[test]
fn exports_end_with_the_session_and_the_claim_socket_goes() {
    let mut w = InProcessWorker::small();
    let a = filled(&mut w, 70_000, 5);
    let info = export(&mut w, json!({"allocation_id": a.allocation_id}));
    let claimed = export(&mut w, json!({"allocation_id": a.allocation_id}));
    let m = Mapped::new(&claim_export(&claimed));
    let socket = PathBuf::from(&info.socket_path);
    assert!(socket.exists());
    let service = std::sync::Arc::clone(&w.service);
    // End of input: the session ends, and everything with it.
    w.close();
    assert!(service.list_exports().exports.is_empty());
    assert!(!socket.exists(), "the claim socket is removed");
    assert!(!socket.parent().unwrap().exists(), "and its directory");
    assert_eq!(service.claim_socket(), None);
    // A mapping made before stays readable: the descriptor keeps the file (the importer must
    // unmap; what it sees is no longer memcoord's to keep).
    assert_eq!(m.bytes().len() as u64, claimed.size_bytes);
}
