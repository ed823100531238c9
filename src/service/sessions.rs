//! Sessions (the contract's section 8.1): what a stdio worker's stdin or one Unix-socket
//! connection holds, and its release when the session ends. The transport opens a session
//! and ends it; the dispatcher notes the leases and exports made in it; each allocation
//! records its holder itself (the engine's books).

use super::MemoryService;
use super::requests::{DeallocateRequest, ExportIdRequest, LeaseRequest};
use crate::domain::{Caller, SessionId, SessionTransport};
use crate::managers::sessions::PRUNE_AT;
use crate::protocol::{ListSessionsResponse, SessionInfo, Timestamp};
use std::sync::Arc;
use uuid::Uuid;

/// What ending a session released.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionEnded {
    /// Allocations freed.
    pub allocations: u64,
    /// Their bytes.
    pub freed_bytes: u64,
    /// Leases released.
    pub leases: u64,
    /// Exports ended.
    pub exports: u64,
}

impl MemoryService {
    /// Opens a session; its requests carry the returned caller (the transport gives it to
    /// its dispatcher: `Dispatcher::with_caller`).
    pub fn open_session(
        &self,
        transport: SessionTransport,
        client_pid: Option<u32>,
    ) -> Arc<Caller> {
        let caller = Caller::session(SessionId::new(), client_pid);
        self.sessions
            .lock()
            .open(Arc::clone(&caller), transport, self.now());
        caller
    }

    /// Whether `caller`'s session is still open (a caller outside a session: always). A
    /// request that waited can outlive its session; what it made then is released at once.
    pub fn session_open(&self, caller: &Caller) -> bool {
        caller
            .session
            .is_none_or(|s| self.sessions.lock().get_mut(&s).is_some())
    }

    /// Notes a lease taken in `caller`'s session (nothing outside one): it is released when
    /// the session ends. False when the session has ended already (the caller releases it).
    pub fn note_lease(&self, caller: &Caller, lease_id: &str) -> bool {
        let (Some(session), Ok(id)) = (caller.session, Uuid::parse_str(lease_id)) else {
            return true;
        };
        let mut sessions = self.sessions.lock();
        let Some(s) = sessions.get_mut(&session) else {
            return false;
        };
        if s.leases.len() >= PRUNE_AT {
            let models = self.models.lock();
            s.leases.retain(|l| models.lease_model(l).is_some());
        }
        s.leases.push(id);
        true
    }

    /// Notes an export made in `caller`'s session: it ends when the session ends. False when
    /// the session has ended already (the caller ends the export).
    pub fn note_export(&self, caller: &Caller, export_id: &str) -> bool {
        let (Some(session), Ok(id)) = (caller.session, Uuid::parse_str(export_id)) else {
            return true;
        };
        let mut sessions = self.sessions.lock();
        let Some(s) = sessions.get_mut(&session) else {
            return false;
        };
        if s.exports.len() >= PRUNE_AT {
            let exports = self.exports.lock();
            s.exports
                .retain(|x| exports.all().any(|live| live.id == *x));
        }
        s.exports.push(id);
        true
    }

    /// Ends a session: its exports end, its leases are released and its allocations that
    /// are not persistent are freed, each as if the client had asked (what is already gone
    /// is skipped). Its requests still waiting for memory are woken and answered at once
    /// (nothing made); one that finishes after this releases what it made itself (the
    /// dispatcher sees the session ended).
    pub fn end_session(&self, session: SessionId) -> SessionEnded {
        let mut ended = SessionEnded::default();
        let noted = self.sessions.lock().end(&session);
        if let Some(s) = &noted {
            for x in &s.exports {
                let req = ExportIdRequest {
                    export_id: x.hyphenated().to_string(),
                };
                if self.unexport(&req).is_ok() {
                    ended.exports += 1;
                }
            }
            for l in &s.leases {
                let req = LeaseRequest {
                    lease_id: l.hyphenated().to_string(),
                };
                if self.model_release(&req).is_ok() {
                    ended.leases += 1;
                }
            }
        }
        let held = self.engine.lock().held_by(&session);
        for allocation_id in held {
            let req = DeallocateRequest {
                allocation_id,
                device_id: None,
            };
            match self.deallocate(&req) {
                Ok(freed) => {
                    ended.allocations += 1;
                    ended.freed_bytes += freed.freed_bytes;
                }
                Err(e) => tracing::warn!("session {session} ended: {}", e.message),
            }
        }
        // Waiters of this session look again, see it ended and give up.
        self.room.raise();
        if ended != SessionEnded::default() {
            tracing::info!(
                "session {session} ended: released {} allocation(s) ({} bytes), {} lease(s), {} export(s)",
                ended.allocations,
                ended.freed_bytes,
                ended.leases,
                ended.exports
            );
        }
        ended
    }

    /// `memory.list_sessions`: every live session, oldest first, with what it holds.
    pub fn list_sessions(&self) -> ListSessionsResponse {
        let holdings = self.engine.lock().session_holdings();
        let sessions = self.sessions.lock();
        let models = self.models.lock();
        let exports = self.exports.lock();
        let sessions = sessions
            .all()
            .into_iter()
            .filter_map(|s| {
                let id = s.caller.session?;
                let (allocation_count, allocated_bytes) =
                    holdings.get(&id).copied().unwrap_or_default();
                Some(SessionInfo {
                    session_id: id.to_string(),
                    tenant: s.caller.tenant.to_string(),
                    client_pid: s.caller.client_pid,
                    transport: s.transport.name().to_string(),
                    started_at: Timestamp(s.started_at),
                    allocation_count,
                    allocated_bytes,
                    lease_count: s
                        .leases
                        .iter()
                        .filter(|l| models.lease_model(l).is_some())
                        .count() as u64,
                    export_count: s
                        .exports
                        .iter()
                        .filter(|x| exports.all().any(|live| live.id == **x))
                        .count() as u64,
                })
            })
            .collect();
        ListSessionsResponse { sessions }
    }
}
