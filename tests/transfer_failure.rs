//! A transfer whose destination fails mid-copy: TRANSFER_FAILED, the source intact, the partial
//! destination freed. The failing device is a test backend wrapping host memory.

use memcoord::backends::{Backend, BackendError, Capacity, CpuBackend};
use memcoord::managers::DeviceSetup;
use memcoord::protocol::requests::{TransferMode, TransferRequest};
use memcoord::protocol::{ErrorCode, MemoryHandle, MemoryType, TransferStatus};
use memcoord::service::MemoryService;

/// Host memory that refuses writes once `fail_after` bytes were written.
struct Failing {
    inner: CpuBackend,
    written: u64,
    fail_after: u64,
}

impl Backend for Failing {
    fn device_id(&self) -> &str {
        "faulty"
    }
    fn name(&self) -> &str {
        "a device that fails mid-transfer"
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
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        self.inner.read(offset, buf)
    }
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), BackendError> {
        if self.written + data.len() as u64 > self.fail_after {
            return Err(BackendError::Device {
                device: "faulty".into(),
                what: "write",
                message: "injected failure".into(),
            });
        }
        self.written += data.len() as u64;
        self.inner.write(offset, data)
    }
    fn copy_within(&mut self, src: u64, dst: u64, len: u64) -> Result<(), BackendError> {
        self.inner.copy_within(src, dst, len)
    }
    fn handle(&self, _offset: u64) -> Option<MemoryHandle> {
        None
    }
}

#[test]
fn a_failed_transfer_leaves_the_source_intact_and_frees_the_destination() {
    const MIB: u64 = 1 << 20;
    let svc = MemoryService::new(vec![
        DeviceSetup {
            backend: Box::new(CpuBackend::new(512 * MIB).unwrap()),
            budget: 400 * MIB,
        },
        DeviceSetup {
            backend: Box::new(Failing {
                inner: CpuBackend::new(512 * MIB).unwrap(),
                written: 0,
                fail_after: 100 * MIB,
            }),
            budget: 400 * MIB,
        },
    ]);
    let size = 200 * MIB;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let req = memcoord::protocol::requests::AllocateRequest::parse(Some(
        &serde_json::value::RawValue::from_string(format!(
            r#"{{"device_id":"cpu","size_bytes":{size},"timeout_seconds":0}}"#
        ))
        .unwrap(),
    ))
    .unwrap();
    let id = rt
        .block_on(svc.allocate(req))
        .unwrap()
        .allocation
        .allocation_id;
    let data: Vec<u8> = (0..size).map(|i| (i % 253) as u8).collect();
    svc.write(&id, 0, &data).unwrap();

    let t = TransferRequest {
        allocation_id: id.clone(),
        source_device_id: "cpu".into(),
        destination_device_id: "faulty".into(),
        mode: TransferMode::Move,
        wait_for_completion: true,
    };
    let started = svc.start_transfer(&t).unwrap();
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
    assert!(status.error_message.is_some());
    assert!(status.completed_at.is_some());

    // The source: same device, every byte.
    assert_eq!(svc.allocation(&id).unwrap().device_id, "cpu");
    let mut back = vec![0u8; size as usize];
    svc.read(&id, 0, &mut back).unwrap();
    assert!(back == data, "source changed by a failed transfer");
    // The destination: nothing left.
    let usage = svc
        .get_usage(&memcoord::protocol::requests::DeviceRequest {
            device_id: "faulty".into(),
        })
        .unwrap();
    assert_eq!(usage.allocated_bytes, 0);
    assert_eq!(usage.allocation_count, 0);
    // And the source can still be deallocated (no longer busy).
    svc.deallocate(&memcoord::protocol::requests::DeallocateRequest {
        allocation_id: id,
        device_id: None,
    })
    .unwrap();
}
