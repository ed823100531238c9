//! Defaults that depend on the transport a request came by: the one place that says how a
//! request over HTTP differs from one over a stream (stdio, a Unix socket).
//!
//! A stream is a session: what it holds ends with it, so a lease may last until released. An
//! HTTP client has no session the service can see end, so a lease taken over HTTP without a
//! `ttl_seconds` gets [`HTTP_LEASE_TTL_SECONDS`]: a client that dies cannot pin a model forever.
//! Each transport gives its [`Dispatcher`](crate::dispatch::Dispatcher) its defaults; the
//! dispatcher puts them in every request's [`Context`](super::Context), where an action's
//! handler reads them (parsing stays transport-blind: the same `data` parses to the same
//! request everywhere, and an absent field stays absent until the handler fills it in).

/// A lease's time limit over HTTP when `memory.model_acquire` gives none (contract 8.5).
pub const HTTP_LEASE_TTL_SECONDS: f64 = 300.0;

/// What a transport fills in for fields a request leaves out.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct TransportDefaults {
    /// `memory.model_acquire`'s `ttl_seconds` when absent or null (`None`: until released).
    pub lease_ttl_seconds: Option<f64>,
}

impl TransportDefaults {
    /// A stream's (stdio, a Unix socket): leases last until released or the session ends.
    pub const STREAM: TransportDefaults = TransportDefaults {
        lease_ttl_seconds: None,
    };

    /// HTTP's: leases last [`HTTP_LEASE_TTL_SECONDS`] unless the request says otherwise.
    pub const HTTP: TransportDefaults = TransportDefaults {
        lease_ttl_seconds: Some(HTTP_LEASE_TTL_SECONDS),
    };
}
