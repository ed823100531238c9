//! Tenants on the service (the contract's section 8.2): the declared tenants and their
//! quotas (checked by the engine on every placement), who a token belongs to, and what a
//! tenant may see: its own allocations only, the operator (`admin`) everything.

use super::MemoryService;
use crate::domain::{Caller, SessionId, Tenants, may_see};
use crate::protocol::{ErrorCode, ProtocolError};
use std::sync::Arc;
use uuid::Uuid;

/// Past this many noted leases and exports, those that ended are forgotten.
const PRUNE_OWNERS_AT: usize = 1024;

impl MemoryService {
    /// The same service with tenants declared: their quotas apply to every allocation and
    /// model load from now on.
    pub fn with_tenants(mut self, tenants: Tenants) -> Self {
        let tenants = Arc::new(tenants);
        self.engine.lock().set_tenants(Arc::clone(&tenants));
        self.tenants = tenants;
        self
    }

    /// The declared tenants (none by default).
    pub fn tenants(&self) -> &Arc<Tenants> {
        &self.tenants
    }

    /// Whether `caller` sees every tenant's allocations: no tenants are declared, or it is
    /// the operator.
    pub fn sees_all(&self, caller: &Caller) -> bool {
        !self.tenants.declared() || &*caller.tenant == crate::domain::ADMIN_TENANT
    }

    /// ALLOCATION_NOT_FOUND, as if it did not exist, when `allocation_id` is another tenant's
    /// and `caller` may not see it; Ok otherwise (an unknown id is left to the action itself).
    pub fn check_visible(&self, caller: &Caller, allocation_id: &str) -> Result<(), ProtocolError> {
        if self.sees_all(caller) {
            return Ok(());
        }
        match self.engine.lock().tenant_of(allocation_id) {
            Some(owner) if !may_see(&caller.tenant, &owner) => Err(ProtocolError::new(
                ErrorCode::AllocationNotFound,
                format!("Allocation {allocation_id} not found"),
            )),
            _ => Ok(()),
        }
    }

    /// Sets a session's tenant (`memory.hello`): list_sessions shows it from now on.
    pub fn set_session_caller(&self, session: &SessionId, caller: Arc<Caller>) {
        if let Some(s) = self.sessions.lock().get_mut(session) {
            s.caller = caller;
        }
    }

    /// Notes the tenant of a lease or export `caller` just made (with tenants declared), so
    /// that no other tenant releases, renews or ends it.
    pub fn note_owner(&self, caller: &Caller, id: &str) {
        let Ok(id) = Uuid::parse_str(id) else {
            return;
        };
        if !self.tenants.declared() {
            return;
        }
        let mut owners = self.owners.lock();
        if owners.len() >= PRUNE_OWNERS_AT {
            let models = self.models.lock();
            let exports = self.exports.lock();
            let live: std::collections::HashSet<Uuid> = exports.all().map(|x| x.id).collect();
            owners.retain(|id, _| models.lease_of(id).is_some() || live.contains(id));
        }
        owners.insert(id, Arc::clone(&caller.tenant));
    }

    /// Whether `caller` may act on the lease or export `id`: it is its own, it is the
    /// operator, or nobody noted it (no tenants, or an unknown id: the action says so itself).
    pub fn owns(&self, caller: &Caller, id: &str) -> bool {
        if self.sees_all(caller) {
            return true;
        }
        let Ok(id) = Uuid::parse_str(id) else {
            return true;
        };
        self.owners
            .lock()
            .get(&id)
            .is_none_or(|owner| may_see(&caller.tenant, owner))
    }
}
