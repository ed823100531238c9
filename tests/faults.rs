//! Injected backend failures: a device whose page commits or copies fail on demand. Each
//! failure gives the contract's error and changes nothing; no byte is lost.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use memcoord::backends::{Backend, BackendError, Capacity, CpuBackend};
use memcoord::managers::DeviceSetup;
use memcoord::protocol::requests::{AllocateRequest, DeviceRequest, TransferMode, TransferRequest};
use memcoord::protocol::{ErrorCode, MemoryHandle, MemoryType};
use memcoord::service::MemoryService;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

const MIB: u64 = 1 << 20;

/// A `cpu`-like device named `faulty`, whose commits and copies fail while told to.
struct Faulty {
    inner: CpuBackend,
    fail_commit: Arc<AtomicBool>,
    fail_copy: Arc<AtomicBool>,
}

fn injected(what: &str) -> BackendError {
    BackendError::Os {
        device: "faulty".into(),
        what: "injected failure",
        source: std::io::Error::other(what.to_string()),
    }
}

impl Backend for Faulty {
    fn device_id(&self) -> &str {
        "faulty"
    }
    fn name(&self) -> &str {
        "a device that fails on demand"
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
        if self.fail_commit.load(Ordering::Relaxed) {
            return Err(injected("commit"));
        }
        self.inner.commit(offset, len)
    }
    fn release(&mut self, offset: u64, len: u64) {
        self.inner.release(offset, len)
    }
    fn host_slice(&self, offset: u64, len: u64) -> Option<&[u8]> {
        self.inner.host_slice(offset, len)
    }
    fn host_slice_mut(&mut self, offset: u64, len: u64) -> Option<&mut [u8]> {
        self.inner.host_slice_mut(offset, len)
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        if self.fail_copy.load(Ordering::Relaxed) {
            return Err(injected("read"));
        }
        self.inner.read(offset, buf)
    }
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), BackendError> {
        if self.fail_copy.load(Ordering::Relaxed) {
            return Err(injected("write"));
        }
        self.inner.write(offset, data)
    }
    fn copy_within(&mut self, src: u64, dst: u64, len: u64) -> Result<(), BackendError> {
        if self.fail_copy.load(Ordering::Relaxed) {
            return Err(injected("copy"));
        }
        self.inner.copy_within(src, dst, len)
    }
    fn handle(&self, _offset: u64) -> Option<MemoryHandle> {
        None
    }
}

struct Setup {
    service: MemoryService,
    fail_commit: Arc<AtomicBool>,
    fail_copy: Arc<AtomicBool>,
}

fn setup() -> Setup {
    let fail_commit = Arc::new(AtomicBool::new(false));
    let fail_copy = Arc::new(AtomicBool::new(false));
    let faulty = Faulty {
        inner: CpuBackend::new(80 * MIB).unwrap(),
        fail_commit: Arc::clone(&fail_commit),
        fail_copy: Arc::clone(&fail_copy),
    };
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
    Setup {
        service,
        fail_commit,
        fail_copy,
    }
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
    s.fail_commit.store(true, Ordering::Relaxed);
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
    s.fail_commit.store(false, Ordering::Relaxed);
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
    s.fail_copy.store(true, Ordering::Relaxed);
    let req = TransferRequest {
        allocation_id: id.clone(),
        source_device_id: "cpu".into(),
        destination_device_id: "faulty".into(),
        mode: TransferMode::Move,
        wait_for_completion: true,
    };
    let started = s.service.start_transfer(&req).unwrap();
    let err = s.service.run_transfer(&started).unwrap_err();
    assert_eq!(err.code, ErrorCode::TransferFailed, "{}", err.message);
    // The source is intact, where it was, with its id; the destination holds nothing.
    assert_eq!(s.service.allocation(&id).unwrap().device_id, "cpu");
    let mut back = vec![0u8; data.len()];
    s.service.read(&id, 0, &mut back).unwrap();
    assert!(back == data, "source bytes changed");
    assert_eq!(usage(&s.service, "faulty").0, 0);
    assert_eq!(usage(&s.service, "faulty").1, 0);
    // And the move works once the device does.
    s.fail_copy.store(false, Ordering::Relaxed);
    let started = s.service.start_transfer(&req).unwrap();
    s.service.run_transfer(&started).unwrap();
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
            .deallocate(&memcoord::protocol::requests::DeallocateRequest {
                allocation_id: id.clone(),
                device_id: None,
            })
            .unwrap();
    }
    s.fail_copy.store(true, Ordering::Relaxed);
    let r = s.service.defragment("faulty", &[]).unwrap();
    assert_eq!(r.moved_count, 0, "nothing moved while copies fail");
    s.fail_copy.store(false, Ordering::Relaxed);
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
