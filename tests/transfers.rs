//! memory.transfer and memory.get_transfer between host devices through the stdio transport
//! (in process), with byte-for-byte verification through `shm` handles.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use common::inproc::InProcessWorker;
use common::{
    Allocate, Deallocate, GetAllocations, GetTransfer, Requests, Transfer, map, pattern, typed,
};
use memcoord::protocol::{MemoryAllocationType, MemoryTransfer, TransferStatus};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

fn shm_alloc(w: &mut impl Requests, size: u64, extra: Value) -> (String, String, usize) {
    let mut data = json!({"device_id": "shm", "size_bytes": size});
    if let (Some(d), Some(e)) = (data.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            d.insert(k.clone(), v.clone());
        }
    }
    let a = w.send::<Allocate>(data).unwrap().allocation;
    let h = a.handle.unwrap();
    (a.allocation_id, h.path, h.offset as usize)
}

fn allocations(w: &mut impl Requests, device: &str) -> Vec<memcoord::protocol::MemoryAllocation> {
    let list = w
        .send::<GetAllocations>(json!({"device_id": device}))
        .unwrap();
    assert_eq!(list.total_count, list.allocations.len() as u64);
    list.allocations
}

fn handle_of(w: &mut impl Requests, id: &str, device: &str) -> Option<(String, usize)> {
    allocations(w, device)
        .into_iter()
        .find(|a| a.allocation_id == id)
        .map(|a| {
            a.handle
                .map_or((String::new(), 0), |h| (h.path, h.offset as usize))
        })
}

fn transfer(w: &mut impl Requests, data: Value) -> MemoryTransfer {
    w.send::<Transfer>(data).unwrap()
}

fn wait_done(w: &mut impl Requests, transfer_id: &str) -> MemoryTransfer {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let t = w
            .send::<GetTransfer>(json!({"transfer_id": transfer_id}))
            .unwrap();
        if t.status != TransferStatus::Running && t.status != TransferStatus::Queued {
            return t;
        }
        assert!(Instant::now() < deadline, "transfer still running: {t:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn move_shm_to_cpu_and_back_keeps_the_id_and_every_byte() {
    let mut w = InProcessWorker::small();
    let size = 5 * MIB + 123;
    let (id, path, off) = shm_alloc(
        &mut w,
        size,
        json!({"purpose": "latents", "allocation_type": "Activations"}),
    );
    let data = pattern(1, size as usize);
    map(&path)[off..off + size as usize].copy_from_slice(&data);
    let shm_before = w.stats("shm");

    // shm -> cpu, waiting.
    let t = transfer(
        &mut w,
        json!({"allocation_id": id, "source_device_id": "shm", "destination_device_id": "cpu", "wait_for_completion": true}),
    );
    assert_eq!(t.status, TransferStatus::Completed, "{t:?}");
    assert_eq!(t.mode, "move");
    assert_eq!(t.allocation_id, id);
    assert_eq!(
        t.destination_allocation_id.as_deref(),
        Some(id.as_str()),
        "a move keeps the id"
    );
    assert_eq!(t.total_bytes, size);
    assert_eq!(t.bytes_transferred, size);
    assert_eq!(t.progress_percentage, 100.0);
    assert!(t.bandwidth_bytes_per_second > 0.0);
    assert!(t.completed_at.is_some());
    assert!(t.error_message.is_none());
    let moved = allocations(&mut w, "cpu");
    assert_eq!(moved[0].allocation_id, id);
    assert_eq!(moved[0].purpose, "latents");
    assert_eq!(moved[0].allocation_type, MemoryAllocationType::Activations);
    assert_eq!(allocations(&mut w, "shm").len(), 0);
    let shm_after = w.stats("shm");
    assert_eq!(shm_after.allocated_bytes, shm_before.allocated_bytes - size);
    assert_eq!(w.stats("cpu").allocated_bytes, size);

    // cpu -> shm in the background, then verify through the new handle.
    let t = transfer(
        &mut w,
        json!({"allocation_id": id, "source_device_id": "cpu", "destination_device_id": "shm"}),
    );
    assert!(
        t.status == TransferStatus::Running || t.status == TransferStatus::Completed,
        "{t:?}"
    );
    let t = wait_done(&mut w, &t.transfer_id);
    assert_eq!(t.status, TransferStatus::Completed);
    let (path, off) = handle_of(&mut w, &id, "shm").expect("back on shm");
    assert!(
        map(&path)[off..off + size as usize] == data[..],
        "bytes changed on the round trip"
    );
    assert_eq!(w.stats("cpu").allocated_bytes, 0);
}

#[test]
fn copy_makes_a_new_allocation_with_the_same_type_purpose_and_persistence() {
    let mut w = InProcessWorker::small();
    let size = 3 * MIB;
    let (id, path, off) = shm_alloc(
        &mut w,
        size,
        json!({"purpose": "vae", "allocation_type": "Cache", "persistent": true}),
    );
    let data = pattern(2, size as usize);
    map(&path)[off..off + size as usize].copy_from_slice(&data);
    // shm -> cpu copy, then cpu copy -> shm copy: two new allocations, source untouched.
    let t = transfer(
        &mut w,
        json!({"allocation_id": id, "source_device_id": "shm", "destination_device_id": "cpu", "mode": "copy", "wait_for_completion": true}),
    );
    assert_eq!(t.mode, "copy");
    let cpu_copy = t.destination_allocation_id.unwrap();
    assert_ne!(cpu_copy, id);
    let listed = allocations(&mut w, "cpu");
    let a = &listed[0];
    assert_eq!(a.allocation_id, cpu_copy);
    assert_eq!(
        (a.purpose.as_str(), a.allocation_type, a.persistent),
        ("vae", MemoryAllocationType::Cache, true)
    );
    let t = transfer(
        &mut w,
        json!({"allocation_id": cpu_copy, "source_device_id": "cpu", "destination_device_id": "shm", "mode": "COPY", "wait_for_completion": true}),
    );
    let shm_copy = t.destination_allocation_id.unwrap();
    let (p2, o2) = handle_of(&mut w, &shm_copy, "shm").unwrap();
    assert!(
        map(&p2)[o2..o2 + size as usize] == data[..],
        "copy of a copy differs"
    );
    let (p1, o1) = handle_of(&mut w, &id, "shm").unwrap();
    assert_eq!(
        (p1.as_str(), o1),
        (path.as_str(), off),
        "the source stays where it was"
    );
    assert!(
        map(&p1)[o1..o1 + size as usize] == data[..],
        "source changed"
    );
    assert_eq!(allocations(&mut w, "shm").len(), 2);
}

#[test]
fn every_transfer_rule_is_enforced_and_failures_change_nothing() {
    let mut w = InProcessWorker::small();
    let (id, _, _) = shm_alloc(&mut w, MIB, json!({}));
    let reservation = w
        .send::<Allocate>(
            json!({"device_id": "shm", "size_bytes": MIB, "allocation_type": "Reservation"}),
        )
        .unwrap()
        .allocation
        .allocation_id;
    let before = (w.stats("shm"), w.stats("cpu"));
    let cases = vec![
        (
            json!({"allocation_id": id, "source_device_id": "shm", "destination_device_id": "shm"}),
            "INVALID_TRANSFER_PARAMS",
            "Source and destination cannot be the same",
        ),
        (
            json!({"allocation_id": id, "source_device_id": "cpu", "destination_device_id": "shm"}),
            "INVALID_TRANSFER_PARAMS",
            "is on shm",
        ),
        (
            json!({"allocation_id": reservation, "source_device_id": "shm", "destination_device_id": "cpu"}),
            "INVALID_TRANSFER_PARAMS",
            "Reservation",
        ),
        (
            json!({"allocation_id": id, "source_device_id": "shm", "destination_device_id": "cuda:9"}),
            "INVALID_DEVICE",
            "cuda:9",
        ),
        (
            json!({"allocation_id": "0b5a4c3e-1111-4222-8333-444455556666", "source_device_id": "shm", "destination_device_id": "cpu"}),
            "ALLOCATION_NOT_FOUND",
            "0b5a4c3e",
        ),
        (
            json!({"allocation_id": id, "source_device_id": "shm", "destination_device_id": "cpu", "mode": "teleport"}),
            "INVALID_PARAMETER",
            "mode",
        ),
        (
            json!({"source_device_id": "shm", "destination_device_id": "cpu"}),
            "INVALID_PARAMETER",
            "allocation_id",
        ),
    ];
    for (data, code, mentions) in cases {
        let e = w.send::<Transfer>(data.clone()).unwrap_err();
        assert_eq!(e.code.as_str(), code, "{data}: {e:?}");
        assert!(e.message.contains(mentions), "{data}: {e:?}");
    }
    // No room on the destination: OUT_OF_MEMORY at once, no waiting.
    let big_id = w
        .send::<Allocate>(json!({"device_id": "cpu", "size_bytes": 60 * MIB}))
        .unwrap()
        .allocation
        .allocation_id;
    let (id8, _, _) = shm_alloc(&mut w, 8 * MIB, json!({}));
    let started = Instant::now();
    let e = w
        .send::<Transfer>(
            json!({"allocation_id": id8, "source_device_id": "shm", "destination_device_id": "cpu", "wait_for_completion": true}),
        )
        .unwrap_err();
    assert_eq!(e.code.as_str(), "OUT_OF_MEMORY", "{e:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    w.send::<Deallocate>(json!({"allocation_id": big_id}))
        .unwrap();
    w.send::<Deallocate>(json!({"allocation_id": id8})).unwrap();
    let after = (w.stats("shm"), w.stats("cpu"));
    assert_eq!(before.0.allocated_bytes, after.0.allocated_bytes);
    assert_eq!(before.1.allocated_bytes, after.1.allocated_bytes);
    // Unknown transfers (the envelope's status code is the wire's: read as written).
    let v = w.request(
        "memory.get_transfer",
        json!({"transfer_id": "6f1c2a4e-0000-4000-8000-000000000000"}),
    );
    assert_eq!(v["error_code"], "TRANSFER_NOT_FOUND");
    assert_eq!(v["status_code"], 404);
    assert_eq!(
        w.send::<GetTransfer>(json!({})).unwrap_err().code.as_str(),
        "INVALID_PARAMETER"
    );
}

#[test]
fn many_transfers_run_at_once() {
    let mut w = InProcessWorker::start("1GiB", "1GiB");
    let sizes = [64 * MIB, 96 * MIB, 128 * MIB];
    let mut ids = Vec::new();
    for (i, size) in sizes.iter().enumerate() {
        let (id, path, off) = shm_alloc(&mut w, *size, json!({}));
        map(&path)[off..off + *size as usize]
            .copy_from_slice(&pattern(10 + i as u64, *size as usize));
        ids.push(id);
    }
    // Three transfers started in one write, so they are in flight together.
    let mut lines = String::new();
    for (k, id) in ids.iter().enumerate() {
        lines += &format!(
            "{}\n",
            json!({"request_id": format!("t{k}"), "action": "memory.transfer",
                   "data": {"allocation_id": id, "source_device_id": "shm", "destination_device_id": "cpu"}})
        );
    }
    w.send_raw(lines.as_bytes());
    let transfers: Vec<String> = (0..3)
        .map(|k| {
            let t = w.wait_for(&format!("t{k}"), Duration::from_secs(10));
            typed::<Transfer>(t).unwrap().transfer_id
        })
        .collect();
    for t in &transfers {
        let s = wait_done(&mut w, t);
        assert_eq!(s.status, TransferStatus::Completed, "{s:?}");
        assert_eq!(s.progress_percentage, 100.0);
    }
    assert_eq!(w.stats("cpu").allocated_bytes, sizes.iter().sum::<u64>());
    assert_eq!(w.stats("shm").allocated_bytes, 0);
    // Bring each back and check every byte.
    for (k, id) in ids.iter().enumerate() {
        let t = transfer(
            &mut w,
            json!({"allocation_id": id, "source_device_id": "cpu", "destination_device_id": "shm", "wait_for_completion": true}),
        );
        assert_eq!(t.status, TransferStatus::Completed);
        let (path, off) = handle_of(&mut w, id, "shm").unwrap();
        let size = sizes[k] as usize;
        assert!(map(&path)[off..off + size] == pattern(10 + k as u64, size)[..]);
    }
}
