//! The model actions: load safetensors weights into allocations owned by the model, unload,
//! leases, status. Reading the file happens here (the managers do no I/O).

use super::MemoryService;
use crate::managers::models::Model;
use crate::managers::{AllocationSpec, Owner};
use crate::protocol::requests::{LeaseRequest, ModelLoadRequest, ModelRequest, ModelStatusRequest};
use crate::protocol::{
    ErrorCode, MemoryAllocationType, ModelAcquireResponse, ModelInfo, ModelReleaseResponse,
    ModelState, ModelStatusResponse, ModelUnloadResponse, ProtocolError,
};
use crate::units::format_bytes;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};
use uuid::Uuid;

fn load_failed(message: impl Into<String>) -> ProtocolError {
    ProtocolError::new(ErrorCode::ModelLoadFailed, message)
}

fn not_found(name: &str) -> ProtocolError {
    ProtocolError::new(ErrorCode::ModelNotFound, format!("Model {name} not found"))
}

/// `path` resolved inside `root`: no `..` escape, no symlink escape, an existing file.
pub fn resolve_model_path(root: &Path, path: &str) -> Result<PathBuf, ProtocolError> {
    let root = root.canonicalize().map_err(|e| {
        load_failed(format!(
            "the model root {} is not usable: {e}",
            root.display()
        ))
    })?;
    let joined = root.join(path);
    let canonical = joined
        .canonicalize()
        .map_err(|e| load_failed(format!("cannot open {path} under the model root: {e}")))?;
    if !canonical.starts_with(&root) {
        return Err(load_failed(format!(
            "{path} resolves outside the model root {}",
            root.display()
        )));
    }
    if !canonical.is_file() {
        return Err(load_failed(format!("{path} is not a file")));
    }
    Ok(canonical)
}

impl MemoryService {
    /// `memory.model_load`: maps the file, checks its safetensors header, and copies every
    /// tensor into a `ModelWeights` allocation owned by `model:<name>` (one per tensor, purpose =
    /// the tensor's name, in file order). Atomic: on any failure nothing stays allocated.
    /// Loading a name already loaded from the same file returns it (and counts as a use).
    pub fn model_load(&self, req: &ModelLoadRequest) -> Result<ModelInfo, ProtocolError> {
        let started = Instant::now();
        let path = resolve_model_path(&self.model_root, &req.path)?;
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
                m.last_used_at = SystemTime::now();
                return Ok(m.info());
            }
            let now = SystemTime::now();
            models.insert(Model {
                name: req.model_name.clone(),
                path: path.clone(),
                device_id: req.device_id.clone(),
                state: ModelState::Loading,
                allocations: Vec::new(),
                size_bytes: 0,
                tensor_count: 0,
                loaded_at: now,
                last_used_at: now,
                keep_alive_seconds: req.keep_alive_seconds,
                load_time_ms: 0.0,
            });
        }
        let mut made = Vec::new();
        let result = self.copy_tensors(req, &path, device, &mut made);
        let mut models = self.models.lock();
        match result {
            Ok((size, count)) => {
                let m = models
                    .get_mut(&req.model_name)
                    .ok_or_else(|| not_found(&req.model_name))?;
                m.state = ModelState::Loaded;
                m.allocations = made;
                m.size_bytes = size;
                m.tensor_count = count;
                m.loaded_at = SystemTime::now();
                m.last_used_at = m.loaded_at;
                m.load_time_ms = started.elapsed().as_secs_f64() * 1000.0;
                Ok(m.info())
            }
            Err(e) => {
                models.remove(&req.model_name);
                drop(models);
                let mut engine = self.engine.lock();
                for id in &made {
                    engine.free_id(id);
                }
                drop(engine);
                self.room.notify_waiters();
                Err(e)
            }
        }
    }

    fn copy_tensors(
        &self,
        req: &ModelLoadRequest,
        path: &Path,
        device: usize,
        made: &mut Vec<Uuid>,
    ) -> Result<(u64, u64), ProtocolError> {
        let file = std::fs::File::open(path)
            .map_err(|e| load_failed(format!("cannot open {}: {e}", path.display())))?;
        // SAFETY: the file is mapped read-only for the length of the load; a host that
        // rewrites a model file while it loads gets whatever bytes were there (never UB in
        // this process: the bytes are only copied).
        let map = unsafe { memmap2::Mmap::map(&file) }
            .map_err(|e| load_failed(format!("cannot map {}: {e}", path.display())))?;
        let tensors = safetensors::SafeTensors::deserialize(&map).map_err(|e| {
            load_failed(format!(
                "{} is not a valid safetensors file: {e}",
                path.display()
            ))
        })?;
        let owner = Owner::Model(req.model_name.as_str().into());
        let mut size = 0u64;
        let mut count = 0u64;
        for (name, view) in tensors.iter() {
            count += 1;
            let data = view.data();
            if data.is_empty() {
                continue;
            }
            let spec = AllocationSpec {
                size: data.len() as u64,
                alignment: 0,
                kind: MemoryAllocationType::ModelWeights,
                purpose: name.to_string(),
                persistent: false,
                owner: owner.clone(),
            };
            let mut engine = self.engine.lock();
            let id = engine
                .try_allocate(device, &spec, SystemTime::now())
                .map_err(|e| {
                    ProtocolError::new(
                        ErrorCode::OutOfMemory,
                        format!(
                            "loading model {} ({} so far) on {}: {e}",
                            req.model_name,
                            format_bytes(size),
                            req.device_id
                        ),
                    )
                })?;
            made.push(id);
            engine.write(&id.to_string(), 0, data)?;
            size += data.len() as u64;
        }
        Ok((size, count))
    }

    /// `memory.model_unload`.
    pub fn model_unload(&self, req: &ModelRequest) -> Result<ModelUnloadResponse, ProtocolError> {
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
            models
                .remove(&req.model_name)
                .ok_or_else(|| not_found(&req.model_name))?
        };
        let mut freed = 0;
        {
            let mut engine = self.engine.lock();
            for id in &model.allocations {
                freed += engine.free_id(id).map_or(0, |f| f.bytes);
            }
        }
        self.room.notify_waiters();
        Ok(ModelUnloadResponse {
            model_name: req.model_name.clone(),
            freed_bytes: freed,
        })
    }

    /// `memory.model_acquire`: a lease; a leased model is never evicted or offloaded.
    pub fn model_acquire(&self, req: &ModelRequest) -> Result<ModelAcquireResponse, ProtocolError> {
        let mut models = self.models.lock();
        if models.get(&req.model_name).is_none() {
            return Err(not_found(&req.model_name));
        }
        let lease = models.lease(&req.model_name);
        let m = models
            .get_mut(&req.model_name)
            .ok_or_else(|| not_found(&req.model_name))?;
        m.last_used_at = SystemTime::now();
        Ok(ModelAcquireResponse {
            lease_id: lease.hyphenated().to_string(),
            model: m.info(),
        })
    }

    /// `memory.model_release`.
    pub fn model_release(&self, req: &LeaseRequest) -> Result<ModelReleaseResponse, ProtocolError> {
        let gone = || {
            ProtocolError::new(
                ErrorCode::LeaseNotFound,
                format!("Lease {} not found", req.lease_id),
            )
        };
        let lease = Uuid::parse_str(&req.lease_id).map_err(|_| gone())?;
        let mut models = self.models.lock();
        let name = models.release(&lease).ok_or_else(gone)?;
        if let Some(m) = models.get_mut(&name) {
            m.last_used_at = SystemTime::now();
        }
        Ok(ModelReleaseResponse {
            lease_id: req.lease_id.clone(),
            model_name: name,
        })
    }

    /// `memory.model_status`.
    pub fn model_status(
        &self,
        req: &ModelStatusRequest,
    ) -> Result<ModelStatusResponse, ProtocolError> {
        let budget = {
            let e = self.engine.lock();
            match &req.device_id {
                Some(id) => e.usage(e.device_index(id)?).budget_bytes,
                None => (0..e.device_count()).map(|d| e.usage(d).budget_bytes).sum(),
            }
        };
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
            .map(Model::info)
            .collect();
        Ok(ModelStatusResponse {
            model_bytes: infos.iter().map(|m| m.size_bytes).sum(),
            models: infos,
            model_budget_bytes: budget,
        })
    }
}
