//! Transfer rules that need a transfer in progress: a test device whose writes are slow, and
//! 1 MiB transfer chunks. The service hands the engine fairly to waiting requests between
//! chunks, so a request made while a chunk copies is answered before the next chunk: the
//! allocation is ALLOCATION_IN_USE for deallocate and for another transfer, and clear skips it.
//! And a destination that fails mid-copy: TRANSFER_FAILED, the source intact, the partial
//! destination freed.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use memcoord::backends::{Backend, BackendError, Capacity, CpuBackend};
use memcoord::managers::DeviceSetup;
use memcoord::protocol::requests::{
    AllocateRequest, ClearRequest, DeallocateRequest, DeviceRequest, TransferMode, TransferRequest,
};
use memcoord::protocol::{ErrorCode, MemoryHandle, MemoryType, TransferStatus};
use memcoord::service::MemoryService;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

const MIB: u64 = 1 << 20;

/// Host memory whose writes take `write_delay` each, or fail once `fail_after` bytes were
/// written.
struct TestDevice {
    inner: CpuBackend,
    written: u64,
    fail_after: u64,
    write_delay: Duration,
    /// Told when a write starts.
    started: Option<mpsc::Sender<()>>,
}

impl Backend for TestDevice {
    fn device_id(&self) -> &str {
        "test"
    }
    fn name(&self) -> &str {
        "a test device"
    }
    fn memory_type(&self) -> MemoryType {
        MemoryType::RAM
    }
    fn capacity(&mut self) -> Capacity {
        self.inner.capacity()
    }
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn page_size(&self) -> u64 {
        self.inner.page_size()
    }
    fn commit(&mut self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.inner.commit(offset, len)
    }
    fn release(&mut self, offset: u64, len: u64) {
        self.inner.release(offset, len)
    }
    fn host_slice(&self, offset: u64, len: u64) -> Option<&[u8]> {
        self.inner.host_slice(offset, len)
    }
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), BackendError> {
        if let Some(started) = &self.started {
            let _ = started.send(());
        }
        std::thread::sleep(self.write_delay);
        if self.written + data.len() as u64 > self.fail_after {
            return Err(BackendError::Device {
                device: "test".into(),
                what: "write",
                message: "injected failure".into(),
            });
        }
        self.written += data.len() as u64;
        self.inner.write(offset, data)
    }
    fn handle(&self, _offset: u64) -> Option<MemoryHandle> {
        None
    }
}

fn service(device: TestDevice) -> MemoryService {
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
    let svc = Arc::new(service(TestDevice {
        inner: CpuBackend::new(1024 * MIB).unwrap(),
        written: 0,
        fail_after: u64::MAX,
        write_delay: Duration::from_millis(50),
        started: Some(started_tx),
    }));
    let _before = allocate(&svc, 4 * MIB);
    let id = allocate(&svc, 8 * MIB);
    let bytes = data(8 * MIB);
    svc.write(&id, 0, &bytes).unwrap();
    let started = svc.start_transfer(&to_test(&id)).unwrap();
    let runner = {
        let svc = Arc::clone(&svc);
        std::thread::spawn(move || svc.run_transfer(&started))
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
    let svc = service(TestDevice {
        inner: CpuBackend::new(1024 * MIB).unwrap(),
        written: 0,
        fail_after: 3 * MIB,
        write_delay: Duration::ZERO,
        started: None,
    });
    let size = 6 * MIB;
    let id = allocate(&svc, size);
    let bytes = data(size);
    svc.write(&id, 0, &bytes).unwrap();

    let started = svc.start_transfer(&to_test(&id)).unwrap();
    let transfer_id = started.wire.transfer_id.clone();
    let err = svc.run_transfer(&started).unwrap_err();
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
