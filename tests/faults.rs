//! Injected backend failures: a device whose page commits or copies fail on demand. Each
//! failure gives the contract's error and changes nothing; no byte is lost.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use common::faulty::{Faults, FaultyBackend};
use memcoord::api::{AllocateRequest, DeviceRequest, TransferMode, TransferRequest};
use memcoord::backends::CpuBackend;
use memcoord::managers::DeviceSetup;
use memcoord::protocol::ErrorCode;
use memcoord::service::MemoryService;
use std::sync::Arc;
use std::sync::atomic::Ordering;

const MIB: u64 = 1 << 20;

struct Setup {
    service: MemoryService,
    faults: Arc<Faults>,
}

fn setup() -> Setup {
    let (faulty, faults) = FaultyBackend::new("faulty", 80 * MIB);
    let service = MemoryService::new(vec![
        DeviceSetup {
            backend: Box::new(CpuBackend::new(80 * MIB).unwrap()),
            budget: 64 * MIB,
            pinned: None,
        },
        DeviceSetup {
            backend: Box::new(faulty),
            budget: 64 * MIB,
            pinned: None,
        },
    ]);
    Setup { service, faults }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed))
        .collect()
}

fn usage(s: &MemoryService, device: &str) -> (u64, u64, u64) {
    let u = s
        .get_usage(&DeviceRequest {
            device_id: device.into(),
        })
        .unwrap();
    (u.allocated_bytes, u.allocation_count, u.total_allocations)
}

fn alloc(s: &MemoryService, device: &str, size: u64) -> Result<String, ErrorCode> {
    s.allocate_now(AllocateRequest::new(device, size))
        .map(|r| r.allocation.allocation_id)
        .map_err(|e| e.code)
}

#[test]
fn a_failing_commit_is_out_of_memory_and_changes_nothing() {
    let s = setup();
    let kept = alloc(&s.service, "faulty", MIB).unwrap();
    let before = usage(&s.service, "faulty");
    s.faults.fail_commit.store(true, Ordering::Relaxed);
    // Fresh pages are needed: refused, nothing left behind.
    assert_eq!(
        alloc(&s.service, "faulty", 8 * MIB),
        Err(ErrorCode::OutOfMemory)
    );
    assert_eq!(
        alloc(&s.service, "faulty", 20 * MIB),
        Err(ErrorCode::OutOfMemory)
    );
    assert_eq!(usage(&s.service, "faulty"), before);
    s.faults.fail_commit.store(false, Ordering::Relaxed);
    alloc(&s.service, "faulty", 8 * MIB).unwrap();
    assert!(s.service.allocation(&kept).is_ok());
    s.service.close();
}

#[test]
fn a_failing_copy_fails_the_transfer_and_keeps_the_source() {
    let s = setup();
    let id = alloc(&s.service, "cpu", 3 * MIB + 5).unwrap();
    let data = pattern(7, (3 * MIB + 5) as usize);
    s.service.write(&id, 0, &data).unwrap();
    s.faults.fail_copy.store(true, Ordering::Relaxed);
    let req = TransferRequest {
        allocation_id: id.clone(),
        source_device_id: "cpu".into(),
        destination_device_id: "faulty".into(),
        mode: TransferMode::Move,
        wait_for_completion: true,
    };
    let started = s.service.start_transfer(&req).unwrap();
    let err = s.service.run_transfer(started).unwrap_err();
    assert_eq!(err.code, ErrorCode::TransferFailed, "{}", err.message);
    // The source is intact, where it was, with its id; the destination holds nothing.
    assert_eq!(s.service.allocation(&id).unwrap().device_id, "cpu");
    let mut back = vec![0u8; data.len()];
    s.service.read(&id, 0, &mut back).unwrap();
    assert!(back == data, "source bytes changed");
    assert_eq!(usage(&s.service, "faulty").0, 0);
    assert_eq!(usage(&s.service, "faulty").1, 0);
    // And the move works once the device does.
    s.faults.fail_copy.store(false, Ordering::Relaxed);
    let started = s.service.start_transfer(&req).unwrap();
    s.service.run_transfer(started).unwrap();
    s.service.read(&id, 0, &mut back).unwrap();
    assert!(back == data);
    assert_eq!(s.service.allocation(&id).unwrap().device_id, "faulty");
    s.service.close();
}

#[test]
fn a_failing_move_stops_a_defragment_without_losing_a_byte() {
    let s = setup();
    let ids: Vec<String> = (0..16)
        .map(|_| alloc(&s.service, "faulty", MIB).unwrap())
        .collect();
    for (i, id) in ids.iter().enumerate() {
        s.service
            .write(id, 0, &pattern(i as u8, MIB as usize))
            .unwrap();
    }
    for id in ids.iter().step_by(2) {
        s.service
            .deallocate(&memcoord::api::DeallocateRequest {
                allocation_id: id.clone(),
                device_id: None,
            })
            .unwrap();
    }
    s.faults.fail_copy.store(true, Ordering::Relaxed);
    let r = s.service.defragment("faulty", &[]).unwrap();
    assert_eq!(r.moved_count, 0, "nothing moved while copies fail");
    s.faults.fail_copy.store(false, Ordering::Relaxed);
    let check = |s: &MemoryService| {
        for (i, id) in ids.iter().enumerate().skip(1).step_by(2) {
            let mut back = vec![0u8; MIB as usize];
            s.read(id, 0, &mut back).unwrap();
            assert!(
                back == pattern(i as u8, MIB as usize),
                "allocation {i} changed"
            );
        }
    };
    check(&s.service);
    let r = s.service.defragment("faulty", &[]).unwrap();
    assert_eq!(r.moved_count, 8);
    check(&s.service);
    s.service.close();
}
