//! Model loading (issue 5): a safetensors file from the page cache into `cpu` allocations,
//! side by side with a plain memcpy of the same bytes out of the same mapping.
//!
//! Run: `cargo bench --bench models` (`-- --gib N` for the file size, default 1).
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report
#![allow(unsafe_code)] // test code: libc calls and memory maps of its own

use memcoord::api::{ModelLoadRequest, ModelRequest};
use memcoord::config::Settings;
use memcoord::service::MemoryService;
use safetensors::tensor::{Dtype, TensorView};
use std::time::Instant;

/// Writes a safetensors file of `total` bytes in 64 MiB f32 tensors.
pub fn write_model(path: &std::path::Path, total: usize) {
    const T: usize = 64 << 20;
    let data: Vec<u8> = (0..T).map(|i| (i % 251) as u8).collect();
    let names: Vec<String> = (0..total / T)
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
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let gib: usize = args
        .iter()
        .position(|a| a == "--gib")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let dir = std::env::temp_dir().join(format!("memcoord-bench-models-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("model.safetensors");
    write_model(&file, gib << 30);
    let bytes = std::fs::read(&file).unwrap(); // warms the page cache
    let mut s = Settings {
        no_gpu: true,
        ..Settings::default()
    };
    s.set_budget(&format!("cpu={}GiB", gib * 3)).unwrap();
    s.set_budget("shm=64MiB").unwrap();
    let svc = MemoryService::new(s.devices().unwrap()).with_model_root(&dir);
    let load = ModelLoadRequest {
        model_name: "m".into(),
        path: "model.safetensors".into(),
        device_id: "cpu".into(),
        keep_alive_seconds: None,
        timeout_seconds: 0.0,
        holder: memcoord::domain::Caller::anonymous(),
    };
    let unload = ModelRequest {
        model_name: "m".into(),
        force: true,
        timeout_seconds: 0.0,
    };
    let (mut loads, mut copies) = (Vec::new(), Vec::new());
    let mut dst = vec![0u8; bytes.len()];
    for round in 0..4 {
        let t = Instant::now();
        let info = svc.model_load(&load).unwrap();
        let secs = t.elapsed().as_secs_f64();
        svc.model_unload(&unload).unwrap();
        let f = std::fs::File::open(&file).unwrap();
        let map = unsafe { memmap2::Mmap::map(&f).unwrap() };
        let t = Instant::now();
        dst.copy_from_slice(&map[..]);
        let copy_secs = t.elapsed().as_secs_f64();
        if round > 0 {
            loads.push(info.size_bytes as f64 / secs / 1e9);
            copies.push(map.len() as f64 / copy_secs / 1e9);
        }
    }
    loads.sort_by(f64::total_cmp);
    copies.sort_by(f64::total_cmp);
    let (l, c) = (loads[loads.len() / 2], copies[copies.len() / 2]);
    println!(
        "model_load of a {gib} GiB safetensors file from the page cache into cpu: {l:.2} GB/s; memcpy from the same mapping {c:.2} GB/s; ratio {:.2}",
        l / c
    );
    std::hint::black_box(&dst);
    let _ = std::fs::remove_dir_all(&dir);
}
