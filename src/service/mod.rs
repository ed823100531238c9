//! The service: one method per protocol action, over the managers. The seed's "interface".
//!
//! Methods take typed requests ([`requests`], defined here: the service imports nothing from
//! the api above it) and return typed responses or a [`ProtocolError`]; they never see JSON. Some wait (an allocate, a model load or an acquire waiting for room; a transfer, a
//! defragment or an optimize doing its work); the transports run those off the reading thread.

mod allocate;
mod exports;
mod leases;
mod model_files;
mod models;
pub mod requests;
mod sessions;
mod state;
mod telemetry;
mod tenants;
mod transfers;

pub use state::{StateError, StateWrittenHook, create_private_dir};

pub use allocate::{LARGE_ALLOCATION_BYTES, TryAllocate};
pub use sessions::SessionEnded;
pub use telemetry::{ModelTelemetry, Telemetry};
pub use transfers::StartedTransfer;

use crate::domain::TransferMode;
use crate::managers::allocations::DeferredCommit;
use crate::managers::allocations::{AllocationFilter, EngineError};
use crate::managers::models::ModelTable;
use crate::managers::transfers::TransferTable;
use crate::managers::{AllocationEngine, AllocationSpec, DeviceSetup, Owner};
use crate::protocol::{
    AllocateMemoryResponse, ClearResponse, DeallocateResponse, DefragmentResponse, ErrorCode,
    GetAllocationsResponse, GetMemoryStatusResponse, ListDevicesResponse, MemoryAllocationType,
    MemoryOptimizationType, MemoryUsageStats, OptimizeResponse, ProtocolError, Timestamp,
};
use crate::protocol::{MemoryTransfer, TransferStatus};
use requests::{
    AllocateRequest, ClearRequest, DeallocateRequest, DeviceRequest, GetAllocationsRequest,
    GetStatusRequest, OptimizeRequest, OptionalDeviceRequest, TransferRequest,
};
use std::path::PathBuf;
use std::sync::Arc;
use uuid::Uuid;

/// The most bytes a transfer copies while holding the engine.
pub const TRANSFER_CHUNK_BYTES: u64 = 256 << 20;

use crate::managers::room::RoomSignal;
use crate::units::format_bytes;
use parking_lot::{Mutex, MutexGuard, RwLock};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

impl From<EngineError> for ProtocolError {
    fn from(e: EngineError) -> Self {
        let code = match &e {
            EngineError::UnknownDevice(_) => ErrorCode::InvalidDevice,
            EngineError::AllocationNotFound(_) => ErrorCode::AllocationNotFound,
            EngineError::NoRoom { .. }
            | EngineError::OverBudget { .. }
            | EngineError::TooMany { .. }
            | EngineError::Backend(_) => ErrorCode::OutOfMemory,
            EngineError::OutOfRange(_) => ErrorCode::InvalidParameter,
            EngineError::InvalidTransfer(_) => ErrorCode::InvalidTransferParams,
            EngineError::InUse(_) => ErrorCode::AllocationInUse,
            EngineError::QuotaExceeded { .. } => ErrorCode::QuotaExceeded,
        };
        ProtocolError::new(code, e.to_string())
    }
}

/// The memory service: every device, every allocation, and the waiters for memory.
pub struct MemoryService {
    /// Where every time that matters to behaviour comes from (the engine's clock too).
    clock: Arc<dyn crate::managers::clock::Clock>,
    /// The background threads (keep-alive sweeper, sampler), stopped at shutdown.
    threads: crate::runtime::Threads,
    /// Shared with the transfers in progress ([`StartedTransfer`] undoes its ends if dropped).
    engine: Arc<Mutex<AllocationEngine>>,
    transfers: Arc<Mutex<TransferTable>>,
    transfer_chunk_bytes: u64,
    /// Held (shared) while pages are committed without the engine; `close` takes it alone.
    commit_gate: RwLock<()>,
    models: Mutex<ModelTable>,
    model_root: model_files::ModelRoot,
    /// Called after each tensor of a model load is copied (tests: changes a file mid-load).
    model_load_hook: Option<ModelLoadHook>,
    model_budgets: rustc_hash::FxHashMap<String, u64>,
    pressure_hold_ms: u64,
    rules: crate::managers::advisor::Rules,
    state: Option<state::StateDir>,
    max_waiting: u64,
    /// The engine's signal that memory came back (raised here too at shutdown and when a model
    /// load ends).
    room: Arc<RoomSignal>,
    shutting_down: AtomicBool,
    /// Live exports (`memory.export`): what they pin, their secrets.
    exports: Mutex<crate::managers::exports::ExportTable>,
    /// Where claims are served (set by the transport that serves them).
    claim_socket: Mutex<Option<PathBuf>>,
    /// Leases released because their time limit ran out, since the start.
    leases_expired: std::sync::atomic::AtomicU64,
    /// The live sessions and the leases and exports each made.
    sessions: Mutex<crate::managers::sessions::SessionTable>,
    /// Declared tenants and their quotas (section 8.2; none by default).
    tenants: Arc<crate::domain::Tenants>,
    /// The tenant of each live lease and export, with tenants declared (`service/tenants.rs`).
    owners: Mutex<rustc_hash::FxHashMap<Uuid, Arc<str>>>,
}

/// See [`MemoryService::with_model_load_hook`].
#[doc(hidden)]
pub type ModelLoadHook = Arc<dyn Fn(&str) + Send + Sync>;

/// How many requests may wait for memory on one device at once, by default.
pub const DEFAULT_MAX_WAITING: u64 = 4096;

impl MemoryService {
    /// A service over the given devices.
    pub fn new(devices: Vec<DeviceSetup>) -> Self {
        Self::with_clock(devices, Arc::new(crate::managers::clock::MonotonicClock))
    }

    /// A service whose engine reads time from `clock` (tests pass a
    /// [`ManualClock`](crate::managers::clock::ManualClock) and advance it instead of sleeping).
    pub fn with_clock(
        devices: Vec<DeviceSetup>,
        clock: Arc<dyn crate::managers::clock::Clock>,
    ) -> Self {
        let engine = AllocationEngine::with_clock(devices, Arc::clone(&clock));
        let room = engine.room();
        MemoryService {
            clock,
            threads: crate::runtime::Threads::new(),
            engine: Arc::new(Mutex::new(engine)),
            transfers: Arc::new(Mutex::new(TransferTable::default())),
            transfer_chunk_bytes: TRANSFER_CHUNK_BYTES,
            commit_gate: RwLock::new(()),
            models: Mutex::new(ModelTable::default()),
            model_root: model_files::ModelRoot::new(PathBuf::from(".")),
            model_load_hook: None,
            model_budgets: Default::default(),
            pressure_hold_ms: crate::managers::pressure::DEFAULT_HOLD_MS,
            rules: Default::default(),
            state: None,
            max_waiting: DEFAULT_MAX_WAITING,
            room,
            shutting_down: AtomicBool::new(false),
            exports: Mutex::default(),
            claim_socket: Mutex::new(None),
            leases_expired: Default::default(),
            sessions: Mutex::default(),
            tenants: Arc::default(),
            owners: Mutex::default(),
        }
    }

    /// Sets how many bytes a transfer copies while holding the engine (default
    /// [`TRANSFER_CHUNK_BYTES`]): smaller answers other requests sooner during transfers.
    pub fn with_transfer_chunk_bytes(mut self, bytes: u64) -> Self {
        self.transfer_chunk_bytes = bytes.max(4096);
        self
    }

    /// Sets how many requests may wait for memory on one device at once (default
    /// [`DEFAULT_MAX_WAITING`]); more are refused with OUT_OF_MEMORY at once.
    pub fn with_max_waiting(mut self, n: u64) -> Self {
        self.max_waiting = n;
        self
    }

    /// Sets the most live allocations a device may hold (default
    /// [`crate::managers::allocations::DEFAULT_MAX_ALLOCATIONS`]).
    pub fn with_max_allocations(self, n: u64) -> Self {
        self.engine.lock().set_max_allocations(n);
        self
    }

    /// Sets the folder model files are loaded from (default: the current directory).
    pub fn with_model_root(mut self, root: impl Into<PathBuf>) -> Self {
        self.model_root = model_files::ModelRoot::new(root.into());
        self
    }

    /// A test seam: `hook(tensor_name)` runs after each tensor of a `memory.model_load` is
    /// copied, with no lock held (a test changes the file there, between two reads).
    #[doc(hidden)]
    pub fn with_model_load_hook(mut self, hook: ModelLoadHook) -> Self {
        self.model_load_hook = Some(hook);
        self
    }

    /// Sets how long a lower pressure level must hold before it is reported (default 10 s).
    pub fn with_pressure_hold(mut self, hold: Duration) -> Self {
        self.pressure_hold_ms = hold.as_millis() as u64;
        self
    }

    /// `memory.get_pressure`.
    pub fn get_pressure(
        &self,
        req: &OptionalDeviceRequest,
    ) -> Result<crate::protocol::GetPressureResponse, ProtocolError> {
        let mut e = self.engine.lock();
        let devices: Vec<usize> = match &req.device_id {
            Some(id) => vec![e.device_index(id)?],
            None => (0..e.device_count()).collect(),
        };
        Ok(crate::protocol::GetPressureResponse {
            devices: devices
                .into_iter()
                .map(|d| e.pressure(d, self.pressure_hold_ms).into())
                .collect(),
        })
    }

    /// Sets a device's model budget (default: its whole budget).
    pub fn with_model_budget(mut self, device_id: impl Into<String>, bytes: u64) -> Self {
        self.model_budgets.insert(device_id.into(), bytes);
        self
    }

    /// Now, as wall time, from the service's clock: what every timestamp the service gives
    /// out is read from (compare against these, not `SystemTime::now()`).
    pub fn now(&self) -> SystemTime {
        self.clock.wall()
    }

    /// Runs `work` on a thread the service owns (a transfer nobody waits for, a scheduled
    /// optimize): [`MemoryService::shut_down`] waits for it before it frees anything, so no
    /// background work outlives the memory it works on.
    pub fn spawn_background(&self, name: &str, work: impl FnOnce() + Send + 'static) {
        self.threads.spawn(name, move |_| work());
    }

    /// Starts the sweeper: a thread that, once a second until shutdown, releases leases past
    /// their time limit ([`MemoryService::sweep_expired_leases`]: within a second of their
    /// deadline) and unloads models idle past their keep-alive ([`MemoryService::shut_down`]
    /// stops it and waits for it).
    pub fn start_keep_alive_sweeper(self: &Arc<Self>) {
        let service = Arc::downgrade(self);
        self.threads.spawn("memcoord-keep-alive", move |stop| {
            while !stop.sleep(Duration::from_secs(1)) {
                let Some(s) = service.upgrade() else { break };
                if s.is_shutting_down() {
                    break;
                }
                for (lease, name) in s.sweep_expired_leases() {
                    tracing::info!("lease {lease} on model {name} expired: released");
                }
                for name in s.sweep_keep_alive() {
                    tracing::info!("unloaded model {name}: idle past its keep-alive");
                }
            }
        });
    }

    /// Whether shutdown has begun.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    /// Begins shutdown: requests waiting for memory give up with SHUTTING_DOWN.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Release);
        self.room.raise();
    }

    /// The end of every transport's shutdown path, once its requests are answered: begins
    /// shutdown (if not yet), stops the background threads and waits for them, frees every
    /// allocation (persistent `shm` ones stay with a state directory, recorded) and unmaps
    /// every device. Returns how many allocations were freed. Call it once, last.
    pub fn shut_down(&self) -> u64 {
        self.begin_shutdown();
        self.threads.stop();
        self.end_all_exports();
        let released = self.release_all();
        self.close();
        released
    }

    /// Frees every allocation (at exit); returns how many there were.
    /// With a state directory, persistent `shm` allocations stay (and stay recorded).
    pub fn release_all(&self) -> u64 {
        match &self.state {
            Some(state) => {
                let n = self
                    .engine
                    .lock()
                    .release_all_but_persistent(state.device());
                if let Err(e) = self.save_state() {
                    tracing::error!("could not record persistent shm allocations: {e}");
                }
                n
            }
            None => self.engine.lock().release_all(),
        }
    }

    /// Releases every allocation and unmaps every device (removing the `shm` file). The
    /// service answers nothing useful afterwards; call it last.
    pub fn close(&self) {
        // Wait for large allocations faulting pages in without the engine.
        let _closed = self.commit_gate.write();
        match &self.state {
            Some(state) => self.engine.lock().close_keeping_persistent(state.device()),
            None => self.engine.lock().close(),
        }
    }

    /// `memory.list_devices`.
    pub fn list_devices(&self) -> ListDevicesResponse {
        let mut e = self.engine.lock();
        let devices = (0..e.device_count()).map(|d| e.info(d).into()).collect();
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
            (e.allocations(d, &AllocationFilter::default(), 0, u64::MAX)
                .1)
                .into_iter()
                .map(Into::into)
                .collect()
        } else {
            Vec::new()
        };
        Ok(GetMemoryStatusResponse {
            device_id: req.device_id.clone(),
            usage_stats: req.include_usage_stats.then(|| e.usage(d).into()),
            allocations,
            fragmentation: req.include_fragmentation.then(|| e.fragmentation(d).into()),
            health_score: e.health_score(d),
            last_updated: Timestamp(memory_info.last_updated),
            memory_info: memory_info.into(),
        })
    }

    /// `memory.get_usage`.
    pub fn get_usage(&self, req: &DeviceRequest) -> Result<MemoryUsageStats, ProtocolError> {
        let e = self.engine.lock();
        let d = e.device_index(&req.device_id)?;
        Ok(e.usage(d).into())
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
            tenant: req.tenant.clone(),
            client_pid: req.client_pid,
        };
        let (total_count, allocations) = e.allocations(d, &filter, req.offset, req.limit);
        Ok(GetAllocationsResponse {
            device_id: req.device_id.clone(),
            total_count,
            allocations: allocations.into_iter().map(Into::into).collect(),
        })
    }

    /// `memory.deallocate`.
    pub fn deallocate(&self, req: &DeallocateRequest) -> Result<DeallocateResponse, ProtocolError> {
        let _recorded = self.recording();
        let freed = {
            let mut e = self.engine.lock();
            let device = match &req.device_id {
                Some(id) => Some(e.device_index(id)?),
                None => None,
            };
            self.check_not_exported(&req.allocation_id)?;
            e.deallocate(&req.allocation_id, device)?
        };
        Ok(DeallocateResponse {
            allocation_id: req.allocation_id.clone(),
            device_id: freed.device_id,
            freed_bytes: freed.bytes,
        })
    }

    /// `memory.clear`.
    pub fn clear(&self, req: &ClearRequest) -> Result<ClearResponse, ProtocolError> {
        self.clear_of(req, None)
    }

    /// `memory.clear` of one tenant's allocations only (`None`: everyone's): what a tenant's
    /// clear frees, as it may release only what it owns.
    pub fn clear_of(
        &self,
        req: &ClearRequest,
        tenant: Option<&str>,
    ) -> Result<ClearResponse, ProtocolError> {
        let _recorded = self.recording();
        let cleared = {
            let mut e = self.engine.lock();
            let d = e.device_index(&req.device_id)?;
            // A clear frees exported allocations too: their exports end first.
            let cleared: Vec<Uuid> = self
                .exported_allocations()
                .into_iter()
                .filter(|id| {
                    e.allocation_by_id(id).is_some_and(|a| {
                        a.device_id == req.device_id
                            && a.owner == "client"
                            && (req.force || !a.persistent)
                            && tenant.is_none_or(|t| a.tenant == t)
                    })
                })
                .collect();
            self.end_exports_holding(&cleared);
            e.clear_of(d, req.force, tenant)
        };
        Ok(ClearResponse {
            device_id: req.device_id.clone(),
            cleared_count: cleared.count,
            freed_bytes: cleared.bytes,
            kept_persistent_count: cleared.kept_persistent,
        })
    }

    /// `memory.defragment`: compacts the device in bounded passes (64 MiB on host devices, as
    /// the backend chooses on others),
    /// releasing the engine between passes so other requests keep being served. Persistent
    /// allocations and those in `fixed` stay put.
    pub fn defragment(
        &self,
        device_id: &str,
        fixed: &[Uuid],
    ) -> Result<DefragmentResponse, ProtocolError> {
        let _recorded = self.recording();
        let started = Instant::now();
        let before = {
            let mut e = self.engine.lock();
            let d = e.device_index(device_id)?;
            e.fragmentation(d).fragmentation_percentage
        };
        let mut total = DefragmentResponse {
            device_id: device_id.to_string(),
            moved_count: 0,
            moved_bytes: 0,
            skipped_count: 0,
            fragmentation_before: before,
            fragmentation_after: before,
            released_bytes: 0,
            duration_ms: 0.0,
        };
        loop {
            let pass = {
                let mut e = self.engine.lock();
                // Looked up each pass: the device may be gone if the worker is closing.
                let d = e.device_index(device_id)?;
                let bytes = e.defragment_pass_bytes(d);
                let mut fixed = fixed.to_vec();
                fixed.extend(self.models.lock().leased_allocations());
                fixed.extend(self.exported_allocations());
                let pass = e.defragment_pass(d, bytes, &fixed);
                // Waiting requests go first between passes.
                MutexGuard::unlock_fair(e);
                pass
            };
            total.moved_count += pass.compaction.moved_count;
            total.moved_bytes += pass.compaction.moved_bytes;
            total.released_bytes += pass.compaction.released_bytes;
            total.skipped_count = pass.fixed_count;
            if pass.compaction.deferred_count == 0 || pass.compaction.moved_count == 0 {
                break;
            }
            std::thread::yield_now();
        }
        {
            let mut e = self.engine.lock();
            let d = e.device_index(device_id)?;
            total.fragmentation_after = e.fragmentation(d).fragmentation_percentage;
        }
        total.duration_ms = started.elapsed().as_secs_f64() * 1000.0;
        Ok(total)
    }

    /// Checks an optimize request against the devices before it runs (for background runs).
    pub fn check_device(&self, device_id: &str) -> Result<f64, ProtocolError> {
        let e = self.engine.lock();
        let d = e.device_index(device_id)?;
        Ok(e.utilization(d))
    }

    /// A device's (budget-charged bytes, cached bytes: held from the device but not allocated).
    fn footprint(&self, device_id: &str) -> Result<(u64, u64), ProtocolError> {
        let e = self.engine.lock();
        let u = e.usage(e.device_index(device_id)?);
        Ok((
            u.allocated_bytes + u.reservation_bytes,
            u.reserved_bytes.saturating_sub(u.allocated_bytes),
        ))
    }

    /// `memory.optimize`, run to completion.
    pub fn optimize(&self, req: &OptimizeRequest) -> Result<OptimizeResponse, ProtocolError> {
        let _recorded = self.recording();
        use MemoryOptimizationType as T;
        let started = Instant::now();
        let usage_before = self.check_device(&req.device_id)?;
        let mut preserve: Vec<Uuid> = req
            .preserve_allocations
            .iter()
            .filter_map(|id| Uuid::parse_str(id).ok())
            .collect();
        // Exported allocations are neither freed nor moved.
        preserve.extend(self.exported_allocations());
        let mut actions = Vec::new();
        let t = req.optimization_type;
        let footprint_before = self.footprint(&req.device_id)?;

        if matches!(t, T::EvictIdleModels | T::Full) {
            let (done, _) = self.evict_idle_models(&req.device_id);
            if done.is_empty() {
                actions.push("EvictIdleModels: no idle model to evict".to_string());
            }
            actions.extend(done.into_iter().map(|d| format!("EvictIdleModels: {d}")));
        }
        if let (true, Some(target)) = (
            matches!(t, T::ReduceToTarget | T::Full),
            req.target_usage_percentage,
        ) {
            let mut kinds = vec![MemoryAllocationType::Cache, MemoryAllocationType::Temporary];
            if req.force {
                kinds.push(MemoryAllocationType::General);
            }
            let cleared = {
                let mut e = self.engine.lock();
                let d = e.device_index(&req.device_id)?;
                e.reclaim(d, &kinds, target, req.force, &preserve)
            };
            let usage_now = self.check_device(&req.device_id)?;
            actions.push(format!(
                "ReduceToTarget: freed {} allocations ({}) of types {}; usage {:.1}% (target {:.1}%){}",
                cleared.count,
                format_bytes(cleared.bytes),
                kinds.iter().map(|k| k.name()).collect::<Vec<_>>().join(", "),
                usage_now,
                target,
                if usage_now > target && !req.force { "; General and persistent allocations are kept without force" } else { "" }
            ));
        }
        if matches!(t, T::Defragment | T::Full) {
            let r = self.defragment(&req.device_id, &preserve)?;
            actions.push(format!(
                "Defragment: moved {} allocations ({}), {} pinned; fragmentation {:.1}% -> {:.1}%; released {}",
                r.moved_count,
                format_bytes(r.moved_bytes),
                r.skipped_count,
                r.fragmentation_before,
                r.fragmentation_after,
                format_bytes(r.released_bytes)
            ));
        }
        if matches!(t, T::ClearCache | T::Full) {
            let (cleared, released) = {
                let mut e = self.engine.lock();
                let d = e.device_index(&req.device_id)?;
                // Every Cache allocation that may go (not persistent, not preserved): a target no usage can reach.
                let cleared = e.reclaim(
                    d,
                    &[MemoryAllocationType::Cache],
                    -1.0,
                    req.force,
                    &preserve,
                );
                (cleared, e.trim(d))
            };
            actions.push(format!(
                "ClearCache: freed {} Cache allocations ({}){}; released {} of cached pages",
                cleared.count,
                format_bytes(cleared.bytes),
                if req.force {
                    ""
                } else {
                    ", persistent ones kept"
                },
                format_bytes(released)
            ));
        }
        let footprint_after = self.footprint(&req.device_id)?;
        // Budget bytes freed plus cached pages given back, each byte counted once (a freed
        // allocation's pages that are then given back count as the allocation only).
        let freed = footprint_before
            .0
            .saturating_sub(footprint_after.0)
            .saturating_add(footprint_before.1.saturating_sub(footprint_after.1));
        Ok(OptimizeResponse {
            device_id: req.device_id.clone(),
            optimization_type: t,
            freed_bytes: freed,
            actions,
            usage_before,
            usage_after: self.check_device(&req.device_id)?,
            duration_ms: started.elapsed().as_secs_f64() * 1000.0,
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
        Ok(self.engine.lock().allocation(allocation_id)?.into())
    }
}
