//! The model actions: load safetensors weights into allocations owned by the model, unload,
//! leases, status. Reading the file happens here (the managers do no I/O).

use super::MemoryService;
use super::model_files::ModelFile;
use super::requests::{
    ModelLoadRequest, ModelOptimizeRequest, ModelRequest, ModelStatusRequest, ModelStrategy,
};
use crate::backends::BackendError;
use crate::managers::allocations::EngineError;
use crate::managers::models::{Model, ModelTensor};
use crate::managers::{AllocationSpec, Owner};
use crate::protocol::{
    ErrorCode, MemoryAllocationType, ModelInfo, ModelOptimizeResponse, ModelState,
    ModelStatusResponse, ModelUnloadResponse, ProtocolError,
};
use crate::units::format_bytes;
use std::sync::Arc;
use std::time::Instant;
use uuid::Uuid;

pub(super) fn not_found(name: &str) -> ProtocolError {
    ProtocolError::new(ErrorCode::ModelNotFound, format!("Model {name} not found"))
}

impl MemoryService {
    /// `memory.model_load`: opens the file beneath the model root, checks its safetensors
    /// header, and reads every tensor (with `pread`, so a file shortened meanwhile is an error)
    /// into a `ModelWeights` allocation owned by `model:<name>` (one per tensor, purpose = the
    /// tensor's name, in file order). Atomic: on any failure nothing stays allocated.
    /// Loading a name already loaded from the same file returns it (and counts as a use).
    pub fn model_load(&self, req: &ModelLoadRequest) -> Result<ModelInfo, ProtocolError> {
        let _recorded = self.recording();
        static LOADS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let load_token = LOADS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let started = Instant::now();
        let file = self.model_root.open(&req.path)?;
        let path = file.path().to_path_buf();
        let device = {
            let e = self.engine.lock();
            e.device_index(&req.device_id)?
        };
        {
            let mut models = self.models.lock();
            if let Some(m) = models.get_mut(&req.model_name) {
                if m.path != path {
                    return Err(ProtocolError::invalid_parameter(format!(
                        "model {} is already loaded from {}, not {}",
                        req.model_name,
                        m.path.display(),
                        path.display()
                    )));
                }
                if m.state == ModelState::Loading {
                    return Err(ProtocolError::new(
                        ErrorCode::ModelInUse,
                        format!("model {} is still loading", req.model_name),
                    ));
                }
                m.last_used_at = self.now();
                let m = models
                    .get(&req.model_name)
                    .ok_or_else(|| not_found(&req.model_name))?;
                return Ok(models.info(m).into());
            }
            let now = self.now();
            models.insert(Model {
                load_token,
                name: req.model_name.clone(),
                path: path.clone(),
                device_id: req.device_id.clone(),
                resident_device_id: req.device_id.clone(),
                state: ModelState::Loading,
                allocations: Vec::new(),
                tensors: Vec::new(),
                size_bytes: 0,
                tensor_count: 0,
                loaded_at: now,
                last_used_at: now,
                keep_alive_seconds: req.keep_alive_seconds,
                load_time_ms: 0.0,
            });
        }
        let mut made = Vec::new();
        let mut listed = Vec::new();
        let result = self.copy_tensors(req, &file, device, &mut made, &mut listed);
        // However the load ends, an acquire waiting for it wakes (after the table's lock, below,
        // is let go: locals drop in reverse order).
        struct Ended<'a>(&'a crate::managers::room::RoomSignal);
        impl Drop for Ended<'_> {
            fn drop(&mut self) {
                self.0.raise();
            }
        }
        let _ended = Ended(&self.room);
        let mut models = self.models.lock();
        match result {
            Ok((size, count)) => {
                let Some(m) = models
                    .get_mut(&req.model_name)
                    .filter(|m| m.load_token == load_token)
                else {
                    // Unloaded with force while it loaded (and perhaps loaded again since, by
                    // another request): give its bytes back.
                    drop(models);
                    let mut engine = self.engine.lock();
                    for id in &made {
                        engine.free_id(id);
                    }
                    drop(engine);
                    return Err(not_found(&req.model_name));
                };
                m.state = ModelState::Loaded;
                m.allocations = made;
                m.tensors = listed;
                m.size_bytes = size;
                m.tensor_count = count;
                m.loaded_at = self.now();
                m.last_used_at = m.loaded_at;
                m.load_time_ms = started.elapsed().as_secs_f64() * 1000.0;
                Ok(m.info().into())
            }
            Err(e) => {
                if models
                    .get(&req.model_name)
                    .is_some_and(|m| m.load_token == load_token)
                {
                    models.remove(&req.model_name);
                }
                drop(models);
                let mut engine = self.engine.lock();
                for id in &made {
                    engine.free_id(id);
                }
                // The pages copied so far go back too, not into the cache: a load that fails
                // (often for want of room) leaves the device as it found it.
                if !made.is_empty() {
                    engine.trim(device);
                }
                drop(engine);
                Err(e)
            }
        }
    }

    fn copy_tensors(
        &self,
        req: &ModelLoadRequest,
        file: &ModelFile,
        device: usize,
        made: &mut Vec<Uuid>,
        listed: &mut Vec<ModelTensor>,
    ) -> Result<(u64, u64), ProtocolError> {
        let tensors = file.header()?;
        let owner = Owner::Model(req.model_name.as_str().into());
        let total: u64 = tensors.iter().map(|t| t.len).sum();
        let budget = self.model_budget(&req.device_id);
        if total > budget {
            return Err(ProtocolError::new(
                ErrorCode::OutOfMemory,
                format!(
                    "model {} needs {}, more than the model budget of {} on {}",
                    req.model_name,
                    format_bytes(total),
                    format_bytes(budget),
                    req.device_id
                ),
            ));
        }
        // Over the loader's quota: refused before anything is evicted or waited for.
        self.engine
            .lock()
            .check_quota(device, &req.holder.tenant, total)?;
        self.wait_for_room(
            &req.device_id,
            device,
            total,
            Some(budget),
            req.timeout_seconds,
        )?;
        let resident = self.models.lock().resident_bytes(&req.device_id);
        if resident + total > budget {
            return Err(ProtocolError::new(
                ErrorCode::OutOfMemory,
                format!(
                    "model {} needs {} on {}, where models hold {} of a {} model budget and none \
                     can be evicted; {}",
                    req.model_name,
                    format_bytes(total),
                    req.device_id,
                    format_bytes(resident),
                    format_bytes(budget),
                    self.holders(&req.device_id)
                ),
            ));
        }
        let needs = tensors.last().map_or(0, |t| t.start + t.len);
        let spec_of = |tensor: &super::model_files::Tensor| AllocationSpec {
            size: tensor.len,
            alignment: 0,
            kind: MemoryAllocationType::ModelWeights,
            purpose: tensor.name.clone(),
            persistent: false,
            owner: owner.clone(),
            holder: Arc::clone(&req.holder),
        };
        // Memory other processes may map (shm, GPUs) takes the model as one region, its
        // tensors back to back: an export of it is then a few segments (on a GPU, a few
        // physical allocations; `backends::cuda` says why that matters). Where no free range
        // holds the whole model, tensors are placed one by one as before.
        let mut grouped = {
            let mut engine = self.engine.lock();
            let shareable = matches!(
                engine.memory_type(device),
                crate::domain::MemoryType::VRAM | crate::domain::MemoryType::SharedMemory
            );
            let specs: Vec<AllocationSpec> =
                tensors.iter().filter(|t| t.len > 0).map(spec_of).collect();
            let ids = (shareable && !specs.is_empty())
                .then(|| engine.try_allocate_group(device, &specs, self.now()).ok())
                .flatten()
                .unwrap_or_default();
            made.extend(ids.iter().copied());
            ids.into_iter()
        };
        let mut size = 0u64;
        let mut count = 0u64;
        for tensor in &tensors {
            count += 1;
            listed.push(ModelTensor {
                name: tensor.name.clone(),
                dtype: tensor.dtype.clone(),
                shape: tensor.shape.clone(),
                size_bytes: tensor.len,
                allocation: None,
            });
            if tensor.len == 0 {
                continue;
            }
            let mut engine = self.engine.lock();
            let placed = match grouped.next() {
                Some(id) => Ok(id),
                None => engine
                    .try_allocate(device, &spec_of(tensor), self.now())
                    .inspect(|&id| made.push(id)),
            };
            let id = match placed {
                Ok(id) => id,
                Err(e) => {
                    drop(engine);
                    let code = match e {
                        EngineError::QuotaExceeded { .. } => ErrorCode::QuotaExceeded,
                        _ => ErrorCode::OutOfMemory,
                    };
                    return Err(ProtocolError::new(
                        code,
                        format!(
                            "loading model {} ({} of {} so far) on {}: {e}; {}",
                            req.model_name,
                            format_bytes(size),
                            format_bytes(total),
                            req.device_id,
                            self.holders(&req.device_id)
                        ),
                    ));
                }
            };
            if let Some(t) = listed.last_mut() {
                t.allocation = Some(id);
            }
            let reader = file.reader(tensor);
            match engine.write_with(&id.to_string(), 0, tensor.len, &reader) {
                Ok(()) => {}
                Err(EngineError::Backend(BackendError::Source(e))) => {
                    drop(engine);
                    return Err(if e.raw_os_error() == Some(libc::EFAULT) {
                        // pread could not write into the destination: its pages could not be
                        // backed (a full tmpfs under shm), not a fault of the file.
                        ProtocolError::new(
                            ErrorCode::OutOfMemory,
                            format!(
                                "loading model {} on {}: the memory of tensor {} could not be \
                                 backed ({e}); free memory on the device and load it again",
                                req.model_name, req.device_id, tensor.name
                            ),
                        )
                    } else {
                        file.read_error(e, needs)
                    });
                }
                Err(e) => return Err(e.into()),
            }
            drop(engine);
            size += tensor.len;
            if let Some(hook) = &self.model_load_hook {
                hook(&tensor.name);
            }
        }
        file.check_unchanged()?;
        Ok((size, count))
    }

    /// The model budget of a device: `--model-budget`, else its whole budget.
    pub(super) fn model_budget(&self, device_id: &str) -> u64 {
        if let Some(b) = self.model_budgets.get(device_id) {
            return *b;
        }
        let e = self.engine.lock();
        e.device_index(device_id)
            .map(|d| e.usage(d).budget_bytes)
            .unwrap_or(0)
    }

    pub(super) fn device_available(&self, device: usize) -> u64 {
        self.engine.lock().available(device)
    }

    /// Evicts idle models from `device_id` (expired keep-alive first, then least recently
    /// used; never a leased one) until `fits` holds or none is left: each is offloaded to
    /// `cpu` when `cpu` has room for it, else unloaded. Returns what was done, for people.
    pub(super) fn make_room(&self, device_id: &str, fits: impl Fn(&Self) -> bool) -> Vec<String> {
        let mut done = Vec::new();
        while !fits(self) {
            let victims = self.models.lock().eviction_order(device_id, self.now());
            let Some((name, size)) = victims.into_iter().next() else {
                break;
            };
            let cpu_room = device_id != "cpu" && {
                let mut e = self.engine.lock();
                e.device_index("cpu").is_ok_and(|c| e.available(c) >= size)
            };
            if cpu_room && self.offload(&name).is_ok() {
                done.push(format!(
                    "offloaded model {name} ({}) to cpu",
                    format_bytes(size)
                ));
            } else if self.drop_model(&name).is_some() {
                done.push(format!("unloaded model {name} ({})", format_bytes(size)));
            } else {
                break;
            }
        }
        done
    }

    /// [`MemoryService::make_room`] for an allocation of `size` bytes on device `d` (index of
    /// `device_id`), only when evicting every idle model there would make it fit: an allocation
    /// that fails anyway evicts nothing (a failed request changes nothing).
    pub(super) fn make_room_for(&self, device_id: &str, d: usize, size: u64) -> Vec<String> {
        if !self.eviction_would_fit(device_id, d, size, None) {
            return Vec::new();
        }
        self.make_room(device_id, |svc| svc.device_available(d) >= size)
    }

    /// Whether `size` bytes fit on device `d` (index of `device_id`) now, or would once every
    /// idle model there is evicted; with `model_budget`, as models' bytes within that budget.
    fn eviction_would_fit(
        &self,
        device_id: &str,
        d: usize,
        size: u64,
        model_budget: Option<u64>,
    ) -> bool {
        let (evictable, resident) = {
            let models = self.models.lock();
            let evictable: u64 = models
                .eviction_order(device_id, self.now())
                .iter()
                .map(|(_, bytes)| bytes)
                .sum();
            (evictable, models.resident_bytes(device_id))
        };
        self.device_available(d).saturating_add(evictable) >= size
            && model_budget.is_none_or(|b| resident.saturating_sub(evictable) + size <= b)
    }

    /// Room for a model's `size` bytes on device `d` (index of `device_id`), within
    /// `model_budget`: makes room as [`MemoryService::make_room`] does, but only when evicting
    /// every idle model would be enough (a request that fails anyway evicts nothing); while it
    /// does not fit, waits (up to `timeout_seconds`, checking every 50 ms, trying again each
    /// time) for frees, releases and unloads elsewhere. Returns whether it fits.
    pub(super) fn wait_for_room(
        &self,
        device_id: &str,
        d: usize,
        size: u64,
        model_budget: Option<u64>,
        timeout_seconds: f64,
    ) -> Result<bool, ProtocolError> {
        let fits = |svc: &Self| {
            svc.device_available(d) >= size
                && model_budget
                    .is_none_or(|b| svc.models.lock().resident_bytes(device_id) + size <= b)
        };
        let deadline = Instant::now() + std::time::Duration::from_secs_f64(timeout_seconds);
        loop {
            // Read before looking at the books: a raise after this is not missed.
            let seen = self.room.generation();
            if self.eviction_would_fit(device_id, d, size, model_budget) {
                self.make_room(device_id, fits);
            }
            if fits(self) {
                return Ok(true);
            }
            if self.is_shutting_down() {
                return Err(ProtocolError::new(
                    ErrorCode::ShuttingDown,
                    format!("{device_id}: the worker is stopping; the request was not carried out"),
                ));
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            // Until memory comes back (the engine raises it), shutdown, or the deadline; a
            // model's keep-alive running out frees nothing until the sweeper unloads it, and
            // that unload raises it too.
            self.room.wait_until(seen, deadline);
        }
    }

    /// Moves a model's bytes to `cpu` (state Offloaded); a later acquire brings them back
    /// without reading the file.
    pub(super) fn offload(&self, name: &str) -> Result<u64, ProtocolError> {
        self.relocate_model(name, "cpu", ModelState::Offloaded)
    }

    pub(super) fn relocate_model(
        &self,
        name: &str,
        to: &str,
        state: ModelState,
    ) -> Result<u64, ProtocolError> {
        let allocations = {
            let models = self.models.lock();
            models
                .get(name)
                .ok_or_else(|| not_found(name))?
                .allocations
                .clone()
        };
        let mut moved = 0;
        {
            let mut e = self.engine.lock();
            let dst = e.device_index(to)?;
            let now = self.now();
            for (k, id) in allocations.iter().enumerate() {
                if let Err(err) = e.relocate(id, dst, now) {
                    // Put back what moved, so the model stays in one place.
                    let home = self
                        .models
                        .lock()
                        .get(name)
                        .map(|m| m.resident_device_id.clone())
                        .unwrap_or_default();
                    if let Ok(h) = e.device_index(&home) {
                        for back in &allocations[..k] {
                            let _ = e.relocate(back, h, now);
                        }
                    }
                    return Err(err.into());
                }
                moved += e.allocation_by_id(id).map_or(0, |a| a.size_bytes);
            }
        }
        if let Some(m) = self.models.lock().get_mut(name) {
            m.resident_device_id = to.to_string();
            m.state = state;
        }
        Ok(moved)
    }

    /// Unloads a model whatever its leases; returns the bytes freed.
    pub(super) fn drop_model(&self, name: &str) -> Option<u64> {
        let model = self.models.lock().remove(name)?;
        self.end_exports_of_model(name);
        let mut freed = 0;
        {
            let mut engine = self.engine.lock();
            for id in &model.allocations {
                freed += engine.free_id(id).map_or(0, |f| f.bytes);
            }
        }
        Some(freed)
    }

    /// Who holds a device's memory, for people: its models (and their leases) and the clients'
    /// bytes.
    pub(super) fn holders(&self, device_id: &str) -> String {
        let held: Vec<String> = {
            let models = self.models.lock();
            models
                .all()
                .into_iter()
                .filter(|m| m.resident_device_id == device_id && m.state != ModelState::Loading)
                .map(|m| {
                    let leases = models.lease_count(&m.name);
                    let leased = if leases > 0 {
                        format!(" (leased x{leases})")
                    } else {
                        String::new()
                    };
                    format!("model {} {}{leased}", m.name, format_bytes(m.size_bytes))
                })
                .collect()
        };
        let client = {
            let e = self.engine.lock();
            e.device_index(device_id)
                .map(|d| {
                    let u = e.usage(d);
                    (u.allocated_bytes + u.reservation_bytes).saturating_sub(u.model_bytes)
                })
                .unwrap_or(0)
        };
        let models = if held.is_empty() {
            String::new()
        } else {
            format!("{}, ", held.join(", "))
        };
        format!(
            "held by: {models}client allocations {}",
            format_bytes(client)
        )
    }

    /// Unloads unleased models idle past their keep-alive; returns their names.
    pub fn sweep_keep_alive(&self) -> Vec<String> {
        let _recorded = self.recording();
        let now = self.now();
        let expired: Vec<String> = {
            let models = self.models.lock();
            models
                .all()
                .into_iter()
                .filter(|m| {
                    m.state != ModelState::Loading
                        && models.lease_count(&m.name) == 0
                        && models.expired(m, now)
                })
                .map(|m| m.name.clone())
                .collect()
        };
        expired
            .into_iter()
            .filter(|n| self.drop_model(n).is_some())
            .collect()
    }

    /// Evicts every unleased model resident on a device (offload to `cpu` where it has room,
    /// else unload): `memory.optimize` EvictIdleModels.
    pub fn evict_idle_models(&self, device_id: &str) -> (Vec<String>, u64) {
        let _recorded = self.recording();
        let before = self.models.lock().resident_bytes(device_id);
        let actions = self.make_room(device_id, |svc| {
            svc.models
                .lock()
                .eviction_order(device_id, self.now())
                .is_empty()
        });
        let after = self.models.lock().resident_bytes(device_id);
        (actions, before.saturating_sub(after))
    }

    /// `memory.model_optimize`.
    pub fn model_optimize(
        &self,
        req: &ModelOptimizeRequest,
    ) -> Result<ModelOptimizeResponse, ProtocolError> {
        let _recorded = self.recording();
        let devices: Vec<String> = match &req.device_id {
            Some(d) => {
                self.engine.lock().device_index(d)?;
                vec![d.clone()]
            }
            None => {
                let e = self.engine.lock();
                (0..e.device_count())
                    .map(|d| e.device_id(d).to_string())
                    .collect()
            }
        };
        let mut out = ModelOptimizeResponse {
            unloaded: Vec::new(),
            offloaded: Vec::new(),
            freed_bytes: 0,
        };
        let now = self.now();
        for device in devices {
            match req.strategy {
                ModelStrategy::OffloadIdle | ModelStrategy::UnloadIdle => {
                    let idle: Vec<(String, u64)> = {
                        let models = self.models.lock();
                        models
                            .eviction_order(&device, now)
                            .into_iter()
                            .filter(|(n, _)| {
                                models.get(n).is_some_and(|m| {
                                    now.duration_since(m.last_used_at)
                                        .is_ok_and(|d| d.as_secs_f64() >= req.idle_seconds)
                                })
                            })
                            .collect()
                    };
                    for (name, size) in idle {
                        let offload =
                            req.strategy == ModelStrategy::OffloadIdle && device != "cpu" && {
                                let mut e = self.engine.lock();
                                e.device_index("cpu").is_ok_and(|c| e.available(c) >= size)
                            };
                        if offload && self.offload(&name).is_ok() {
                            out.offloaded.push(name);
                            out.freed_bytes += size;
                        } else if self.drop_model(&name).is_some() {
                            out.unloaded.push(name);
                            out.freed_bytes += size;
                        }
                    }
                }
                ModelStrategy::FitBudget => {
                    let target = req
                        .target_bytes
                        .unwrap_or_else(|| self.model_budget(&device));
                    let before = self.models.lock().resident_bytes(&device);
                    for action in self.make_room(&device, |svc| {
                        svc.models.lock().resident_bytes(&device) <= target
                    }) {
                        if let Some(name) = action.strip_prefix("offloaded model ") {
                            out.offloaded
                                .push(name.split(' ').next().unwrap_or("").to_string());
                        } else if let Some(name) = action.strip_prefix("unloaded model ") {
                            out.unloaded
                                .push(name.split(' ').next().unwrap_or("").to_string());
                        }
                    }
                    out.freed_bytes +=
                        before.saturating_sub(self.models.lock().resident_bytes(&device));
                }
            }
        }
        Ok(out)
    }

    /// `memory.model_unload`.
    pub fn model_unload(&self, req: &ModelRequest) -> Result<ModelUnloadResponse, ProtocolError> {
        let _recorded = self.recording();
        let model = {
            let mut models = self.models.lock();
            let m = models
                .get(&req.model_name)
                .ok_or_else(|| not_found(&req.model_name))?;
            let leases = models.lease_count(&req.model_name);
            if !req.force && (leases > 0 || m.state == ModelState::Loading) {
                return Err(ProtocolError::new(
                    ErrorCode::ModelInUse,
                    format!(
                        "model {} is {}; unload it with force, or release it first",
                        req.model_name,
                        if leases > 0 {
                            format!("leased ({leases} lease(s))")
                        } else {
                            "loading".to_string()
                        }
                    ),
                ));
            }
            let model = models
                .remove(&req.model_name)
                .ok_or_else(|| not_found(&req.model_name))?;
            // With force, its exports end first (without force a leased, so exported,
            // model was refused above).
            self.end_exports_of_model(&req.model_name);
            model
        };
        let mut freed = 0;
        {
            let mut engine = self.engine.lock();
            for id in &model.allocations {
                freed += engine.free_id(id).map_or(0, |f| f.bytes);
            }
        }
        Ok(ModelUnloadResponse {
            model_name: req.model_name.clone(),
            freed_bytes: freed,
        })
    }

    /// `memory.model_status`.
    pub fn model_status(
        &self,
        req: &ModelStatusRequest,
    ) -> Result<ModelStatusResponse, ProtocolError> {
        let devices: Vec<String> = {
            let e = self.engine.lock();
            match &req.device_id {
                Some(id) => vec![e.device_id(e.device_index(id)?).to_string()],
                None => (0..e.device_count())
                    .map(|d| e.device_id(d).to_string())
                    .collect(),
            }
        };
        let budget = devices.iter().map(|d| self.model_budget(d)).sum();
        let models = self.models.lock();
        if let Some(name) = &req.model_name
            && models.get(name).is_none()
        {
            return Err(not_found(name));
        }
        let infos: Vec<ModelInfo> = models
            .all()
            .into_iter()
            .filter(|m| req.device_id.as_deref().is_none_or(|d| d == m.device_id))
            .filter(|m| req.model_name.as_deref().is_none_or(|n| n == m.name))
            .map(|m| models.info(m).into())
            .collect();
        Ok(ModelStatusResponse {
            model_bytes: infos.iter().map(|m| m.size_bytes).sum(),
            models: infos,
            model_budget_bytes: budget,
        })
    }
}
