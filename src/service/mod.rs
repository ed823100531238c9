//! The service: one method per protocol action, over the managers. The seed's "interface".
//!
//! Methods take typed requests and return typed responses or a [`ProtocolError`]; they never
//! see JSON. Only `allocate` can wait (for memory); everything else answers at once.

use crate::managers::allocations::{AllocationFilter, EngineError};
use crate::managers::{AllocationEngine, AllocationSpec, DeviceSetup, Owner};
use crate::protocol::requests::{
    AllocateRequest, ClearRequest, DeallocateRequest, DeviceRequest, GetAllocationsRequest,
    GetStatusRequest,
};
use crate::protocol::{
    AllocateMemoryResponse, ClearResponse, DeallocateResponse, ErrorCode, GetAllocationsResponse,
    GetMemoryStatusResponse, ListDevicesResponse, MemoryUsageStats, ProtocolError, Timestamp,
};
use crate::units::format_bytes;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::Notify;

impl From<EngineError> for ProtocolError {
    fn from(e: EngineError) -> Self {
        let code = match &e {
            EngineError::UnknownDevice(_) => ErrorCode::InvalidDevice,
            EngineError::AllocationNotFound(_) => ErrorCode::AllocationNotFound,
            EngineError::NoRoom { .. } | EngineError::OverBudget { .. } => ErrorCode::OutOfMemory,
            EngineError::OutOfRange(_) => ErrorCode::InvalidParameter,
            EngineError::Backend(_) => ErrorCode::OutOfMemory,
        };
        ProtocolError::new(code, e.to_string())
    }
}

/// The memory service: every device, every allocation, and the waiters for memory.
pub struct MemoryService {
    engine: Mutex<AllocationEngine>,
    /// Woken whenever memory is freed (and at shutdown).
    room: Notify,
    shutting_down: AtomicBool,
}

/// The result of trying to allocate without waiting.
pub enum TryAllocate {
    /// Done (or failed for good).
    Ready(Result<AllocateMemoryResponse, ProtocolError>),
    /// No room now; the request should wait up to its timeout.
    MustWait(AllocateRequest),
}

impl MemoryService {
    /// A service over the given devices.
    pub fn new(devices: Vec<DeviceSetup>) -> Self {
        MemoryService {
            engine: Mutex::new(AllocationEngine::new(devices)),
            room: Notify::new(),
            shutting_down: AtomicBool::new(false),
        }
    }

    /// Whether shutdown has begun.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    /// Begins shutdown: requests waiting for memory give up with SHUTTING_DOWN.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Release);
        self.room.notify_waiters();
    }

    /// Frees every allocation (at exit); returns how many there were.
    pub fn release_all(&self) -> u64 {
        self.engine.lock().release_all()
    }

    /// Releases every allocation and unmaps every device (removing the `shm` file). The
    /// service answers nothing useful afterwards; call it last.
    pub fn close(&self) {
        self.engine.lock().close();
    }

    /// `memory.list_devices`.
    pub fn list_devices(&self) -> ListDevicesResponse {
        let mut e = self.engine.lock();
        let devices = (0..e.device_ids().len()).map(|d| e.info(d)).collect();
        ListDevicesResponse { devices }
    }

    /// `memory.get_status`.
    pub fn get_status(
        &self,
        req: &GetStatusRequest,
    ) -> Result<GetMemoryStatusResponse, ProtocolError> {
        let mut e = self.engine.lock();
        let d = e.device_index(&req.device_id)?;
        let memory_info = e.info(d);
        let allocations = if req.include_allocations {
            e.allocations(d, &AllocationFilter::default(), 0, u64::MAX)
                .1
        } else {
            Vec::new()
        };
        Ok(GetMemoryStatusResponse {
            device_id: req.device_id.clone(),
            usage_stats: req.include_usage_stats.then(|| e.usage(d)),
            allocations,
            fragmentation: req.include_fragmentation.then(|| e.fragmentation(d, true)),
            health_score: e.health_score(d),
            last_updated: memory_info.last_updated,
            memory_info,
        })
    }

    /// `memory.get_usage`.
    pub fn get_usage(&self, req: &DeviceRequest) -> Result<MemoryUsageStats, ProtocolError> {
        let e = self.engine.lock();
        let d = e.device_index(&req.device_id)?;
        Ok(e.usage(d))
    }

    /// `memory.get_allocations`.
    pub fn get_allocations(
        &self,
        req: &GetAllocationsRequest,
    ) -> Result<GetAllocationsResponse, ProtocolError> {
        let e = self.engine.lock();
        let d = e.device_index(&req.device_id)?;
        let filter = AllocationFilter {
            kind: req.allocation_type,
            purpose: req.purpose.clone(),
            owner: req.owner.clone(),
        };
        let (total_count, allocations) = e.allocations(d, &filter, req.offset, req.limit);
        Ok(GetAllocationsResponse {
            device_id: req.device_id.clone(),
            total_count,
            allocations,
        })
    }

    /// `memory.allocate` without waiting: done, failed, or must wait for room.
    pub fn try_allocate(&self, req: AllocateRequest, started: Instant) -> TryAllocate {
        let mut e = self.engine.lock();
        let d = match e.device_index(&req.device_id) {
            Ok(d) => d,
            Err(err) => return TryAllocate::Ready(Err(err.into())),
        };
        match Self::allocate_locked(&mut e, d, &req, started) {
            Err(EngineError::NoRoom { .. }) if req.timeout_seconds > 0.0 => {
                TryAllocate::MustWait(req)
            }
            Err(err) => {
                if matches!(
                    err,
                    EngineError::NoRoom { .. }
                        | EngineError::OverBudget { .. }
                        | EngineError::Backend(_)
                ) {
                    e.record_failure(d);
                }
                TryAllocate::Ready(Err(err.into()))
            }
            Ok(resp) => TryAllocate::Ready(Ok(resp)),
        }
    }

    fn allocate_locked(
        e: &mut AllocationEngine,
        d: usize,
        req: &AllocateRequest,
        started: Instant,
    ) -> Result<AllocateMemoryResponse, EngineError> {
        let spec = AllocationSpec {
            size: req.size_bytes,
            alignment: req.alignment,
            kind: req.allocation_type,
            purpose: req.purpose.clone(),
            persistent: req.persistent,
            owner: Owner::Client,
        };
        let now = SystemTime::now();
        let (_, allocation) = e.try_allocate(d, &spec, now)?;
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        e.record_allocation_time(d, ms);
        let available = e.available(d);
        Ok(AllocateMemoryResponse {
            device_id: req.device_id.clone(),
            message: format!(
                "allocated {} on {}",
                format_bytes(req.size_bytes),
                req.device_id
            ),
            allocation,
            success: true,
            allocation_time_ms: ms,
            available_memory_bytes: available,
            utilization_percentage: e.utilization(d),
            allocated_at: Timestamp(now),
        })
    }

    /// `memory.allocate`, waiting up to `timeout_seconds` for room.
    pub async fn allocate(
        &self,
        req: AllocateRequest,
    ) -> Result<AllocateMemoryResponse, ProtocolError> {
        let started = Instant::now();
        match self.try_allocate(req, started) {
            TryAllocate::Ready(r) => r,
            TryAllocate::MustWait(req) => self.wait_and_allocate(req, started).await,
        }
    }

    /// Waits for room (woken by every free) until the request's deadline, then allocates.
    pub async fn wait_and_allocate(
        &self,
        req: AllocateRequest,
        started: Instant,
    ) -> Result<AllocateMemoryResponse, ProtocolError> {
        let deadline = started + Duration::from_secs_f64(req.timeout_seconds);
        let d = self.engine.lock().device_index(&req.device_id)?;
        self.engine.lock().record_waiting(d, 1);
        let result = loop {
            let notified = self.room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_shutting_down() {
                break Err(ProtocolError::new(
                    ErrorCode::ShuttingDown,
                    format!(
                        "{}: the worker is stopping; the allocation of {} was not made",
                        req.device_id,
                        format_bytes(req.size_bytes)
                    ),
                ));
            }
            let attempt = {
                let mut e = self.engine.lock();
                Self::allocate_locked(&mut e, d, &req, started)
            };
            match attempt {
                Ok(resp) => break Ok(resp),
                Err(EngineError::NoRoom {
                    device,
                    requested,
                    available,
                }) => {
                    if tokio::time::timeout_at(deadline.into(), notified)
                        .await
                        .is_err()
                    {
                        self.engine.lock().record_failure(d);
                        break Err(ProtocolError::new(
                            ErrorCode::OutOfMemory,
                            format!(
                                "{device}: requested {}, {} available after waiting {} s",
                                format_bytes(requested),
                                format_bytes(available),
                                req.timeout_seconds
                            ),
                        ));
                    }
                }
                Err(err) => {
                    self.engine.lock().record_failure(d);
                    break Err(err.into());
                }
            }
        };
        self.engine.lock().record_waiting(d, -1);
        result
    }

    /// `memory.deallocate`.
    pub fn deallocate(&self, req: &DeallocateRequest) -> Result<DeallocateResponse, ProtocolError> {
        let freed = {
            let mut e = self.engine.lock();
            let device = match &req.device_id {
                Some(id) => Some(e.device_index(id)?),
                None => None,
            };
            e.deallocate(&req.allocation_id, device)?
        };
        self.room.notify_waiters();
        Ok(DeallocateResponse {
            allocation_id: req.allocation_id.clone(),
            device_id: freed.device_id,
            freed_bytes: freed.bytes,
        })
    }

    /// `memory.clear`.
    pub fn clear(&self, req: &ClearRequest) -> Result<ClearResponse, ProtocolError> {
        let cleared = {
            let mut e = self.engine.lock();
            let d = e.device_index(&req.device_id)?;
            e.clear(d, req.force)
        };
        if cleared.count > 0 {
            self.room.notify_waiters();
        }
        Ok(ClearResponse {
            device_id: req.device_id.clone(),
            cleared_count: cleared.count,
            freed_bytes: cleared.bytes,
            kept_persistent_count: cleared.kept_persistent,
        })
    }

    /// Reads bytes of a live allocation (library API; the protocol carries no payloads).
    pub fn read(
        &self,
        allocation_id: &str,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), ProtocolError> {
        Ok(self.engine.lock().read(allocation_id, offset, buf)?)
    }

    /// Writes bytes into a live allocation (library API).
    pub fn write(
        &self,
        allocation_id: &str,
        offset: u64,
        data: &[u8],
    ) -> Result<(), ProtocolError> {
        Ok(self.engine.lock().write(allocation_id, offset, data)?)
    }

    /// One live allocation as the protocol shows it (library API).
    pub fn allocation(
        &self,
        allocation_id: &str,
    ) -> Result<crate::protocol::MemoryAllocation, ProtocolError> {
        Ok(self.engine.lock().allocation(allocation_id)?)
    }
}
