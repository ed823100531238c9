//! GPU benchmarks (issue 4), each side by side in one run with a plain driver copy of the same
//! bytes. Skips, saying so, where there is no GPU. Run by `scripts/gpu-check.sh`, or
//! `cargo bench --bench gpu`.
//!
//! 1. 1 GiB cpu -> cuda:0 and cuda:0 -> cpu transfers (from plain, pageable `cpu` allocations)
//!    vs cuMemcpy from/to pinned host memory, and vs cuMemcpy from/to pageable memory;
//! 2. defragment moves on cuda:0 vs cuMemcpyDtoD of the same bytes;
//! 3. VRAM allocate + free pair in process, pages already backed (p50);
//! 4. the SDXL trace at full scale on cuda:0: peak reserved / peak allocated.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report
#![allow(unsafe_code)] // test code: libc calls and memory maps of its own

use cudarc::driver::sys;
use memcoord::api::{AllocateRequest, TransferMode, TransferRequest};
use memcoord::config::Settings;
use memcoord::managers::replay::replay;
use memcoord::managers::{AllocationEngine, AllocationSpec};
use memcoord::protocol::MemoryAllocationType;
use memcoord::protocol::trace::parse_trace;
use memcoord::service::MemoryService;
use std::time::{Instant, SystemTime};

const GIB: u64 = 1 << 30;

fn ok(r: sys::CUresult, what: &str) {
    assert_eq!(r, sys::CUresult::CUDA_SUCCESS, "{what}");
}

/// Plain driver copies of `bytes` for the baselines; returns GB/s for
/// (pinned HtoD, pinned DtoH, pageable HtoD, pageable DtoH, DtoD).
fn baselines(bytes: usize) -> [f64; 5] {
    unsafe {
        ok(sys::cuInit(0), "cuInit");
        let mut dev = 0;
        ok(sys::cuDeviceGet(&raw mut dev, 0), "cuDeviceGet");
        let mut ctx = std::ptr::null_mut();
        ok(sys::cuDevicePrimaryCtxRetain(&raw mut ctx, dev), "ctx");
        ok(sys::cuCtxSetCurrent(ctx), "set ctx");
        let (mut d1, mut d2) = (0, 0);
        ok(sys::cuMemAlloc_v2(&raw mut d1, bytes), "alloc");
        ok(sys::cuMemAlloc_v2(&raw mut d2, bytes), "alloc");
        let mut pinned = std::ptr::null_mut();
        ok(sys::cuMemHostAlloc(&raw mut pinned, bytes, 0), "host alloc");
        std::ptr::write_bytes(pinned.cast::<u8>(), 7, bytes);
        let mut pageable = vec![7u8; bytes];
        let time = |f: &mut dyn FnMut()| {
            f(); // warm-up
            ok(sys::cuCtxSynchronize(), "sync");
            let t = Instant::now();
            for _ in 0..3 {
                f();
            }
            ok(sys::cuCtxSynchronize(), "sync");
            (3 * bytes) as f64 / t.elapsed().as_secs_f64() / 1e9
        };
        let p = pinned;
        let r = [
            time(&mut || ok(sys::cuMemcpyHtoD_v2(d1, p, bytes), "HtoD")),
            time(&mut || ok(sys::cuMemcpyDtoH_v2(p, d1, bytes), "DtoH")),
            time(&mut || {
                ok(
                    sys::cuMemcpyHtoD_v2(d1, pageable.as_ptr().cast(), bytes),
                    "HtoD",
                );
            }),
            time(&mut || {
                ok(
                    sys::cuMemcpyDtoH_v2(pageable.as_mut_ptr().cast(), d1, bytes),
                    "DtoH",
                );
            }),
            time(&mut || ok(sys::cuMemcpyDtoD_v2(d2, d1, bytes), "DtoD")),
        ];
        // How long pinning 1 GiB of ordinary (already touched) memory takes: the price of
        // copying from pageable memory without staging.
        let t = Instant::now();
        let reg = sys::cuMemHostRegister_v2(pageable.as_mut_ptr().cast(), bytes, 0);
        let reg_ms = t.elapsed().as_secs_f64() * 1e3;
        if reg == sys::CUresult::CUDA_SUCCESS {
            let fast = time(&mut || {
                ok(
                    sys::cuMemcpyHtoD_v2(d1, pageable.as_ptr().cast(), bytes),
                    "HtoD",
                );
            });
            let t = Instant::now();
            sys::cuMemHostUnregister(pageable.as_mut_ptr().cast());
            println!(
                "cuMemHostRegister of {} MiB: {reg_ms:.1} ms, then HtoD {fast:.1} GB/s, unregister {:.1} ms",
                bytes >> 20,
                t.elapsed().as_secs_f64() * 1e3
            );
        } else {
            println!("cuMemHostRegister failed: {reg:?}");
        }
        sys::cuMemFree_v2(d1);
        sys::cuMemFree_v2(d2);
        sys::cuMemFreeHost(pinned);
        r
    }
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

fn transfer_gbps(svc: &MemoryService, id: &str, from: &str, to: &str) -> f64 {
    let t = Instant::now();
    svc.transfer(&TransferRequest {
        allocation_id: id.into(),
        source_device_id: from.into(),
        destination_device_id: to.into(),
        mode: TransferMode::Move,
        wait_for_completion: true,
    })
    .unwrap();
    GIB as f64 / t.elapsed().as_secs_f64() / 1e9
}

/// Writes a safetensors file of about `total` bytes in 256 MiB f32 tensors.
fn write_model(path: &std::path::Path, total: usize) {
    use safetensors::tensor::{Dtype, TensorView};
    const T: usize = 256 << 20;
    let data: Vec<u8> = (0..T).map(|i| (i % 251) as u8).collect();
    let names: Vec<String> = (0..total.div_ceil(T))
        .map(|i| format!("layer.{i:03}.weight"))
        .collect();
    let views: Vec<(String, TensorView<'_>)> = names
        .iter()
        .map(|n| {
            (
                n.clone(),
                TensorView::new(Dtype::F32, vec![T / 4], &data).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    if let Err(reason) = memcoord::backends::cuda::probe() {
        println!("skipping GPU benchmarks: {reason}");
        return;
    }
    let mut s = Settings::default();
    s.set_budget("cpu=8GiB").unwrap();
    s.set_budget("shm=1GiB").unwrap();
    s.set_budget("cuda:0=100GiB").unwrap();
    let svc = MemoryService::new(s.devices().unwrap());
    let gpu = svc
        .list_devices()
        .devices
        .into_iter()
        .find(|d| d.device_id == "cuda:0")
        .unwrap();
    println!(
        "== {} ({} bytes), {} ==",
        gpu.name,
        gpu.total_memory,
        humantime::format_rfc3339_seconds(SystemTime::now())
    );

    // 1. Transfers of 1 GiB, five round trips after one warm-up: from a plain (pageable) cpu
    // allocation, and from a Staging one (served from the pinned pool).
    let base = baselines(GIB as usize);
    let mut results = Vec::new();
    for kind in ["General", "Staging"] {
        let id = allocate_kind(&svc, "cpu", GIB, kind);
        svc.write(&id, 0, &vec![3u8; GIB as usize]).unwrap();
        let (mut h2d, mut d2h) = (Vec::new(), Vec::new());
        for round in 0..6 {
            let a = transfer_gbps(&svc, &id, "cpu", "cuda:0");
            let b = transfer_gbps(&svc, &id, "cuda:0", "cpu");
            if round > 0 {
                h2d.push(a);
                d2h.push(b);
            }
        }
        svc.deallocate(&memcoord::api::DeallocateRequest {
            allocation_id: id,
            device_id: None,
        })
        .unwrap();
        results.push((kind, median(h2d), median(d2h)));
    }
    {
        // The host side alone: 1 GiB copied over rayon's threads (pageable to pageable).
        use rayon::prelude::*;
        let src = vec![1u8; GIB as usize];
        let mut dst = vec![2u8; GIB as usize];
        let t = Instant::now();
        dst.par_chunks_mut(4 << 20)
            .zip(src.par_chunks(4 << 20))
            .for_each(|(d, s)| d.copy_from_slice(s));
        println!(
            "host memcpy of 1 GiB over {} threads: {:.1} GB/s",
            rayon::current_num_threads(),
            GIB as f64 / t.elapsed().as_secs_f64() / 1e9
        );
    }
    for (kind, h2d, d2h) in results {
        println!(
            "cpu ({kind}) -> cuda:0 transfer, 1 GiB: {h2d:.1} GB/s; cuMemcpyHtoD pinned {:.1} GB/s ({:.0}%), pageable {:.1} GB/s ({:.1}x)",
            base[0],
            h2d / base[0] * 100.0,
            base[2],
            h2d / base[2]
        );
        println!(
            "cuda:0 -> cpu ({kind}) transfer, 1 GiB: {d2h:.1} GB/s; cuMemcpyDtoH pinned {:.1} GB/s ({:.0}%), pageable {:.1} GB/s ({:.1}x)",
            base[1],
            d2h / base[1] * 100.0,
            base[3],
            d2h / base[3]
        );
    }

    // 2. Defragment on cuda:0: 64 allocations of 512 MiB, every other freed (16 GiB move).
    let mut ids = Vec::new();
    for _ in 0..64 {
        ids.push(allocate(&svc, "cuda:0", 512 << 20));
    }
    for id in ids.iter().step_by(2) {
        svc.deallocate(&memcoord::api::DeallocateRequest {
            allocation_id: id.clone(),
            device_id: None,
        })
        .unwrap();
    }
    let t = Instant::now();
    let r = svc.defragment("cuda:0", &[]).unwrap();
    let secs = t.elapsed().as_secs_f64();
    let defrag_gbps = 2.0 * r.moved_bytes as f64 / secs / 1e9;
    println!(
        "defragment cuda:0: moved {} MiB at {:.0} GB/s read+write; cuMemcpyDtoD {:.0} GB/s read+write ({:.0}%)",
        r.moved_bytes >> 20,
        defrag_gbps,
        2.0 * base[4],
        defrag_gbps / (2.0 * base[4]) * 100.0
    );
    svc.close();

    // Models: a 2.5 GB safetensors file from the page cache into cuda:0, beside
    // safetensors.torch.load_file(device="cuda:0") in the same run; offload and restore of a
    // 5 GB model, beside pinned cuMemcpy.
    {
        let dir = std::env::temp_dir().join("memcoord-gpu-models");
        std::fs::create_dir_all(&dir).unwrap();
        let small = dir.join("m25.safetensors");
        let big = dir.join("m50.safetensors");
        write_model(&small, 2_500_000_000);
        write_model(&big, 5_000_000_000);
        let _ = std::fs::read(&small).map(|b| std::hint::black_box(b.len()));
        let mut s = Settings::default();
        s.set_budget("cpu=32GiB").unwrap();
        s.set_budget("shm=1GiB").unwrap();
        s.set_budget("cuda:0=100GiB").unwrap();
        // Offloaded model weights live in the pinned pool when it has room.
        s.pinned_pool = Some(8 << 30);
        let svc = MemoryService::new(s.devices().unwrap()).with_model_root(&dir);
        let load = |name: &str, file: &str| memcoord::api::ModelLoadRequest {
            model_name: name.into(),
            path: file.into(),
            device_id: "cuda:0".into(),
            keep_alive_seconds: None,
            timeout_seconds: 0.0,
            holder: memcoord::domain::Caller::anonymous(),
        };
        let unload = |name: &str| memcoord::api::ModelRequest {
            model_name: name.into(),
            force: true,
            timeout_seconds: 0.0,
        };
        let mut rates = Vec::new();
        for round in 0..3 {
            let t = Instant::now();
            let info = svc.model_load(&load("m", "m25.safetensors")).unwrap();
            let r = info.size_bytes as f64 / t.elapsed().as_secs_f64() / 1e9;
            svc.model_unload(&unload("m")).unwrap();
            if round > 0 {
                rates.push(r);
            }
        }
        let ours = median(rates);
        let py = std::process::Command::new("python3")
            .arg("-c")
            .arg(format!(
                "import time,torch\nfrom safetensors.torch import load_file\np='{}'\nload_file(p,device='cuda:0');torch.cuda.synchronize()\nr=[]\nfor _ in range(2):\n  t=time.perf_counter();d=load_file(p,device='cuda:0');torch.cuda.synchronize();r.append(sum(v.numel()*v.element_size() for v in d.values())/(time.perf_counter()-t)/1e9);del d\nprint(sorted(r)[-1])",
                small.display()
            ))
            .output();
        let py_rate: Option<f64> = py
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok());
        match py_rate {
            Some(p) => println!(
                "model_load 2.5 GB safetensors -> cuda:0: {ours:.1} GB/s; safetensors.torch.load_file(device='cuda:0') {p:.1} GB/s; ratio {:.1}x",
                ours / p
            ),
            None => println!(
                "model_load 2.5 GB safetensors -> cuda:0: {ours:.1} GB/s; (python baseline unavailable)"
            ),
        }
        let info = svc.model_load(&load("big", "m50.safetensors")).unwrap();
        let opt = |strategy| memcoord::api::ModelOptimizeRequest {
            device_id: Some("cuda:0".into()),
            strategy,
            idle_seconds: 0.0,
            target_bytes: None,
        };
        let (mut offs, mut backs) = (Vec::new(), Vec::new());
        for _ in 0..3 {
            let t = Instant::now();
            let r = svc
                .model_optimize(&opt(memcoord::api::ModelStrategy::OffloadIdle))
                .unwrap();
            offs.push(info.size_bytes as f64 / t.elapsed().as_secs_f64() / 1e9);
            assert_eq!(r.offloaded, vec!["big".to_string()]);
            let t = Instant::now();
            let lease = svc
                .model_acquire(&memcoord::api::ModelAcquireRequest {
                    model_name: "big".into(),
                    timeout_seconds: 30.0,
                    ttl_seconds: None,
                })
                .unwrap();
            backs.push(info.size_bytes as f64 / t.elapsed().as_secs_f64() / 1e9);
            svc.model_release(&memcoord::api::LeaseRequest {
                lease_id: lease.lease_id,
            })
            .unwrap();
        }
        println!(
            "offload/restore cycles of a {:.1} GB model, each GB/s: offload {offs:.1?}, restore {backs:.1?}",
            info.size_bytes as f64 / 1e9
        );
        let (off, back) = (median(offs), median(backs));
        println!(
            "offload cuda:0 -> cpu (pinned pool) {off:.1} GB/s ({:.0}% of pinned DtoH {:.1}); restore {back:.1} GB/s ({:.0}% of pinned HtoD {:.1})",
            off / base[1] * 100.0,
            base[1],
            back / base[0] * 100.0,
            base[0]
        );
        svc.close();
        let _ = std::fs::remove_dir_all(&dir);
    }

    // 3. VRAM allocate + free pair in process, pages already backed.
    let mut engine = AllocationEngine::new(s.devices().unwrap());
    let d = engine.device_index("cuda:0").unwrap();
    let spec = AllocationSpec::general;
    let now = SystemTime::now();
    let keep: Vec<_> = (0..1000u64)
        .map(|i| engine.try_allocate(d, &spec(4096 + i * 64), now).unwrap())
        .collect();
    let warm = engine.try_allocate(d, &spec(64 << 20), now).unwrap();
    engine.free_id(&warm);
    let mut samples = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        for k in 0..1000u64 {
            let id = engine
                .try_allocate(d, &spec(256 + (k % 64) * 4096), now)
                .unwrap();
            engine.free_id(&id);
        }
        samples.push(t.elapsed().as_nanos() as f64 / 1000.0);
    }
    println!(
        "VRAM allocate + free pair (pages backed, 1,000 live): p50 {:.0} ns",
        median(samples)
    );
    for id in keep {
        engine.free_id(&id);
    }
    engine.trim(d);

    // 4. The SDXL trace at full scale on cuda:0.
    let trace = std::env::var("MEMCOORD_TRACE").unwrap_or_else(|_| {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/assets/traces/sdxl-inference.jsonl"
        )
        .to_string()
    });
    match std::fs::File::open(&trace) {
        Ok(f) => {
            let ops = parse_trace(std::io::BufReader::new(f)).unwrap();
            let r = replay(&mut engine, d, &ops, 1.0, None);
            println!(
                "SDXL trace, full scale, cuda:0: {:.0} ops/s; peak allocated {} B, peak reserved {} B, reserved/allocated {:.4}, fragmentation at peak {:.2}%, failed {}",
                r.ops_per_second,
                r.peak_allocated_bytes,
                r.peak_reserved_bytes,
                r.reserved_over_allocated,
                r.fragmentation_percentage_at_peak,
                r.failed_allocations
            );
        }
        Err(e) => println!("no trace at {trace} ({e}): skipped the replay"),
    }
    engine.close();
}
