//! Transfer rules that need a transfer in progress: a test device whose writes are slow, and
//! 1 MiB transfer chunks. The service hands the engine fairly to waiting requests between
//! chunks, so a request made while a chunk copies is answered before the next chunk: the
//! allocation is ALLOCATION_IN_USE for deallocate and for another transfer, and clear skips it.
//! And a destination that fails mid-copy: TRANSFER_FAILED, the source intact, the partial
//! destination freed.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use common::faulty::FaultyBackend;
use memcoord::api::{
    AllocateRequest, ClearRequest, DeallocateRequest, DeviceRequest, TransferMode, TransferRequest,
};
use memcoord::backends::CpuBackend;
use memcoord::managers::DeviceSetup;
use memcoord::protocol::{ErrorCode, TransferStatus};
use memcoord::service::MemoryService;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc;

const MIB: u64 = 1 << 20;

fn service(device: FaultyBackend) -> MemoryService {
    MemoryService::with_transfer_chunk_bytes(
        MemoryService::new(vec![
            DeviceSetup {
                backend: Box::new(CpuBackend::new(1024 * MIB).unwrap()),
                budget: 800 * MIB,
                pinned: None,
            },
            DeviceSetup {
                backend: Box::new(device),
                budget: 800 * MIB,
                pinned: None,
            },
        ]),
        MIB,
    )
}

fn allocate(svc: &MemoryService, size: u64) -> String {
    svc.allocate_now(AllocateRequest::new("cpu", size))
        .unwrap()
        .allocation
        .allocation_id
}

fn to_test(id: &str) -> TransferRequest {
    TransferRequest {
        allocation_id: id.into(),
        source_device_id: "cpu".into(),
        destination_device_id: "test".into(),
        mode: TransferMode::Move,
        wait_for_completion: true,
    }
}

fn data(size: u64) -> Vec<u8> {
    (0..size).map(|i| (i % 253) as u8).collect()
}

#[test]
fn an_allocation_in_transfer_is_in_use_until_the_transfer_ends() {
    let (started_tx, write_started) = mpsc::channel();
    let (device, faults) = FaultyBackend::new("test", 1024 * MIB);
    faults.write_delay_ms.store(50, Ordering::Relaxed);
    *faults.write_started.lock() = Some(started_tx);
    let svc = Arc::new(service(device));
    let _before = allocate(&svc, 4 * MIB);
    let id = allocate(&svc, 8 * MIB);
    let bytes = data(8 * MIB);
    svc.write(&id, 0, &bytes).unwrap();
    let started = svc.start_transfer(&to_test(&id)).unwrap();
    let runner = {
        let svc = Arc::clone(&svc);
        std::thread::spawn(move || svc.run_transfer(started))
    };
    write_started.recv().unwrap(); // the first of 8 chunks is being copied

    let e = svc
        .deallocate(&DeallocateRequest {
            allocation_id: id.clone(),
            device_id: None,
        })
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::AllocationInUse, "{}", e.message);
    let e = svc.start_transfer(&to_test(&id)).map(|_| ()).unwrap_err();
    assert_eq!(e.code, ErrorCode::AllocationInUse, "{}", e.message);
    let cleared = svc
        .clear(&ClearRequest {
            device_id: "cpu".into(),
            force: true,
        })
        .unwrap();
    assert_eq!(
        cleared.cleared_count, 1,
        "clear skips the allocation in transfer"
    );

    let t = runner.join().unwrap().unwrap();
    assert_eq!(t.status, TransferStatus::Completed);
    let a = svc.allocation(&id).unwrap();
    assert_eq!(a.device_id, "test");
    let mut back = vec![0u8; bytes.len()];
    svc.read(&id, 0, &mut back).unwrap();
    assert!(back == bytes);
    svc.deallocate(&DeallocateRequest {
        allocation_id: id,
        device_id: None,
    })
    .unwrap();
}

#[test]
fn a_failed_transfer_leaves_the_source_intact_and_frees_the_destination() {
    let (device, faults) = FaultyBackend::new("test", 1024 * MIB);
    faults.fail_after_bytes.store(3 * MIB, Ordering::Relaxed);
    let svc = service(device);
    let size = 6 * MIB;
    let id = allocate(&svc, size);
    let bytes = data(size);
    svc.write(&id, 0, &bytes).unwrap();

    let started = svc.start_transfer(&to_test(&id)).unwrap();
    let transfer_id = started.wire.transfer_id.clone();
    let err = svc.run_transfer(started).unwrap_err();
    assert_eq!(err.code, ErrorCode::TransferFailed);
    assert!(
        err.message.contains("injected failure") && err.message.contains("intact"),
        "{}",
        err.message
    );

    let status = svc.get_transfer(&transfer_id).unwrap();
    assert_eq!(status.status, TransferStatus::Failed);
    assert!(status.error_message.is_some() && status.completed_at.is_some());
    assert!(
        status.bytes_transferred > 0 && status.bytes_transferred < size,
        "failed part-way"
    );

    assert_eq!(svc.allocation(&id).unwrap().device_id, "cpu");
    let mut back = vec![0u8; size as usize];
    svc.read(&id, 0, &mut back).unwrap();
    assert!(back == bytes, "source changed by a failed transfer");
    let usage = svc
        .get_usage(&DeviceRequest {
            device_id: "test".into(),
        })
        .unwrap();
    assert_eq!((usage.allocated_bytes, usage.allocation_count), (0, 0));
    svc.deallocate(&DeallocateRequest {
        allocation_id: id,
        device_id: None,
    })
    .unwrap();
}

#[test]
fn a_transfer_dropped_before_it_runs_undoes_itself() {
    // What happens when the thread that was to copy never runs (it could not start, or the
    // worker stopped first): the accepted transfer is dropped. Its ends must not stay busy.
    let (device, _faults) = FaultyBackend::new("test", 1024 * MIB);
    let svc = service(device);
    let size = 4 * MIB;
    let id = allocate(&svc, size);
    let bytes = data(size);
    svc.write(&id, 0, &bytes).unwrap();

    let started = svc.start_transfer(&to_test(&id)).unwrap();
    let transfer_id = started.wire.transfer_id.clone();
    let busy = svc
        .deallocate(&DeallocateRequest {
            allocation_id: id.clone(),
            device_id: None,
        })
        .unwrap_err();
    assert_eq!(busy.code, ErrorCode::AllocationInUse, "busy while accepted");
    drop(started);

    let status = svc.get_transfer(&transfer_id).unwrap();
    assert_eq!(status.status, TransferStatus::Failed);
    assert!(
        status
            .error_message
            .as_deref()
            .is_some_and(|m| m.contains("abandoned") && m.contains("intact")),
        "{status:?}"
    );
    assert_eq!(svc.allocation(&id).unwrap().device_id, "cpu");
    let mut back = vec![0u8; size as usize];
    svc.read(&id, 0, &mut back).unwrap();
    assert!(back == bytes, "source changed by an abandoned transfer");
    let usage = svc
        .get_usage(&DeviceRequest {
            device_id: "test".into(),
        })
        .unwrap();
    assert_eq!(
        (usage.allocated_bytes, usage.allocation_count),
        (0, 0),
        "the destination is freed"
    );
    // The source is free to move again, and to be freed.
    let t = svc.transfer(&to_test(&id)).unwrap();
    assert_eq!(t.status, TransferStatus::Completed);
    svc.deallocate(&DeallocateRequest {
        allocation_id: id,
        device_id: None,
    })
    .unwrap();
}
