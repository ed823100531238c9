//! Who made a request: its session (a stdio worker's stdin, one Unix-socket connection; none
//! over HTTP), the client's process id and its tenant. The transport sets it once per session;
//! the engine records it on each allocation, so a session's holdings are released when it ends.

use std::sync::{Arc, LazyLock};

/// A session's id: a UUID v4 (written lowercase and hyphenated).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub uuid::Uuid);

impl SessionId {
    /// A new, random id.
    pub fn new() -> Self {
        SessionId(uuid::Uuid::new_v4())
    }
}

impl Default for SessionId {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Display for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// How a session reaches the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SessionTransport {
    /// A stdio worker's stdin and stdout.
    Stdio,
    /// One connection to the Unix-domain socket (`--unix`).
    Unix,
}

impl SessionTransport {
    /// `stdio` or `unix`, as the wire writes it.
    pub fn name(self) -> &'static str {
        match self {
            SessionTransport::Stdio => "stdio",
            SessionTransport::Unix => "unix",
        }
    }
}

/// The tenant of a request that carries no token.
pub const DEFAULT_TENANT: &str = "default";

/// Who made a request.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Caller {
    /// The session it came in on (None: HTTP, or a library call).
    pub session: Option<SessionId>,
    /// The client's process id: the peer's on a Unix socket, the parent's on stdio.
    pub client_pid: Option<u32>,
    /// Its tenant (`default` until tenants are configured).
    pub tenant: Arc<str>,
}

static ANONYMOUS: LazyLock<Arc<Caller>> = LazyLock::new(|| {
    Arc::new(Caller {
        session: None,
        client_pid: None,
        tenant: Arc::from(DEFAULT_TENANT),
    })
});

impl Caller {
    /// A caller of no session, no known process, of the `default` tenant (HTTP, library calls,
    /// the service's own allocations). Shared: cloning it allocates nothing.
    pub fn anonymous() -> Arc<Caller> {
        Arc::clone(&ANONYMOUS)
    }

    /// A caller outside any session, of `tenant` (what an adopted persistent allocation
    /// records: the tenant that made it, in an earlier run).
    pub fn of_tenant(tenant: &str) -> Arc<Caller> {
        if tenant == DEFAULT_TENANT {
            return Self::anonymous();
        }
        Arc::new(Caller {
            session: None,
            client_pid: None,
            tenant: Arc::from(tenant),
        })
    }

    /// The caller of a new session.
    pub fn session(session: SessionId, client_pid: Option<u32>) -> Arc<Caller> {
        Arc::new(Caller {
            session: Some(session),
            client_pid,
            tenant: Arc::from(DEFAULT_TENANT),
        })
    }
}
