//! Tenants on the service (the contract's section 8.2): the declared tenants and their
//! quotas (checked by the engine on every placement), who a token belongs to, and what a
//! tenant may see: its own allocations only, the operator (`admin`) everything.

use super::MemoryService;
use crate::domain::{Caller, SessionId, Tenants, may_see};
use crate::protocol::{ErrorCode, ProtocolError};
use std::sync::Arc;

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
}
