//! Leases: `memory.model_acquire`, `memory.model_renew`, `memory.model_release`, and the
//! expiry of leases with a time limit (contract section 8.5).
//!
//! A lease's deadline is kept on the service's monotonic clock (its wall time is what the
//! protocol shows); [`MemoryService::sweep_expired_leases`] releases every lease past it
//! exactly as `memory.model_release` would (the exports made under it end too) and counts
//! it. The service's sweeper thread calls it once a second
//! ([`MemoryService::start_keep_alive_sweeper`]); release and renew call it first, so a lease
//! past its deadline is gone for them whether or not the sweeper has come by.

use super::MemoryService;
use super::models::not_found;
use super::requests::{LeaseRequest, ModelAcquireRequest, RenewRequest};
use crate::managers::models::{LeaseLimit, ModelTable};
use crate::protocol::{
    ErrorCode, ModelAcquireResponse, ModelReleaseResponse, ModelRenewResponse, ModelState,
    ProtocolError, Timestamp,
};
use crate::units::format_bytes;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use uuid::Uuid;

fn lease_not_found(lease_id: &str) -> ProtocolError {
    ProtocolError::new(
        ErrorCode::LeaseNotFound,
        format!("Lease {lease_id} not found"),
    )
}

impl MemoryService {
    /// `memory.model_acquire` when it needs no waiting (the model is loaded and home): the
    /// lease at once, in arrival order. `None`: call [`MemoryService::model_acquire`].
    pub fn model_acquire_now(
        &self,
        req: &ModelAcquireRequest,
    ) -> Option<Result<ModelAcquireResponse, ProtocolError>> {
        let _recorded = self.recording();
        let mut models = self.models.lock();
        let Some(m) = models.get(&req.model_name) else {
            return Some(Err(not_found(&req.model_name)));
        };
        if m.state != ModelState::Loaded {
            return None;
        }
        Some(self.take_lease(&mut models, req))
    }

    /// `memory.model_acquire`: a lease; a leased model is never evicted or offloaded.
    pub fn model_acquire(
        &self,
        req: &ModelAcquireRequest,
    ) -> Result<ModelAcquireResponse, ProtocolError> {
        let _recorded = self.recording();
        let (state, home, size) = {
            let models = self.models.lock();
            let m = models
                .get(&req.model_name)
                .ok_or_else(|| not_found(&req.model_name))?;
            (m.state, m.device_id.clone(), m.size_bytes)
        };
        let (mut state, home, size) = (state, home, size);
        // A model still loading is waited for, up to the timeout.
        let deadline = Instant::now() + std::time::Duration::from_secs_f64(req.timeout_seconds);
        while state == ModelState::Loading {
            let seen = self.room.generation();
            if Instant::now() >= deadline || self.is_shutting_down() {
                return Err(ProtocolError::new(
                    ErrorCode::ModelInUse,
                    format!("model {} is still loading", req.model_name),
                ));
            }
            // A load that ends, either way, raises the room signal.
            self.room.wait_until(seen, deadline);
            state = self
                .models
                .lock()
                .get(&req.model_name)
                .ok_or_else(|| not_found(&req.model_name))?
                .state;
        }
        if state == ModelState::Offloaded {
            // Bring it back first, making room from other idle models.
            let device = self.engine.lock().device_index(&home)?;
            let budget = self.model_budget(&home);
            let fits =
                self.wait_for_room(&home, device, size, Some(budget), req.timeout_seconds)?;
            let restored = if fits {
                self.relocate_model(&req.model_name, &home, ModelState::Loaded)
                    .map(|_| ())
                    .map_err(|e| e.message)
            } else {
                Err(format!(
                    "no room for {} within its model budget of {}",
                    format_bytes(size),
                    format_bytes(budget)
                ))
            };
            restored.map_err(|why| {
                ProtocolError::new(
                    ErrorCode::OutOfMemory,
                    format!(
                        "model {} cannot come back to {home}: {why}; {}",
                        req.model_name,
                        self.holders(&home)
                    ),
                )
            })?;
        }
        let mut models = self.models.lock();
        self.take_lease(&mut models, req)
    }

    /// Leases a model in the table (held locked): the lease, with its time limit if the
    /// request gives one, and the model as it is now.
    fn take_lease(
        &self,
        models: &mut ModelTable,
        req: &ModelAcquireRequest,
    ) -> Result<ModelAcquireResponse, ProtocolError> {
        if models.get(&req.model_name).is_none() {
            return Err(not_found(&req.model_name));
        }
        let now = self.now();
        let limit = req.ttl_seconds.map(|ttl| self.limit_from_now(ttl));
        let lease = models.lease(&req.model_name, now, limit);
        let m = models
            .get_mut(&req.model_name)
            .ok_or_else(|| not_found(&req.model_name))?;
        m.last_used_at = now;
        let m = models
            .get(&req.model_name)
            .ok_or_else(|| not_found(&req.model_name))?;
        Ok(ModelAcquireResponse {
            lease_id: lease.hyphenated().to_string(),
            expires_at: limit.map(|l| Timestamp(l.expires_at)),
            model: models.info(m).into(),
        })
    }

    /// A time limit of `ttl_seconds` (checked by the api: finite, > 0, at most 30 days) from
    /// now on the service's clock.
    fn limit_from_now(&self, ttl_seconds: f64) -> LeaseLimit {
        let ttl = Duration::try_from_secs_f64(ttl_seconds).unwrap_or(Duration::ZERO);
        LeaseLimit::from_now(ttl, self.clock.millis(), self.clock.wall())
    }

    /// `memory.model_release`.
    pub fn model_release(&self, req: &LeaseRequest) -> Result<ModelReleaseResponse, ProtocolError> {
        let _recorded = self.recording();
        let gone = || {
            ProtocolError::new(
                ErrorCode::LeaseNotFound,
                format!("Lease {} not found", req.lease_id),
            )
        };
        let lease = Uuid::parse_str(&req.lease_id).map_err(|_| gone())?;
        // A lease past its deadline is gone, whether or not the sweeper has come by yet.
        self.sweep_expired_leases();
        let name = self.end_lease(&lease).ok_or_else(gone)?;
        Ok(ModelReleaseResponse {
            lease_id: req.lease_id.clone(),
            model_name: name,
        })
    }

    /// `memory.model_renew`: gives a lease a new time limit from now (the request's, else the
    /// one it was last given, else `default_ttl`: the transport's). An unknown lease, or one
    /// past its deadline, is LEASE_NOT_FOUND.
    pub fn model_renew(
        &self,
        req: &RenewRequest,
        default_ttl: Option<f64>,
    ) -> Result<ModelRenewResponse, ProtocolError> {
        let _recorded = self.recording();
        let lease = Uuid::parse_str(&req.lease_id).map_err(|_| lease_not_found(&req.lease_id))?;
        self.sweep_expired_leases();
        let mut models = self.models.lock();
        let held = models
            .lease_of(&lease)
            .ok_or_else(|| lease_not_found(&req.lease_id))?;
        let ttl = req
            .ttl_seconds
            .or(held.limit.map(|l| l.ttl.as_secs_f64()))
            .or(default_ttl)
            .ok_or_else(|| {
                ProtocolError::invalid_parameter(format!(
                    "field `ttl_seconds` is required: lease {} has no time limit to renew \
                     (it lasts until released)",
                    req.lease_id
                ))
            })?;
        let limit = self.limit_from_now(ttl);
        let name = models
            .renew(&lease, limit)
            .map(|l| l.model.clone())
            .ok_or_else(|| lease_not_found(&req.lease_id))?;
        if let Some(m) = models.get_mut(&name) {
            m.last_used_at = self.now();
        }
        Ok(ModelRenewResponse {
            lease_id: req.lease_id.clone(),
            expires_at: Timestamp(limit.expires_at),
        })
    }

    /// Ends a lease as `memory.model_release` does: the exports made under it end, and a load
    /// or an acquire waiting for room is woken (the model may be evicted now). Returns the
    /// model's name, or `None` for an unknown lease.
    fn end_lease(&self, lease: &Uuid) -> Option<String> {
        let name = {
            let mut models = self.models.lock();
            let name = models.release(lease)?;
            if let Some(m) = models.get_mut(&name) {
                m.last_used_at = self.now();
            }
            name
        };
        self.end_exports_of_lease(lease);
        self.room.raise();
        Some(name)
    }

    /// Releases every lease past its deadline on the service's clock, as
    /// `memory.model_release` would, and counts them (`memcoord_leases_expired_total`).
    /// Returns (lease, model) of each.
    pub fn sweep_expired_leases(&self) -> Vec<(Uuid, String)> {
        let due = self.models.lock().expired_leases(self.clock.millis());
        if due.is_empty() {
            return Vec::new();
        }
        let _recorded = self.recording();
        let ended: Vec<(Uuid, String)> = {
            let mut models = self.models.lock();
            let now = self.clock.millis();
            let wall = self.now();
            due.into_iter()
                .filter_map(|lease| {
                    // Checked again under the lock: a renew may have come in between.
                    let still_due = models
                        .lease_of(&lease)
                        .and_then(|l| l.limit)
                        .is_some_and(|l| l.deadline_millis <= now);
                    if !still_due {
                        return None;
                    }
                    let name = models.release(&lease)?;
                    if let Some(m) = models.get_mut(&name) {
                        m.last_used_at = wall;
                    }
                    Some((lease, name))
                })
                .collect()
        };
        for (lease, _) in &ended {
            self.end_exports_of_lease(lease);
        }
        self.leases_expired
            .fetch_add(ended.len() as u64, Ordering::Relaxed);
        self.room.raise();
        ended
    }

    /// How many leases have expired since the start.
    pub fn leases_expired_total(&self) -> u64 {
        self.leases_expired.load(Ordering::Relaxed)
    }
}
