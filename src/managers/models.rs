//! Models: which named weights are loaded where, as which allocations, and who leases them.
//! Plain data; the service reads the files and the engine holds the bytes.

use crate::domain::{LeaseView, ModelState, ModelView};
use rustc_hash::FxHashMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};
use uuid::Uuid;

/// One loaded (or loading) model.
#[derive(Debug, Clone)]
pub struct Model {
    /// The host's name for it.
    pub name: String,
    /// The file it came from (canonical path).
    pub path: PathBuf,
    /// Its home device.
    pub device_id: String,
    /// Where its bytes are now: the home device, or `cpu` while Offloaded.
    pub resident_device_id: String,
    /// Loading, Loaded or Offloaded.
    pub state: ModelState,
    /// One allocation per non-empty tensor, in file order.
    pub allocations: Vec<Uuid>,
    /// Every tensor, in file order, as its header describes it (what an export lists).
    pub tensors: Vec<ModelTensor>,
    /// Bytes of all tensors.
    pub size_bytes: u64,
    /// Tensors in the file.
    pub tensor_count: u64,
    /// When the load finished (or started, while loading).
    pub loaded_at: SystemTime,
    /// Last load, acquire or release.
    pub last_used_at: SystemTime,
    /// Idle time after which it may be unloaded; `None` = until evicted.
    pub keep_alive_seconds: Option<f64>,
    /// How long the load took.
    pub load_time_ms: f64,
    /// Which load made this entry (a load that finishes after its entry was replaced must not
    /// take the new one over).
    pub load_token: u64,
}

impl Model {
    /// What `memory.model_*` report of it, its leases left out (see [`ModelTable::info`]).
    pub fn info(&self) -> ModelView {
        ModelView {
            model_name: self.name.clone(),
            device_id: self.device_id.clone(),
            resident_device_id: self.resident_device_id.clone(),
            state: self.state,
            size_bytes: self.size_bytes,
            tensor_count: self.tensor_count,
            path: self.path.to_string_lossy().into_owned(),
            loaded_at: self.loaded_at,
            last_used_at: self.last_used_at,
            keep_alive_seconds: self.keep_alive_seconds,
            load_time_ms: self.load_time_ms,
            leases: Vec::new(),
        }
    }
}

/// One tensor of a model: what the safetensors header says of it, and where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelTensor {
    /// Its name in the file.
    pub name: String,
    /// Its dtype as the header writes it (`F16`, `BF16`, …).
    pub dtype: String,
    /// Its dimensions.
    pub shape: Vec<u64>,
    /// Its bytes.
    pub size_bytes: u64,
    /// The allocation holding it (`None` for a tensor of no bytes).
    pub allocation: Option<Uuid>,
}

/// One lease: a model held in place (never evicted, offloaded or moved) until it is released
/// or, with a time limit, until its deadline passes.
#[derive(Debug, Clone, PartialEq)]
pub struct Lease {
    /// The model it holds.
    pub model: String,
    /// When it was taken (wall time).
    pub acquired_at: SystemTime,
    /// Its time limit, if any.
    pub limit: Option<LeaseLimit>,
}

/// When a lease with a time limit ends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LeaseLimit {
    /// The time limit it was last given (acquired or renewed with).
    pub ttl: Duration,
    /// Its deadline on the service's monotonic clock (milliseconds): what expiry is judged by.
    pub deadline_millis: u64,
    /// The same deadline as wall time (what the protocol shows).
    pub expires_at: SystemTime,
}

impl LeaseLimit {
    /// A limit of `ttl` from now (`now_millis` on the monotonic clock, read at `now_wall`).
    pub fn from_now(ttl: Duration, now_millis: u64, now_wall: SystemTime) -> Self {
        let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        LeaseLimit {
            ttl,
            deadline_millis: now_millis.saturating_add(ms),
            expires_at: now_wall + ttl,
        }
    }
}

/// Every model and every lease.
#[derive(Default)]
pub struct ModelTable {
    models: FxHashMap<String, Model>,
    leases: FxHashMap<Uuid, Lease>,
}

impl ModelTable {
    /// A model by name.
    pub fn get(&self, name: &str) -> Option<&Model> {
        self.models.get(name)
    }

    /// A model by name, mutably.
    pub fn get_mut(&mut self, name: &str) -> Option<&mut Model> {
        self.models.get_mut(name)
    }

    /// Adds (or replaces) a model.
    pub fn insert(&mut self, model: Model) {
        self.models.insert(model.name.clone(), model);
    }

    /// Removes a model and its leases.
    pub fn remove(&mut self, name: &str) -> Option<Model> {
        self.leases.retain(|_, l| l.model != name);
        self.models.remove(name)
    }

    /// Every model, by name.
    pub fn all(&self) -> Vec<&Model> {
        let mut v: Vec<&Model> = self.models.values().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// What `memory.model_*` report of a model, its leases included.
    pub fn info(&self, m: &Model) -> ModelView {
        let mut view = m.info();
        let mut leases: Vec<(&Uuid, &Lease)> = self
            .leases
            .iter()
            .filter(|(_, l)| l.model == m.name)
            .collect();
        leases.sort_by_key(|(id, l)| (l.acquired_at, **id));
        view.leases = leases
            .into_iter()
            .map(|(id, l)| LeaseView {
                lease_id: *id,
                acquired_at: l.acquired_at,
                expires_at: l.limit.map(|x| x.expires_at),
            })
            .collect();
        view
    }

    /// How many leases a model has.
    pub fn lease_count(&self, name: &str) -> usize {
        self.leases.values().filter(|l| l.model == name).count()
    }

    /// Leases a model, taken at `now` (wall time) with an optional time limit; returns the
    /// lease id.
    pub fn lease(&mut self, name: &str, now: SystemTime, limit: Option<LeaseLimit>) -> Uuid {
        let id = Uuid::new_v4();
        self.leases.insert(
            id,
            Lease {
                model: name.to_string(),
                acquired_at: now,
                limit,
            },
        );
        id
    }

    /// A lease.
    pub fn lease_of(&self, lease: &Uuid) -> Option<&Lease> {
        self.leases.get(lease)
    }

    /// The model a lease is on.
    pub fn lease_model(&self, lease: &Uuid) -> Option<&str> {
        self.leases.get(lease).map(|l| l.model.as_str())
    }

    /// Gives a lease a new time limit; returns it, or `None` for an unknown lease.
    pub fn renew(&mut self, lease: &Uuid, limit: LeaseLimit) -> Option<&Lease> {
        let l = self.leases.get_mut(lease)?;
        l.limit = Some(limit);
        Some(l)
    }

    /// Leases whose deadline is at or before `now_millis` (the monotonic clock), oldest
    /// deadline first.
    pub fn expired_leases(&self, now_millis: u64) -> Vec<Uuid> {
        let mut v: Vec<(u64, Uuid)> = self
            .leases
            .iter()
            .filter_map(|(id, l)| {
                l.limit
                    .filter(|x| x.deadline_millis <= now_millis)
                    .map(|x| (x.deadline_millis, *id))
            })
            .collect();
        v.sort_unstable();
        v.into_iter().map(|(_, id)| id).collect()
    }

    /// Ends a lease; returns the model's name.
    pub fn release(&mut self, lease: &Uuid) -> Option<String> {
        self.leases.remove(lease).map(|l| l.model)
    }

    /// Whether a model's keep-alive has run out.
    pub fn expired(&self, m: &Model, now: SystemTime) -> bool {
        m.keep_alive_seconds.is_some_and(|k| {
            now.duration_since(m.last_used_at)
                .is_ok_and(|idle| idle.as_secs_f64() >= k)
        })
    }

    /// Models that may be evicted from `device_id` (resident there, loaded, not leased), best
    /// victims first: expired keep-alive, then least recently used.
    pub fn eviction_order(&self, device_id: &str, now: SystemTime) -> Vec<(String, u64)> {
        let mut v: Vec<&Model> = self
            .models
            .values()
            .filter(|m| {
                m.resident_device_id == device_id
                    && m.state == ModelState::Loaded
                    && self.lease_count(&m.name) == 0
            })
            .collect();
        v.sort_by_key(|m| (!self.expired(m, now), m.last_used_at));
        v.into_iter()
            .map(|m| (m.name.clone(), m.size_bytes))
            .collect()
    }

    /// Bytes of models resident on a device.
    pub fn resident_bytes(&self, device_id: &str) -> u64 {
        self.models
            .values()
            .filter(|m| m.resident_device_id == device_id)
            .map(|m| m.size_bytes)
            .sum()
    }

    /// Allocations of leased models (they must not move).
    pub fn leased_allocations(&self) -> Vec<Uuid> {
        self.models
            .values()
            .filter(|m| self.lease_count(&m.name) > 0)
            .flat_map(|m| m.allocations.iter().copied())
            .collect()
    }
}
