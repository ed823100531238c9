//! GPU tests: VRAM allocations, defragment and transfers in every direction, each verified byte
//! for byte, and page release seen in cuMemGetInfo. They skip cleanly, saying so, where there
//! is no GPU. `scripts/gpu-check.sh` runs them on the GPU machine.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use common::pattern;
use memcoord::api::{
    AllocateRequest, DeallocateRequest, DeviceRequest, OptimizeRequest, TransferMode,
    TransferRequest,
};
use memcoord::config::Settings;
use memcoord::protocol::MemoryAllocationType;
use memcoord::protocol::{MemoryOptimizationType, TransferStatus};
use memcoord::service::MemoryService;
use std::time::Duration;

const MIB: u64 = 1 << 20;

fn service() -> Option<MemoryService> {
    let mut s = Settings::default();
    s.set_budget("cpu=4GiB").unwrap();
    s.set_budget("shm=2GiB").unwrap();
    s.set_budget("cuda:0=16GiB").unwrap();
    s.set_budget("cuda:1=16GiB").unwrap();
    if let Err(reason) = memcoord::backends::cuda::probe() {
        eprintln!("skipping GPU tests: {reason}");
        return None;
    }
    Some(MemoryService::new(s.devices().unwrap()))
}

fn allocate(svc: &MemoryService, device: &str, size: u64) -> String {
    allocate_kind(svc, device, size, "General")
}

fn allocate_kind(svc: &MemoryService, device: &str, size: u64, kind: &str) -> String {
    let req = AllocateRequest {
        allocation_type: MemoryAllocationType::from_name(kind).unwrap(),
        ..AllocateRequest::new(device, size)
    };
    svc.allocate_now(req).unwrap().allocation.allocation_id
}

fn free(svc: &MemoryService, id: &str) {
    svc.deallocate(&DeallocateRequest {
        allocation_id: id.into(),
        device_id: None,
    })
    .unwrap();
}

fn check(svc: &MemoryService, id: &str, want: &[u8], what: &str) {
    let mut back = vec![0u8; want.len()];
    svc.read(id, 0, &mut back).unwrap();
    assert!(back == want, "{what}: bytes differ");
}

fn transfer(svc: &MemoryService, id: &str, from: &str, to: &str, mode: TransferMode) -> String {
    let t = svc
        .transfer(&TransferRequest {
            allocation_id: id.into(),
            source_device_id: from.into(),
            destination_device_id: to.into(),
            mode,
            wait_for_completion: true,
        })
        .unwrap();
    assert_eq!(t.status, TransferStatus::Completed);
    t.destination_allocation_id.unwrap()
}

fn free_vram(svc: &MemoryService) -> u64 {
    // Capacity readings are reused for 100 ms.
    std::thread::sleep(Duration::from_millis(150));
    let d = svc.list_devices();
    let gpu = d.devices.iter().find(|d| d.device_id == "cuda:0").unwrap();
    gpu.total_memory - gpu.used_memory
}

#[test]
fn vram_allocations_defragment_transfers_and_page_release() {
    let Some(svc) = service() else { return };
    let devices = svc.list_devices();
    let gpu = devices
        .devices
        .iter()
        .find(|d| d.device_id == "cuda:0")
        .expect("cuda:0 listed");
    assert_eq!(gpu.memory_type.name(), "VRAM");
    eprintln!("cuda:0: {} ({} bytes)", gpu.name, gpu.total_memory);

    // 1. Allocate, write, read back.
    let size = 256 * MIB + 4096 + 17;
    let data = pattern(1, size as usize);
    let id = allocate(&svc, "cuda:0", size);
    svc.write(&id, 0, &data).unwrap();
    check(&svc, &id, &data, "write/read on cuda:0");

    // 2. Transfers in every direction, moves and copies, verified each time.
    let on_cpu = transfer(&svc, &id, "cuda:0", "cpu", TransferMode::Move);
    assert_eq!(on_cpu, id, "a move keeps the id");
    check(&svc, &id, &data, "cuda:0 -> cpu");
    let back = transfer(&svc, &id, "cpu", "cuda:0", TransferMode::Move);
    check(&svc, &back, &data, "cpu -> cuda:0");
    let shm_copy = transfer(&svc, &id, "cuda:0", "shm", TransferMode::Copy);
    check(&svc, &shm_copy, &data, "cuda:0 -> shm (copy)");
    check(&svc, &id, &data, "source of the copy");
    let gpu_copy = transfer(&svc, &shm_copy, "shm", "cuda:0", TransferMode::Copy);
    check(&svc, &gpu_copy, &data, "shm -> cuda:0 (copy)");
    free(&svc, &shm_copy);
    free(&svc, &gpu_copy);
    free(&svc, &id);

    // Staging allocations on cpu come from the pinned pool; their transfers go straight to
    // the DMA engine. Verified both ways.
    let staged = allocate_kind(&svc, "cpu", 96 * MIB + 5, "Staging");
    let sdata = pattern(7, (96 * MIB + 5) as usize);
    svc.write(&staged, 0, &sdata).unwrap();
    let usage = svc
        .get_usage(&DeviceRequest {
            device_id: "cpu".into(),
        })
        .unwrap();
    assert!(
        usage.reserved_bytes >= 1 << 30,
        "the pinned pool counts as held: {usage:?}"
    );
    transfer(&svc, &staged, "cpu", "cuda:0", TransferMode::Move);
    check(&svc, &staged, &sdata, "cpu (pinned) -> cuda:0");
    transfer(&svc, &staged, "cuda:0", "cpu", TransferMode::Move);
    check(&svc, &staged, &sdata, "cuda:0 -> cpu (pinned)");
    free(&svc, &staged);

    // Between two GPUs, where there are two: moves and copies both ways, verified.
    if svc
        .list_devices()
        .devices
        .iter()
        .any(|d| d.device_id == "cuda:1")
    {
        let id = allocate(&svc, "cuda:0", 64 * MIB + 3);
        let bytes = pattern(9, (64 * MIB + 3) as usize);
        svc.write(&id, 0, &bytes).unwrap();
        transfer(&svc, &id, "cuda:0", "cuda:1", TransferMode::Move);
        check(&svc, &id, &bytes, "cuda:0 -> cuda:1");
        let copy = transfer(&svc, &id, "cuda:1", "cuda:0", TransferMode::Copy);
        check(&svc, &copy, &bytes, "cuda:1 -> cuda:0 (copy)");
        free(&svc, &copy);
        free(&svc, &id);
        eprintln!("cuda:0 <-> cuda:1 transfers verified");
    } else {
        eprintln!("one GPU: cuda:0 <-> cuda:1 transfers not tested here");
    }

    // 3. Defragment with verification, including overlapping moves.
    let mut live = Vec::new();
    for i in 0..48u64 {
        let size = (1 + i % 7) * 3 * MIB + i * 4097;
        let id = allocate(&svc, "cuda:0", size);
        let bytes = pattern(100 + i, size as usize);
        svc.write(&id, 0, &bytes).unwrap();
        live.push((id, bytes));
    }
    let mut kept = Vec::new();
    for (i, (id, bytes)) in live.into_iter().enumerate() {
        if i % 3 == 0 {
            free(&svc, &id);
        } else {
            kept.push((id, bytes));
        }
    }
    let r = svc.defragment("cuda:0", &[]).unwrap();
    assert!(r.moved_count > 0, "{r:?}");
    assert!(r.fragmentation_after <= r.fragmentation_before);
    for (id, bytes) in &kept {
        check(&svc, id, bytes, "after defragment on cuda:0");
    }
    eprintln!(
        "defragment cuda:0: moved {} allocations ({} bytes), fragmentation {:.1}% -> {:.1}%",
        r.moved_count, r.moved_bytes, r.fragmentation_before, r.fragmentation_after
    );
    for (id, _) in kept {
        free(&svc, &id);
    }

    // 4. Page release is visible in cuMemGetInfo.
    let opt = |t| OptimizeRequest {
        device_id: "cuda:0".into(),
        optimization_type: t,
        force: false,
        target_usage_percentage: None,
        preserve_allocations: vec![],
        wait_for_completion: true,
    };
    svc.optimize(&opt(MemoryOptimizationType::ClearCache))
        .unwrap();
    let before = free_vram(&svc);
    let big = allocate(&svc, "cuda:0", 4096 * MIB);
    let during = free_vram(&svc);
    assert!(
        before - during >= 4096 * MIB,
        "backing 4 GiB: free {before} -> {during}"
    );
    free(&svc, &big);
    let cleared = svc
        .optimize(&opt(MemoryOptimizationType::ClearCache))
        .unwrap();
    let after = free_vram(&svc);
    assert!(cleared.freed_bytes >= 4096 * MIB, "{cleared:?}");
    assert!(
        after + 64 * MIB >= before,
        "released pages back in cuMemGetInfo: {before} -> {after}"
    );
    let usage = svc
        .get_usage(&DeviceRequest {
            device_id: "cuda:0".into(),
        })
        .unwrap();
    assert_eq!(usage.allocated_bytes, 0);
    assert_eq!(usage.reserved_bytes, 0);
    eprintln!(
        "cuMemGetInfo free: {before} before, {during} with 4 GiB backed, {after} after ClearCache"
    );
    svc.close();
}

/// Issue 19, item 2: model files are read with pread into the pinned staging buffer and copied
/// to the GPU chunk by chunk (no mmap). Every tensor of a model loaded onto cuda:0 equals the
/// file's bytes; a file cut short is MODEL_LOAD_FAILED and leaves nothing on the GPU.
#[test]
fn a_model_loaded_onto_the_gpu_equals_its_file() {
    let Some(svc) = service() else {
        println!("SKIPPED: a_model_loaded_onto_the_gpu_equals_its_file: no GPU");
        return;
    };
    let dir = std::env::temp_dir().join(format!("memcoord-gpu-model-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Odd sizes (element counts of F32), one larger than a staging chunk, many small ones.
    let mut tensors: Vec<(String, usize)> = vec![("big".into(), 100 << 20), ("odd".into(), 12_345)];
    for i in 0..300 {
        tensors.push((format!("small.{i}"), 1000 + i * 37));
    }
    let named: Vec<(&str, usize)> = tensors.iter().map(|(n, c)| (n.as_str(), *c)).collect();
    let bytes = common::write_model(&dir.join("m.safetensors"), &named);
    let svc = svc.with_model_root(&dir);
    let load = |name: &str, path: &str| memcoord::api::ModelLoadRequest {
        model_name: name.into(),
        path: path.into(),
        device_id: "cuda:0".into(),
        keep_alive_seconds: None,
        timeout_seconds: 0.0,
        holder: memcoord::domain::Caller::anonymous(),
    };
    let info = svc.model_load(&load("m", "m.safetensors")).unwrap();
    assert_eq!(info.tensor_count, tensors.len() as u64);
    let listed = svc
        .get_allocations(&memcoord::api::GetAllocationsRequest {
            device_id: "cuda:0".into(),
            allocation_type: None,
            purpose: None,
            owner: Some("model:m".into()),
            tenant: None,
            client_pid: None,
            offset: 0,
            limit: 100_000,
        })
        .unwrap();
    assert_eq!(listed.allocations.len(), tensors.len());
    for a in &listed.allocations {
        check(&svc, &a.allocation_id, &bytes[&a.purpose], &a.purpose);
    }
    // Cut short: refused, nothing left.
    let full = std::fs::read(dir.join("m.safetensors")).unwrap();
    std::fs::write(dir.join("cut.safetensors"), &full[..full.len() - 4096]).unwrap();
    let usage = || {
        svc.get_usage(&DeviceRequest {
            device_id: "cuda:0".into(),
        })
        .unwrap()
        .allocated_bytes
    };
    let before = usage();
    let err = svc.model_load(&load("cut", "cut.safetensors")).unwrap_err();
    assert_eq!(
        err.code,
        memcoord::protocol::ErrorCode::ModelLoadFailed,
        "{}",
        err.message
    );
    assert_eq!(before, usage());
    println!(
        "model {} ({} tensors) on cuda:0 equals its file; a cut file: {}",
        info.size_bytes, info.tensor_count, err.message
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Issue 14: a model on cuda:0, exported under its lease, is a few segments (its tensors are
/// one region backed by physical allocations of up to 1 GiB, not one descriptor per 2 MiB
/// page); the descriptors, imported with the driver and mapped at each segment's
/// `file_offset`, show every tensor's bytes equal to the file's. A defragment with the export
/// live moves other allocations, not the export's, and the mapping still reads the file's
/// bytes. (The claimant here is this process; `scripts/gpu/export_proof.py` claims from
/// another process.)
#[test]
#[allow(unsafe_code)] // the importer's driver calls
fn a_model_exported_from_the_gpu_maps_through_its_descriptors() {
    use common::Requests;
    use common::claim::claim_export;
    use common::inproc::InProcessWorker;
    use cudarc::driver::sys;
    use memcoord::api::actions::{export::Export, unexport::Unexport};
    use memcoord::protocol::ExportInfo;
    use serde_json::json;
    use std::os::fd::IntoRawFd;

    let Some(svc) = service() else {
        println!("SKIPPED: a_model_exported_from_the_gpu_maps_through_its_descriptors: no GPU");
        return;
    };
    let dir = std::env::temp_dir().join(format!("memcoord-gpu-export-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // 300 tensors, ~1.2 GiB of F32: more than one physical allocation of 1 GiB.
    let mut tensors: Vec<(String, usize)> = Vec::new();
    for i in 0..300 {
        tensors.push((format!("layer.{i}.weight"), (1 << 20) + i * 4099));
    }
    let named: Vec<(&str, usize)> = tensors.iter().map(|(n, c)| (n.as_str(), *c)).collect();
    let bytes = common::write_model(&dir.join("m.safetensors"), &named);
    let mut w = InProcessWorker::over(svc.with_model_root(&dir));
    w.send::<common::ModelLoad>(
        json!({"model_name": "m", "path": "m.safetensors", "device_id": "cuda:0"}),
    )
    .unwrap();
    let lease = w
        .send::<common::ModelAcquire>(json!({"model_name": "m"}))
        .unwrap()
        .lease_id;
    // Fragment the GPU around the model: allocations to free, and one to move.
    let mut small = Vec::new();
    for _ in 0..8 {
        small.push(
            w.send::<common::Allocate>(json!({"device_id": "cuda:0", "size_bytes": 3 * MIB}))
                .unwrap()
                .allocation
                .allocation_id,
        );
    }
    let info: ExportInfo = w
        .send::<Export>(json!({"model_name": "m", "lease_id": lease}))
        .unwrap();
    assert!(
        info.device_uuid
            .as_deref()
            .unwrap_or("")
            .starts_with("GPU-")
    );
    let claimed = claim_export(&info);
    assert_eq!(claimed.error_code(), None, "{}", claimed.line);
    let segments = claimed.line["segments"].as_array().unwrap().clone();
    assert_eq!(segments.len(), claimed.fds.len());
    assert!(
        segments.len() <= 4,
        "a model of {} bytes came as {} segments",
        info.size_bytes,
        segments.len()
    );
    // Import and map, as a claimant does.
    let mut got: Vec<u8> = vec![0; info.size_bytes as usize];
    let read_all = |got: &mut Vec<u8>, base: u64| unsafe {
        assert_eq!(
            sys::cuMemcpyDtoH_v2(got.as_mut_ptr().cast(), base, got.len()),
            sys::CUresult::CUDA_SUCCESS
        );
    };
    let base = unsafe {
        assert_eq!(sys::cuInit(0), sys::CUresult::CUDA_SUCCESS);
        let mut dev = 0;
        sys::cuDeviceGet(&raw mut dev, 0);
        let mut ctx = std::ptr::null_mut();
        sys::cuDevicePrimaryCtxRetain(&raw mut ctx, dev);
        sys::cuCtxSetCurrent(ctx);
        let mut base = 0;
        assert_eq!(
            sys::cuMemAddressReserve(&raw mut base, info.size_bytes as usize, 0, 0, 0),
            sys::CUresult::CUDA_SUCCESS
        );
        for (s, fd) in segments.iter().zip(claimed.fds) {
            let mut h = 0;
            let raw = fd.into_raw_fd();
            assert_eq!(
                sys::cuMemImportFromShareableHandle(
                    &raw mut h,
                    raw as usize as *mut std::ffi::c_void,
                    sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
                ),
                sys::CUresult::CUDA_SUCCESS
            );
            libc::close(raw);
            let (off, len, file_off) = (
                s["offset"].as_u64().unwrap(),
                s["size_bytes"].as_u64().unwrap(),
                s["file_offset"].as_u64().unwrap(),
            );
            assert_eq!(
                sys::cuMemMap(base + off, len as usize, file_off as usize, h, 0),
                sys::CUresult::CUDA_SUCCESS,
                "segment {s}"
            );
            sys::cuMemRelease(h);
        }
        let mut desc: sys::CUmemAccessDesc = std::mem::zeroed();
        desc.location.type_ = sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE;
        desc.location.id = 0;
        desc.flags = sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
        assert_eq!(
            sys::cuMemSetAccess(base, info.size_bytes as usize, &raw const desc, 1),
            sys::CUresult::CUDA_SUCCESS
        );
        base
    };
    let verify = |got: &Vec<u8>, when: &str| {
        for t in &info.tensors {
            let at = t.offset as usize;
            assert!(
                got[at..at + t.size_bytes as usize] == bytes[&t.name][..],
                "{when}: tensor {} differs through the mapping",
                t.name
            );
        }
    };
    read_all(&mut got, base);
    verify(&got, "after the claim");
    // A defragment with the export live: frees leave holes, the pass moves what it may.
    for id in small.iter().step_by(2) {
        w.send::<common::Deallocate>(json!({"allocation_id": id}))
            .unwrap();
    }
    let before: Vec<u64> = info.allocations.iter().map(|a| a.offset).collect();
    let d = w
        .send::<common::Defragment>(json!({"device_id": "cuda:0"}))
        .unwrap();
    read_all(&mut got, base);
    verify(&got, "after a defragment");
    let after = w.send::<Export>(json!({"model_name": "m", "lease_id": lease}));
    // A second export of the same model lays it out the same way: nothing of it moved.
    let again: ExportInfo = after.unwrap();
    let now: Vec<u64> = again.allocations.iter().map(|a| a.offset).collect();
    assert_eq!(before, now, "an exported model moved");
    w.send::<Unexport>(json!({"export_id": again.export_id}))
        .unwrap();
    w.send::<Unexport>(json!({"export_id": info.export_id}))
        .unwrap();
    unsafe {
        sys::cuMemUnmap(base, info.size_bytes as usize);
        sys::cuMemAddressFree(base, info.size_bytes as usize);
    }
    println!(
        "model {} bytes on cuda:0 exported as {} segments; defragment moved {} allocations; \
         every tensor equal through the importer's mapping before and after",
        info.size_bytes,
        segments.len(),
        d.moved_count
    );
    let _ = std::fs::remove_dir_all(&dir);
}
