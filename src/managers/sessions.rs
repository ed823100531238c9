//! The live sessions (a stdio worker's stdin, each Unix-socket connection) and the leases and
//! exports each made, so that what a session holds is released when it ends. Its allocations
//! are not listed here: each records its holder itself (the engine's books).

use crate::domain::{Caller, SessionId, SessionTransport};
use rustc_hash::FxHashMap;
use std::sync::Arc;
use std::time::SystemTime;
use uuid::Uuid;

/// Past this many lease or export ids noted, a session's list is pruned of those that ended.
pub const PRUNE_AT: usize = 256;

/// One live session.
#[derive(Debug, Clone)]
pub struct Session {
    /// Who it is: its id, process and tenant.
    pub caller: Arc<Caller>,
    /// How it reaches the service.
    pub transport: SessionTransport,
    /// When it began.
    pub started_at: SystemTime,
    /// The leases it took (some may have been released since).
    pub leases: Vec<Uuid>,
    /// The exports it made (some may have ended since).
    pub exports: Vec<Uuid>,
}

/// The live sessions by id.
#[derive(Debug, Default)]
pub struct SessionTable {
    sessions: FxHashMap<SessionId, Session>,
}

impl SessionTable {
    /// Records a new session.
    pub fn open(&mut self, caller: Arc<Caller>, transport: SessionTransport, now: SystemTime) {
        if let Some(id) = caller.session {
            self.sessions.insert(
                id,
                Session {
                    caller,
                    transport,
                    started_at: now,
                    leases: Vec::new(),
                    exports: Vec::new(),
                },
            );
        }
    }

    /// A live session.
    pub fn get_mut(&mut self, id: &SessionId) -> Option<&mut Session> {
        self.sessions.get_mut(id)
    }

    /// Removes a session, returning what it noted.
    pub fn end(&mut self, id: &SessionId) -> Option<Session> {
        self.sessions.remove(id)
    }

    /// Every live session, oldest first.
    pub fn all(&self) -> Vec<&Session> {
        let mut all: Vec<&Session> = self.sessions.values().collect();
        all.sort_by_key(|s| s.started_at);
        all
    }

    /// How many sessions are live.
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }
}
