//! The wire shapes of sessions (the contract's section 8.1): `memory.list_sessions`.

use super::Timestamp;
use serde::{Deserialize, Serialize};

/// One live session: a stdio worker's stdin, or one Unix-socket connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct SessionInfo {
    /// Lowercase hyphenated UUID v4.
    pub session_id: String,
    /// Its tenant (`default` without tenants).
    pub tenant: String,
    /// The client's process: the peer's pid on a Unix socket, the parent's on stdio.
    pub client_pid: Option<u32>,
    /// `stdio` or `unix`.
    pub transport: String,
    /// When it began.
    pub started_at: Timestamp,
    /// Its live client allocations (persistent ones included).
    pub allocation_count: u64,
    /// Their bytes.
    pub allocated_bytes: u64,
    /// Its live model leases.
    pub lease_count: u64,
    /// Its live exports.
    pub export_count: u64,
}

/// `memory.list_sessions`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ListSessionsResponse {
    /// Every live session, oldest first.
    pub sessions: Vec<SessionInfo>,
}

/// `memory.hello` (section 8.2): the session and the tenant the token named.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct HelloResponse {
    /// The session the tenant now applies to (null over HTTP, which has no sessions).
    pub session_id: Option<String>,
    /// The tenant of the token; the session's requests belong to it from now on.
    pub tenant: String,
}
