//! In-process engine benchmarks (issue 3), each with its baseline in the same run:
//!
//! 1. allocate + free pair through the engine with 1,000 / 100,000 / 1,000,000 live allocations
//!    (p50 over batches of 1,000 pairs), to show O(1);
//! 2. heap bytes of metadata per live allocation, counted by a counting global allocator;
//! 3. defragment throughput against a plain memcpy of the same bytes;
//! 4. the SDXL trace at 1/16 scale on `cpu`: peak reserved / peak allocated.
//!
//! Run: `cargo bench --bench engine` (add `-- --quick` for a short run, `-- --pairs-only` for
//! the first part only).
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report
#![allow(unsafe_code)] // test code: libc calls and memory maps of its own

use memcoord::backends::CpuBackend;
use memcoord::managers::replay::replay;
use memcoord::managers::{AllocationEngine, AllocationSpec, DeviceSetup};
use memcoord::protocol::trace::parse_trace;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Instant, SystemTime};

/// Counts live heap bytes (why not a crate: ten lines, and the figure must include every
/// allocation the engine makes).
struct Counting;
static HEAP: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        HEAP.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        HEAP.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        HEAP.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn engine(budget: u64) -> AllocationEngine {
    AllocationEngine::new(vec![DeviceSetup {
        backend: Box::new(CpuBackend::new(budget + budget / 4).expect("reserve address space")),
        budget,
        pinned: None,
    }])
}

fn spec(size: u64) -> AllocationSpec {
    AllocationSpec::general(size)
}

/// Sizes 64..1024 bytes from a fixed sequence.
fn size_at(i: u64) -> u64 {
    64 + (i.wrapping_mul(2_654_435_761) % 961)
}

fn pair_p50(live: u64, batches: usize) -> (f64, f64) {
    let mut e = engine(2 << 30);
    let now = SystemTime::now();
    let heap_before = HEAP.load(Ordering::Relaxed);
    let mut ids = Vec::with_capacity(live as usize);
    for i in 0..live {
        ids.push(e.try_allocate(0, &spec(size_at(i)), now).expect("fill"));
    }
    let per_alloc = (HEAP.load(Ordering::Relaxed) - heap_before) as f64 / live as f64;
    // Free a scattered tenth so the pairs run among holes, as in real use.
    for id in ids.iter().step_by(10) {
        e.free_id(id);
    }
    let mut samples = Vec::with_capacity(batches);
    let mut k = 0u64;
    for _ in 0..batches {
        let t = Instant::now();
        for _ in 0..1000 {
            k += 1;
            let id = e.try_allocate(0, &spec(size_at(k)), now).expect("pair");
            e.free_id(&id);
        }
        samples.push(t.elapsed().as_nanos() as f64 / 1000.0);
    }
    samples.sort_by(f64::total_cmp);
    (samples[samples.len() / 2], per_alloc)
}

fn defragment_vs_memcpy(total: u64) -> (f64, f64, u64) {
    const CHUNK: u64 = 1 << 20;
    let mut e = engine(total * 2);
    let now = SystemTime::now();
    let n = total / CHUNK;
    let data = vec![0xA5u8; CHUNK as usize];
    let mut ids = Vec::new();
    for _ in 0..n {
        let id = e.try_allocate(0, &spec(CHUNK), now).unwrap();
        e.write(&id.to_string(), 0, &data).unwrap();
        ids.push(id);
    }
    for id in ids.iter().step_by(2) {
        e.free_id(id);
    }
    let t = Instant::now();
    let pass = e.defragment_pass(0, u64::MAX, &[]);
    let secs = t.elapsed().as_secs_f64();
    let moved = pass.compaction.moved_bytes;
    // The baseline: memcpy of the same bytes in the same chunk size, buffers already backed.
    let src = vec![1u8; moved as usize];
    let mut dst = vec![2u8; moved as usize];
    let t = Instant::now();
    for (d, s) in dst
        .chunks_mut(CHUNK as usize)
        .zip(src.chunks(CHUNK as usize))
    {
        d.copy_from_slice(s);
    }
    let memcpy_secs = t.elapsed().as_secs_f64();
    std::hint::black_box(&dst);
    (moved as f64 / secs, moved as f64 / memcpy_secs, moved)
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let batches = if quick { 50 } else { 300 };

    println!("== allocate + free pair through the engine (p50 of 1,000-pair batches) ==");
    let mut results = Vec::new();
    for live in [1_000u64, 100_000, 1_000_000] {
        let (p50, per_alloc) = pair_p50(live, batches);
        println!(
            "{live:>9} live: {p50:>7.1} ns per pair   heap metadata {per_alloc:>6.1} B per live allocation"
        );
        results.push((live, p50));
    }
    println!(
        "ratio 1,000,000 live / 1,000 live: {:.2}",
        results[2].1 / results[0].1
    );

    if std::env::args().any(|a| a == "--pairs-only") {
        return;
    }
    println!(
        "== defragment vs memcpy (each trial: one defragment, then memcpy of the same bytes) =="
    );
    let mut ratios = Vec::new();
    for trial in 0..if quick { 2 } else { 5 } {
        let (defrag, memcpy, moved) = defragment_vs_memcpy(if quick { 256 << 20 } else { 1 << 30 });
        println!(
            "trial {trial}: moved {:.0} MiB: defragment {:.2} GB/s, memcpy {:.2} GB/s, ratio {:.2}",
            moved as f64 / f64::from(1 << 20),
            defrag / 1e9,
            memcpy / 1e9,
            defrag / memcpy
        );
        ratios.push(defrag / memcpy);
    }
    ratios.sort_by(f64::total_cmp);
    println!("median ratio {:.2}", ratios[ratios.len() / 2]);

    let trace = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/assets/traces/sdxl-inference.jsonl"
    );
    match std::fs::File::open(trace) {
        Ok(f) => {
            let ops = parse_trace(std::io::BufReader::new(f)).expect("trace");
            let mut e = engine(4 << 30);
            let r = replay(&mut e, 0, &ops, 0.0625, None);
            println!("== SDXL trace at 1/16 on cpu ==");
            println!(
                "ops/s {:.0}; peak allocated {} B, peak reserved {} B, reserved/allocated {:.4}, fragmentation at peak {:.2}%",
                r.ops_per_second,
                r.peak_allocated_bytes,
                r.peak_reserved_bytes,
                r.reserved_over_allocated,
                r.fragmentation_percentage_at_peak
            );
        }
        Err(_) => println!("(no trace at {trace}: skipped the replay)"),
    }
}
